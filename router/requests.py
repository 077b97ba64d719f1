"""What a request may ask for and when it ends: the one torch-free place for validation and stop rules.

The router's gRPC service and the in-process `generate` both check prompts here, and the scheduler
ends every sequence with `StopCriteria`, so the two front doors cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass


def check_prompt(prompt_ids: list[int], vocab_size: int, context_limit: int) -> None:
    """Raise ValueError naming the problem: empty, too long for the context, or ids out of range."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if len(prompt_ids) >= context_limit:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context limit is {context_limit}")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token ids out of range [0, {vocab_size}): {bad[:5]}")


def check_stop_token_ids(stop_token_ids, vocab_size: int) -> None:
    bad = [t for t in stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"stop token ids out of range [0, {vocab_size}): {bad[:5]}")


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

    def max_fed_tokens(self, num_prompt: int) -> int:
        """The most tokens the model can ever hold for this request: every token but the last sampled one."""
        return min(num_prompt + self.max_tokens, self.context_limit) - 1
