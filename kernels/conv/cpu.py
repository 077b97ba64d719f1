"""The CPU path of the causal depthwise conv1d: naive.py's decode update in fewer ops.

Where the C++ op was built (cpu_fused.py), the decode update runs on it as a one-token prefill per
sequence: the same fp32 products in tap order, silu's exp in the last bit aside, and a speculative
verification's T updates then give the bits of T decode steps. Otherwise the update gathers the
sequences' windows once, appends the new inputs in the activation dtype (the window then holds
exactly the values naive.py upcasts), and writes the rolled windows back by slot; the weighted sum
is naive.py's, in fp32, so the results agree with it bit for bit.

Prefill on the state pool runs as one C++ op where it could be built (cpu_fused.py: the same fp32
products in the same tap order, only silu's exp may differ in the last bit). Otherwise it computes
naive.py's sum over the W taps as W shifted [T, C] multiply-adds instead of one gathered [T, W, C]
window tensor: the same fp32 products added in the same tap order, with a W-th of the memory
traffic (at a 2048-token chunk the window tensor is 32 MiB per layer).
"""
from __future__ import annotations

import torch

from . import cpu_fused, naive
from .naive import check_conv_inputs, check_conv_update_inputs

__all__ = ["causal_conv1d", "causal_conv1d_update"]


def causal_conv1d(x, weight, *, initial_state=None, state_slots=None, cu_seqlens=None, activation="silu"):
    """ops.causal_conv1d: naive.py's contract and sums, one tap at a time."""
    T, C, W, N = check_conv_inputs(x, weight, initial_state, cu_seqlens, activation, state_slots)
    if cpu_fused.takes(x, weight, initial_state if state_slots is not None else None):
        if state_slots is not None:
            naive.check_slot_values(state_slots, initial_state.shape[0])
            return cpu_fused.causal_conv1d(x, weight, initial_state, state_slots, cu_seqlens, activation), None
        # per-sequence states (or zeros) through the same op, as rows of a pool of their own, so a
        # sequence's conv gives the same bits whichever form held its state
        states = (x.new_zeros(N, C, W - 1) if initial_state is None
                  else initial_state.to(x.dtype).contiguous().clone())
        return cpu_fused.causal_conv1d(x, weight, states, torch.arange(N), cu_seqlens, activation), states
    if state_slots is not None:
        return naive.with_conv_state_slots(causal_conv1d, x, weight, initial_state, state_slots, cu_seqlens,
                                           activation)
    device = x.device
    offsets, lengths, source = naive.conv_source(x, initial_state, cu_seqlens, T, C, W, N)
    seq = torch.repeat_interleave(torch.arange(N, device=device), lengths, output_size=T)
    start = offsets.index_select(0, seq)                          # each position's sequence start
    p = torch.arange(T, device=device) - start
    state_row0 = T + seq * (W - 1) + (W - 1)                      # + p (< 0) is a state column
    weight_f = weight.float()
    y = None
    for tap in range(W):
        shift = p - (W - 1) + tap
        rows = source.index_select(0, torch.where(shift >= 0, start + shift, state_row0 + shift))
        term = rows * weight_f[:, tap]
        y = term if y is None else y.add_(term)
    y = naive._activate(y, activation).to(x.dtype)
    taps = torch.arange(W - 1, device=device)
    last = lengths[:, None] - (W - 1) + taps[None, :]           # [N, W - 1] positions of the new state
    n = torch.arange(N, device=device)[:, None]
    rows = torch.where(last >= 0, offsets[:-1, None] + last, T + n * (W - 1) + (W - 1) + last)
    final_state = source.index_select(0, rows.reshape(-1)).view(N, W - 1, C).transpose(1, 2).to(x.dtype)
    return y, final_state


def causal_conv1d_update(x, conv_state, weight, *, state_slots=None, activation="silu"):
    """ops.causal_conv1d_update. Slot values are not checked here (a host sync): as on the Triton
    path, the caller hands distinct slots inside the pool."""
    check_conv_update_inputs(x, conv_state, weight, activation, state_slots)
    if cpu_fused.takes(x, weight, conv_state):
        # a one-token prefill per sequence on the C++ op: the prefill's arithmetic, so that a speculative
        # verification (causal_conv1d_update_steps) and T decode steps give the same bits
        N = x.shape[0]
        return cpu_fused.causal_conv1d(x, weight, conv_state, _slot_rows(state_slots, N), torch.arange(N + 1),
                                       activation)
    out_dtype = x.dtype
    if state_slots is None:
        state = conv_state
    elif isinstance(state_slots, range):  # consecutive slots: the pool rows as one view, rolled in place
        state = conv_state = conv_state[state_slots.start:state_slots.stop]
        state_slots = None
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


causal_conv1d_update.takes_slot_range = True  # see kernels/ops.py


def causal_conv1d_update_steps(x, conv_state, weight, *, state_slots=None, activation="silu"):
    """ops.causal_conv1d_update_steps: T tokens per sequence as one prefill of the C++ op where it runs
    (it computes each output from its window alone, taps in the same order, so a T-token prefill gives
    the bits of T one-token steps), else T updates."""
    N, T, C = x.shape
    if not cpu_fused.takes(x, weight, conv_state):
        return torch.stack([causal_conv1d_update(x[:, t], conv_state, weight, state_slots=state_slots,
                                                 activation=activation) for t in range(T)], dim=1)
    check_conv_update_inputs(x[:, 0], conv_state, weight, activation, state_slots)
    y = cpu_fused.causal_conv1d(x.reshape(N * T, C), weight, conv_state, _slot_rows(state_slots, N),
                                torch.arange(0, N * T + 1, T), activation)
    return y.view(N, T, C)


causal_conv1d_update_steps.takes_slot_range = True


def _slot_rows(state_slots, n: int) -> torch.Tensor:
    """The pool rows of n sequences as the C++ op takes them: slots, a range of them, or None (the
    state tensor's own rows)."""
    if state_slots is None:
        return torch.arange(n)
    if isinstance(state_slots, range):
        return torch.arange(state_slots.start, state_slots.stop)
    return state_slots
