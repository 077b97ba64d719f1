"""Continuous batching on plain data: which tokens of which sequences the next forward pass runs.

Never imports torch (tested on plain data). Each step, under a token budget and the block manager's
memory:
  1. every running sequence with one token pending decodes it (decode first keeps the inter-token
     latency of running requests flat while new prompts stream in). A decode that needs a new KV
     block when none is free preempts the most recently admitted running sequence (possibly itself):
     its blocks and state slot are freed and it goes back to the front of the queue to recompute
     its prompt and output so far; it then finishes with the same tokens;
  2. the rest of the budget goes to prompt chunks: running sequences still prefilling first, then
     waiting sequences in arrival order while a state slot and blocks for the whole prompt are free
     (chunked prefill: a long prompt takes several steps and never stalls the decodes). Blocks for
     the whole prompt are taken at admission, so an admitted prefill never waits for memory.
A request that could never fit, even alone in the whole cache, is rejected at submit.

With a prefix cache (router/prefix_cache.py) admission first looks the sequence's tokens up: on a hit
at p it shares the cached blocks, its state slot is loaded from the snapshot at p and prefill starts
at p. Prefill chunks then also stop where a state snapshot is due (the prompt minus its last token,
which is where an identical prompt will look), and the batch tells the runner which snapshots to take.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .requests import StopCriteria

__all__ = ["QueueFull", "RequestTooLarge", "ScheduledBatch", "Scheduler", "Sequence", "Status", "StopCriteria"]


class QueueFull(Exception):
    """The waiting queue is at its bound: the caller should reject the request (RESOURCE_EXHAUSTED)."""


class RequestTooLarge(ValueError):
    """The request needs more KV cache than the whole pool holds (INVALID_ARGUMENT: retrying cannot help)."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    stop: StopCriteria
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens already run through the model (held in its KV blocks and state slot)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    num_preemptions: int = 0
    # Speculative decoding: tokens the MTP head proposes after the pending one; the next decode feeds
    # them with it and keeps the longest prefix the model agrees with (router/speculative.py).
    draft_ids: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0     # drafts verified so far...
    num_accepted_tokens: int = 0  # ...and accepted (the acceptance the response's usage reports)
    num_cached: int = 0  # prompt tokens restored from the prefix cache at first admission
    cache_keys: list = field(default_factory=list)  # chain keys of all known tokens but the last (with a cache)
    snapshot_at: int = 0  # where the prefill stops for a state snapshot (the tokens of cache_keys)
    remote_hit: object = None  # a verified Redis hit (router/redis_cache.py) deeper than the local tier, until admitted

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens not yet run through the model: the rest of the prompt (and, after a preemption, of the
        output so far), or the last sampled token."""
        return self.num_tokens - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        return not (self.output_ids and self.num_pending == 1)

    def token_slice(self, n: int) -> list[int]:
        """The next `n` tokens to feed."""
        start = self.num_computed
        if start < len(self.prompt_ids):
            return (self.prompt_ids + self.output_ids)[start:start + n]
        return self.output_ids[start - len(self.prompt_ids):start - len(self.prompt_ids) + n]


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens each sequence feeds this step
    block_tables: list[list[int]] = field(default_factory=list)  # each sequence's KV blocks, in order
    state_slots: list[int] = field(default_factory=list)         # each sequence's DeltaNet state slot
    draft_ids: list[list[int]] = field(default_factory=list)     # drafts fed after each one's pending token
    # The prefix cache's work for the runner, in the order it does it (all empty without a cache):
    end_snapshots: list[tuple[int, str]] = field(default_factory=list)  # (slot, key): state of a sequence that ended
    dropped: list[str] = field(default_factory=list)       # snapshot keys evicted: free their tensors
    copies: list = field(default_factory=list)             # BlockCopy: partial tail blocks to copy before the pass
    restores: list[tuple[int, str]] = field(default_factory=list)  # (slot, key): load a snapshot into a slot
    snapshots: list[tuple[int, int, str]] = field(default_factory=list)  # (batch index, position, key) to take
    remote_restores: list[tuple[int, list[int], object]] = field(default_factory=list)  # (slot, table, Redis hit)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def drafts(self, row: int) -> list[int]:
        return self.draft_ids[row] if self.draft_ids else []

    def samples(self) -> list[bool]:
        """Per sequence: does this step reach its last known token (so the logits give its next token)?"""
        return [s.num_computed + n - len(self.drafts(i)) == s.num_tokens
                for i, (s, n) in enumerate(zip(self.seqs, self.num_new_tokens))]


class Scheduler:
    def __init__(self, max_batch_tokens: int, max_running: int, max_queue: int, blocks: BlockManager):
        if max_batch_tokens < 1 or max_running < 1 or max_queue < 0:
            raise ValueError(f"need max_batch_tokens >= 1, max_running >= 1, max_queue >= 0; got "
                             f"{max_batch_tokens}, {max_running}, {max_queue}")
        self.max_batch_tokens, self.max_running, self.max_queue = max_batch_tokens, max_running, max_queue
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: preemption takes from the end
        self.num_preemptions = 0
        self._end_snapshots: list[tuple[int, str]] = []
        # What the last postprocess registered, for the Redis tier: (chain keys, the ended sequence's slot
        # or None when the snapshot is in the runner's store under the last key)
        self.new_snapshots: list[tuple[list, int | None]] = []

    def add(self, seq: Sequence) -> None:
        """Queue a sequence. RequestTooLarge if it cannot fit even alone, QueueFull if the queue is full."""
        self.check(seq)
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def check(self, seq: Sequence) -> None:
        """What `add` raises, without queueing (the engine checks before a cache lookup, then adds)."""
        need = seq.stop.max_fed_tokens(len(seq.prompt_ids))
        if need > self.blocks.capacity_tokens:
            raise RequestTooLarge(
                f"the request needs KV cache for {need} tokens (a {len(seq.prompt_ids)}-token prompt and up to "
                f"{seq.stop.max_tokens} new tokens) but the whole cache holds {self.blocks.capacity_tokens} tokens; "
                f"shorten the prompt or lower max_tokens")
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting (the limit is {self.max_queue})")

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        seqs: list[Sequence] = []
        counts: list[int] = []
        drafts: list[list[int]] = []
        budget = self.max_batch_tokens
        for seq in list(self.running):  # decodes, oldest first
            if budget == 0:
                break
            if seq.status is not Status.RUNNING or seq.is_prefilling:
                continue  # preempted earlier in this loop, or still in its prompt
            fed_drafts = seq.draft_ids[:budget - 1]
            if not self._make_room(seq, 1 + len(fed_drafts)):
                continue  # it preempted itself
            seqs.append(seq)
            counts.append(1 + len(fed_drafts))
            drafts.append(fed_drafts)
            budget -= 1 + len(fed_drafts)
        for seq in self.running:  # prompt chunks of admitted sequences; their blocks are already held
            if budget == 0:
                break
            if seq.is_prefilling:
                n = self._chunk(seq, budget)
                seqs.append(seq)
                counts.append(n)
                drafts.append([])
                budget -= n
        restores, remote = [], []
        while budget > 0 and self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            hit = self._lookup(seq)
            if not self.blocks.can_admit(seq.num_tokens, hit):
                break  # arrival order: a large request is not overtaken forever by small ones
            self.waiting.popleft()
            if seq.remote_hit is not None and seq.remote_hit.position > (hit.position if hit else 0):
                hit, from_redis = None, seq.remote_hit  # deeper in Redis: fresh blocks, written by the runner
            else:
                from_redis = None
            seq.remote_hit = None
            self.blocks.admit(seq.seq_id, seq.num_tokens, hit)
            if from_redis is not None:
                seq.num_computed = from_redis.position
                remote.append((self.blocks.slot(seq.seq_id), list(self.blocks.table(seq.seq_id)), from_redis))
                if seq.num_preemptions == 0:
                    seq.num_cached = from_redis.position
            if hit is not None:
                seq.num_computed = hit.position
                restores.append((self.blocks.slot(seq.seq_id), hit.snapshot))
                if seq.num_preemptions == 0:
                    seq.num_cached = hit.position
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = self._chunk(seq, budget)
            seqs.append(seq)
            counts.append(n)
            drafts.append([])
            budget -= n
        if not seqs:
            return None
        batch = ScheduledBatch(seqs, counts, [self.blocks.table(s.seq_id) for s in seqs],
                               [self.blocks.slot(s.seq_id) for s in seqs], drafts)
        if self.blocks.caching:
            batch.end_snapshots, self._end_snapshots = self._end_snapshots, []
            batch.dropped, batch.copies, batch.restores = self.blocks.take_dropped(), self.blocks.take_copies(), restores
            batch.remote_restores = remote
            batch.snapshots = [(i, p, key) for i, (s, n) in enumerate(zip(seqs, counts)) for p, key in self._due(s, n)]
        return batch

    def _lookup(self, seq: Sequence):
        """The prefix cache's hit for a sequence about to be admitted (None: a miss, or no cache)."""
        if not self.blocks.caching:
            return None
        tokens = seq.prompt_ids + seq.output_ids
        if seq.snapshot_at != len(tokens) - 1 or not seq.cache_keys:
            seq.snapshot_at = len(tokens) - 1  # at least one token must run, for the next token's logits
            seq.cache_keys = self.blocks.keys(tokens[:-1])
        return self.blocks.lookup(seq.cache_keys, tokens[:-1], tokens[-1])

    def _due(self, seq: Sequence, n: int) -> list[tuple[int, object]]:
        """(position, key) of the state snapshots this prefill chunk reaches: every snapshot interval, the
        last block boundary of the prompt and the prompt minus its last token. One inside the chunk comes
        from the chunked pass's checkpoints, which sit at block boundaries only if the chunk starts on one."""
        start, end = seq.num_computed, seq.num_computed + n
        if not seq.is_prefilling or start >= seq.snapshot_at:
            return []
        bs = self.blocks.block_size
        last_boundary = seq.snapshot_at // bs * bs
        positions = [p for p in range((start // bs + 1) * bs, min(end, seq.snapshot_at) + 1, bs)
                     if (p == end or start % bs == 0) and (p % self.blocks.snapshot_interval == 0 or p == last_boundary)]
        if end == seq.snapshot_at and end not in positions:
            positions.append(end)
        due = []
        for p in positions:
            key = seq.cache_keys[(p - 1) // bs]
            assert key.position == p
            if not self.blocks.has_snapshot(key.hex):
                due.append((p, key))
        return due

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Prompt tokens to feed under `budget`. A cut chunk ends on a block boundary when it can, so the
        DeltaNet states the chunked pass records (every 64 tokens of a pass) sit at absolute block
        boundaries, where a prefix cache can use them."""
        n = min(seq.num_pending, budget)
        if self.blocks.caching and seq.num_computed < seq.snapshot_at < seq.num_computed + n and \
                not self.blocks.has_snapshot(seq.cache_keys[-1].hex):
            n = seq.snapshot_at - seq.num_computed  # stop where an identical prompt will look (the runner snapshots)
        if n < seq.num_pending:
            end = (seq.num_computed + n) // self.blocks.block_size * self.blocks.block_size
            if end > seq.num_computed:
                n = end - seq.num_computed
        return n

    def _make_room(self, seq: Sequence, n: int = 1) -> bool:
        """Blocks for `n` more tokens of `seq`, preempting newer sequences as needed; False if `seq` itself
        had to go (it was the newest)."""
        while not self.blocks.can_grow(seq.seq_id, seq.num_computed + n):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq.seq_id, seq.num_computed + n)
        return True

    def _preempt(self, seq: Sequence) -> None:
        # Recompute: drop everything the model held; the prompt and the output so far are fed again.
        self.running.remove(seq)
        self.blocks.release(seq.seq_id)
        seq.num_computed = 0
        seq.draft_ids = []  # they lean on the MTP head's memory of this sequence, dropped with its blocks
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def postprocess(self, batch: ScheduledBatch, sampled: dict[int, list[int] | int],
                    drafts: dict[int, list[int]] | None = None) -> list[Sequence]:
        """Advance the batch after its forward pass; `sampled` maps seq_id -> new tokens for the sequences
        whose `samples()` was True: one token (a list of one, or an int), or with speculation the accepted drafts and one more.
        `drafts`: seq_id -> drafts to feed next step. Returns the sequences that finished (already
        removed); a stop among several new tokens drops the ones after it."""
        finished = []
        self.new_snapshots = []
        due: dict[int, list] = {}
        for i, position, key in batch.snapshots:
            due.setdefault(i, []).append(key)
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.status is not Status.RUNNING:
                for key in due.get(i, ()):
                    self.blocks.discard_snapshot(key.hex)  # aborted while the step ran: nothing to keep
                continue  # aborted while the step ran
            tokens = sampled.get(seq.seq_id)
            if isinstance(tokens, int):
                tokens = [tokens]
            if tokens is None:
                seq.num_computed += n
            else:
                # The model keeps the pending token and the accepted drafts; the rejected ones are forgotten.
                seq.num_computed += n - (len(batch.drafts(i)) - (len(tokens) - 1))
                seq.num_draft_tokens += len(batch.drafts(i))
                seq.num_accepted_tokens += len(tokens) - 1 if batch.drafts(i) else 0
            for key in due.get(i, ()):  # the runner took these snapshots during the step (prefill only)
                keys = seq.cache_keys[:(key.position - 1) // self.blocks.block_size + 1]
                self.blocks.register(seq.seq_id, keys, seq.prompt_ids + seq.output_ids)
                self.new_snapshots.append((keys, None))
            if tokens is None:
                continue
            seq.draft_ids = list((drafts or {}).get(seq.seq_id, ()))
            for token in tokens:
                seq.output_ids.append(token)
                reason = seq.stop.finish_reason(token, len(seq.output_ids), seq.num_tokens)
                if reason is not None:
                    if self.blocks.caching:
                        self._snapshot_at_end(seq)
                    self.finish(seq, reason)
                    finished.append(seq)
                    break
        return finished

    def _snapshot_at_end(self, seq: Sequence) -> None:
        """Keep the state of a finished sequence (all it computed: the next turn of a conversation starts
        with these tokens); the runner copies it out of the slot before the slot is used again."""
        if seq.num_computed > seq.num_tokens:
            return  # a stop among accepted drafts: the slot holds tokens that the output dropped
        if seq.num_computed == seq.num_tokens and self.blocks.namespace.mtp:
            return  # a stop at the last accepted draft: the MTP head's last row paired it with a dropped token
        tokens = seq.prompt_ids + seq.output_ids
        keys = self.blocks.keys(tokens[:seq.num_computed])
        if keys and not self.blocks.has_snapshot(keys[-1].hex):
            key = self.blocks.register(seq.seq_id, keys, tokens)
            self._end_snapshots.append((self.blocks.slot(seq.seq_id), key))
            self.new_snapshots.append((keys, self.blocks.slot(seq.seq_id)))

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence wherever it is (finished, aborted by its client, or failed) and free its memory."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        self.blocks.release(seq.seq_id)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def finish_all(self, reason: str) -> list[Sequence]:
        seqs = [*self.running, *self.waiting]
        for seq in seqs:
            self.finish(seq, reason)
        return seqs
