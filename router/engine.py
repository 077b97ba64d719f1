"""The router's engine: glue between requests, the scheduler and the model runner.

`run()` is one asyncio task: schedule, run the forward pass on the model thread, hand the sampled
tokens to each request's stream. Everything that touches the scheduler happens on the event loop, so
it needs no locks; the model thread only reads the batch it was given.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from nextserve.model.sampling import SamplingParams

from .runner import ModelRunner
from .requests import StopCriteria
from .scheduler import QueueFull, Scheduler, Sequence, Status
from .shards import ShardPool, ShardUnavailable
from .telemetry import RouterTelemetry

log = logging.getLogger("nextserve.router")


@dataclass(frozen=True)
class Tokens:
    token_ids: list[int]


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" or "length"


@dataclass(frozen=True)
class Failed:
    unavailable: bool  # True: an expert shard is down (retryable); False: an internal error
    message: str


class RequestStream:
    """One request's events (Tokens..., then Finished or Failed) and its timestamps (monotonic seconds)."""

    def __init__(self, seq: Sequence):
        self.seq = seq
        self.events: asyncio.Queue = asyncio.Queue()
        self.arrival = time.monotonic()
        self.first_scheduled: float | None = None
        self.first_token: float | None = None
        self.end: float | None = None
        self.failure: Failed | None = None

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.end is not None and self.events.empty():
            raise StopAsyncIteration
        return await self.events.get()

    def _push(self, event) -> None:
        if isinstance(event, Tokens) and self.first_token is None:
            self.first_token = time.monotonic()
        if isinstance(event, (Finished, Failed)):
            self.end = time.monotonic()
        if isinstance(event, Failed):
            self.failure = event
        self.events.put_nowait(event)


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, pool: ShardPool,
                 eos_token_id: int | None, context_limit: int, telemetry: RouterTelemetry | None = None,
                 redis_cache=None):
        """redis_cache: router/redis_cache.py's RedisCache (the shared tier behind the local prefix cache), or None."""
        self.runner, self.scheduler, self.pool = runner, scheduler, pool
        self.redis_cache = redis_cache
        self._looking_up: dict[int, asyncio.Task] = {}  # sequences waiting for their Redis lookup
        self.telemetry = telemetry
        if telemetry is not None:
            telemetry.attach(scheduler, pool)
        self.eos_token_id, self.context_limit = eos_token_id, context_limit
        self._streams: dict[int, RequestStream] = {}
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._free_after_step: list[int] = []
        self._stepping = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._task: asyncio.Task | None = None
        pool.listeners.append(lambda healthy: self._wake.set())
        self.steps = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        for task in list(self._looking_up.values()):
            task.cancel()
        for seq_id in list(self._looking_up):
            stream = self._streams.get(seq_id)
            if stream is not None:
                self._drop_looking_up(stream.seq, Failed(True, "the router is shutting down"))
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for seq in self.scheduler.finish_all("abort"):
            self._fail(seq, Failed(True, "the router is shutting down"))
        # Not waiting: a forward pass still running needs this loop for its dispatch; it fails fast (bounded)
        # once the pool is closed.
        self._executor.shutdown(wait=False)

    # -- requests (event loop) ----------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue a validated request. Raises ShardUnavailable when not serving, QueueFull when the queue is
        full, RequestTooLarge when it could never fit in the KV cache."""
        if not self.pool.healthy:
            raise ShardUnavailable("not serving: " + "; ".join(self.pool.down_shards()))
        stop = StopCriteria(max_tokens=params.max_tokens, context_limit=self.context_limit,
                            stop_token_ids=frozenset(params.stop_token_ids), eos_token_id=self.eos_token_id,
                            ignore_eos=params.ignore_eos)
        seq = Sequence(next(self._ids), list(prompt_ids), stop)
        if self.redis_cache is None or len(seq.prompt_ids) < 2:
            self.scheduler.add(seq)
        else:
            self.scheduler.check(seq)  # what add would refuse is refused now, before the lookup
            self._looking_up[seq.seq_id] = asyncio.create_task(self._look_up(seq))
        self.runner.add(seq.seq_id, params)
        stream = RequestStream(seq)
        self._streams[seq.seq_id] = stream
        self._wake.set()
        return stream

    async def _look_up(self, seq: Sequence) -> None:
        """Ask Redis for a prefix deeper than the local tier's (bounded; a failure is a miss), then queue."""
        try:
            seq.remote_hit = await self.redis_cache.lookup(seq.prompt_ids)
        except Exception:
            log.exception("prefix cache: Redis lookup failed; computing the prompt")
            seq.remote_hit = None
        self._looking_up.pop(seq.seq_id, None)
        if seq.seq_id not in self._streams:
            return  # aborted meanwhile
        try:
            self.scheduler.add(seq)
        except QueueFull as e:
            self._drop_looking_up(seq, Failed(True, f"the router is at capacity: {e}"))
        self._wake.set()

    def _drop_looking_up(self, seq: Sequence, failure: Failed | None) -> None:
        self._looking_up.pop(seq.seq_id, None)
        seq.status, seq.finish_reason = Status.FINISHED, "abort"
        stream = self._streams.pop(seq.seq_id, None)
        if stream is not None and failure is not None:
            stream._push(failure)
        self.runner.free(seq.seq_id)

    def abort(self, stream: RequestStream) -> None:
        """The client went away or a stop string matched: free the sequence (idempotent)."""
        seq = stream.seq
        if seq.seq_id not in self._streams:
            return
        task = self._looking_up.get(seq.seq_id)
        if task is not None:  # not queued yet: its lookup finds the stream gone
            task.cancel()
            self._drop_looking_up(seq, None)
            return
        self.scheduler.finish(seq, "abort")
        del self._streams[seq.seq_id]
        if self._stepping:
            self._free_after_step.append(seq.seq_id)  # the model thread may still read its state
        else:
            self.runner.free(seq.seq_id)

    @property
    def num_active(self) -> int:
        return len(self._streams)

    @property
    def idle(self) -> bool:
        """No forward pass running and nothing scheduled (an aborted request's last pass has ended too)."""
        return not self._stepping and not self.scheduler.has_work()

    # -- the loop -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.scheduler.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self.pool.healthy:
                message = "expert shards unavailable: " + "; ".join(self.pool.down_shards())
                for seq in self.scheduler.finish_all("error"):
                    self._fail(seq, Failed(True, message))
                continue
            batch = self.scheduler.schedule()
            if batch is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = time.monotonic()
            for seq in batch.seqs:
                stream = self._streams.get(seq.seq_id)
                if stream is not None and stream.first_scheduled is None:
                    stream.first_scheduled = now
            self._stepping = True
            observed = self.telemetry.step_started(batch) if self.telemetry is not None else None
            try:
                sampled = await loop.run_in_executor(self._executor, self.runner.step, batch)
            except ShardUnavailable as e:
                self._observe_step(observed, None, str(e))
                self._fail_batch(batch, Failed(True, str(e)))
            except Exception as e:
                log.exception("forward pass failed")
                self._observe_step(observed, None, str(e))
                self._fail_batch(batch, Failed(False, f"internal error in the forward pass: {e}"))
            else:
                self.steps += 1
                self._observe_step(observed, sampled)
                self._deliver(batch, sampled)
            finally:
                self._stepping = False
                for seq_id in self._free_after_step:
                    self.runner.free(seq_id)
                self._free_after_step.clear()

    def _observe_step(self, observed, sampled: dict[int, list[int]] | None, error: str | None = None) -> None:
        if observed is not None:
            self.telemetry.step_finished(observed, sampled, error)

    def cache_status(self) -> tuple[str, str | None]:
        """The prefix cache's tiers ("off", "local" or "local+redis") and why it is degraded (None: it is not)."""
        if not self.scheduler.blocks.caching:
            return "off", None
        if self.redis_cache is None:
            return "local", None
        return "local+redis", self.redis_cache.degraded

    def _store_in_redis(self) -> None:
        """The snapshots the last step registered, to Redis: read now, before the next step reuses slots."""
        taken, self.scheduler.new_snapshots = self.scheduler.new_snapshots, []
        if self.redis_cache is None or not taken:
            return
        states = []
        for keys, slot in taken:
            state = self.runner.pools.read_state(slot) if slot is not None else self.runner.snapshots.peek(keys[-1].hex)
            if state is not None:
                states.append((keys, state))
        try:
            self.redis_cache.store(states)
        except Exception:
            log.exception("prefix cache: storing in Redis failed; serving on")

    def _deliver(self, batch, sampled: dict[int, list[int]]) -> None:
        before = {seq.seq_id: len(seq.output_ids) for seq in batch.seqs}
        accepted = sum(seq.num_accepted_tokens for seq in batch.seqs)
        finished = {seq.seq_id for seq in self.scheduler.postprocess(batch, sampled, self.runner.drafts)}
        if self.telemetry is not None:
            self.telemetry.speculation(sum(len(d) for d in batch.draft_ids),
                                       sum(seq.num_accepted_tokens for seq in batch.seqs) - accepted)
        self._store_in_redis()
        for seq in batch.seqs:
            stream = self._streams.get(seq.seq_id)
            if stream is None or seq.seq_id not in sampled:
                continue
            # with speculation several tokens at once; a stop among them drops the ones after it
            stream._push(Tokens(seq.output_ids[before[seq.seq_id]:]))
            if seq.seq_id in finished:
                stream._push(Finished(seq.finish_reason))
                del self._streams[seq.seq_id]
                self.runner.free(seq.seq_id)

    def _fail_batch(self, batch, failure: Failed) -> None:
        # A failed pass may have advanced some layers' states and not others: these sequences cannot go on.
        for seq in batch.seqs:
            self.scheduler.finish(seq, "error")
            self._fail(seq, failure)

    def _fail(self, seq: Sequence, failure: Failed) -> None:
        stream = self._streams.pop(seq.seq_id, None)
        if stream is not None:
            stream._push(failure)
        if self._stepping:
            self._free_after_step.append(seq.seq_id)
        else:
            self.runner.free(seq.seq_id)
