"""The positions of a decoding sequence that the MTP head has not taken in yet, from steps that drafted nothing.

The head's attention layer needs its keys and values at every position a later draft attends to. A
step whose k is 0 drafts nothing, so instead of running the head there (a pass per step, about a
tenth of a decode step on a small model) the decoder keeps, per sequence, what that pass would have
read: the main model's hidden state at each position and the token after it. The head takes them
in one pass when the sequence drafts again, or when `capacity` positions have waited (so that the
hidden states held stay bounded). Until then the head's keys there are zeros (see
SpeculativeDecoder), finite should anything read them: a sequence that ends while positions wait
leaves them so in blocks the prefix cache may share, which costs a later draft some acceptance,
never exactness.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULT_CAPACITY = 64  # positions: one KV block


@dataclass
class Backlog:
    start: int  # the first position waiting
    # the main-model hidden states of the waiting positions, in order, as (a step's hidden [T, H], first
    # row, end row): rows are sliced only when the head takes them in, so that a step without drafts
    # costs no tensor op per sequence
    hidden: list[tuple[torch.Tensor, int, int]] = field(default_factory=list)
    following: list[int] = field(default_factory=list)  # the token after each waiting position

    @property
    def length(self) -> int:
        return len(self.following)

    @property
    def end(self) -> int:
        """The position after the last one waiting: where the sequence's next pass must start."""
        return self.start + self.length

    def add(self, hidden: torch.Tensor, first: int, end: int, following: list[int]) -> None:
        """Rows [first, end) of a step's hidden states wait, with the tokens following them."""
        self.hidden.append((hidden, first, end))
        self.following.extend(following)

    def states(self) -> torch.Tensor:
        """The waiting positions' hidden states [length, H]."""
        parts = [h[a:b] for h, a, b in self.hidden]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
