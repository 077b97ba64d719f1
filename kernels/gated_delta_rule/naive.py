"""Plain torch references of the gated delta rule (Qwen3-Next's linear attention).

Per value head the state S is [K, V] (fp32) and every token t does

    S <- exp(g_t) S;   delta = beta_t (v_t - S^T k_t);   S <- S + k_t delta^T;   o_t = S^T q_t

with q and k L2-normalised over the head dim, q scaled by `scale` (K ** -0.5 by default) and key
head `j // (Hv // Hk)` serving value head j. The chunked form computes the same thing 64 tokens
at a time with the WY/UT transform, and is what the model runs for prefill on the CPU.

Layout: q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta [B, T, Hv]. With `cu_seqlens` [N + 1],
B == 1 and N sequences are packed along T. Everything is computed in fp32; the output is cast
to v.dtype, states stay fp32.

Sequences of unequal length are laid out side by side and padded with q = k = v = 0, g = 0 and
beta = 0: such a token multiplies the state by exp(0) = 1 and adds k delta^T = 0, so padding
leaves every state bit-for-bit unchanged and lets all sequences advance in one batched step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_slot_values
from .utils import check_gdn_inputs, sequence_offsets

__all__ = [
    "gdn_gating",
    "l2norm",
    "naive_recurrent_gated_delta_rule",
    "naive_recurrent_gated_delta_rule_from_gates",
    "naive_chunk_gated_delta_rule",
]


def gdn_gating(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor,
               dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gates from the raw projections, in fp32.

    a, b: [..., Hv]; A_log, dt_bias: [Hv].
    Returns g [..., Hv] = -exp(A_log) * softplus(a + dt_bias) (log decay, < 0) and
    beta [..., Hv] = sigmoid(b).
    """
    if a.shape != b.shape or a.shape[-1:] != A_log.shape or A_log.shape != dt_bias.shape:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must be [..., Hv] with A_log "
                         f"{tuple(A_log.shape)} and dt_bias {tuple(dt_bias.shape)} both [Hv]")
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    beta = b.float().sigmoid()
    return g, beta


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(sum(x^2) + eps) over the last dim (fla's and transformers' convention)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm, Hv):
    """Flatten [B, T] into tokens, go to fp32, normalise and scale, and expand key heads to value heads.

    Returns q, k [B*T, Hv, K]; v [B*T, Hv, V]; g, beta [B*T, Hv].
    """
    K = q.shape[-1]
    q, k, v = (x.reshape(-1, x.shape[2], x.shape[3]).float() for x in (q, k, v))
    g, beta = (x.reshape(-1, Hv).float() for x in (g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * (K ** -0.5 if scale is None else scale)
    group = Hv // k.shape[1]
    if group > 1:
        # value head j reads key head j // group: repeat each key head `group` times in a row
        q, k = q.repeat_interleave(group, dim=1), k.repeat_interleave(group, dim=1)
    return q, k, v, g, beta


def _gather_padded(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [T, ...] gathered at index [...] where the value T selects an appended row of zeros."""
    return torch.cat([x, x.new_zeros((1,) + x.shape[1:])])[index]


def _with_state_slots(fn, q, k, v, g, beta, initial_state, state_slots, cu_seqlens, **kwargs):
    """Run `fn` on the pool rows state_slots index, write the final states back into those rows,
    and return fn's outputs with final_state None: the slot-indexed form of either reference."""
    check_gdn_inputs(q, k, v, (g, beta), ("g", "beta"), initial_state, cu_seqlens, state_slots)
    check_slot_values(state_slots, initial_state.shape[0])
    slots = state_slots.long()
    o, final_state, extra = fn(q, k, v, g, beta, initial_state=initial_state[slots], output_final_state=True,
                               cu_seqlens=cu_seqlens, **kwargs)
    initial_state[slots] = final_state
    return o, None, extra


def _initial_state(initial_state, N, Hv, K, V, device):
    if initial_state is None:
        return torch.zeros(N, Hv, K, V, dtype=torch.float32, device=device)
    return initial_state.float().clone()


def naive_recurrent_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=True,
                                     cu_seqlens=None, output_all_states=False, use_qk_l2norm=True, state_slots=None):
    """The gated delta rule token by token.

    q, k: [B, T, Hk, K]; v: [B, T, Hv, V] with Hv a multiple of Hk; g, beta: [B, T, Hv].
    initial_state: [N, Hv, K, V] or None (zeros); cu_seqlens: [N + 1] or None (N = B).
    state_slots: [N] int32/int64 or None. With it, initial_state is the whole fp32 pool
    [S, Hv, K, V]: sequence n starts from pool[state_slots[n]] and its final state is written back
    there (output_final_state is then moot: the pool is the output).
    Returns (o [B, T, Hv, V] in v.dtype, final_state [N, Hv, K, V] fp32 or None (always None with
    state_slots), all_states [B, T, Hv, K, V] fp32 or None: the state after every token).

    Example, two sequences of 3 and 5 tokens packed:
        o, s, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 3, 8]))
        # q: [1, 8, Hk, K] ... s: [2, Hv, K, V]
    """
    if state_slots is not None:
        return _with_state_slots(naive_recurrent_gated_delta_rule, q, k, v, g, beta, initial_state, state_slots,
                                 cu_seqlens, scale=scale, output_all_states=output_all_states,
                                 use_qk_l2norm=use_qk_l2norm)
    shapes = check_gdn_inputs(q, k, v, (g, beta), ("g", "beta"), initial_state, cu_seqlens)
    B, T, Hv, K, V, N = shapes.B, shapes.T, shapes.Hv, shapes.K, shapes.V, shapes.N
    dtype, device = v.dtype, v.device
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm, Hv)
    offsets = sequence_offsets(shapes, cu_seqlens, device)
    lengths = offsets.diff()
    L_max = int(lengths.max()) if N > 0 else 0

    # index[n, t]: the packed token t of sequence n, or B*T (a zero row) past its end
    pos = torch.arange(L_max, device=device)
    valid = pos[None, :] < lengths[:, None]
    index = torch.where(valid, offsets[:-1, None] + pos[None, :], B * T)
    q, k, v, g, beta = (_gather_padded(x, index) for x in (q, k, v, g, beta))  # [N, L_max, ...]

    S = _initial_state(initial_state, N, Hv, K, V, device)
    o = torch.zeros(N, L_max, Hv, V, dtype=torch.float32, device=device)
    all_states = torch.empty(B * T, Hv, K, V, dtype=torch.float32, device=device) if output_all_states else None
    for t in range(L_max):
        k_t = k[:, t]
        S = S * g[:, t].exp()[..., None, None]
        delta = beta[:, t, :, None] * (v[:, t] - torch.einsum("nhk,nhkv->nhv", k_t, S))
        S = S + k_t[..., :, None] * delta[..., None, :]
        o[:, t] = torch.einsum("nhk,nhkv->nhv", q[:, t], S)
        if all_states is not None:
            m = valid[:, t]
            all_states[index[m, t]] = S[m]

    # boolean indexing walks [N, L_max] row-major: sequence by sequence, i.e. the packed order
    o = o[valid].reshape(B, T, Hv, V).to(dtype)
    if all_states is not None:
        all_states = all_states.reshape(B, T, Hv, K, V)
    return o, (S if output_final_state else None), all_states


def naive_recurrent_gated_delta_rule_from_gates(q, k, v, a, b, A_log, dt_bias, **kwargs):
    """`gdn_gating` then `naive_recurrent_gated_delta_rule`: the reference of the fused recurrent kernel.

    a, b: [B, T, Hv] raw projections; A_log, dt_bias: [Hv]; other arguments (state_slots included)
    and the returned (o, final_state, all_states) as in `naive_recurrent_gated_delta_rule`.
    """
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    return naive_recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)


def naive_chunk_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=True,
                                 cu_seqlens=None, output_chunk_states=False, use_qk_l2norm=True, chunk_size=64,
                                 state_slots=None):
    """The gated delta rule in chunks of `chunk_size` tokens (the WY/UT form).

    Within a chunk, with G the cumulative sum of g from the chunk start and Γ_ij = exp(G_i - G_j):
        A = (I + strictly_lower(diag(beta) (K K^T ⊙ Γ)))^-1
        w = A (beta ⊙ K ⊙ e^G),  u = A (beta ⊙ V)
        V_new = u - w S
        O = (Q ⊙ e^G) S + causal(Q K^T ⊙ Γ) V_new
        S <- e^{G_last} S + (K ⊙ e^{G_last - G})^T V_new
    Everything that does not involve S is computed for all chunks of all sequences at once; only
    the three lines with S loop over the chunk index (all sequences advancing together).

    q, k: [B, T, Hk, K]; v: [B, T, Hv, V] with Hv a multiple of Hk; g, beta: [B, T, Hv].
    initial_state: [N, Hv, K, V] or None (zeros); cu_seqlens: [N + 1] or None (N = B).
    state_slots: [N] int32/int64 or None. With it, initial_state is the whole fp32 pool
    [S, Hv, K, V]: sequence n starts from pool[state_slots[n]] and its final state is written back
    there (output_final_state is then moot: the pool is the output).
    Returns (o [B, T, Hv, V] in v.dtype, final_state [N, Hv, K, V] fp32 or None (always None with
    state_slots), chunk_states [sum_n floor(L_n / chunk_size), Hv, K, V] fp32 or None: the state
    after each full chunk, sequence by sequence in order of position).
    """
    if state_slots is not None:
        return _with_state_slots(naive_chunk_gated_delta_rule, q, k, v, g, beta, initial_state, state_slots,
                                 cu_seqlens, scale=scale, output_chunk_states=output_chunk_states,
                                 use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size)
    shapes = check_gdn_inputs(q, k, v, (g, beta), ("g", "beta"), initial_state, cu_seqlens)
    B, T, Hv, K, V, N = shapes.B, shapes.T, shapes.Hv, shapes.K, shapes.V, shapes.N
    BT = chunk_size
    dtype, device = v.dtype, v.device
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm, Hv)
    offsets = sequence_offsets(shapes, cu_seqlens, device)
    lengths = offsets.diff()

    # chunk bookkeeping: chunk i belongs to sequence seq[i] and is its chunk number c_in_seq[i]
    n_chunks = (lengths + BT - 1) // BT
    NC = int(n_chunks.sum())
    C_max = int(n_chunks.max()) if N > 0 else 0
    first_chunk = n_chunks.cumsum(0) - n_chunks
    seq = torch.repeat_interleave(torch.arange(N, device=device), n_chunks)
    c_in_seq = torch.arange(NC, device=device) - first_chunk[seq]
    pos = c_in_seq[:, None] * BT + torch.arange(BT, device=device)[None, :]
    index = torch.where(pos < lengths[seq, None], offsets[seq, None] + pos, B * T)  # [NC, BT]
    # one more chunk made only of padding: the identity step for sequences that have run out of chunks
    index = torch.cat([index, index.new_full((1, BT), B * T)])

    # [NC + 1, Hv, BT, D] and [NC + 1, Hv, BT]
    q, k, v = (_gather_padded(x, index).transpose(1, 2).contiguous() for x in (q, k, v))
    g, beta = (_gather_padded(x, index).transpose(1, 2).contiguous() for x in (g, beta))

    G = g.cumsum(-1)
    causal = torch.ones(BT, BT, dtype=torch.bool, device=device).tril()
    # Γ_ij = exp(G_i - G_j) for i >= j, 0 above the diagonal (masking before exp avoids overflow)
    gamma = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    strictly_lower = torch.ones(BT, BT, dtype=torch.bool, device=device).tril(-1)
    lower = (beta[..., :, None] * (k @ k.transpose(-1, -2)) * gamma).masked_fill(~strictly_lower, 0)
    eye = torch.eye(BT, dtype=torch.float32, device=device)
    # (I + L) is unit lower-triangular: forward substitution instead of forming the inverse
    w = torch.linalg.solve_triangular(eye + lower, beta[..., None] * k * G.exp()[..., None], upper=False,
                                      unitriangular=True)
    u = torch.linalg.solve_triangular(eye + lower, beta[..., None] * v, upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * gamma
    q_decayed = q * G.exp()[..., None]
    G_last = G[..., -1]  # padding has g = 0, so this is G at the last real token of the chunk
    k_decayed = k * (G_last[..., None] - G).exp()[..., None]
    state_decay = G_last.exp()

    # chunk_table[n, c]: global chunk id, or NC (the identity chunk) past the sequence's end
    c = torch.arange(C_max, device=device)
    chunk_table = torch.where(c[None, :] < n_chunks[:, None], first_chunk[:, None] + c[None, :], NC)

    full = (c[None, :] + 1) * BT <= lengths[:, None]  # [N, C_max]: chunk c of sequence n is complete
    chunk_states = None
    if output_chunk_states:
        chunk_states = torch.empty(int(full.sum()), Hv, K, V, dtype=torch.float32, device=device)
        state_slot = full.flatten().cumsum(0).reshape(N, C_max) - 1

    S = _initial_state(initial_state, N, Hv, K, V, device)
    o = torch.empty(NC + 1, Hv, BT, V, dtype=torch.float32, device=device)
    for i in range(C_max):
        ids = chunk_table[:, i]
        v_new = u[ids] - w[ids] @ S
        o[ids] = q_decayed[ids] @ S + attn[ids] @ v_new
        S = state_decay[ids][..., None, None] * S + k_decayed[ids].transpose(-1, -2) @ v_new
        if chunk_states is not None:
            m = full[:, i]
            chunk_states[state_slot[m, i]] = S[m]

    # scatter chunks back to packed tokens; padded positions land in the dropped row B*T
    o_flat = torch.empty(B * T + 1, Hv, V, dtype=torch.float32, device=device)
    o_flat[index[:NC].flatten()] = o[:NC].transpose(1, 2).reshape(NC * BT, Hv, V)
    o = o_flat[:B * T].reshape(B, T, Hv, V).to(dtype)
    return o, (S if output_final_state else None), chunk_states
