"""The CPU path of the causal depthwise conv1d: naive.py's decode update in fewer ops.

The update gathers the sequences' windows once, appends the new inputs in the activation dtype
(the window then holds exactly the values naive.py upcasts), and writes the rolled windows back
by slot; the weighted sum is naive.py's, in fp32, so the results agree with it bit for bit.
Prefill is naive.py's.
"""
from __future__ import annotations

import torch

from . import naive
from .naive import check_conv_update_inputs

__all__ = ["causal_conv1d", "causal_conv1d_update"]

causal_conv1d = naive.causal_conv1d


def causal_conv1d_update(x, conv_state, weight, *, state_slots=None, activation="silu"):
    """ops.causal_conv1d_update. Slot values are not checked here (a host sync): as on the Triton
    path, the caller hands distinct slots inside the pool."""
    check_conv_update_inputs(x, conv_state, weight, activation, state_slots)
    out_dtype = x.dtype
    if state_slots is None:
        state = conv_state
    else:
        slots = state_slots if state_slots.dtype == torch.int64 else state_slots.long()
        state = conv_state.index_select(0, slots)
    if x.dtype != state.dtype:  # the new inputs must reach the sum unrounded: build the window in fp32
        state, x = state.float(), x.float()
    window = torch.cat([state, x.unsqueeze(-1)], dim=-1)  # [N, C, W], oldest input first
    weight_f = weight if weight.dtype == torch.float32 else weight.float()
    window_f = window if window.dtype == torch.float32 else window.float()
    y = naive._activate((window_f * weight_f).sum(-1), activation)
    rolled = window[..., 1:] if window.dtype == conv_state.dtype else window[..., 1:].to(conv_state.dtype)
    if state_slots is None:
        conv_state.copy_(rolled)
    else:
        conv_state.index_copy_(0, slots, rolled)
    return y if y.dtype == out_dtype else y.to(out_dtype)
