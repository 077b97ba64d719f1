"""One expert worker as the router sees it: a synchronous gRPC channel, its `Experts` stream, and the
requests waiting for an answer on it.

No event loop sits between the model thread and the worker. `send` puts the request on the
stream's outbox, which gRPC's own sender thread drains, and returns a `concurrent.futures.Future`;
one reader thread per connection reads the answers (grpc's sync API releases the GIL while it
waits) and resolves the futures by request id, so the model thread wakes up once per answer.
On two shared cores every thread wake-up costs real time: the asyncio path paid about six per
round trip (model thread, router loop, worker loop, worker compute thread and back), this one three.

A connection that fails (the stream ends or errors, an answer times out) fails every request
waiting on it with `ShardUnavailable`, marks itself down and is re-dialled by its keeper thread,
which checks the worker's identity again before the connection takes traffic.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import grpc

from nextserve.proto.v1 import experts_pb2, experts_pb2_grpc
from nextserve.worker.fingerprint import FingerprintMismatch, check_worker_identity
from nextserve.worker.server import GRPC_OPTIONS

log = logging.getLogger("nextserve.router")

RECONNECT_INTERVAL = 0.5  # seconds between attempts to reach a worker that is down


class ShardUnavailable(Exception):
    """No healthy worker can compute some of the tokens: the message names the shards."""


@dataclass(frozen=True)
class Reply:
    response: experts_pb2.ExpertResponse
    seconds: float  # from handing the request to the stream to the answer's arrival


class _Stream:
    """One open `Experts` call: its channel, the outbox its request iterator drains, its answers."""

    def __init__(self, channel: grpc.Channel):
        self.channel = channel
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.responses = experts_pb2_grpc.ExpertWorkerStub(channel).Experts(self._requests())

    def _requests(self) -> Iterator[experts_pb2.ExpertRequest]:
        while (message := self.outbox.get()) is not None:
            yield message

    def close(self) -> None:
        self.outbox.put(None)  # ends the request iterator, so gRPC's sender thread exits
        self.responses.cancel()
        self.channel.close()


class WorkerConnection:
    def __init__(self, shard: int, address: str, fingerprint: str, experts: tuple[int, ...], dtype: str,
                 request_timeout: float, on_change: Callable[[], None]):
        self.shard, self.address = shard, address
        self.fingerprint, self.experts, self.dtype = fingerprint, experts, dtype
        self.request_timeout = request_timeout
        self.on_change = on_change  # called from whichever thread saw the change
        self.healthy = False
        self.last_error = "not connected yet"
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards the fields below, and `healthy` with them
        self._pending: dict[int, tuple[Future, float]] = {}  # request id -> (future, perf_counter at send)
        self._stream: _Stream | None = None
        self._dialing: grpc.Channel | None = None  # a connect in progress: close() cuts it short
        self._closed = threading.Event()
        self._wake = threading.Event()  # set when the connection goes down (or closes): the keeper acts
        self._keeper: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"shard {self.shard} ({self.address})"

    # -- connecting -------------------------------------------------------------------------------------

    def connect(self, timeout: float = 5.0) -> None:
        """Check the worker's identity, then open the stream (blocks). Raises FingerprintMismatch,
        grpc.RpcError, or ShardUnavailable when the connection was closed meanwhile."""
        channel = grpc.insecure_channel(self.address, options=GRPC_OPTIONS)
        with self._lock:
            self._dialing = channel
        try:
            if self._closed.is_set():
                raise self._unavailable("the router is closing")
            info = experts_pb2_grpc.ExpertWorkerStub(channel).Info(experts_pb2.InfoRequest(), timeout=timeout,
                                                                  wait_for_ready=True)
            check_worker_identity(info, address=self.address, fingerprint=self.fingerprint, shard=self.shard,
                                  experts=self.experts, dtype=self.dtype)
            stream = _Stream(channel)
        except BaseException:
            channel.close()
            raise
        finally:
            with self._lock:
                self._dialing = None
        with self._lock:
            if self._closed.is_set():
                stream.close()
                raise self._unavailable("the router is closing")
            self._stream = stream
            self.healthy, self.last_error = True, ""
        threading.Thread(target=self._read, args=(stream,), name=f"shard-{self.shard}-answers", daemon=True).start()
        log.info("connected to %r", self)
        self.on_change()

    def keep_connected(self) -> None:
        """From now on, re-dial whenever the connection is down (a restarted pod, a new IP behind DNS)."""
        if self._keeper is None:
            self._keeper = threading.Thread(target=self._keep, name=f"shard-{self.shard}-keeper", daemon=True)
            self._keeper.start()

    def _keep(self) -> None:
        while not self._closed.is_set():
            self._wake.clear()  # before looking: a failure after the look sets it again
            if self.healthy:
                self._wake.wait()
                continue
            try:
                self.connect(timeout=max(RECONNECT_INTERVAL, 2.0))
                continue
            except FingerprintMismatch as e:
                self.last_error = str(e)
                log.error("%s", e)
            except Exception as e:  # noqa: BLE001 - unreachable, refused, closing: try again
                if not self._closed.is_set():
                    self.last_error = describe(e)
            self._closed.wait(RECONNECT_INTERVAL)

    # -- requests (from the model thread) ---------------------------------------------------------------

    def send(self, message: experts_pb2.ExpertRequest) -> Future:
        """Put `message` on the stream (its request_id is set here) and return at once; the future's
        result is the Reply, or its exception ShardUnavailable."""
        future: Future = Future()
        with self._lock:
            stream = self._stream
            if stream is None:
                future.set_exception(self._unavailable(self.last_error))
                return future
            message.request_id = next(self._ids)
            self._pending[message.request_id] = (future, time.perf_counter())
            stream.outbox.put(message)
        return future

    def expire(self, request_id: int) -> None:
        """The answer to `request_id` is overdue: the worker counts as failed (every request waiting on
        it fails; its rows can go to a replica) and is re-dialled."""
        with self._lock:
            stream = self._stream if request_id in self._pending else None
        if stream is not None:
            self._fail(stream, f"no answer within {self.request_timeout:g} s")

    def _read(self, stream: _Stream) -> None:
        try:
            for response in stream.responses:
                with self._lock:
                    waiting = self._pending.pop(response.request_id, None)
                if waiting is not None:
                    future, sent = waiting
                    future.set_result(Reply(response, time.perf_counter() - sent))
            reason = "the worker closed the stream"
        except Exception as e:  # noqa: BLE001 - RpcError above all: the worker is gone, restarting or draining
            reason = describe(e)
        self._fail(stream, reason)

    def _fail(self, stream: _Stream, reason: str) -> None:
        with self._lock:
            if self._stream is not stream:
                return  # that stream already failed, or the connection was closed
            self._stream = None
            self.healthy, self.last_error = False, reason
            waiting, self._pending = self._pending, {}
        stream.close()
        if self._closed.is_set():
            return
        log.warning("%r is down: %s", self, reason)
        error = self._unavailable(reason)
        for future, _ in waiting.values():
            future.set_exception(error)
        self.on_change()
        self._wake.set()

    def _unavailable(self, reason: str) -> ShardUnavailable:
        return ShardUnavailable(f"expert shard {self.shard} ({self.address}) is unavailable: {reason}")

    def close(self) -> None:
        """Fail what is waiting (a forward pass then fails now, not at its timeout) and stop re-dialling."""
        self._closed.set()
        self._wake.set()
        with self._lock:
            stream, self._stream = self._stream, None
            waiting, self._pending = self._pending, {}
            dialing, self.healthy, self.last_error = self._dialing, False, "the router is closing"
        error = ShardUnavailable(f"expert shard {self.shard} ({self.address}): the router is closing")
        for future, _ in waiting.values():
            future.set_exception(error)
        if stream is not None:
            stream.close()
        if dialing is not None:
            dialing.close()


def describe(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"
