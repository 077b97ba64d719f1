"""Continuous batching on plain data: which tokens of which sequences the next forward pass runs.

Never imports torch (tested on plain data). Each step:
  1. every running sequence whose prompt is done decodes one token (decode first keeps the
     inter-token latency of running requests flat while new prompts stream in);
  2. the rest of the token budget goes to prompt chunks: running sequences still prefilling first,
     then waiting sequences in arrival order while there is room (chunked prefill: a long prompt
     takes several steps and never stalls the decodes).
A sequence joins the running batch on the step after it arrives; it samples its first token on the
step that feeds the last token of its prompt.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class QueueFull(Exception):
    """The waiting queue is at its bound: the caller should reject the request (RESOURCE_EXHAUSTED)."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class StopCriteria:
    max_tokens: int
    context_limit: int
    stop_token_ids: frozenset[int] = frozenset()
    eos_token_id: int | None = None
    ignore_eos: bool = False

    def finish_reason(self, token: int, num_output: int, num_total: int) -> str | None:
        """ "stop", "length" or None after `token` became output token number `num_output`."""
        if token in self.stop_token_ids or (token == self.eos_token_id and not self.ignore_eos):
            return "stop"
        if num_output >= self.max_tokens or num_total >= self.context_limit:
            return "length"
        return None


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    stop: StopCriteria
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens already run through the model (held in its state)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens not yet run through the model: the rest of the prompt, or the last sampled token."""
        return self.num_tokens - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

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

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self) -> list[bool]:
        """Per sequence: does this step reach its last known token (so the logits give its next token)?"""
        return [s.num_computed + n == s.num_tokens for s, n in zip(self.seqs, self.num_new_tokens)]


class Scheduler:
    def __init__(self, max_batch_tokens: int, max_running: int, max_queue: int):
        if max_batch_tokens < 1 or max_running < 1 or max_queue < 0:
            raise ValueError(f"need max_batch_tokens >= 1, max_running >= 1, max_queue >= 0; got "
                             f"{max_batch_tokens}, {max_running}, {max_queue}")
        self.max_batch_tokens, self.max_running, self.max_queue = max_batch_tokens, max_running, max_queue
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting (the limit is {self.max_queue})")
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        seqs: list[Sequence] = []
        counts: list[int] = []
        budget = self.max_batch_tokens
        for seq in self.running:  # decodes
            if budget == 0:
                break
            if not seq.is_prefilling:
                seqs.append(seq)
                counts.append(1)
                budget -= 1
        for seq in self.running:  # prompt chunks of admitted sequences
            if budget == 0:
                break
            if seq.is_prefilling:
                n = min(seq.num_pending, budget)
                seqs.append(seq)
                counts.append(n)
                budget -= n
        while budget > 0 and self.waiting and len(self.running) < self.max_running:
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_pending, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return ScheduledBatch(seqs, counts) if seqs else None

    def postprocess(self, batch: ScheduledBatch, sampled: dict[int, int]) -> list[Sequence]:
        """Advance the batch after its forward pass; `sampled` maps seq_id -> new token for the sequences
        whose `samples()` was True. Returns the sequences that finished (already removed)."""
        finished = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.status is not Status.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed += n
            if seq.seq_id not in sampled:
                continue
            token = sampled[seq.seq_id]
            seq.output_ids.append(token)
            reason = seq.stop.finish_reason(token, len(seq.output_ids), seq.num_tokens)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence wherever it is (finished, aborted by its client, or failed)."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def finish_all(self, reason: str) -> list[Sequence]:
        seqs = [*self.running, *self.waiting]
        for seq in seqs:
            self.finish(seq, reason)
        return seqs
