"""Plain torch reference of the causal depthwise conv1d in front of the Gated DeltaNet.

Channel c of token t (local position p in its sequence) is

    y[t, c] = act( sum_{j < W} weight[c, j] * x_seq[p - (W - 1) + j, c] )

where positions before the sequence start read the conv state: the last W - 1 inputs of what
came before (zeros for a fresh sequence), oldest first. The state handed back is the last W - 1
inputs of [state, sequence], so a sequence shorter than W - 1 keeps part of its initial state.
Accumulation is fp32; outputs are in x.dtype, as are returned states.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_slot_values, check_state_slots, num_sequences

__all__ = ["causal_conv1d", "causal_conv1d_update"]

_ACTIVATIONS = (None, "silu", "swish")


def _check_x_and_weight(x, weight, activation, x_layout: str) -> tuple[tuple[int, int], int]:
    """The checks both entry points share; returns (x.shape, W)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation {activation!r}: expected one of {_ACTIVATIONS}")
    if x.dim() != 2:
        raise ValueError(f"x {tuple(x.shape)} must be {x_layout}")
    C = x.shape[1]
    if weight.dim() != 2 or weight.shape[0] != C or weight.shape[1] < 1:
        raise ValueError(f"weight {tuple(weight.shape)} must be [C, W] with C = {C} (x {tuple(x.shape)})")
    return tuple(x.shape), weight.shape[1]


def check_conv_inputs(x, weight, initial_state, cu_seqlens, activation,
                      state_slots=None) -> tuple[int, int, int, int]:
    """Validate `causal_conv1d` inputs; return (T, C, W, N). Raises ValueError naming the bad shape.

    x: [T, C]; weight: [C, W]; initial_state: [N, C, W - 1] or None, or with state_slots [N] the
    pool [S, C, W - 1]; cu_seqlens: [N + 1] or None (N = 1).
    """
    (T, C), W = _check_x_and_weight(x, weight, activation, "[T, C] (sequences packed along T)")
    N = num_sequences(cu_seqlens, default=1)
    if state_slots is not None:
        check_state_slots(state_slots, initial_state, N, (C, W - 1), "initial_state")
    elif initial_state is not None and tuple(initial_state.shape) != (N, C, W - 1):
        raise ValueError(f"initial_state {tuple(initial_state.shape)} must be [N, C, W - 1] = {(N, C, W - 1)}")
    return T, C, W, N


def check_conv_update_inputs(x, conv_state, weight, activation, state_slots=None) -> tuple[int, int, int]:
    """Validate `causal_conv1d_update` inputs; return (N, C, W).

    x: [N, C]; conv_state: [N, C, W - 1], or with state_slots [N] the pool [S, C, W - 1]; weight: [C, W].
    """
    (N, C), W = _check_x_and_weight(x, weight, activation, "[N, C] (one token per sequence)")
    if state_slots is not None:
        check_state_slots(state_slots, conv_state, N, (C, W - 1), "conv_state")
    elif tuple(conv_state.shape) != (N, C, W - 1):
        raise ValueError(f"conv_state {tuple(conv_state.shape)} must be [N, C, W - 1] = {(N, C, W - 1)}")
    return N, C, W


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y


def with_conv_state_slots(conv, x, weight, pool, state_slots, cu_seqlens, activation):
    """Run the prefill `conv` on pool[state_slots] and write the final states back by slot."""
    check_slot_values(state_slots, pool.shape[0])
    slots = state_slots.long()
    y, final_state = conv(x, weight, initial_state=pool.index_select(0, slots), cu_seqlens=cu_seqlens,
                          activation=activation)
    pool[slots] = final_state.to(pool.dtype)
    return y, None


def conv_source(x, initial_state, cu_seqlens, T, C, W, N):
    """(offsets [N + 1], lengths [N], source [T + N * (W - 1), C] fp32) for the prefill gathers.

    The source rows are the T inputs, then each sequence's W - 1 state columns, oldest first, so
    that every tap of every position is one row index.
    """
    device = x.device
    offsets = (cu_seqlens.to(device=device, dtype=torch.int64) if cu_seqlens is not None
               else torch.tensor([0, T], device=device))
    state = (initial_state.float() if initial_state is not None
             else torch.zeros(N, C, W - 1, dtype=torch.float32, device=device))
    source = torch.cat([x.float(), state.transpose(1, 2).reshape(N * (W - 1), C)])
    return offsets, offsets.diff(), source


def causal_conv1d(x, weight, *, initial_state=None, state_slots=None, cu_seqlens=None, activation="silu"):
    """Prefill: causal depthwise conv over packed sequences, then the activation.

    x: [T, C]; weight: [C, W]; initial_state: [N, C, W - 1] or None (zeros);
    cu_seqlens: [N + 1] or None (one sequence); activation: "silu" / "swish" or None.
    state_slots: [N] int32/int64 or None. With it, initial_state is the whole pool [S, C, W - 1]:
    sequence n starts from pool[state_slots[n]] and its final state is written back there.
    Returns (y [T, C] in x.dtype, final_state [N, C, W - 1] in x.dtype, or None with state_slots).

    Example, two sequences of 5 and 2 tokens:
        y, state = causal_conv1d(x, w, cu_seqlens=torch.tensor([0, 5, 7], dtype=torch.int32))
    Example, the same two continuing from pool slots 3 and 0:
        y, _ = causal_conv1d(x, w, initial_state=pool, state_slots=torch.tensor([3, 0]), cu_seqlens=cu)
    """
    T, C, W, N = check_conv_inputs(x, weight, initial_state, cu_seqlens, activation, state_slots)
    if state_slots is not None:
        return with_conv_state_slots(causal_conv1d, x, weight, initial_state, state_slots, cu_seqlens, activation)
    device = x.device
    offsets, lengths, source = conv_source(x, initial_state, cu_seqlens, T, C, W, N)

    def row(n, p):
        """Source row of position p (may be negative: then a state column) of sequence n."""
        return torch.where(p >= 0, offsets[n] + p, T + n * (W - 1) + (W - 1) + p)

    taps = torch.arange(W, device=device)
    seq = torch.repeat_interleave(torch.arange(N, device=device), lengths)  # [T]
    p = torch.arange(T, device=device) - offsets[seq]
    window = source[row(seq[:, None], p[:, None] - (W - 1) + taps[None, :])]  # [T, W, C]
    y = _activate((window * weight.float().t()[None]).sum(1), activation).to(x.dtype)

    n = torch.arange(N, device=device)
    last = lengths[:, None] - (W - 1) + taps[None, : W - 1]  # [N, W - 1]
    final_state = source[row(n[:, None], last)].transpose(1, 2).to(x.dtype)
    return y, final_state


def causal_conv1d_update(x, conv_state, weight, *, state_slots=None, activation="silu"):
    """Decode: one new token per sequence; conv_state is rolled in place.

    x: [N, C]; conv_state: [N, C, W - 1] (oldest input first); weight: [C, W].
    state_slots: [N] int32/int64 or None. With it, conv_state is the whole pool [S, C, W - 1] and
    sequence n rolls pool[state_slots[n]].
    Returns y [N, C] in x.dtype.
    """
    check_conv_update_inputs(x, conv_state, weight, activation, state_slots)
    if state_slots is not None:
        check_slot_values(state_slots, conv_state.shape[0])
        slots = state_slots.long()
        state = conv_state[slots]
        y = causal_conv1d_update(x, state, weight, activation=activation)
        conv_state[slots] = state
        return y
    window = torch.cat([conv_state.float(), x.float()[..., None]], dim=-1)  # [N, C, W]
    y = _activate((window * weight.float()[None]).sum(-1), activation)
    conv_state.copy_(window[..., 1:])
    return y.to(x.dtype)
