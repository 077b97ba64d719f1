"""The expert workers of a router, and the split of each MoE layer's tokens between them.

`ShardPool.dispatch` is called from the model thread (inside the forward pass): it cuts the layer's
tokens between workers (`dispatch.py`), puts one request per worker on that worker's stream
(`connection.py`) and returns at once; `LayerDispatch.result()` waits for the partial sums (the model
computes the shared expert in between), retries what a failed worker had on a healthy replica and
adds them up. Nothing on that path goes through an event loop: the model thread sends, and each
connection's reader thread hands it the answers.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nextserve.proto import tensors
from nextserve.proto.v1 import experts_pb2
from nextserve.worker.fingerprint import FingerprintMismatch
from nextserve.worker.plan import ExpertPlan

from .connection import Reply, ShardUnavailable, WorkerConnection, describe
from .dispatch import Assignment, Routing, add_partials, split_tokens, to_host, unowned_experts
from .overlap import ComputeBaton

log = logging.getLogger("nextserve.router")

__all__ = ["DispatchStats", "LayerDispatch", "ShardPool", "ShardUnavailable"]


@dataclass
class DispatchStats:
    """Per-layer dispatch latency samples (seconds) and bytes sent and received, for the benchmark."""
    latencies: list[float]
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(frozen=True)
class _Sent:
    """One request on its way: which rows it carries, the message, and where its answer will be."""
    part: Assignment
    message: experts_pb2.ExpertRequest
    future: concurrent.futures.Future
    at: float  # perf_counter when it was handed to the stream


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
        if not request_timeout > 0:
            raise ValueError(f"the expert request timeout must be positive, got {request_timeout}")
        self.plan, self.fingerprint = plan, fingerprint
        # The loop start() ran on: listeners are called there, whichever thread saw the change.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.request_timeout = request_timeout
        self.listeners: list[Callable[[bool], None]] = []
        self._routing_lock = threading.Lock()
        self.connections = [WorkerConnection(s, address, fingerprint, plan.experts_of(s), dtype, request_timeout,
                                             self._changed)
                            for s in sorted(workers) for address in workers[s]]
        self.stats = DispatchStats([])
        self.record_stats = False
        self._turns = itertools.count()
        self.routing = self._route()
        # handed to the other micro-batch while a layer's tokens are away (when two ping-pong; see overlap.py)
        self.baton = ComputeBaton()
        # Observability hooks (nextserve.router.telemetry sets them), both called from the model thread:
        # on_dispatch(layer, expert_ids) for every layer, on_reply(shard, request, seconds, failed) for every
        # shard's answer; and the W3C trace context sent with the current step's requests ({}: not traced).
        self.on_dispatch: Callable[[int, torch.Tensor], None] | None = None
        self.on_reply: Callable[[int, experts_pb2.ExpertRequest, float, bool], None] | None = None
        self.trace_context: dict[str, str] = {}

    # -- lifecycle (on the event loop) --------------------------------------------------------------

    async def start(self, first_contact_timeout: float = 5.0) -> None:
        """Contact every worker once. A fingerprint mismatch is fatal (raised); an unreachable worker is
        retried in the background while the pool reports not healthy."""
        self.loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(asyncio.to_thread(c.connect, first_contact_timeout)
                                         for c in self.connections), return_exceptions=True)
        mismatches = [r for r in results if isinstance(r, FingerprintMismatch)]
        if mismatches:
            await self.close()
            raise FingerprintMismatch("; ".join(str(m) for m in mismatches))
        for c, r in zip(self.connections, results):
            if isinstance(r, BaseException):
                c.last_error = describe(r)
                log.warning("%r is not reachable yet (%s); retrying in the background", c, c.last_error)
            c.keep_connected()

    async def close(self) -> None:
        for c in self.connections:
            c.close()

    @property
    def healthy(self) -> bool:
        """Every expert has at least one healthy worker."""
        return bool((self.routing.owner >= 0).all())

    def down_shards(self) -> list[str]:
        return [f"{c!r}: {c.last_error}" for c in self.connections if not c.healthy]

    def _changed(self) -> None:
        # Routing only changes with health: rebuild it here, not on every layer of every step. The
        # model thread reads `self.routing` once per split; replacing it whole keeps that read consistent.
        # Connections change from their own threads: the lock keeps a late rebuild from overwriting a
        # newer one, and the listeners hear of the changes in the order they happened.
        with self._routing_lock:
            self.routing = self._route()
            healthy = self.healthy
            for listener in self.listeners:
                try:
                    self.loop.call_soon_threadsafe(listener, healthy)
                except RuntimeError:  # the loop is closed: nobody is listening any more
                    pass

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
                  rows: torch.Tensor | None = None) -> list[tuple[Assignment, experts_pb2.ExpertRequest]]:
        """The requests for the slots of expert_ids [R, k] (-1 = nothing to do) of the layer's rows [R]
        (None: all the layer's rows, in order). Raises ShardUnavailable when an expert named has no
        healthy holder."""
        routing = self.routing
        unowned = unowned_experts(routing, expert_ids)
        if unowned:
            shards = sorted({s for e in unowned for s in self.plan.shards_of(e)})
            raise ShardUnavailable(f"expert shard(s) {shards} unavailable (experts {unowned[:8]}): "
                                   + "; ".join(self.down_shards()))
        requests = []
        for part in split_tokens(routing, expert_ids, next(self._turns)):
            if rows is not None:
                part = Assignment(part.shard, part.connection, rows[part.rows], part.expert_ids)
            requests.append((part, experts_pb2.ExpertRequest(
                layer=layer, hidden=tensors.rows_to_wire(hidden, part.rows),
                expert_ids=tensors.to_wire(part.expert_ids), weights=tensors.rows_to_wire(weights, part.rows),
                trace_context=self.trace_context)))
        return requests

    def _send(self, requests: list[tuple[Assignment, experts_pb2.ExpertRequest]]) -> list[_Sent]:
        return [_Sent(part, message, self.connections[part.connection].send(message), time.perf_counter())
                for part, message in requests]

    def _wait(self, sent: list[_Sent]) -> list[Reply | ShardUnavailable]:
        """Each request's Reply, or the ShardUnavailable its connection failed it with. A request not
        answered within request_timeout of its sending fails its connection (see WorkerConnection.expire)."""
        answers = []
        for s in sent:
            try:
                try:
                    answers.append(s.future.result(max(0.0, s.at + self.request_timeout - time.perf_counter())))
                except concurrent.futures.TimeoutError:
                    self.connections[s.part.connection].expire(s.message.request_id)
                    answers.append(s.future.result())  # failed by expire(), or answered just in time
            except ShardUnavailable as e:
                answers.append(e)
        return answers


class LayerDispatch:
    """One MoE layer's routed tokens, sent to the workers; `result()` waits for and adds their partials."""

    def __init__(self, pool: ShardPool, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor, device: torch.device):
        # hidden and weights: the host copies, kept to resend a failed worker's rows
        self.pool, self.layer, self.device = pool, layer, device
        self.hidden, self.weights = hidden, weights
        self.started = time.perf_counter()
        self.requests = pool._requests(layer, hidden, expert_ids, weights)
        self.sent = pool._send(self.requests)

    def result(self) -> torch.Tensor:
        """[T, H] fp32 on the model's device. A worker that failed is marked down (by its connection) and
        its rows go to a healthy replica or another holder of its experts; ShardUnavailable otherwise,
        and at once for a request that a healthy worker rejected."""
        pool, T, H = self.pool, self.hidden.shape[0], self.hidden.shape[1]
        partials, sent_bytes, received_bytes = [], 0, 0
        sent = self.sent
        for _ in range(len(pool.connections) + 1):
            with pool.baton.away():
                answers = pool._wait(sent)
            failed = []
            for s, answer in zip(sent, answers):
                if isinstance(answer, Reply) and answer.response.error:
                    # A worker that rejects a well-formed request disagrees with the router about the model.
                    address = pool.connections[s.part.connection].address
                    answer = ShardUnavailable(f"expert shard {s.part.shard} ({address}) rejected a request: "
                                              f"{answer.response.error}")
                if pool.on_reply is not None:
                    seconds = answer.seconds if isinstance(answer, Reply) else time.perf_counter() - s.at
                    pool.on_reply(s.part.shard, s.message, seconds, isinstance(answer, Exception))
                if isinstance(answer, ShardUnavailable):
                    failed.append((s.part, answer))
                    continue
                partials.append((s.part, self._partial(s.part, answer.response)))
                if pool.record_stats:
                    sent_bytes += s.message.ByteSize()
                    received_bytes += answer.response.ByteSize()
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
            sent = pool._send(requests)
        else:
            raise ShardUnavailable("expert dispatch kept failing: " + "; ".join(pool.down_shards()))
        if pool.record_stats:
            pool.stats.latencies.append(time.perf_counter() - self.started)
            pool.stats.bytes_sent += sent_bytes
            pool.stats.bytes_received += received_bytes
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
