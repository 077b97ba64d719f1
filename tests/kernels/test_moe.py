"""MoE routing and expert FFN: the torch references against transformers, the Triton kernels against them."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3NextConfig
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock, Qwen3NextTopKRouter

from nextserve.kernels import ops
from nextserve.kernels.moe import naive, triton_moe


def small_config(**overrides):
    kwargs = dict(hidden_size=48, num_experts=12, num_experts_per_tok=3, moe_intermediate_size=40,
                  shared_expert_intermediate_size=24, norm_topk_prob=True)
    kwargs.update(overrides)
    return Qwen3NextConfig(**kwargs)


# The longest accumulation behind a block output: gate/up over H, down over I, k + 1 experts summed.
BLOCK_CHAIN = 48 + 40 + 3 + 1


def random_block(config, dtype):
    block = Qwen3NextSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block.to(dtype)


def block_from_ops(block, x):
    """The sparse MoE block composed from our ops: route, experts, gated shared expert."""
    logits = F.linear(x, block.gate.weight)
    weights, ids = naive.moe_route(logits, block.gate.top_k, renormalize=block.gate.norm_topk_prob)
    routed = naive.expert_ffn(x, ids, weights, block.experts.gate_up_proj, block.experts.down_proj)
    shared = block.shared_expert(x) * torch.sigmoid(block.shared_expert_gate(x))
    return routed + shared


@pytest.mark.parametrize("T", [1, 7, 33])
def test_naive_moe_route_matches_transformers_router(T):
    torch.manual_seed(T)
    router = Qwen3NextTopKRouter(small_config())
    with torch.no_grad():
        router.weight.normal_()
        x = torch.randn(T, 48)
        logits, expected_weights, expected_ids = router(x)
    weights, ids = naive.moe_route(logits, 3)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids, expected_ids) and torch.equal(weights, expected_weights)


def test_naive_moe_route_without_renormalisation_keeps_softmax_mass():
    torch.manual_seed(0)
    logits = torch.randn(5, 12, dtype=torch.bfloat16)
    weights, ids = naive.moe_route(logits, 4, renormalize=False)
    probs = torch.softmax(logits.float(), dim=-1)
    assert torch.equal(weights, probs.gather(1, ids))
    assert (weights.sum(-1) < 1).all()


@pytest.mark.parametrize("T", [1, 7, 33])
def test_naive_block_matches_transformers_fp32(T, close):
    torch.manual_seed(T)
    block = random_block(small_config(), torch.float32)
    x = torch.randn(T, 48)
    with torch.no_grad():
        expected = block(x[None])[0]
        got = block_from_ops(block, x)
    close(got, expected, reduction=BLOCK_CHAIN)


def test_naive_block_matches_transformers_bf16(rms_close):
    torch.manual_seed(4)
    block = random_block(small_config(), torch.bfloat16)
    x = torch.randn(33, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = block(x[None])[0]
        got = block_from_ops(block, x)
    assert got.dtype == torch.bfloat16
    # transformers accumulates the routed sum in bf16 (k roundings more than ours, in fp32).
    rms_close(got, expected, reduction=BLOCK_CHAIN, roundings=3)


def test_naive_expert_ffn_shards_sum_to_the_whole(close):
    """Experts split over two shards (-1 = held by the other shard) add up to all experts on one."""
    torch.manual_seed(5)
    T, H, I, E, k = 17, 48, 40, 12, 3
    hidden = torch.randn(T, H)
    w13, w2 = torch.randn(E, 2 * I, H) * 0.2, torch.randn(E, H, I) * 0.2
    weights, ids = naive.moe_route(torch.randn(T, E), k)
    full = naive.expert_ffn(hidden, ids, weights, w13, w2)
    split = 5  # E_local = 5 and 7: not powers of two
    ids_a = torch.where(ids < split, ids, -1)
    ids_b = torch.where(ids >= split, ids - split, -1)
    part_a = naive.expert_ffn(hidden, ids_a, weights, w13[:split], w2[:split])
    part_b = naive.expert_ffn(hidden, ids_b, weights, w13[split:], w2[split:])
    close(part_a + part_b, full, reduction=H + I + k)
    assert torch.equal(naive.expert_ffn(hidden, torch.full_like(ids, -1), weights, w13, w2), torch.zeros(T, H))


def test_naive_expert_ffn_shape_errors_name_the_tensors():
    hidden, ids, weights = torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2)
    with pytest.raises(ValueError, match="w2"):
        naive.expert_ffn(hidden, ids, weights, torch.randn(3, 10, 8), torch.randn(3, 8, 4))
    with pytest.raises(ValueError, match="expert id"):
        naive.expert_ffn(hidden, ids + 3, weights, torch.randn(3, 10, 8), torch.randn(3, 8, 5))


# --- Triton kernels ------------------------------------------------------------------------

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k", [(1, 12, 3), (7, 12, 3), (33, 12, 3), (5, 512, 10), (3, 64, 1)],
                         ids=["T1-E12-k3", "T7-E12-k3", "T33-E12-k3", "T5-E512-k10", "T3-E64-k1"])
def test_triton_moe_route(T, E, k, dtype, poisoned_empty, close):
    torch.manual_seed(T * E + k)
    logits = (torch.randn(T, E) * 2).to(dtype)
    for renormalize in (True, False):
        with poisoned_empty():
            weights, ids = triton_moe.moe_route(logits, k, renormalize=renormalize)
        expected_weights, expected_ids = naive.moe_route(logits, k, renormalize=renormalize)
        assert ids.dtype == torch.int64 and weights.dtype == torch.float32
        # bf16 logits tie now and then, and torch.topk orders ties arbitrarily: compare the
        # probabilities picked, and require k distinct experts.
        probs = torch.softmax(logits.float(), dim=-1)
        assert torch.equal(probs.gather(1, ids), probs.gather(1, expected_ids))
        assert all(len(set(row)) == k for row in ids.tolist())
        # fp32 softmax over E logits, then a sum of k weights to renormalise
        close(weights, expected_weights, reduction=E + k)


def test_triton_moe_route_never_picks_padding_lanes():
    """With most probabilities underflowing to exactly 0, top-k still returns ids < E."""
    logits = torch.full((2, 12), -200.0)
    logits[:, 5] = 200.0
    _, ids = triton_moe.moe_route(logits, 4)
    assert ids[:, 0].eq(5).all() and ids.lt(12).all() and ids.ge(0).all()
    assert all(len(set(row)) == 4 for row in ids.tolist())


@pytest.mark.parametrize("T,k,E,block_m", [(1, 3, 12, 16), (33, 3, 12, 16), (40, 10, 64, 32)], ids=str)
def test_triton_moe_align_block_size(T, k, E, block_m, poisoned_empty):
    torch.manual_seed(T)
    ids = torch.stack([torch.randperm(E + 3)[:k] for _ in range(T)]) - 3  # some -1..-3: other shards
    with poisoned_empty():
        sorted_slots, block_expert = triton_moe.moe_align_block_size(ids, E, block_m)
    flat = ids.reshape(-1)
    expected_slots, expected_blocks = [], []
    for e in range(E):
        slots = (flat == e).nonzero().squeeze(1).tolist()
        n_padded = -(-len(slots) // block_m) * block_m
        expected_slots += slots + [T * k] * (n_padded - len(slots))
        expected_blocks += [e] * (n_padded // block_m)
    assert sorted_slots[:len(expected_slots)].tolist() == expected_slots
    assert block_expert.tolist() == expected_blocks + [-1] * (block_expert.numel() - len(expected_blocks))


def random_experts(E, H, I, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype)
    return w13, w2


def shard_ids(ids, lo, hi):
    """Global expert ids -> local ids of the shard holding experts [lo, hi); -1 elsewhere."""
    return torch.where((ids >= lo) & (ids < hi), ids - lo, -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,I,E,k,shard", [
    (1, 48, 40, 12, 3, (0, 12)),
    (7, 96, 40, 12, 3, (0, 12)),
    (33, 48, 24, 12, 3, (0, 12)),
    (33, 48, 40, 12, 3, (3, 10)),    # E_local = 7, about 40% of the slots are -1
    (20, 64, 32, 8, 2, (0, 8)),      # 40 slots for 8 experts: the BM = 32 configuration
], ids=["T1-H48", "T7-H96", "T33-H48-I24", "T33-shard7", "T20-BM32"])
def test_triton_expert_ffn(T, H, I, E, k, shard, dtype, poisoned_empty, close):
    torch.manual_seed(T + H)
    hidden = torch.randn(T, H).to(dtype)
    weights, ids = naive.moe_route(torch.randn(T, E), k)
    lo, hi = shard
    w13, w2 = random_experts(hi - lo, H, I, dtype, seed=T)
    local_ids = shard_ids(ids, lo, hi)
    with poisoned_empty():
        got = triton_moe.expert_ffn(hidden, local_ids, weights, w13, w2)
    expected = naive.expert_ffn(hidden, local_ids, weights, w13, w2)
    assert got.dtype == dtype and got.shape == (T, H)
    # bf16: the gate/up activations and the output are rounded to bf16 in different orders
    close(got, expected, reduction=H + I + k, roundings=1 if dtype == torch.float32 else 3)


def test_triton_expert_ffn_no_local_expert_gives_zeros(poisoned_empty):
    hidden = torch.randn(5, 48)
    w13, w2 = random_experts(4, 48, 40, torch.float32, seed=0)
    ids = torch.full((5, 3), -1)
    with poisoned_empty():
        got = triton_moe.expert_ffn(hidden, ids, torch.rand(5, 3), w13, w2)
    assert torch.equal(got, torch.zeros(5, 48))


def test_triton_block_matches_transformers(monkeypatch, close):
    """The whole sparse MoE block through kernels.ops on the Triton path equals transformers'."""
    monkeypatch.setenv("NEXTSERVE_KERNELS", "triton")
    calls = []
    for name in ("moe_route", "expert_ffn"):
        fn = getattr(triton_moe, name)
        monkeypatch.setattr(triton_moe, name,
                            lambda *a, _fn=fn, _name=name, **kw: calls.append(_name) or _fn(*a, **kw))
    torch.manual_seed(6)
    block = random_block(small_config(), torch.float32)
    x = torch.randn(7, 48)
    with torch.no_grad():
        expected = block(x[None])[0]
        weights, ids = ops.moe_route(F.linear(x, block.gate.weight), 3)
        routed = ops.expert_ffn(x, ids, weights, block.experts.gate_up_proj, block.experts.down_proj)
        got = routed + block.shared_expert(x) * torch.sigmoid(block.shared_expert_gate(x))
    assert calls == ["moe_route", "expert_ffn"]
    close(got, expected, reduction=BLOCK_CHAIN)


@pytest.mark.parametrize("impl", ["naive", "triton"])
def test_expert_ffn_fp32_output_is_the_sum_before_its_rounding(impl, poisoned_empty):
    """out_dtype=float32 returns the fp32 accumulator that the default output rounds to hidden's dtype:
    what a worker sends back so that shard partials are added before the one rounding."""
    expert_ffn = naive.expert_ffn if impl == "naive" else triton_moe.expert_ffn
    T, H, I, E, k = 9, 48, 40, 7, 3
    torch.manual_seed(11)
    hidden = torch.randn(T, H).to(torch.bfloat16)
    weights, ids = naive.moe_route(torch.randn(T, 12), k)
    w13, w2 = random_experts(E, H, I, torch.bfloat16, seed=3)
    local_ids = shard_ids(ids, 2, 2 + E)
    with poisoned_empty():
        rounded = expert_ffn(hidden, local_ids, weights, w13, w2)
        full = expert_ffn(hidden, local_ids, weights, w13, w2, out_dtype=torch.float32)
    assert full.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    # the default output is this sum rounded once: within one bf16 ulp (2^-7 relative) whatever the
    # rounding mode (Triton's interpreter truncates), exactly torch's rounding on the reference
    assert bool(((rounded.float() - full).abs() <= full.abs() * 2.0 ** -7).all())
    if impl == "naive":
        assert torch.equal(full.to(torch.bfloat16), rounded)
    # not merely bf16 values stored in fp32: the fp32 sum keeps bits that bf16 drops
    assert not torch.equal(full, rounded.float())
