"""The one door model code uses to reach a kernel.

Each op picks the Triton kernel on CUDA tensors and the CPU path elsewhere: `kernels/<family>/cpu.py`,
the plain torch references (`naive.py`) recomputed in fewer ops for the small token counts of decode,
falling back to the references elsewhere. `NEXTSERVE_KERNELS=triton`, `=cpu` or `=torch` (the plain
references alone) forces one path; with `TRITON_INTERPRET=1` the Triton path runs on the CPU, which is
how CI checks the kernels without a GPU.

Shapes follow flash-linear-attention: `T` tokens (sequences packed back to back and delimited
by `cu_seqlens` [N+1], int32, starting at 0), `H*` heads, `K`/`V`/`D` head dims.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

from .checks import check_slot_range, slot_tensor

_CHOICES = ("triton", "cpu", "torch")
TORCH_BACKENDS = ("cpu", "torch")  # pure torch, differentiable: what training can run on


def kernel_backend(device: torch.device) -> str:
    """"triton", "cpu" or "torch": what the ops run on `device`."""
    forced = os.environ.get("NEXTSERVE_KERNELS", "").strip().lower()
    if forced:
        if forced not in _CHOICES:
            raise ValueError(f"NEXTSERVE_KERNELS={forced!r}: expected one of {_CHOICES}")
        return forced
    return "triton" if device.type == "cuda" else "cpu"


def _pick(t: torch.Tensor, family: str, triton_impl: str, cpu_impl: str, torch_impl: str):
    """The implementation for t's device: `kernels/<family>/<module>.py:<function>`. Imported lazily so
    that the torch paths never import Triton."""
    chosen = {"triton": triton_impl, "cpu": cpu_impl, "torch": torch_impl}[kernel_backend(t.device)]
    module, name = chosen.split(":")
    return getattr(_module(family, module), name)  # looked up per call: tests may replace a function


@functools.cache
def _module(family: str, module: str):
    # Every op of every layer of every step asks: import each module once.
    return importlib.import_module(f"{__package__}.{family}.{module}")


# --- dense projections -----------------------------------------------------------------------

def linear(x, weight, row_order=None):
    """y = x W^T, no bias. x: [..., in]; weight: [out, in], or [E, rows, in] taken as [E * rows, in].
    row_order [out] int64: y's columns in that order (y[..., row_order]). On the CPU, bf16 weights
    given to `prepack_linear` (with the same row_order tensor) run with their oneDNN layout kept."""
    impl = _pick(x, "linear", "naive:linear", "cpu:linear", "naive:linear")
    return impl(x, weight, row_order)


def prepack_linear(weight, row_order=None) -> bool:
    """Keep `weight` (a served projection's, loaded) in the CPU path's matmul layout as well, rows in
    `row_order` if given, where that path runs (bf16 weights: oneDNN's layout on a CPU with native
    bf16, an fp32 copy elsewhere). Returns whether it did."""
    return kernel_backend(weight.device) == "cpu" and _module("linear", "cpu").prepack(weight, row_order)


def kept_in_fp32(weight) -> bool:
    """Whether `prepack_linear` kept an fp32 copy of this bf16 weight (a CPU without native bf16)."""
    return kernel_backend(weight.device) == "cpu" and _module("linear", "cpu").fp32_copy(weight) is not None


def is_prepacked(weight, row_order=None) -> bool:
    return (kernel_backend(weight.device) == "cpu"
            and _module("linear", "cpu").packed_weight(weight, row_order) is not None)


# --- norms -------------------------------------------------------------------------------

def rms_norm(x, weight, eps: float, *, zero_centered: bool = True, residual=None):
    """RMSNorm over the last dim, computed in fp32.

    zero_centered: y = x_hat * (1 + w) (Qwen3-Next's layer norms); else y = x_hat * w.
    With `residual`, first x = x + residual and return (y, x): the pre-norm residual stream.
    """
    impl = _pick(x, "norms", "triton_norms:rms_norm", "cpu:rms_norm", "naive:rms_norm")
    return impl(x, weight, eps, zero_centered=zero_centered, residual=residual)


def gated_rms_norm(x, z, weight, eps: float):
    """(w * rmsnorm(x)) * silu(z) over the last dim (the DeltaNet output norm, plain weight)."""
    impl = _pick(x, "norms", "triton_norms:gated_rms_norm", "cpu:gated_rms_norm", "naive:gated_rms_norm")
    return impl(x, z, weight, eps)


# --- Gated DeltaNet ----------------------------------------------------------------------

def gdn_gating(a, b, A_log, dt_bias):
    """(g, beta): g = -exp(A_log) * softplus(a + dt_bias) (log decay, fp32), beta = sigmoid(b) (fp32).

    a, b: [..., Hv]; A_log, dt_bias: [Hv].
    """
    impl = _pick(a, "gated_delta_rule", "naive:gdn_gating", "cpu:gdn_gating", "naive:gdn_gating")
    return impl(a, b, A_log, dt_bias)


# State slots: with `state_slots` [N] (int32/int64, on the tensors' device) the state argument of
# the ops below is a whole per-layer pool [S, ...] rather than one state per sequence: sequence n
# starts from pool[state_slots[n]] and its final state is written back there in place (the ops
# then return None for it). A freshly assigned slot must hold zeros; slots must be distinct. The
# kernels load and store by slot themselves: no gather or scatter copies around them.
#
# The two decode ops also take a `range` of consecutive slots (what ForwardBatch.slot_range holds
# when a batch's slots are consecutive). The CPU path then reads and updates those pool rows through
# one view; index_select and index_copy_ over the pool cost it more than the recurrence itself. The
# Triton and reference paths, which take tensors, get the range as one.

def _slots_for(impl, state_slots, pool):
    """state_slots as `impl` takes them: a range only where it says it takes one, checked here for
    every path."""
    if not isinstance(state_slots, range):
        return state_slots
    check_slot_range(state_slots, pool)
    return state_slots if getattr(impl, "takes_slot_range", False) else slot_tensor(state_slots, pool.device)


def chunk_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=True,
                           cu_seqlens=None, output_chunk_states=False, use_qk_l2norm=True, state_slots=None):
    """Prefill: the chunked (64-token WY) gated delta rule.

    q, k: [B, T, Hk, K]; v: [B, T, Hv, V] (Hv a multiple of Hk); g, beta: [B, T, Hv] fp32.
    With cu_seqlens, B == 1 and the N sequences are packed along T.
    initial_state: [N, Hv, K, V] fp32 or None (zeros); with state_slots [N], the fp32 pool
    [S, Hv, K, V] (final states written back by slot; output_final_state is then moot).
    Returns (o [B, T, Hv, V] in v.dtype, final_state [N, Hv, K, V] fp32 or None (None with
    state_slots), chunk_states [sum_n floor(L_n / 64), Hv, K, V] fp32 or None: the state after
    each full 64-token chunk of each sequence, counted from the sequence's first token here).
    """
    impl = _pick(q, "gated_delta_rule", "chunk:chunk_gated_delta_rule", "cpu:chunk_gated_delta_rule",
                 "naive:naive_chunk_gated_delta_rule")
    return impl(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, output_chunk_states=output_chunk_states, use_qk_l2norm=use_qk_l2norm,
                state_slots=state_slots)


def fused_recurrent_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, *, scale=None, initial_state=None,
                                     output_final_state=True, cu_seqlens=None, output_all_states=False,
                                     use_qk_l2norm=True, state_slots=None):
    """Decode and short continuations: the token-by-token gated delta rule, gating fused in.

    q, k: [B, T, Hk, K]; v: [B, T, Hv, V]; a, b: [B, T, Hv] (raw projections; g and beta are
    computed inside as in `gdn_gating`); initial_state [N, Hv, K, V] fp32 or None; with
    state_slots [N] or a range, the fp32 pool [S, Hv, K, V] (final states written back by slot).
    Returns (o [B, T, Hv, V], final_state [N, Hv, K, V] fp32 or None (None with state_slots),
    all_states [B, T, Hv, K, V] fp32 or None: the state after every token, for speculative
    decoding to keep the state of the last accepted draft token).
    """
    impl = _pick(q, "gated_delta_rule", "fused_recurrent:fused_recurrent_gated_delta_rule",
                 "cpu:fused_recurrent_gated_delta_rule", "naive:naive_recurrent_gated_delta_rule_from_gates")
    return impl(q, k, v, a, b, A_log, dt_bias, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                output_all_states=output_all_states, use_qk_l2norm=use_qk_l2norm,
                state_slots=_slots_for(impl, state_slots, initial_state))


def prepare_cpu_kernels(device) -> bool:
    """Build the CPU path's fused ops of the dense path (the RMSNorms, the delta rule, the prefill conv,
    paged attention; a compile of ~25 s each the first time on a machine) ahead of the first request,
    where that path runs on `device`. Returns whether they are ready."""
    if kernel_backend(torch.device(device)) != "cpu":
        return False
    return all([_module(family, "cpu_fused").available()
                for family in ("norms", "gated_delta_rule", "conv", "attention")])


# --- causal depthwise conv1d ----------------------------------------------------------------

def causal_conv1d(x, weight, *, initial_state=None, state_slots=None, cu_seqlens=None,
                  activation: str | None = "silu"):
    """Prefill: causal depthwise conv over packed sequences, then SiLU.

    x: [T, C]; weight: [C, W]; initial_state: [N, C, W-1] or None (zeros); with state_slots [N],
    the pool [S, C, W-1] in x.dtype (final states written back by slot).
    Returns (y [T, C], final_state [N, C, W-1] or None with state_slots): the last W-1 inputs of
    each sequence (nextserve keeps W-1 inputs, as vLLM does; transformers keeps W).
    """
    impl = _pick(x, "conv", "triton_conv:causal_conv1d", "cpu:causal_conv1d", "naive:causal_conv1d")
    return impl(x, weight, initial_state=initial_state, state_slots=state_slots, cu_seqlens=cu_seqlens,
                activation=activation)


def causal_conv1d_update(x, conv_state, weight, *, state_slots=None, activation: str | None = "silu"):
    """Decode: one token per sequence. x: [N, C]; conv_state: [N, C, W-1], rolled in place (with
    state_slots [N] or a range, the pool [S, C, W-1], rows rolled by slot). Returns y [N, C]."""
    impl = _pick(x, "conv", "triton_conv:causal_conv1d_update", "cpu:causal_conv1d_update",
                 "naive:causal_conv1d_update")
    return impl(x, conv_state, weight, state_slots=_slots_for(impl, state_slots, conv_state),
                activation=activation)


def causal_conv1d_update_steps(x, conv_state, weight, *, state_slots=None, activation: str | None = "silu"):
    """T decode steps per sequence in one call: x [N, T, C] -> y [N, T, C], the bits of T calls of
    `causal_conv1d_update` on x[:, 0], ..., x[:, T - 1] (a speculative verification's pending token and
    drafts). The CPU path runs them as one op; the others make the T calls."""
    if kernel_backend(x.device) == "cpu":
        impl = _module("conv", "cpu").causal_conv1d_update_steps
        return impl(x, conv_state, weight, state_slots=_slots_for(impl, state_slots, conv_state),
                    activation=activation)
    return torch.stack([causal_conv1d_update(x[:, t], conv_state, weight, state_slots=state_slots,
                                             activation=activation) for t in range(x.shape[1])], dim=1)


# --- attention ------------------------------------------------------------------------------

def qk_norm_rope(q, k, q_norm_weight, k_norm_weight, positions, *, rotary_dim: int, theta: float, eps: float):
    """Zero-centred RMSNorm of q and k per head, then NeoX RoPE on the first `rotary_dim` dims.

    q: [T, Hq, D]; k: [T, Hkv, D]; positions: [T] int64 absolute positions. Returns (q, k).
    """
    impl = _pick(q, "attention", "triton_attention:qk_norm_rope", "cpu:qk_norm_rope", "naive:qk_norm_rope")
    return impl(q, k, q_norm_weight, k_norm_weight, positions, rotary_dim=rotary_dim, theta=theta, eps=eps)


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, scale: float, gate=None):
    """Causal GQA attention over packed sequences, optionally gated: o * sigmoid(gate).

    q: [Tq, Hq, D]; k, v: [Tk, Hkv, D]; gate: [Tq, Hq, D] or None. Sequence n has Lq_n queries
    and Lk_n >= Lq_n keys; its queries are the LAST Lq_n positions (bottom-right causal), so the
    same op serves prefill, continuation from a KV cache and decode (Lq_n = 1).
    Returns o [Tq, Hq, D] in q.dtype.
    """
    impl = _pick(q, "attention", "triton_attention:attention", "cpu:attention", "naive:attention")
    return impl(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale, gate=gate)


def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Write new keys/values into the paged caches in place (a scatter, no copies of the cache).

    k, v: [T, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; slot_mapping: [T] int64,
    slot = block_id * block_size + offset; a negative slot is padding and is not written.
    """
    impl = _pick(k, "attention", "triton_attention:reshape_and_cache", "cpu:reshape_and_cache",
                 "naive:reshape_and_cache")
    impl(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, *, scale: float, gate=None):
    """`attention` with K/V read from paged caches through block tables.

    q: [Tq, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables: [N, max_blocks]
    int32 (entries past a sequence's blocks are never read); cu_seqlens_q: [N+1] int32; seq_lens_k:
    [N] int32, the keys of each sequence INCLUDING the new ones (already cached by
    `reshape_and_cache`). Queries are the last Lq_n positions (bottom-right causal): prefill,
    chunked prefill after cached blocks and decode alike. gate: [Tq, Hq, D] or None.
    Returns o [Tq, Hq, D] in q.dtype (fp32 accumulation).
    """
    impl = _pick(q, "attention", "triton_attention:paged_attention", "cpu:paged_attention",
                 "naive:paged_attention")
    return impl(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale=scale, gate=gate)


# --- mixture of experts ---------------------------------------------------------------------

def moe_route(router_logits, top_k: int, *, renormalize: bool = True):
    """Softmax over all experts (fp32), top-k, optional renormalisation to sum 1.

    router_logits: [T, E]. Returns (weights [T, top_k] fp32, expert_ids [T, top_k] int64).
    """
    impl = _pick(router_logits, "moe", "triton_moe:moe_route", "cpu:moe_route", "naive:moe_route")
    return impl(router_logits, top_k, renormalize=renormalize)


def expert_ffn(hidden, expert_ids, expert_weights, w13, w2, *, out_dtype=None):
    """The experts one shard holds, applied to the tokens routed to them, summed with weights.

    hidden: [T, H]; expert_ids: [T, k] int, LOCAL indices into w13/w2, -1 where the expert is
    held elsewhere (contributes nothing); expert_weights: [T, k] fp32;
    w13: [E_local, 2*I, H] (gate_proj rows then up_proj rows); w2: [E_local, H, I].
    out[t] = sum_j weights[t, j] * down_e(silu(gate_e h_t) * up_e h_t), e = expert_ids[t, j].
    Returns [T, H] in out_dtype (default hidden.dtype), accumulated in fp32: out_dtype=torch.float32
    keeps a shard's partial sum unrounded until the shards' partials are added.
    """
    impl = _pick(hidden, "moe", "triton_moe:expert_ffn", "cpu:expert_ffn", "naive:expert_ffn")
    return impl(hidden, expert_ids, expert_weights, w13, w2, out_dtype=out_dtype)


def prepare_expert_ffn(w13) -> bool:
    """Build what `expert_ffn` will run on w13's device and dtype ahead of the first request: on the
    CPU path the grouped form's prefill ops and, in bf16, the fused decode kernel (a compile of ~30 s
    each the first time on a machine). Returns whether they are ready."""
    if kernel_backend(w13.device) != "cpu" or w13.numel() == 0:
        return False
    grouped = _module("moe", "cpu_grouped").available()
    return grouped and (w13.dtype != torch.bfloat16 or _module("moe", "cpu_fused").available())
