"""Speculative decoding's settings and each sequence's acceptance record.

Plain data, no torch (the scheduler side of speculative decoding). Each sequence keeps a decayed
count of drafts the model accepted and of drafts it judged (a draft after the first rejection is
not judged), starting from a prior of one accepted in two: its acceptance rate `p` is
(accepted + 1) / (judged + 2). A step with k drafts then yields E(k) = 1 + p + ... + p^k tokens for
it (the accepted prefix and one more): what router/goodput.py weighs against the step's cost, with p
raised by one standard deviation of its estimate while the record is short (`optimistic_rate`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MAX_SPECULATIVE_TOKENS = 4


@dataclass(slots=True)
class SpeculativeConfig:
    num_tokens: int         # K: drafts per step at most, 1..4
    adaptive: bool = True   # each step drafts the k in 0..K with the best goodput; False: always K (fixed k)
    decay: float = 0.9      # per judged draft: older steps count less in a sequence's acceptance

    def __post_init__(self):
        if not 1 <= self.num_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative tokens must be in 1..{MAX_SPECULATIVE_TOKENS}, got {self.num_tokens}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")


def check_speculation(requested: int | None, enabled: bool) -> None:
    """A request that asks for drafts from a server that runs without the MTP head is refused (ValueError)."""
    if requested and not enabled:
        raise ValueError(f"speculative_tokens={requested}: this server runs without speculative decoding "
                         "(start it with --speculative-tokens)")


def expected_tokens(p: float, k: int) -> float:
    """Tokens a step with k drafts yields when each draft is accepted with probability p."""
    return sum(p ** i for i in range(k + 1))


class AcceptanceTracker:
    """One sequence's acceptance record and the most drafts it may make per step."""

    def __init__(self, config: SpeculativeConfig, max_tokens: int | None = None, can_speculate: bool = True):
        """max_tokens: the request's own K (0: off), None: the server's; can_speculate False (a request
        with penalties) keeps it off."""
        self.config = config
        self.max_k = (config.num_tokens if max_tokens is None else max_tokens) if can_speculate else 0
        self.accepted = 0.0
        self.judged = 0.0
        self.num_judged = 0  # undecayed: how much evidence the rate rests on

    @property
    def off(self) -> bool:
        """It never drafts (the MTP head still takes in its positions, for the prefix cache's blocks)."""
        return self.max_k == 0

    @property
    def rate(self) -> float:
        return (self.accepted + 1) / (self.judged + 2)

    @property
    def optimistic_rate(self) -> float:
        """The rate plus one standard deviation of its estimate from the drafts judged so far: what the
        goodput rule assumes, so that a sequence whose first few drafts went badly keeps drafting until
        its acceptance is known (a step without drafts would never learn it), while one with a long
        record is taken at its rate."""
        p = self.rate
        return min(1.0, p + math.sqrt(p * (1 - p) / (self.num_judged + 3)))

    def record(self, drafted: int, accepted: int) -> None:
        """A verification of `drafted` drafts accepted the first `accepted` of them."""
        if drafted == 0:
            return
        judged = accepted + (1 if accepted < drafted else 0)
        self.num_judged += judged
        for ok in [True] * accepted + [False] * (judged - accepted):
            self.accepted = self.config.decay * self.accepted + ok
            self.judged = self.config.decay * self.judged + 1
