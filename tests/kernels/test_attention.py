"""q/k norm + partial RoPE and varlen gated attention: the torch references against transformers,
the Triton kernels against them."""

import pytest
import torch
from transformers import Qwen3NextConfig
from transformers.models.qwen3_next.modeling_qwen3_next import (
    Qwen3NextAttention,
    Qwen3NextRMSNorm,
    Qwen3NextRotaryEmbedding,
    apply_rotary_pos_emb,
)

from nextserve.kernels import ops
from nextserve.kernels.attention import naive, triton_attention

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def small_config(head_dim=32, **overrides):
    kwargs = dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                  partial_rotary_factor=0.25, rope_theta=1e4, rms_norm_eps=1e-6)
    kwargs.update(overrides)
    config = Qwen3NextConfig(**kwargs)
    config._attn_implementation = "eager"
    return config


def causal_mask(Lq, Lk):
    """Additive bottom-right causal mask [1, 1, Lq, Lk] for transformers' eager attention."""
    i_q = torch.arange(Lq)[:, None] + (Lk - Lq)
    mask = torch.zeros(Lq, Lk)
    return mask.masked_fill(torch.arange(Lk)[None, :] > i_q, torch.finfo(torch.float32).min)[None, None]


def pack(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,head_dim,rotary_factor", [(1, 32, 0.25), (7, 16, 0.5), (33, 64, 0.25), (5, 32, 1.0)],
                         ids=["T1-D32", "T7-D16", "T33-D64", "T5-D32-full"])
def test_naive_qk_norm_rope_matches_transformers(T, head_dim, rotary_factor, dtype):
    torch.manual_seed(T)
    config = small_config(head_dim=head_dim, partial_rotary_factor=rotary_factor, rope_theta=1e7)
    q, k = torch.randn(T, 4, head_dim, dtype=dtype), torch.randn(T, 2, head_dim, dtype=dtype)
    q_norm, k_norm = Qwen3NextRMSNorm(head_dim).to(dtype), Qwen3NextRMSNorm(head_dim).to(dtype)
    positions = torch.randint(0, 5000, (T,))
    with torch.no_grad():
        q_norm.weight.normal_(0, 0.5)
        k_norm.weight.normal_(0, 0.5)
        cos, sin = Qwen3NextRotaryEmbedding(config)(q, positions[None])
        expected_q, expected_k = apply_rotary_pos_emb(q_norm(q)[None].transpose(1, 2), k_norm(k)[None].transpose(1, 2),
                                                      cos, sin)
    got_q, got_k = naive.qk_norm_rope(q, k, q_norm.weight.detach(), k_norm.weight.detach(), positions,
                                      rotary_dim=int(head_dim * rotary_factor), theta=1e7, eps=1e-6)
    assert torch.equal(got_q, expected_q.transpose(1, 2)[0])
    assert torch.equal(got_k, expected_k.transpose(1, 2)[0])


@pytest.mark.parametrize("T", [1, 7, 33])
def test_naive_attention_layer_matches_transformers(T, close):
    """The whole gated attention layer composed from our ops equals Qwen3NextAttention (eager, fp32)."""
    torch.manual_seed(T)
    config = small_config()
    layer = Qwen3NextAttention(config, layer_idx=3)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(T, 48)
    positions = torch.arange(T)
    with torch.no_grad():
        cos_sin = Qwen3NextRotaryEmbedding(config)(x, positions[None])
        expected, _ = layer(x[None], cos_sin, causal_mask(T, T))

        q, gate = layer.q_proj(x).view(T, 4, 64).chunk(2, dim=-1)
        k, v = layer.k_proj(x).view(T, 2, 32), layer.v_proj(x).view(T, 2, 32)
        q, k = naive.qk_norm_rope(q, k, layer.q_norm.weight, layer.k_norm.weight, positions,
                                  rotary_dim=8, theta=1e4, eps=1e-6)
        cu = pack([T])
        o = naive.attention(q, k, v, cu, cu, scale=32 ** -0.5, gate=gate)
        got = layer.o_proj(o.reshape(T, -1))
    close(got, expected[0], reduction=layer_chain(T))


def test_naive_attention_varlen_continuation_and_decode_equal_full_recompute(close):
    """Queries that are the last Lq of Lk keys get exactly the last Lq rows of full causal attention."""
    torch.manual_seed(0)
    Lk, Lq = [7, 1, 33, 12], [7, 1, 1, 5]
    k, v = torch.randn(sum(Lk), 2, 16), torch.randn(sum(Lk), 2, 16)
    q_full = torch.randn(sum(Lk), 4, 16)
    gate_full = torch.randn(sum(Lk), 4, 16)
    cu_k = pack(Lk)
    full = naive.attention(q_full, k, v, cu_k, cu_k, scale=0.25, gate=gate_full)
    last = torch.cat([torch.arange(int(cu_k[n + 1]) - Lq[n], int(cu_k[n + 1])) for n in range(4)])
    got = naive.attention(q_full[last], k, v, pack(Lq), cu_k, scale=0.25, gate=gate_full[last])
    close(got, full[last], reduction=16 + max(Lk))


def test_naive_attention_one_sequence_equals_sdpa(close):
    torch.manual_seed(1)
    q, k, v = torch.randn(9, 4, 32), torch.randn(9, 2, 32), torch.randn(9, 2, 32)
    cu = pack([9])
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True, scale=0.3)
    close(naive.attention(q, k, v, cu, cu, scale=0.3), expected.transpose(0, 1), reduction=32 + 9)


def test_naive_attention_shape_errors_name_the_tensors():
    q, k = torch.randn(3, 4, 8), torch.randn(3, 3, 8)
    with pytest.raises(ValueError, match="Hkv"):
        naive.attention(q, k, k, pack([3]), pack([3]), scale=1.0)
    with pytest.raises(ValueError, match="Lk"):
        naive.attention(q, q[:2, :2], q[:2, :2], pack([3]), pack([2]), scale=1.0)
    with pytest.raises(ValueError, match="positions"):
        naive.qk_norm_rope(q, q, torch.zeros(8), torch.zeros(8), torch.arange(2), rotary_dim=4, theta=1e4, eps=1e-6)


# --- Triton kernels ------------------------------------------------------------------------

# The interpreter truncates fp32 -> bf16 where the GPU and torch round to nearest (up to a whole ulp
# instead of half), and the kernels reduce in another order. Roundings to bf16 on the way: the kernels
# keep q, k, v in bf16 and round the probabilities before P @ V, then the output; qk-norm rounds the
# normalised value, then the rotated one.
ATTENTION_ROUNDINGS = {torch.float32: 1, torch.bfloat16: 3}
NORM_ROPE_ROUNDINGS = {torch.float32: 1, torch.bfloat16: 2}


def layer_chain(T, H=48, D=32, Hq=4):
    """The longest accumulation behind an attention-layer output: q_proj over H, q-norm over D, scores
    over D, the softmax and P @ V over the T keys, o_proj over Hq * D."""
    return H + D + D + T + Hq * D


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,Hq,Hkv,D,rotary_dim", [(1, 4, 2, 32, 8), (7, 4, 2, 16, 16), (33, 8, 2, 48, 12),
                                                   (5, 16, 2, 256, 64)],
                         ids=["T1-D32", "T7-D16-full", "T33-D48", "T5-D256"])
def test_triton_qk_norm_rope(T, Hq, Hkv, D, rotary_dim, dtype, poisoned_empty, close):
    torch.manual_seed(T + D)
    # q arrives as the query half of q_proj's [T, Hq, 2D] output: a strided view.
    q = torch.randn(T, Hq, 2 * D, dtype=dtype)[..., :D]
    k = torch.randn(T, Hkv, D, dtype=dtype)
    q_w, k_w = (0.5 * torch.randn(D)).to(dtype), (0.5 * torch.randn(D)).to(dtype)
    positions = torch.randint(0, 200_000, (T,))
    kw = dict(rotary_dim=rotary_dim, theta=1e7, eps=1e-6)
    with poisoned_empty():
        got_q, got_k = triton_attention.qk_norm_rope(q, k, q_w, k_w, positions, **kw)
    expected_q, expected_k = naive.qk_norm_rope(q, k, q_w, k_w, positions, **kw)
    close(got_q, expected_q, reduction=D + 2, roundings=NORM_ROPE_ROUNDINGS[dtype], what="q")
    close(got_k, expected_k, reduction=D + 2, roundings=NORM_ROPE_ROUNDINGS[dtype], what="k")


def random_attention_inputs(Lq, Lk, Hq, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(Lq), Hq, D, generator=g).to(dtype)
    k = torch.randn(sum(Lk), Hkv, D, generator=g).to(dtype)
    v = torch.randn(sum(Lk), Hkv, D, generator=g).to(dtype)
    gate = torch.randn(sum(Lq), Hq, D, generator=g).to(dtype)
    return q, k, v, gate, pack(Lq), pack(Lk)


ATTENTION_CASES = {
    # name: (Lq per sequence, Lk per sequence, Hq, Hkv, D)
    "prefill-T1": ([1], [1], 4, 2, 32),
    "prefill-T7-D16": ([7], [7], 4, 2, 16),
    "prefill-T33-G8": ([33], [33], 16, 2, 32),
    "varlen-mixed": ([7, 1, 33, 0, 5], [7, 40, 33, 3, 20], 4, 2, 32),
    "D24-masked": ([9, 4], [9, 30], 6, 2, 24),
    "MHA-G1": ([20], [20], 2, 2, 16),
    "decode": ([1, 1, 1], [1, 37, 70], 8, 2, 32),
    # Keys before the diagonal take the unmasked loop: several key blocks, several query tiles.
    "continuation": ([5, 70], [150, 140], 4, 2, 32),
    "prefill-T100": ([100], [100], 4, 2, 16),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_triton_attention(case, gated, dtype, poisoned_empty, close):
    Lq, Lk, Hq, Hkv, D = ATTENTION_CASES[case]
    q, k, v, gate, cu_q, cu_k = random_attention_inputs(Lq, Lk, Hq, Hkv, D, dtype, seed=len(case))
    gate = gate if gated else None
    with poisoned_empty():
        got = triton_attention.attention(q, k, v, cu_q, cu_k, scale=D ** -0.5, gate=gate)
    expected = naive.attention(q, k, v, cu_q, cu_k, scale=D ** -0.5, gate=gate)
    assert got.dtype == dtype
    close(got, expected, reduction=D + max(Lk), roundings=ATTENTION_ROUNDINGS[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [2, 5])
def test_triton_attention_split_keys(num_splits, dtype, poisoned_empty, close):
    """Decode with the keys split over several programs; short and empty splits included."""
    q, k, v, gate, cu_q, cu_k = random_attention_inputs([1, 1, 1, 1], [1, 20, 90, 64], 8, 2, 32, dtype, seed=3)
    with poisoned_empty():
        got = triton_attention.attention(q, k, v, cu_q, cu_k, scale=0.2, gate=gate, num_splits=num_splits)
    expected = naive.attention(q, k, v, cu_q, cu_k, scale=0.2, gate=gate)
    # plus one rounding of each split's partial output before the merge
    close(got, expected, reduction=32 + 90 + num_splits, roundings=ATTENTION_ROUNDINGS[dtype] + 1)


def test_triton_attention_layer_through_ops(monkeypatch, close):
    """The gated attention layer on the Triton path of kernels.ops equals transformers' (fp32)."""
    monkeypatch.setenv("NEXTSERVE_KERNELS", "triton")
    calls = []
    for name in ("qk_norm_rope", "attention"):
        fn = getattr(triton_attention, name)
        monkeypatch.setattr(triton_attention, name,
                            lambda *a, _fn=fn, _name=name, **kw: calls.append(_name) or _fn(*a, **kw))
    torch.manual_seed(7)
    T, config = 9, small_config()
    layer = Qwen3NextAttention(config, layer_idx=3)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
        x, positions = torch.randn(T, 48), torch.arange(T)
        expected, _ = layer(x[None], Qwen3NextRotaryEmbedding(config)(x, positions[None]), causal_mask(T, T))
        q, gate = layer.q_proj(x).view(T, 4, 64).chunk(2, dim=-1)
        k, v = layer.k_proj(x).view(T, 2, 32), layer.v_proj(x).view(T, 2, 32)
        q, k = ops.qk_norm_rope(q, k, layer.q_norm.weight, layer.k_norm.weight, positions,
                                rotary_dim=8, theta=1e4, eps=1e-6)
        o = ops.attention(q, k, v, pack([T]), pack([T]), scale=32 ** -0.5, gate=gate)
        got = layer.o_proj(o.reshape(T, -1))
    assert calls == ["qk_norm_rope", "attention"]
    close(got, expected[0], reduction=layer_chain(T))
