"""The CPU path (kernels/*/cpu.py) against the plain torch references (naive.py) on fresh random inputs.

Where the CPU path runs naive.py's arithmetic op for op (norms, conv update, RoPE, the cache
scatter) the results must be identical; where it regroups matmuls or sums over a padded row
(the decode recurrence, the routed experts, paged attention) they must agree to the conftest
rule. Shapes are awkward on purpose: more value heads than key heads, head dims that are not
powers of two, rotary dims short of the head, -1 expert slots, padding slots and block-table
entries past a sequence's blocks, NaN in every cache slot and pool row no one owns.
"""
import math

import pytest
import torch

from nextserve.kernels import ops
from nextserve.kernels.attention import cpu as attention_cpu
from nextserve.kernels.attention import cpu_fused as attention_fused
from nextserve.kernels.attention import naive as attention_naive
from nextserve.kernels.conv import cpu as conv_cpu
from nextserve.kernels.conv import cpu_fused as conv_fused
from nextserve.kernels.conv import naive as conv_naive
from nextserve.kernels.gated_delta_rule import cpu as gdn_cpu
from nextserve.kernels.gated_delta_rule import cpu_fused as gdn_fused
from nextserve.kernels.gated_delta_rule import naive as gdn_naive
from nextserve.kernels.linear import cpu as linear_cpu
from nextserve.kernels.moe import cpu as moe_cpu
from nextserve.kernels.moe import cpu_fused as moe_fused
from nextserve.kernels.moe import cpu_grouped as moe_grouped
from nextserve.kernels.moe import naive as moe_naive
from nextserve.kernels.norms import cpu as norms_cpu
from nextserve.kernels.norms import cpu_fused as norms_fused
from nextserve.kernels.norms import naive as norms_naive

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
BLOCK = 64


def randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


# --- norms ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 512), (16, 100), (3, 5, 48)], ids=["decode", "batch", "per-head"])
def test_norms_equal_the_reference(shape, dtype, close):
    # the fused op (where built) sums the squares in another order: the reference's tolerance over H,
    # one rounding to the activation dtype (three in the gated form); the residual sum is exact
    gen = torch.Generator().manual_seed(sum(shape))
    x, residual, z = (randn(gen, *shape, dtype=dtype) for _ in range(3))
    w = randn(gen, shape[-1], dtype=dtype, scale=0.2)
    H = shape[-1]
    for zero_centered in (True, False):
        got = norms_cpu.rms_norm(x, w, 1e-6, zero_centered=zero_centered)
        assert got.dtype == dtype and got.shape == x.shape
        close(got, norms_naive.rms_norm(x, w, 1e-6, zero_centered=zero_centered), reduction=H, dtype=dtype)
    got_y, got_sum = norms_cpu.rms_norm(x, w, 1e-6, residual=residual)
    want_y, want_sum = norms_naive.rms_norm(x, w, 1e-6, residual=residual)
    close(got_y, want_y, reduction=H, dtype=dtype)
    assert torch.equal(got_sum, want_sum)
    got = norms_cpu.gated_rms_norm(x, z, w, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    close(got, norms_naive.gated_rms_norm(x, z, w, 1e-6), reduction=H, dtype=dtype, roundings=3)


def test_the_fused_norms_build():
    # CI installs g++ (the Makefile's test-deps): the op must build there, not fall back silently
    assert norms_fused.available()


def test_norm_shape_errors_name_the_tensors():
    with pytest.raises(ValueError, match="disagree on H"):
        norms_cpu.rms_norm(torch.randn(2, 8), torch.randn(9), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        norms_cpu.rms_norm(torch.randn(2, 8), torch.randn(8), 1e-6, residual=torch.randn(3, 8))
    with pytest.raises(ValueError, match="z"):
        norms_cpu.gated_rms_norm(torch.randn(2, 8), torch.randn(2, 9), torch.randn(8), 1e-6)


# --- causal conv1d update -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, C, W", [(1, 40, 4), (5, 136, 4), (3, 17, 2)], ids=["decode", "batch", "W2"])
def test_conv_update_equals_the_reference(N, C, W, dtype, close, monkeypatch):
    # on the C++ op (where built) silu's exp may differ from torch's in the last bit: the tolerance of
    # W fp32 products and one rounding; the torch form is naive.py's op for op, so bit for bit. The
    # rolled windows are copies either way.
    gen = torch.Generator().manual_seed(N * C)
    x, weight = randn(gen, N, C, dtype=dtype), randn(gen, C, W, dtype=dtype)
    start = torch.full((N + 3, C, W - 1), float("nan"), dtype=dtype)
    slots = torch.randperm(N + 3, generator=gen)[:N]
    start[slots] = randn(gen, N, C, W - 1, dtype=dtype)
    start_states = randn(gen, N, C, W - 1, dtype=dtype)
    for cpp in (True, False):
        if not cpp:
            monkeypatch.setattr(conv_fused, "takes", lambda *args: False)

        def same(got, want, what):
            if cpp:
                close(got, want, reduction=W, dtype=dtype, what=what)
            else:
                assert torch.equal(got, want), what
        pool, ref_pool = start.clone(), start.clone()
        got = conv_cpu.causal_conv1d_update(x, pool, weight, state_slots=slots.to(torch.int32))
        same(got, conv_naive.causal_conv1d_update(x, ref_pool, weight, state_slots=slots), "by slot")
        assert torch.equal(pool.nan_to_num(7.0), ref_pool.nan_to_num(7.0))  # rolled rows equal, the others untouched NaN

        states, ref_states = start_states.clone(), start_states.clone()  # without slots: rolled in place
        for activation in (None, "silu"):
            same(conv_cpu.causal_conv1d_update(x, states, weight, activation=activation),
                 conv_naive.causal_conv1d_update(x, ref_states, weight, activation=activation), f"{activation}")
            assert torch.equal(states, ref_states)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slots_as", ["tensor", "range"])
def test_conv_update_steps_equal_that_many_updates(slots_as, dtype, monkeypatch):
    """A speculative verification's T tokens per sequence in one call give the bits of T decode steps,
    outputs and rolled windows alike (the C++ op's one prefill, and the torch form's loop)."""
    N, T, C, W = 3, 4, 40, 4
    gen = torch.Generator().manual_seed(T * C)
    x, weight = randn(gen, N, T, C, dtype=dtype), randn(gen, C, W, dtype=dtype)
    start = torch.full((N + 3, C, W - 1), float("nan"), dtype=dtype)
    slots = range(2, 2 + N) if slots_as == "range" else torch.randperm(N + 3, generator=gen)[:N]
    rows = torch.arange(2, 2 + N) if slots_as == "range" else slots
    start[rows] = randn(gen, N, C, W - 1, dtype=dtype)
    for cpp in (True, False):
        if not cpp:
            monkeypatch.setattr(conv_fused, "takes", lambda *args: False)
        pool, ref_pool = start.clone(), start.clone()
        got = conv_cpu.causal_conv1d_update_steps(x, pool, weight, state_slots=slots)
        want = torch.stack([conv_cpu.causal_conv1d_update(x[:, t], ref_pool, weight, state_slots=slots)
                            for t in range(T)], dim=1)
        assert got.shape == (N, T, C) and torch.equal(got, want), f"C++ op: {cpp}"
        assert torch.equal(pool.nan_to_num(7.0), ref_pool.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths, W", [([7], 4), ([5, 1, 70], 4), ([2, 3], 2)], ids=["one", "ragged", "W2"])
def test_conv_prefill_equals_the_reference(lengths, W, dtype, close):
    """Shorter sequences than the window read their state columns; the sums match naive.py's bit for bit
    (silu aside), the new states exactly."""
    gen = torch.Generator().manual_seed(sum(lengths) * W)
    N, C, T = len(lengths), 24, sum(lengths)
    x, weight = randn(gen, T, C, dtype=dtype), randn(gen, C, W, dtype=dtype)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    for initial in (None, randn(gen, N, C, W - 1, dtype=dtype)):
        for activation in (None, "silu"):
            got = conv_cpu.causal_conv1d(x, weight, initial_state=initial, cu_seqlens=cu, activation=activation)
            want = conv_naive.causal_conv1d(x, weight, initial_state=initial, cu_seqlens=cu, activation=activation)
            if activation is None:
                assert torch.equal(got[0], want[0])
            else:  # the fused op's silu may differ from torch's in the last bit
                close(got[0], want[0], reduction=W, dtype=dtype)
            assert torch.equal(got[1], want[1])
    # states by slot (the fused op where built): the same sums, and silu whose exp may differ from
    # torch's in the last bit; the states it writes back are copies, exact
    start = torch.full((N + 2, C, W - 1), float("nan"), dtype=dtype)
    slots = torch.randperm(N + 2, generator=gen)[:N]
    start[slots] = randn(gen, N, C, W - 1, dtype=dtype)
    for activation in (None, "silu"):
        pool, ref_pool = start.clone(), start.clone()
        got, none = conv_cpu.causal_conv1d(x, weight, initial_state=pool, state_slots=slots.to(torch.int32),
                                           cu_seqlens=cu, activation=activation)
        want, _ = conv_naive.causal_conv1d(x, weight, initial_state=ref_pool, state_slots=slots, cu_seqlens=cu,
                                           activation=activation)
        assert none is None and got.dtype == dtype
        if activation is None:
            assert torch.equal(got, want)
        else:
            close(got, want, reduction=W, dtype=dtype)
        assert torch.equal(pool.nan_to_num(7.0), ref_pool.nan_to_num(7.0))


def test_the_fused_conv_builds():
    # CI installs g++ (the Makefile's test-deps): the op must build there, not fall back silently
    assert conv_fused.available()


# --- gated delta rule decode ---------------------------------------------------------------------

def recurrence_chain(T: int, K: int) -> int:
    return T + 2 * K  # as in test_gated_delta_rule_naive.py


GDN_CASES = {
    # name: (B, T, Hk, Hv, K, V)
    "decode-small-preset": (1, 1, 4, 8, 64, 64),
    "decode-batch-awkward": (5, 1, 1, 2, 24, 20),
    "short-continuation": (3, 4, 2, 6, 16, 12),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(GDN_CASES))
def test_recurrent_decode_equals_the_reference(case, dtype, close):
    B, T, Hk, Hv, K, V = GDN_CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    q, k = randn(gen, B, T, Hk, K, dtype=dtype), randn(gen, B, T, Hk, K, dtype=dtype)
    v = randn(gen, B, T, Hv, V, dtype=dtype)
    a, b = randn(gen, B, T, Hv, dtype=dtype, scale=2), randn(gen, B, T, Hv, dtype=dtype, scale=2)
    A_log, dt_bias = (torch.rand(Hv, generator=gen) * 2 - 1).to(dtype), randn(gen, Hv, dtype=dtype, scale=0.5)
    pool = torch.full((B + 2, Hv, K, V), float("nan"))
    slots = torch.randperm(B + 2, generator=gen)[:B]
    pool[slots] = randn(gen, B, Hv, K, V)
    ref_pool, start_pool = pool.clone(), pool.clone()
    args = (q, k, v, a, b, A_log, dt_bias)
    chain = recurrence_chain(T, K)

    o, none, all_states = gdn_cpu.fused_recurrent_gated_delta_rule(*args, initial_state=pool, state_slots=slots,
                                                                   output_all_states=True)
    o_ref, _, all_ref = gdn_naive.naive_recurrent_gated_delta_rule_from_gates(
        *args, initial_state=ref_pool, state_slots=slots, output_all_states=True)
    assert none is None and o.dtype == dtype
    close(o, o_ref, reduction=chain, what="output")
    close(all_states, all_ref, reduction=chain, what="state after every token")
    close(pool[slots], ref_pool[slots], reduction=chain, what="final states in the pool")
    unused = sorted(set(range(B + 2)) - set(slots.tolist()))
    assert torch.isnan(pool[unused]).all()

    # the pool rows by slot without every token's state: a decode step (T = 1) runs the fused op
    fused_pool, naive_pool = start_pool.clone(), start_pool.clone()
    o, _, _ = gdn_cpu.fused_recurrent_gated_delta_rule(*args, initial_state=fused_pool, state_slots=slots)
    o_ref, _, _ = gdn_naive.naive_recurrent_gated_delta_rule_from_gates(*args, initial_state=naive_pool,
                                                                        state_slots=slots)
    close(o, o_ref, reduction=chain, what="output, states by slot")
    close(fused_pool[slots], naive_pool[slots], reduction=chain, what="pool rows, states by slot")
    assert torch.isnan(fused_pool[unused]).all()

    # without slots, from zeros and from given states, with a given scale and without the L2 norm
    for kwargs in (dict(), dict(initial_state=ref_pool[slots].clone(), scale=0.3, use_qk_l2norm=False)):
        o, final, _ = gdn_cpu.fused_recurrent_gated_delta_rule(*args, **kwargs)
        o_ref, final_ref, _ = gdn_naive.naive_recurrent_gated_delta_rule_from_gates(*args, **kwargs)
        close(o, o_ref, reduction=chain, what="output without slots")
        close(final, final_ref, reduction=chain, what="final state without slots")


def test_the_fused_decode_step_builds():
    # CI installs g++ (the Makefile's test-deps): the op must build there, not fall back silently
    assert gdn_fused.available()


def test_recurrent_with_cu_seqlens_is_the_reference():
    """Packed sequences of unequal length take naive.py's packed form (and its slot checks)."""
    gen = torch.Generator().manual_seed(0)
    q, v = randn(gen, 1, 5, 1, 8), randn(gen, 1, 5, 2, 8)
    a = randn(gen, 1, 5, 2)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    got = gdn_cpu.fused_recurrent_gated_delta_rule(q, q, v, a, a, torch.zeros(2), torch.zeros(2), cu_seqlens=cu)
    want = gdn_naive.naive_recurrent_gated_delta_rule_from_gates(q, q, v, a, a, torch.zeros(2), torch.zeros(2),
                                                                 cu_seqlens=cu)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="appears twice"):
        gdn_cpu.fused_recurrent_gated_delta_rule(q, q, v, a, a, torch.zeros(2), torch.zeros(2), cu_seqlens=cu,
                                                 initial_state=torch.zeros(4, 2, 8, 8),
                                                 state_slots=torch.tensor([1, 1]))


# --- gated delta rule prefill (chunked) ----------------------------------------------------------

def chunk_chain(T: int, K: int, chunk: int = 64) -> int:
    return recurrence_chain(T, K) + 2 * chunk  # as in test_gated_delta_rule_naive.py


CHUNK_CASES = {
    # name: (lengths, Hk, Hv, K, V, log-decay scale): lengths across and short of the 64-token chunk
    "batch-small-preset": ([128, 64, 130, 1], 4, 8, 64, 64, 1.5),
    "awkward-dims": ([70, 3, 64], 1, 3, 24, 20, 1.5),
    # decays strong enough that a chunk's state falls below e^-60: the pairwise-exp branch
    "strong-decay": ([150, 40], 2, 2, 128, 32, 30.0),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_chunked_prefill_equals_the_reference(case, dtype, rms_close):
    lengths, Hk, Hv, K, V, decay = CHUNK_CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    T, N = sum(lengths), len(lengths)
    q, k = randn(gen, 1, T, Hk, K, dtype=dtype), randn(gen, 1, T, Hk, K, dtype=dtype)
    v = randn(gen, 1, T, Hv, V, dtype=dtype)
    g, beta = -torch.rand(1, T, Hv, generator=gen) * decay, torch.rand(1, T, Hv, generator=gen)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    pool = torch.full((N + 2, Hv, K, V), float("nan"))
    slots = torch.randperm(N + 2, generator=gen)[:N]
    pool[slots] = randn(gen, N, Hv, K, V)
    ref_pool, start_pool = pool.clone(), pool.clone()
    args = (q, k, v, g, beta)
    chain = chunk_chain(max(lengths), K)

    o, none, chunk_states = gdn_cpu.chunk_gated_delta_rule(*args, initial_state=pool, state_slots=slots,
                                                           cu_seqlens=cu, output_chunk_states=True)
    o_ref, _, chunk_ref = gdn_naive.naive_chunk_gated_delta_rule(*args, initial_state=ref_pool, state_slots=slots,
                                                                 cu_seqlens=cu, output_chunk_states=True)
    assert none is None and o.dtype == dtype and chunk_states.shape == chunk_ref.shape
    rms_close(o, o_ref, reduction=chain, dtype=dtype, what="output")
    rms_close(chunk_states, chunk_ref, reduction=chain, what="states after each full chunk")
    rms_close(pool[slots], ref_pool[slots], reduction=chain, what="final states in the pool")
    unused = sorted(set(range(N + 2)) - set(slots.tolist()))
    assert torch.isnan(pool[unused]).all()

    # per-sequence states and zeros are run on the same op: the same bits as the pool rows
    got_o, final, _ = gdn_cpu.chunk_gated_delta_rule(*args, initial_state=start_pool[slots], cu_seqlens=cu)
    assert torch.equal(got_o, o) and torch.equal(final, pool[slots])
    # without the in-kernel norm, q and k come normalised (unnormalised keys make the rule diverge)
    normalised = (gdn_naive.l2norm(q.float()).to(dtype), gdn_naive.l2norm(k.float()).to(dtype), v, g, beta)
    for inputs, kwargs in ((args, dict()), (normalised, dict(scale=0.3, use_qk_l2norm=False))):
        got_o, final, _ = gdn_cpu.chunk_gated_delta_rule(*inputs, cu_seqlens=cu, **kwargs)
        o_ref, final_ref, _ = gdn_naive.naive_chunk_gated_delta_rule(*inputs, cu_seqlens=cu, **kwargs)
        rms_close(got_o, o_ref, reduction=chain, dtype=dtype, what=f"output from zeros {kwargs}")
        rms_close(final, final_ref, reduction=chain, what=f"final state from zeros {kwargs}")


def test_chunked_prefill_takes_unpacked_batches_and_other_chunk_sizes(rms_close):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (randn(gen, 3, 70, 2, 16) for _ in range(3))
    g, beta = -torch.rand(3, 70, 2, generator=gen), torch.rand(3, 70, 2, generator=gen)
    state = randn(gen, 3, 2, 16, 16)
    o, final, cs = gdn_cpu.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, output_chunk_states=True)
    o_ref, final_ref, cs_ref = gdn_naive.naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state,
                                                                      output_chunk_states=True)
    for got, want, what in ((o, o_ref, "output"), (final, final_ref, "final state"), (cs, cs_ref, "chunk states")):
        rms_close(got, want, reduction=chunk_chain(70, 16), what=what)
    # a chunk other than the op's 64 is naive.py's own computation
    got = gdn_cpu.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16)
    want = gdn_naive.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="appears twice"):
        gdn_cpu.chunk_gated_delta_rule(q[:1], k[:1], v[:1], g[:1], beta[:1], cu_seqlens=torch.tensor([0, 30, 70]),
                                       initial_state=torch.zeros(4, 2, 16, 16), state_slots=torch.tensor([2, 2]))


# --- q/k norm + RoPE -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, Hq, Hkv, D, rotary_dim", [(1, 8, 2, 64, 16), (7, 6, 2, 48, 48), (5, 3, 1, 20, 8)],
                         ids=["decode-small-preset", "full-rotary", "awkward"])
def test_qk_norm_rope_equals_the_reference(T, Hq, Hkv, D, rotary_dim, dtype, close, monkeypatch):
    # q and k as the layer hands them over: views into one projection's rows, q every other head-sized
    # chunk (its gate in between), so neither is contiguous
    gen = torch.Generator().manual_seed(T * D)
    projected = randn(gen, T, 2 * Hq * D + 2 * Hkv * D, dtype=dtype)
    q_gate, k, _ = projected.split([2 * Hq * D, Hkv * D, Hkv * D], dim=-1)
    q = q_gate.view(T, Hq, 2 * D)[..., :D]
    k = k.view(T, Hkv, D)
    wq, wk = randn(gen, D, dtype=dtype, scale=0.1), randn(gen, D, dtype=dtype, scale=0.1)
    positions = torch.randint(0, 40000, (T,), generator=gen)
    want = attention_naive.qk_norm_rope(q, k, wq, wk, positions, rotary_dim=rotary_dim, theta=1e7, eps=1e-6)

    # the C++ op: its own sum-of-squares order and the C library's cos and sin, otherwise naive.py's
    # roundings (the norm, each product of the rotation and their sum, and cos or sin one ulp apart)
    got = attention_cpu.qk_norm_rope(q, k, wq, wk, positions, rotary_dim=rotary_dim, theta=1e7, eps=1e-6)
    assert attention_fused.available()
    for g, w in zip(got, want):
        assert g.dtype == dtype
        close(g, w, reduction=D, dtype=dtype, roundings=4)

    # the torch form, where the op cannot be built: naive.py op for op
    monkeypatch.setattr(attention_fused, "available", lambda: False)
    got = attention_cpu.qk_norm_rope(q, k, wq, wk, positions, rotary_dim=rotary_dim, theta=1e7, eps=1e-6)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --- paged KV --------------------------------------------------------------------------------------

def paged_case(Lq, Lk, Hq, Hkv, D, dtype, seed):
    """NaN-filled caches holding the sequences' keys in shuffled blocks, block-table entries past each
    sequence's blocks set to -1 (and one column of them), as tests/kernels/test_paged_attention.py lays
    them out."""
    gen = torch.Generator().manual_seed(seed)
    n_blocks = [math.ceil(L / BLOCK) for L in Lk]
    num_blocks = sum(n_blocks) + 2
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(Lk), max(n_blocks) + 1), -1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, BLOCK, Hkv, D), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    used = 0
    for n, (L, nb) in enumerate(zip(Lk, n_blocks)):
        tables[n, :nb] = order[used:used + nb].to(torch.int32)
        used += nb
        pos = torch.arange(L)
        slots = tables[n, pos // BLOCK].long() * BLOCK + pos % BLOCK
        k_cache.view(-1, Hkv, D)[slots] = randn(gen, L, Hkv, D, dtype=dtype)
        v_cache.view(-1, Hkv, D)[slots] = randn(gen, L, Hkv, D, dtype=dtype)
    q, gate = randn(gen, sum(Lq), Hq, D, dtype=dtype), randn(gen, sum(Lq), Hq, D, dtype=dtype)
    cu_q = torch.tensor([0, *torch.tensor(Lq).cumsum(0).tolist()], dtype=torch.int32)
    return q, gate, k_cache, v_cache, tables, cu_q, torch.tensor(Lk, dtype=torch.int32)


PAGED_CASES = {
    # name: (Lq per sequence, Lk per sequence, Hq, Hkv, D)
    "decode": ([1, 1, 1, 1], [1, 64, 65, 130], 8, 2, 32),
    "verify-with-idle-sequence": ([3, 0, 5, 1], [67, 3, 5, 129], 6, 2, 24),  # drafts, Lq = 0, G = 3
    "prefill-takes-the-reference": ([65, 2], [65, 70], 4, 2, 16),
}
ATTENTION_ROUNDINGS = {torch.float32: 1, torch.bfloat16: 4}  # as in test_paged_attention.py


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(PAGED_CASES))
def test_paged_attention_equals_the_reference(case, dtype, close):
    Lq, Lk, Hq, Hkv, D = PAGED_CASES[case]
    q, gate, k_cache, v_cache, tables, cu_q, seq_lens_k = paged_case(Lq, Lk, Hq, Hkv, D, dtype, seed=len(case))
    args = (q, k_cache, v_cache, tables, cu_q, seq_lens_k)
    for g in (gate, None):
        got = attention_cpu.paged_attention(*args, scale=D ** -0.5, gate=g)
        want = attention_naive.paged_attention(*args, scale=D ** -0.5, gate=g)
        close(got, want, reduction=max(Lk) + D, roundings=ATTENTION_ROUNDINGS[dtype],
              what=f"{'gated' if g is not None else 'ungated'} output")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slot_mapping", [[130, 5, -1, 64, 255, 0, -1, 191, 63], [-1, 7, -1], [-1, -1], [3, 0, 200]],
                         ids=["padding-inside", "padding-first", "all-padding", "no-padding"])
def test_reshape_and_cache_equals_the_reference(slot_mapping, dtype):
    gen = torch.Generator().manual_seed(len(slot_mapping))
    T, Hkv, D = len(slot_mapping), 2, 12
    k, v = randn(gen, T, Hkv, D, dtype=dtype), randn(gen, T, Hkv, D, dtype=dtype)
    caches = [randn(gen, 4, BLOCK, Hkv, D, dtype=dtype) for _ in range(2)]
    ref = [c.clone() for c in caches]
    for mapping in (torch.tensor(slot_mapping), torch.tensor(slot_mapping, dtype=torch.int32)):
        attention_cpu.reshape_and_cache(k, v, *caches, mapping)
        attention_naive.reshape_and_cache(k, v, *ref, mapping)
        assert torch.equal(caches[0], ref[0]) and torch.equal(caches[1], ref[1])


# --- routed experts ---------------------------------------------------------------------------------

BLOCK_CHAIN = 48 + 40 + 3 + 1  # gate/up over H, down over I, k slots summed (as in test_moe.py)


FORM_DTYPES = [pytest.param(form, dtype, id=f"{form}-{name}") for form in sorted(moe_cpu.FORMS)
               for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
               if dtype == torch.bfloat16 or form not in moe_cpu.BF16_ONLY]


@pytest.mark.parametrize("form, dtype", FORM_DTYPES)
@pytest.mark.parametrize("T", [1, 3, 17])
def test_every_expert_form_equals_the_reference(T, form, dtype, close):
    gen = torch.Generator().manual_seed(T)
    E, k, H, I = 7, 3, 48, 40
    hidden = randn(gen, T, H, dtype=dtype)
    w13, w2 = randn(gen, E, 2 * I, H, dtype=dtype, scale=0.2), randn(gen, E, H, I, dtype=dtype, scale=0.2)
    weights, ids = moe_naive.moe_route(torch.randn(T, 12, generator=gen), k)
    local = torch.where(ids < E, ids, -1)  # a shard holding experts 0..6 of 12: some slots are elsewhere
    for out_dtype in (None, torch.float32):
        got = moe_cpu.FORMS[form](hidden, local, weights, w13, w2, out_dtype=out_dtype)
        want = moe_naive.expert_ffn(hidden, local, weights, w13, w2, out_dtype=out_dtype)
        assert got.dtype == want.dtype
        close(got, want, reduction=BLOCK_CHAIN, what=f"{form}, out_dtype {out_dtype}")
    nobody = torch.full_like(local, -1)
    assert torch.equal(moe_cpu.FORMS[form](hidden, nobody, weights, w13, w2), torch.zeros(T, H, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_grouped_form_with_and_without_its_cpp_ops_equals_the_reference(dtype, monkeypatch, close):
    # CI installs g++: the grouped form's C++ ops must build there; without them it runs torch ops
    assert moe_grouped.available()
    gen = torch.Generator().manual_seed(13)
    T, E, k, H, I = 40, 7, 3, 48, 40  # I = 40: SwiGLU's vector loop and its scalar tail
    hidden = randn(gen, T, H, dtype=dtype)
    w13, w2 = randn(gen, E, 2 * I, H, dtype=dtype, scale=0.2), randn(gen, E, H, I, dtype=dtype, scale=0.2)
    weights, ids = moe_naive.moe_route(torch.randn(T, 12, generator=gen), k)
    local = torch.where(ids < E, ids, -1)
    want = moe_naive.expert_ffn(hidden, local, weights, w13, w2, out_dtype=torch.float32)
    with_cpp = moe_cpu.grouped_expert_ffn(hidden, local, weights, w13, w2, out_dtype=torch.float32)
    monkeypatch.setattr(moe_grouped, "available", lambda: False)
    with_torch = moe_cpu.grouped_expert_ffn(hidden, local, weights, w13, w2, out_dtype=torch.float32)
    close(with_cpp, want, reduction=BLOCK_CHAIN, dtype=dtype, what="with the C++ ops")
    close(with_torch, want, reduction=BLOCK_CHAIN, dtype=dtype, what="with torch ops")


def test_the_grouped_form_from_fp32_copies_equals_the_reference(monkeypatch, close):
    # a CPU without native bf16 keeps fp32 copies of w13 and w2 (model.moe's prepack): the batched
    # matmuls read them, the same exact products of bf16 values summed in fp32
    monkeypatch.setattr(linear_cpu, "packing_supported", lambda: False)
    gen = torch.Generator().manual_seed(14)
    T, E, k, H, I = 40, 7, 3, 48, 40
    hidden = randn(gen, T, H, dtype=torch.bfloat16)
    w13 = randn(gen, E, 2 * I, H, dtype=torch.bfloat16, scale=0.2)
    w2 = randn(gen, E, H, I, dtype=torch.bfloat16, scale=0.2)
    assert ops.prepack_linear(w13) and ops.prepack_linear(w2) and ops.kept_in_fp32(w13) and ops.kept_in_fp32(w2)
    weights, ids = moe_naive.moe_route(torch.randn(T, 12, generator=gen), k)
    local = torch.where(ids < E, ids, -1)
    want = moe_naive.expert_ffn(hidden, local, weights, w13, w2, out_dtype=torch.float32)
    with torch.inference_mode():
        got = moe_cpu.grouped_expert_ffn(hidden, local, weights, w13, w2, out_dtype=torch.float32)
    close(got, want, reduction=BLOCK_CHAIN, dtype=torch.bfloat16)
    with torch.no_grad():
        w2.mul_(2)  # a reload in place: the copy follows
    with torch.inference_mode():
        got = moe_cpu.grouped_expert_ffn(hidden, local, weights, w13, w2, out_dtype=torch.float32)
    close(got, moe_naive.expert_ffn(hidden, local, weights, w13, w2, out_dtype=torch.float32),
          reduction=BLOCK_CHAIN, dtype=torch.bfloat16, what="after an in-place update of w2")


def test_the_fused_kernel_builds_and_takes_bf16_only():
    # CI installs g++ (the Makefile's test-deps): the kernel must build there, not fall back silently
    assert moe_fused.available()
    gen = torch.Generator().manual_seed(5)
    hidden, w13, w2 = torch.randn(2, 8, generator=gen), torch.randn(3, 12, 8, generator=gen), torch.randn(3, 8, 6, generator=gen)
    ids, weights = torch.tensor([[0, 2], [1, -1]]), torch.rand(2, 2, generator=gen)
    with pytest.raises(ValueError, match="bf16"):
        moe_fused.expert_ffn(hidden, ids, weights, w13, w2)
    with pytest.raises(RuntimeError, match="out of range"):
        moe_fused.expert_ffn(hidden.bfloat16(), torch.tensor([[0, 3], [1, -1]]), weights, w13.bfloat16(), w2.bfloat16())


def test_the_fused_kernel_gives_a_token_the_same_sum_alone_or_in_a_batch(close):
    # widths that are multiples of 16 take the vector path, slots blocked four at a time per expert:
    # a token's result must not depend on which tokens share its experts (batch invariance)
    gen = torch.Generator().manual_seed(11)
    T, E, k, H, I = 21, 6, 4, 64, 32
    hidden = randn(gen, T, H, dtype=torch.bfloat16)
    w13 = randn(gen, E, 2 * I, H, dtype=torch.bfloat16, scale=0.2)
    w2 = randn(gen, E, H, I, dtype=torch.bfloat16, scale=0.2)
    weights, ids = moe_naive.moe_route(torch.randn(T, E, generator=gen), k)
    batch = moe_fused.expert_ffn(hidden, ids, weights, w13, w2, out_dtype=torch.float32)
    want = moe_naive.expert_ffn(hidden, ids, weights, w13, w2, out_dtype=torch.float32)
    close(batch, want, reduction=H + I + k, dtype=torch.bfloat16)
    for t in (0, 7, T - 1):
        alone = moe_fused.expert_ffn(hidden[t:t + 1], ids[t:t + 1], weights[t:t + 1], w13, w2, out_dtype=torch.float32)
        assert torch.equal(alone[0], batch[t])


def test_the_form_follows_the_slot_count():
    small = (2 * 64 * 512 + 512 * 64) * 2  # one small-preset expert's w13 and w2 rows, bf16
    assert moe_cpu.choose_form(1, 8, 64, small, fused=True) == "fused"   # decode at batch 1, bf16
    assert moe_cpu.choose_form(24, 8, 64, small, fused=True) == "fused"  # ... up to batch 24
    assert moe_cpu.choose_form(32, 8, 64, small, fused=True, grouped_ops=True) == "grouped"
    assert moe_cpu.choose_form(16, 8, 64, small, grouped_ops=True) == "grouped"  # fp32: where dense paid
    assert moe_cpu.choose_form(1, 8, 64, small, grouped_ops=True) == "gathered"
    assert moe_cpu.choose_form(1, 8, 64, small) == "gathered"        # decode at batch 1 without the kernel
    assert moe_cpu.choose_form(16, 8, 64, small) == "dense"          # decode at batch 16
    assert moe_cpu.choose_form(128, 8, 64, small) == "grouped"       # a short prompt's prefill
    assert moe_cpu.choose_form(2048, 8, 64, small) == "grouped"      # a prefill chunk of 2048 tokens
    assert moe_cpu.choose_form(32768, 8, 64, small) == "loop"        # past 2048 slots per expert (unmeasured)
    big = 3 * 512 * 2048 * 2                                         # an 80B-A3B expert: copies too big,
    assert moe_cpu.choose_form(1, 10, 512, big) == "loop"            # and 51x the work for the dense form
    assert moe_cpu.choose_form(1, 10, 512, big, fused=True) == "fused"   # the kernel reads them in place


# --- the one door ------------------------------------------------------------------------------------

def test_ops_run_the_cpu_path_off_cuda_and_the_references_when_asked(monkeypatch):
    calls = []
    for module in (norms_cpu, norms_naive):
        monkeypatch.setattr(module, "rms_norm", lambda *a, _m=module, _f=module.rms_norm, **kw:
                            calls.append(_m.__name__.rsplit(".", 1)[1]) or _f(*a, **kw))
    x, w = torch.randn(2, 8), torch.zeros(8)
    monkeypatch.delenv("NEXTSERVE_KERNELS", raising=False)
    assert ops.kernel_backend(x.device) == "cpu"
    ops.rms_norm(x, w, 1e-6)
    monkeypatch.setenv("NEXTSERVE_KERNELS", "torch")
    ops.rms_norm(x, w, 1e-6)
    monkeypatch.setenv("NEXTSERVE_KERNELS", "cpu")
    ops.rms_norm(x, w, 1e-6)
    assert calls == ["cpu", "naive", "cpu"]
    monkeypatch.setenv("NEXTSERVE_KERNELS", "fast")
    with pytest.raises(ValueError, match="expected one of"):
        ops.rms_norm(x, w, 1e-6)


def test_the_grouped_batch_width_is_bucketed_so_shapes_recur():
    widths = [moe_cpu.padded_width(n) for n in range(1, 5000)]
    assert all(n <= w <= n + max(n // 8, 0) for n, w in zip(range(1, 5000), widths))  # at most 12.5% padding
    assert widths == sorted(widths)
    assert len(set(moe_cpu.padded_width(n) for n in range(257, 513))) == 8            # eight widths per octave


def test_a_kernel_that_cannot_be_built_is_reported_not_raised(tmp_path, caplog):
    from nextserve.kernels import cpu_extensions
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    with caplog.at_level("WARNING"):
        assert cpu_extensions.load("nextserve_test_broken", broken) is None
    assert cpu_extensions.failure("nextserve_test_broken") and "could not be built" in caplog.text
    assert cpu_extensions.load("nextserve_test_broken", broken) is None   # tried once per process
