"""Connections to the expert workers, and the split of each MoE layer's tokens between them.

Every worker gets one long-lived bidirectional `Experts` stream; requests on it are matched to
responses by id, so the router can have one request per layer in flight to every worker at once.
A connection that fails (the stream ends, a write fails, a response times out) fails its pending
requests with `ShardUnavailable`, marks itself down and reconnects in the background, checking the
fingerprint again before it takes traffic.

`ShardPool.dispatch` is called from the model thread (inside the forward pass): it cuts the layer's
tokens between workers (`dispatch.py`), hands the requests to the event loop that owns the channels
and returns at once; `LayerDispatch.result()` waits for the partial sums (the model computes the
shared expert in between), retries what a failed worker had on a healthy replica and adds them up.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from nextserve.proto import tensors
from nextserve.proto.v1 import experts_pb2, experts_pb2_grpc
from nextserve.worker.fingerprint import FingerprintMismatch, check_worker_identity
from nextserve.worker.plan import ExpertPlan
from nextserve.worker.server import GRPC_OPTIONS

from .dispatch import Assignment, Routing, add_partials, split_tokens, to_host, unowned_experts
from .overlap import ComputeBaton

log = logging.getLogger("nextserve.router")


class ShardUnavailable(Exception):
    """No healthy worker can compute some of the tokens: the message names the shards."""


@dataclass
class DispatchStats:
    """Per-layer dispatch latency samples (seconds) and bytes sent and received, for the benchmark."""
    latencies: list[float]
    bytes_sent: int = 0
    bytes_received: int = 0


class WorkerConnection:
    def __init__(self, shard: int, address: str, fingerprint: str, experts: tuple[int, ...], dtype: str,
                 request_timeout: float, on_change: Callable[[], None]):
        self.shard, self.address = shard, address
        self.fingerprint, self.experts, self.dtype = fingerprint, experts, dtype
        self.request_timeout = request_timeout
        self.on_change = on_change
        self.healthy = False
        self.last_error = "not connected yet"
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._channel: grpc.aio.Channel | None = None
        self._call = None
        self._write_lock = asyncio.Lock()
        self._reader: asyncio.Task | None = None
        self._reconnect: asyncio.Task | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"shard {self.shard} ({self.address})"

    async def connect(self, timeout: float = 5.0) -> None:
        """Check the worker's identity, then open the stream. Raises FingerprintMismatch or grpc.aio.AioRpcError."""
        channel = grpc.aio.insecure_channel(self.address, options=GRPC_OPTIONS)
        try:
            stub = experts_pb2_grpc.ExpertWorkerStub(channel)
            info = await stub.Info(experts_pb2.InfoRequest(), timeout=timeout, wait_for_ready=True)
            self._check_identity(info)
            call = stub.Experts()
        except BaseException:
            await channel.close()
            raise
        self._channel, self._call = channel, call
        self._reader = asyncio.create_task(self._read_responses(call))
        self.healthy, self.last_error = True, ""
        log.info("connected to %r", self)
        self.on_change()

    def _check_identity(self, info: experts_pb2.InfoResponse) -> None:
        check_worker_identity(info, address=self.address, fingerprint=self.fingerprint, shard=self.shard,
                              experts=self.experts, dtype=self.dtype)

    async def _read_responses(self, call) -> None:
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise ConnectionError("the worker closed the stream")
                future = self._pending.pop(response.request_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # AioRpcError, ConnectionError: the worker is gone or restarting
            self._fail(_describe(e))

    def _fail(self, reason: str) -> None:
        if not self.healthy and self._call is None:
            return
        self.healthy, self.last_error = False, reason
        log.warning("%r is down: %s", self, reason)
        error = ShardUnavailable(f"expert shard {self.shard} ({self.address}) is unavailable: {reason}")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        call, channel, self._call, self._channel = self._call, self._channel, None, None
        if call is not None:
            call.cancel()
        if channel is not None:
            asyncio.ensure_future(channel.close())
        self.on_change()
        if not self._closed and (self._reconnect is None or self._reconnect.done()):
            self._reconnect = asyncio.create_task(self.reconnect_forever())

    async def reconnect_forever(self, interval: float = 0.5) -> None:
        """Retry until the worker answers with the right fingerprint (a restarted pod, a new IP behind DNS)."""
        while not self._closed and not self.healthy:
            try:
                await self.connect(timeout=max(interval, 2.0))
                return
            except FingerprintMismatch as e:
                self.last_error = str(e)
                log.error("%s", e)
            except Exception as e:
                self.last_error = _describe(e)
            await asyncio.sleep(interval)

    async def request(self, message: experts_pb2.ExpertRequest) -> experts_pb2.ExpertResponse:
        if not self.healthy or self._call is None:
            raise ShardUnavailable(f"expert shard {self.shard} ({self.address}) is unavailable: {self.last_error}")
        message.request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[message.request_id] = future
        try:
            try:
                async with self._write_lock:
                    await self._call.write(message)
            except Exception as e:
                self._fail(f"sending failed: {_describe(e)}")
            try:
                response = await asyncio.wait_for(future, self.request_timeout)
            except asyncio.TimeoutError:
                self._fail(f"no answer within {self.request_timeout:g} s")
                raise ShardUnavailable(f"expert shard {self.shard} ({self.address}) did not answer within "
                                       f"{self.request_timeout:g} s") from None
        finally:
            self._pending.pop(message.request_id, None)
        if response.error:
            # A worker that rejects a well-formed request disagrees with the router about the model.
            raise ShardUnavailable(f"expert shard {self.shard} ({self.address}) rejected a request: {response.error}")
        return response

    async def close(self) -> None:
        self._closed = True
        for future in self._pending.values():  # a forward pass waiting on them fails now, not at its timeout
            if not future.done():
                future.set_exception(ShardUnavailable(f"expert shard {self.shard} ({self.address}): the router is closing"))
        self._pending.clear()
        for task in (self._reader, self._reconnect):
            if task is not None:
                task.cancel()
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close()
        self.healthy = False


class ShardPool:
    """All worker connections and the expert plan: splits a layer's routed tokens between workers."""

    def __init__(self, plan: ExpertPlan, workers: dict[int, list[str]], fingerprint: str, dtype: str,
                 request_timeout: float = 60.0):
        missing = [s for s in plan.shard_indices if not workers.get(s)]
        if missing:
            raise ValueError(f"no worker address given for plan shards {missing}: every expert must be reachable")
        unknown = sorted(set(workers) - set(plan.shard_indices))
        if unknown:
            raise ValueError(f"workers given for shards {unknown}, which the plan does not have "
                             f"(plan shards: {plan.shard_indices})")
        self.plan, self.fingerprint = plan, fingerprint
        self.loop: asyncio.AbstractEventLoop | None = None
        self.request_timeout = request_timeout
        self.listeners: list[Callable[[bool], None]] = []
        self.connections = [WorkerConnection(s, address, fingerprint, plan.experts_of(s), dtype, request_timeout,
                                             self._changed)
                            for s in sorted(workers) for address in workers[s]]
        self.stats = DispatchStats([])
        self.record_stats = False
        self._turns = itertools.count()
        self.routing = self._route()
        # handed to the other micro-batch while a layer's tokens are away (when two ping-pong; see overlap.py)
        self.baton = ComputeBaton()
        # Observability hooks (nextserve.router.telemetry sets them): on_dispatch(layer, expert_ids) from the
        # model thread for every layer, on_reply(shard, request, seconds, failed) on the event loop for every
        # shard's answer, and the W3C trace context sent with the current step's requests ({}: not traced).
        self.on_dispatch: Callable[[int, torch.Tensor], None] | None = None
        self.on_reply: Callable[[int, experts_pb2.ExpertRequest, float, bool], None] | None = None
        self.trace_context: dict[str, str] = {}

    # -- lifecycle (on the event loop) --------------------------------------------------------------

    async def start(self, first_contact_timeout: float = 5.0) -> None:
        """Contact every worker once. A fingerprint mismatch is fatal (raised); an unreachable worker is
        retried in the background while the pool reports not healthy."""
        self.loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(c.connect(first_contact_timeout) for c in self.connections),
                                       return_exceptions=True)
        mismatches = [r for r in results if isinstance(r, FingerprintMismatch)]
        if mismatches:
            await self.close()
            raise FingerprintMismatch("; ".join(str(m) for m in mismatches))
        for c, r in zip(self.connections, results):
            if isinstance(r, BaseException):
                c.last_error = _describe(r)
                log.warning("%r is not reachable yet (%s); retrying in the background", c, c.last_error)
                c._reconnect = asyncio.create_task(c.reconnect_forever())

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.connections))

    @property
    def healthy(self) -> bool:
        """Every expert has at least one healthy worker."""
        return bool((self.routing.owner >= 0).all())

    def down_shards(self) -> list[str]:
        return [f"{c!r}: {c.last_error}" for c in self.connections if not c.healthy]

    def _changed(self) -> None:
        # Routing only changes with health: rebuild it here, not on every layer of every step. The
        # model thread reads `self.routing` once per split; replacing it whole keeps that read consistent.
        self.routing = self._route()
        healthy = self.healthy
        for listener in self.listeners:
            listener(healthy)

    def _route(self) -> Routing:
        """Each expert's owner: the first shard in plan order that holds it and has a healthy replica;
        every healthy replica of an owner shard shares its tokens (none stands by)."""
        replicas: dict[int, tuple[int, ...]] = {}
        for i, c in enumerate(self.connections):
            if c.healthy:
                replicas[c.shard] = replicas.get(c.shard, ()) + (i,)
        owner = [next((s for s in self.plan.shards_of(e) if s in replicas), -1) for e in range(self.plan.num_experts)]
        return Routing(torch.tensor(owner, dtype=torch.int64), replicas)

    # -- dispatch (from the model thread) -------------------------------------------------------------

    def dispatch(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> "LayerDispatch":
        """Start each token's weighted sum over its k routed experts on the workers; returns at once.

        hidden [T, H] in the serving dtype (it travels in it); expert_ids [T, k] global; weights [T, k]
        fp32. `result()` of the returned LayerDispatch gives the [T, H] fp32 sum, or raises
        ShardUnavailable naming the shard that no healthy worker can stand in for.
        """
        assert self.loop is not None, "start() the pool first"
        hidden_host, ids_host, weights_host = to_host(hidden, expert_ids, weights)
        if self.on_dispatch is not None:
            self.on_dispatch(layer, ids_host)
        return LayerDispatch(self, layer, hidden_host, ids_host, weights_host, device=hidden.device)

    def _requests(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                  rows: torch.Tensor) -> list[tuple[Assignment, experts_pb2.ExpertRequest]]:
        """The requests for the slots of expert_ids [R, k] (-1 = nothing to do) of the layer's rows [R].
        Raises ShardUnavailable when an expert named has no healthy holder."""
        routing = self.routing
        unowned = unowned_experts(routing, expert_ids)
        if unowned:
            shards = sorted({s for e in unowned for s in self.plan.shards_of(e)})
            raise ShardUnavailable(f"expert shard(s) {shards} unavailable (experts {unowned[:8]}): "
                                   + "; ".join(self.down_shards()))
        requests = []
        for part in split_tokens(routing, expert_ids, next(self._turns)):
            part = Assignment(part.shard, part.connection, rows[part.rows], part.expert_ids)
            requests.append((part, experts_pb2.ExpertRequest(
                layer=layer, hidden=tensors.to_wire(hidden[part.rows]), expert_ids=tensors.to_wire(part.expert_ids),
                weights=tensors.to_wire(weights[part.rows]))))
        return requests

    def _send(self, requests) -> concurrent.futures.Future:
        async def one(connection, message):
            if self.trace_context:
                message.trace_context.update(self.trace_context)
            start = time.perf_counter()
            try:
                result = await connection.request(message)
            except ShardUnavailable as e:
                result = e
            if self.on_reply is not None:
                self.on_reply(connection.shard, message, time.perf_counter() - start, isinstance(result, Exception))
            return result

        async def every():
            return await asyncio.gather(*(one(self.connections[a.connection], m) for a, m in requests))
        return asyncio.run_coroutine_threadsafe(every(), self.loop)


class LayerDispatch:
    """One MoE layer's routed tokens, sent to the workers; `result()` waits for and adds their partials."""

    def __init__(self, pool: ShardPool, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor, device: torch.device):
        # hidden and weights: the host copies, kept to resend a failed worker's rows
        self.pool, self.layer, self.device = pool, layer, device
        self.hidden, self.weights = hidden, weights
        self.started = time.perf_counter()
        self.requests = pool._requests(layer, hidden, expert_ids, weights, torch.arange(hidden.shape[0]))
        self.future = pool._send(self.requests)

    def result(self) -> torch.Tensor:
        """[T, H] fp32 on the model's device. A worker that failed is marked down (by its connection) and
        its rows go to a healthy replica or another holder of its experts; ShardUnavailable otherwise,
        and at once for a request that a healthy worker rejected."""
        pool, T, H = self.pool, self.hidden.shape[0], self.hidden.shape[1]
        partials, sent, received = [], 0, 0
        requests, future = self.requests, self.future
        for _ in range(len(pool.connections) + 1):
            try:
                # each request is bounded by request_timeout; this bounds a loop that stopped altogether
                with pool.baton.away():
                    responses = future.result(pool.request_timeout + 5.0)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise ShardUnavailable("the router's network loop did not answer; is it shutting down?") from None
            failed = []
            for (part, message), response in zip(requests, responses):
                if isinstance(response, ShardUnavailable):
                    failed.append((part, response))
                    continue
                partials.append((part, self._partial(part, response)))
                sent, received = sent + message.ByteSize(), received + response.ByteSize()
            if not failed:
                break
            log.warning("layer %d: moving %d rows to healthy replicas after: %s", self.layer,
                        sum(len(p.rows) for p, _ in failed), failed[0][1])
            requests = []
            for part, error in failed:
                if pool.connections[part.connection].healthy:
                    raise error  # a worker that is up but rejected the request: resending cannot help
                try:
                    requests += pool._requests(self.layer, self.hidden, part.expert_ids, self.weights, part.rows)
                except ShardUnavailable:
                    raise error from None  # names the shard and the address that failed, and why
            future = pool._send(requests)
        else:
            raise ShardUnavailable("expert dispatch kept failing: " + "; ".join(pool.down_shards()))
        if pool.record_stats:
            pool.stats.latencies.append(time.perf_counter() - self.started)
            pool.stats.bytes_sent += sent
            pool.stats.bytes_received += received
        return add_partials(T, H, partials).to(self.device)

    def _partial(self, part: Assignment, response: experts_pb2.ExpertResponse) -> torch.Tensor:
        partial = tensors.from_wire(response.output)
        expected = (len(part.rows), self.hidden.shape[1])
        if partial.dtype != torch.float32 or tuple(partial.shape) != expected:
            connection = self.pool.connections[part.connection]
            raise ShardUnavailable(f"expert shard {part.shard} ({connection.address}) answered with a {partial.dtype} "
                                   f"tensor of shape {list(partial.shape)}, expected float32 {list(expected)}: "
                                   f"is it an older worker version?")
        return partial


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"
