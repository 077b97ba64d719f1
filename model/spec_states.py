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

    def windows_after(self, index: torch.Tensor) -> torch.Tensor:
        """Conv windows [R, conv_dim, kernel - 1] picked by `window_index`'s index [R, kernel - 1]."""
        m, width = self.start_windows.shape[0], self.start_windows.shape[-1]
        source = torch.cat([self.conv_inputs, self.start_windows.transpose(1, 2).reshape(m * width, -1)])
        return source[index].transpose(1, 2)


def window_index(num_tokens: int, width: int, rows: list[int], offsets: list[int], kept: list[int]) -> list[list[int]]:
    """For each row, the rows of `TokenStates.windows_after`'s source holding its conv window after its
    token kept[i] (its tokens start at offsets[i] of the num_tokens packed ones): the last `width` conv
    inputs up to that token, reaching back into the window the row started from when the token is early.
    The source is the packed conv inputs, then each row's start window, oldest column first."""
    out = []
    for row, offset, j in zip(rows, offsets, kept):
        # column c of the window is the input at local position j - width + 1 + c (negative: the start window)
        out.append([offset + q if q >= 0 else num_tokens + row * width + width + q
                    for q in range(j - width + 1, j + 1)])
    return out


def keep_state_at(batch: ForwardBatch, slots: list[int], kept: dict[int, int]) -> None:
    """For each verified row r in `kept`, make its state slot (`slots[r]`) hold the DeltaNet state after
    its token kept[r] (0-based within this pass). Rows that kept all their tokens need no entry: the
    pass already left their final state in the slot. A handful of ops per layer, however many rows."""
    if not kept or not batch.token_states:
        return
    rows = list(kept)
    offsets = [batch.spans[r][0] for r in rows]
    any_states = next(iter(batch.token_states.values()))
    device = any_states.recurrent.device
    width = any_states.start_windows.shape[-1]
    tokens = torch.tensor([o + kept[r] for o, r in zip(offsets, rows)], device=device)
    windows = torch.tensor(window_index(any_states.conv_inputs.shape[0], width, rows, offsets, [kept[r] for r in rows]),
                           device=device)
    slot_ids = torch.tensor([slots[r] for r in rows], device=device)
    for layer, states in batch.token_states.items():
        batch.pools.conv[layer].index_copy_(0, slot_ids, states.windows_after(windows))
        batch.pools.recurrent[layer].index_copy_(0, slot_ids, states.recurrent[tokens])
