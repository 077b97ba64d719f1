"""The CPU path of the gated delta rule: naive.py's decode recurrence in one op or a few dozen.

naive.py handles any packing: it gathers every sequence into a padded [N, L_max] layout, which
needs L_max on the host, and unpacks the outputs with a boolean index, which needs their count.
A decode step (one token per sequence) and a speculative verification (the same few tokens per
sequence) have neither problem: their N sequences are laid out as [N, T] without cu_seqlens, so the
recurrence runs straight on that layout.

There it runs as one C++ op where that could be built (cpu_fused.py: the same products, its sums
over K in another order, so it agrees with naive.py to the tolerance of an fp32 sum over K).
Steps that want gradients, and every step where the op could not be built, run the torch ops
below, whose arithmetic is naive.py's op for op (fp32 throughout, key heads broadcast to their value
heads rather than repeated, which multiplies the same numbers), so they agree with it bit for bit.

Prefill runs the chunked form as cpu_fused.py's `chunk_steps` where it was built (the same WY/UT
math per sequence and head, to the tolerance of naive.py's fp32 sums); packed continuations of
the recurrence, gating, and anything that wants gradients are naive.py's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_slot_values, slot_tensor
from ..cpu_extensions import needs_backward
from . import cpu_fused, naive
from .utils import check_gdn_inputs, sequence_offsets

__all__ = ["gdn_gating", "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"]

gdn_gating = naive.gdn_gating


def _fp32(x: torch.Tensor) -> torch.Tensor:
    # .float() on an fp32 tensor is still a dispatched op; at decode sizes each one counts
    return x if x.dtype == torch.float32 else x.float()


def _fused(q, k, v, a, b, A_log, dt_bias, initial_state, state_slots, scale, use_qk_l2norm,
           output_final_state, output_all_states):
    """The recurrence on cpu_fused.py's op, in every state form the torch path takes: pool rows by
    slot (updated in place), per-sequence states (a copy is updated and returned), or zeros. The
    same op for all, so a sequence's state is the same bits whichever form held it."""
    B, _, _, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    if state_slots is not None:
        o, all_states = cpu_fused.recurrent_steps(q, k, v, a, b, A_log, dt_bias, initial_state, state_slots,
                                                  scale=scale, use_qk_l2norm=use_qk_l2norm,
                                                  output_all_states=output_all_states)
        return o, None, all_states
    state = (torch.zeros(B, Hv, K, V, dtype=torch.float32, device=v.device) if initial_state is None
             else initial_state.float().clone())
    o, all_states = cpu_fused.recurrent_steps(q, k, v, a, b, A_log, dt_bias, state, range(0, B), scale=scale,
                                              use_qk_l2norm=use_qk_l2norm, output_all_states=output_all_states)
    return o, (state if output_final_state else None), all_states


def chunk_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=True,
                           cu_seqlens=None, output_chunk_states=False, use_qk_l2norm=True, chunk_size=64,
                           state_slots=None):
    """ops.chunk_gated_delta_rule (naive.naive_chunk_gated_delta_rule's arguments and results) on
    cpu_fused.py's op, in every state form: pool rows by slot (updated in place), per-sequence states
    (a copy is updated and returned) or zeros; the same op for all, so a sequence's state is the same
    bits whichever form held it."""
    if (needs_backward(q, k, v, g, beta) or chunk_size != cpu_fused.CHUNK or not cpu_fused.available()):
        return naive.naive_chunk_gated_delta_rule(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, output_chunk_states=output_chunk_states, use_qk_l2norm=use_qk_l2norm,
            chunk_size=chunk_size, state_slots=state_slots)
    shapes = check_gdn_inputs(q, k, v, (g, beta), ("g", "beta"), initial_state, cu_seqlens, state_slots)
    B, T, Hv, K, V, N = shapes.B, shapes.T, shapes.Hv, shapes.K, shapes.V, shapes.N
    offsets = sequence_offsets(shapes, cu_seqlens, q.device)
    packed = [x.reshape(B * T, *x.shape[2:]) for x in (q, k, v, g, beta)]
    if state_slots is not None:
        check_slot_values(state_slots, initial_state.shape[0])
        pool, slots = initial_state, state_slots
    else:
        pool = (torch.zeros(N, Hv, K, V, dtype=torch.float32, device=v.device) if initial_state is None
                else initial_state.float().clone())
        slots = torch.arange(N, device=v.device)
    o, chunk_states = cpu_fused.chunk_steps(*packed, offsets, pool, slots, scale=scale,
                                            use_qk_l2norm=use_qk_l2norm, output_chunk_states=output_chunk_states)
    final = pool if state_slots is None and output_final_state else None
    return o.view(B, T, Hv, V), final, chunk_states


def fused_recurrent_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, *, scale=None, initial_state=None,
                                     output_final_state=True, cu_seqlens=None, output_all_states=False,
                                     use_qk_l2norm=True, state_slots=None):
    """ops.fused_recurrent_gated_delta_rule: with cu_seqlens None (B sequences of T tokens each),
    the recurrence on the [B, T] layout directly; with cu_seqlens, naive.py's packed form.

    Slot values are not checked here (that needs a host sync): as on the Triton path, the caller
    hands distinct slots inside the pool (the block manager does).
    """
    if cu_seqlens is not None:
        state_slots = slot_tensor(state_slots, q.device)
        return naive.naive_recurrent_gated_delta_rule_from_gates(
            q, k, v, a, b, A_log, dt_bias, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, output_all_states=output_all_states,
            use_qk_l2norm=use_qk_l2norm, state_slots=state_slots)
    shapes = check_gdn_inputs(q, k, v, (a, b), ("a", "b"), initial_state, None, state_slots)
    B, T, Hk, Hv, K, V = shapes.B, shapes.T, shapes.Hk, shapes.Hv, shapes.K, shapes.V
    if tuple(A_log.shape) != (Hv,) or tuple(dt_bias.shape) != (Hv,):
        raise ValueError(f"A_log {tuple(A_log.shape)} and dt_bias {tuple(dt_bias.shape)} must be [Hv] = ({Hv},)")
    dtype, group = v.dtype, Hv // Hk
    if not needs_backward(q, k, v, a, b, A_log, dt_bias) and cpu_fused.available():
        # one C++ op (it has no backward, so a step that trains keeps the torch ops below)
        return _fused(q, k, v, a, b, A_log, dt_bias, initial_state, state_slots, scale, use_qk_l2norm,
                      output_final_state, output_all_states)

    def per_token(x, *shape):
        """x [B, T, ...] as T views [B, *shape] (one view when T == 1: a decode step)."""
        return [x.view(B, *shape)] if T == 1 else list(x.view(B, T, *shape).unbind(1))

    # Value heads are viewed as [Hk, group]: key head j serves value heads j*group .. j*group + group-1,
    # so q and k broadcast over `group` instead of being repeated.
    g = -_fp32(A_log).exp() * F.softplus(_fp32(a) + _fp32(dt_bias))   # as naive.gdn_gating
    decays = per_token(g.exp(), Hk, group, 1, 1)
    betas = per_token(_fp32(b).sigmoid(), Hk, group, 1, 1)
    qk = _fp32(torch.cat([q, k], dim=2))                                # q and k normalised in one pass
    if use_qk_l2norm:
        qk = naive.l2norm(qk)
    q, k = qk.split(Hk, dim=2)
    qs = per_token(q * (K ** -0.5 if scale is None else scale), Hk, 1, 1, K)
    ks, k_cols = per_token(k, Hk, 1, 1, K), per_token(k, Hk, 1, K, 1)
    vs = per_token(_fp32(v), Hk, group, 1, V)

    slots = state_slots
    if isinstance(state_slots, torch.Tensor) and state_slots.dtype != torch.int64:
        slots = state_slots.long()
    if initial_state is None:
        S = torch.zeros(B, Hk, group, K, V, dtype=torch.float32, device=v.device)
    elif isinstance(slots, range):  # the pool rows themselves, updated in place below
        S = initial_state[slots.start:slots.stop].view(B, Hk, group, K, V)
    elif slots is not None:
        S = initial_state.index_select(0, slots).view(B, Hk, group, K, V)
    else:
        S = _fp32(initial_state).clone().view(B, Hk, group, K, V)
    outputs, states = [], []
    for q_t, k_t, k_col, v_t, decay, beta in zip(qs, ks, k_cols, vs, decays, betas):
        # S is this call's own (zeros, a gathered copy or a clone) or the pool rows it must update,
        # so the updates run in place unless every token's state is kept; either way the same
        # roundings: decay, then the rank-one correction from the decayed state
        S = S * decay if output_all_states else S.mul_(decay)
        delta = beta * (v_t - k_t @ S)                                     # [B, Hk, group, 1, V]
        S = S + k_col * delta if output_all_states else S.add_(k_col * delta)
        outputs.append(q_t @ S)
        if output_all_states:
            states.append(S)
    o = (outputs[0] if T == 1 else torch.stack(outputs, dim=1)).view(B, T, Hv, V)
    o = o if dtype == torch.float32 else o.to(dtype)
    all_states = None
    if output_all_states:
        all_states = (states[0] if T == 1 else torch.stack(states, dim=1)).view(B, T, Hv, K, V)
    S = S.view(B, Hv, K, V)
    if isinstance(slots, range):
        rows = initial_state[slots.start:slots.stop]
        if S.data_ptr() != rows.data_ptr():  # kept every token's state, so S is a new tensor
            rows.copy_(S)
        return o, None, all_states
    if slots is not None:
        initial_state.index_copy_(0, slots, S)
        return o, None, all_states
    return o, (S if output_final_state else None), all_states


fused_recurrent_gated_delta_rule.takes_slot_range = True  # see kernels/ops.py
