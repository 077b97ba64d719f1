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

    def add(self, seq: Sequence) -> None:
        """Queue a sequence. RequestTooLarge if it cannot fit even alone, QueueFull if the queue is full."""
        need = seq.stop.max_fed_tokens(len(seq.prompt_ids))
        if need > self.blocks.capacity_tokens:
            raise RequestTooLarge(
                f"the request needs KV cache for {need} tokens (a {len(seq.prompt_ids)}-token prompt and up to "
                f"{seq.stop.max_tokens} new tokens) but the whole cache holds {self.blocks.capacity_tokens} tokens; "
                f"shorten the prompt or lower max_tokens")
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting (the limit is {self.max_queue})")
        seq.status = Status.WAITING
        self.waiting.append(seq)

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
        while budget > 0 and self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if not self.blocks.can_admit(seq.num_tokens):
                break  # arrival order: a large request is not overtaken forever by small ones
            self.waiting.popleft()
            self.blocks.admit(seq.seq_id, seq.num_tokens)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = self._chunk(seq, budget)
            seqs.append(seq)
            counts.append(n)
            drafts.append([])
            budget -= n
        if not seqs:
            return None
        return ScheduledBatch(seqs, counts, [self.blocks.table(s.seq_id) for s in seqs],
                              [self.blocks.slot(s.seq_id) for s in seqs], drafts)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Prompt tokens to feed under `budget`. A cut chunk ends on a block boundary when it can, so the
        DeltaNet states the chunked pass records (every 64 tokens of a pass) sit at absolute block
        boundaries, where a prefix cache can use them."""
        n = min(seq.num_pending, budget)
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
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.status is not Status.RUNNING:
                continue  # aborted while the step ran
            tokens = sampled.get(seq.seq_id)
            if isinstance(tokens, int):
                tokens = [tokens]
            if tokens is None:
                seq.num_computed += n
                continue
            # The model keeps the pending token and the accepted drafts; the rejected ones are forgotten.
            seq.num_computed += n - (len(batch.drafts(i)) - (len(tokens) - 1))
            seq.num_draft_tokens += len(batch.drafts(i))
            seq.num_accepted_tokens += len(tokens) - 1 if batch.drafts(i) else 0
            seq.draft_ids = list((drafts or {}).get(seq.seq_id, ()))
            for token in tokens:
                seq.output_ids.append(token)
                reason = seq.stop.finish_reason(token, len(seq.output_ids), seq.num_tokens)
                if reason is not None:
                    self.finish(seq, reason)
                    finished.append(seq)
                    break
        return finished

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
