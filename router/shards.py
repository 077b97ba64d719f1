"""Connections to the expert workers, and the split of each MoE layer's tokens between them.

Every worker gets one long-lived bidirectional `Experts` stream; requests on it are matched to
responses by id, so the router can have one request per layer in flight to every worker at once.
A connection that fails (the stream ends, a write fails, a response times out) fails its pending
requests with `ShardUnavailable`, marks itself down and reconnects in the background, checking the
fingerprint again before it takes traffic.

`ShardPool.dispatch` is called from the model thread (inside the forward pass); the network I/O runs
on the event loop that owns the channels.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from nextserve.proto import tensors
from nextserve.proto.v1 import experts_pb2, experts_pb2_grpc
from nextserve.worker.plan import ExpertPlan
from nextserve.worker.server import GRPC_OPTIONS

log = logging.getLogger("nextserve.router")


class ShardUnavailable(Exception):
    """No healthy worker can compute some of the tokens: the message names the shards."""


class FingerprintMismatch(Exception):
    """A worker serves another checkpoint (or another shard of the plan) than the router expects."""


@dataclass
class DispatchStats:
    """Per-layer dispatch latency samples (seconds) and bytes sent and received, for the benchmark."""
    latencies: list[float]
    bytes_sent: int = 0
    bytes_received: int = 0


class WorkerConnection:
    def __init__(self, shard: int, address: str, fingerprint: str, experts: tuple[int, ...],
                 request_timeout: float, on_change: Callable[[], None]):
        self.shard, self.address = shard, address
        self.fingerprint, self.experts = fingerprint, experts
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
        if info.fingerprint != self.fingerprint:
            raise FingerprintMismatch(
                f"worker {self.address} (shard {self.shard}) serves checkpoint fingerprint {info.fingerprint}, "
                f"but the router's checkpoint has fingerprint {self.fingerprint}: point both at the same checkpoint")
        if info.shard != self.shard or tuple(info.expert_ids) != self.experts:
            raise FingerprintMismatch(
                f"worker {self.address} reports shard {info.shard} with {len(info.expert_ids)} experts, but the "
                f"router's plan gives shard {self.shard} {len(self.experts)} experts: the plans differ")

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

    def __init__(self, plan: ExpertPlan, workers: dict[int, list[str]], fingerprint: str,
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
        self.connections = [WorkerConnection(s, address, fingerprint, plan.experts_of(s), request_timeout,
                                             self._changed)
                            for s in sorted(workers) for address in workers[s]]
        # expert -> indices into self.connections that hold it
        self._holders: list[list[int]] = [[] for _ in range(plan.num_experts)]
        for i, c in enumerate(self.connections):
            for e in c.experts:
                self._holders[e].append(i)
        self.stats = DispatchStats([])
        self.record_stats = False
        # Observability hooks (nextserve.router.telemetry sets them): on_dispatch(layer, expert_ids) from the
        # model thread for every layer, on_reply(shard, request, seconds, failed) on the event loop for every
        # shard's answer, and the W3C trace context sent with the current step's requests ({}: not traced).
        self.on_dispatch: Callable[[int, torch.Tensor], None] | None = None
        self.on_reply: Callable[[int, experts_pb2.ExpertRequest, float, bool], None] | None = None
        self.trace_context: dict[str, str] = {}
        self._owners = self._choose_owners()

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
        return all(any(self.connections[i].healthy for i in holders) for holders in self._holders)

    def down_shards(self) -> list[str]:
        return [f"{c!r}: {c.last_error}" for c in self.connections if not c.healthy]

    def _changed(self) -> None:
        # Ownership only changes with health: recompute it here, not on every layer of every step.
        self._owners = self._choose_owners()
        healthy = self.healthy
        for listener in self.listeners:
            listener(healthy)

    # -- dispatch (from the model thread) -------------------------------------------------------------

    def dispatch(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum over the k slots of each token of weight * expert(hidden), computed by the workers.

        hidden [T, H]; expert_ids [T, k] global; weights [T, k] fp32. Returns [T, H] in hidden's dtype.
        A worker that fails mid-request is marked down and its share is recomputed on a replica, if
        any holds the same experts; otherwise ShardUnavailable names the shard.
        """
        assert self.loop is not None, "start() the pool first"
        start = time.perf_counter()
        if self.on_dispatch is not None:
            self.on_dispatch(layer, expert_ids)
        for _ in range(len(self.connections) + 1):
            parts = self._split(layer, hidden, expert_ids, weights)
            future = asyncio.run_coroutine_threadsafe(self._send(parts), self.loop)
            try:
                # each request is bounded by request_timeout; this bounds a loop that stopped altogether
                results = future.result(self.request_timeout + 5.0)
            except TimeoutError:
                future.cancel()
                raise ShardUnavailable("the router's network loop did not answer; is it shutting down?") from None
            failures = [r for r in results if isinstance(r, ShardUnavailable)]
            if not failures:
                break
            if not self.healthy:
                raise failures[0]
            log.warning("layer %d: retrying on replicas after: %s", layer, failures[0])
        else:
            raise ShardUnavailable("expert dispatch kept failing: " + "; ".join(self.down_shards()))
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        for (_, rows, _), response in zip(parts, results):
            out.index_add_(0, rows, tensors.from_wire(response.output, hidden.device).float())
        if self.record_stats:
            self.stats.latencies.append(time.perf_counter() - start)
            self.stats.bytes_sent += sum(m.ByteSize() for _, _, m in parts)
            self.stats.bytes_received += sum(r.ByteSize() for r in results)
        return out.to(hidden.dtype)

    def _split(self, layer, hidden, expert_ids, weights):
        """[(connection, token rows, request)] with each (token, slot) assigned to exactly one worker."""
        slot_owner = self._owners[expert_ids.cpu()]
        if bool((slot_owner < 0).any()):
            experts = sorted(set(expert_ids.cpu()[slot_owner < 0].tolist()))
            shards = sorted({s for e in experts for s in self.plan.shards_of(e)})
            raise ShardUnavailable(f"expert shard(s) {shards} unavailable (experts {experts[:8]}): "
                                   + "; ".join(self.down_shards()))
        parts = []
        for index in slot_owner.unique().tolist():
            mine = slot_owner == index
            rows = mine.any(dim=1).nonzero().squeeze(1)
            ids = torch.where(mine[rows], expert_ids.cpu()[rows], -1).to(torch.int32)
            rows_dev = rows.to(hidden.device)
            message = experts_pb2.ExpertRequest(
                layer=layer, hidden=tensors.to_wire(hidden[rows_dev]), expert_ids=tensors.to_wire(ids),
                weights=tensors.to_wire(weights[rows_dev].float()))
            parts.append((self.connections[index], rows_dev, message))
        return parts

    def _choose_owners(self) -> torch.Tensor:
        """[num_experts]: expert -> index of the first healthy connection holding it (plan order), -1 if none.

        The model thread dispatches one layer at a time, so no request is in flight when a layer is
        split: replicas are standbys that take over when the first holder fails."""
        owners = [next((i for i in holders if self.connections[i].healthy), -1) for holders in self._holders]
        return torch.tensor(owners, dtype=torch.int64)

    async def _send(self, parts) -> list:
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
        return await asyncio.gather(*(one(c, m) for c, _, m in parts))


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"
