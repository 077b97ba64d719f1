"""How many drafts a sequence should get: its running acceptance against what a draft costs.

Plain data, no torch (the scheduler side of speculative decoding). The rule:

- each sequence keeps a decayed count of drafts the model accepted and of drafts it judged (a draft
  after the first rejection is not judged), starting from a prior of one accepted in two: its
  acceptance rate `p` is (accepted + 1) / (judged + 2);
- with k drafts a step yields E(k) = 1 + p + ... + p^k tokens (the accepted prefix and one more) and
  costs 1 + c * k decode steps, c = `draft_cost` (a draft's MTP layer and its extra verified
  position, relative to one decode step); the sequence gets the k in 0..K with the most tokens per
  unit of cost, E(k) / (1 + c k). k = 0 wins exactly when p < c;
- once k = 0 is chosen, speculation stays off for the rest of the sequence: the MTP head stops
  running for it, so its MTP cache would have holes a later draft would read.
So a sequence never pays for drafts that do not pay for themselves by this measure; c = 0 means
"always draft K" (what the equality tests run).
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_SPECULATIVE_TOKENS = 4
DEFAULT_DRAFT_COST = 0.25  # one MTP layer over ~4 decoder layers, and an extra verified position


@dataclass(slots=True)
class SpeculativeConfig:
    num_tokens: int            # K: drafts per step at most, 1..4
    draft_cost: float = DEFAULT_DRAFT_COST  # c above; 0 never turns speculation off
    decay: float = 0.9         # per judged draft: older steps count less

    def __post_init__(self):
        if not 1 <= self.num_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative tokens must be in 1..{MAX_SPECULATIVE_TOKENS}, got {self.num_tokens}")
        if not 0 <= self.draft_cost < 1:
            raise ValueError(f"the speculative draft cost must be in [0, 1), got {self.draft_cost}")
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
    """One sequence's acceptance record and the number of drafts it gets next."""

    def __init__(self, config: SpeculativeConfig, max_tokens: int | None = None):
        """max_tokens: the request's own K (0: off), None: the server's."""
        self.config = config
        self.max_k = config.num_tokens if max_tokens is None else max_tokens
        self.accepted = 0.0
        self.judged = 0.0
        self.off = self.max_k == 0
        self.total_drafted = 0
        self.total_accepted = 0

    @property
    def rate(self) -> float:
        return (self.accepted + 1) / (self.judged + 2)

    def record(self, drafted: int, accepted: int) -> None:
        """A verification of `drafted` drafts accepted the first `accepted` of them."""
        if drafted == 0:
            return
        self.total_drafted += drafted
        self.total_accepted += accepted
        judged = accepted + (1 if accepted < drafted else 0)
        for ok in [True] * accepted + [False] * (judged - accepted):
            self.accepted = self.config.decay * self.accepted + ok
            self.judged = self.config.decay * self.judged + 1

    def next_k(self) -> int:
        """Drafts for the next step (0 turns speculation off for good)."""
        if self.off:
            return 0
        p, c = self.rate, self.config.draft_cost
        k = max(range(self.max_k + 1), key=lambda k: (expected_tokens(p, k) / (1 + c * k), k))
        if k == 0:
            self.off = True
        return k
