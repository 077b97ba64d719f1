"""Rolling a verification pass back to its last accepted token, without running anything again.

A speculative step feeds each sequence its pending token and k drafts; the DeltaNet layers run them
token by token (`ForwardBatch.keep_states_rows`) and leave, per layer, the recurrent state after every
token and the conv window the pass started from. When the model accepts only the first j + 1 of the
k + 1 tokens, `keep_state_at` writes the state after token j into the sequence's slot: what a run
that never saw the rejected drafts would hold. Attention layers need no rollback: the keys of the
rejected tokens stay in the blocks past the sequence's length, unread, until the next tokens at those
positions overwrite them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .state import ForwardBatch


@dataclass
class TokenStates:
    """One DeltaNet layer's states over the verified rows [0, m) of a pass."""
    start_windows: torch.Tensor  # [m, conv_dim, kernel - 1]: each row's conv window before the pass
    conv_inputs: torch.Tensor    # [T_m, conv_dim]: the conv inputs of the rows' tokens, packed
    recurrent: torch.Tensor      # [T_m, Hv, K, V] fp32: the recurrent state after every token

    def window_after(self, row: int, offset: int, j: int) -> torch.Tensor:
        """The conv window after token j of `row` (whose tokens start at `offset`): the last kernel - 1
        inputs, reaching back into the window the row started from when j is small."""
        width = self.start_windows.shape[-1]
        inputs = torch.cat([self.start_windows[row], self.conv_inputs[offset:offset + j + 1].t()], dim=1)
        return inputs[:, -width:]


def keep_state_at(batch: ForwardBatch, slots: list[int], kept: dict[int, int]) -> None:
    """For each verified row r in `kept`, make its state slot (`slots[r]`) hold the DeltaNet state after
    its token kept[r] (0-based within this pass). Rows that kept all their tokens need no entry: the
    pass already left their final state in the slot."""
    if not kept:
        return
    for layer, states in batch.token_states.items():
        conv_pool, recurrent_pool = batch.pools.conv[layer], batch.pools.recurrent[layer]
        for row, j in kept.items():
            offset = batch.spans[row][0]
            conv_pool[slots[row]].copy_(states.window_after(row, offset, j))
            recurrent_pool[slots[row]].copy_(states.recurrent[offset + j])
