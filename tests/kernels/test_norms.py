"""RMSNorm and gated RMSNorm: the torch references against transformers, the Triton kernels against them."""

import pytest
import torch
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm, Qwen3NextRMSNormGated

from nextserve.kernels import ops
from nextserve.kernels.norms import naive, triton_norms

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 48), (7, 96), (2, 3, 128)], ids=str)
def test_naive_rms_norm_matches_transformers(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    ref = Qwen3NextRMSNorm(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        ref.weight.normal_(0, 0.5)
        expected = ref(x)
    # Same ops in the same order: bit for bit, in bf16 too.
    assert torch.equal(naive.rms_norm(x, ref.weight.detach(), 1e-6), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_naive_rms_norm_residual_returns_the_sum(dtype):
    torch.manual_seed(1)
    x, residual = torch.randn(7, 96, dtype=dtype), torch.randn(7, 96, dtype=dtype)
    weight = torch.randn(96, dtype=dtype) * 0.5
    y, new_residual = naive.rms_norm(x, weight, 1e-6, residual=residual)
    # the fused residual is one add, and the norm of it the same function: bit for bit
    assert new_residual.dtype == dtype and torch.equal(new_residual, residual + x)
    assert torch.equal(y, naive.rms_norm(residual + x, weight, 1e-6))


def test_naive_rms_norm_plain_weight():
    torch.manual_seed(2)
    x, weight = torch.randn(5, 48), torch.randn(48)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight
    # the reference formula with the same ops in the same order: bit for bit
    assert torch.equal(naive.rms_norm(x, weight, 1e-5, zero_centered=False), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 32), (7, 4, 128), (33, 48)], ids=str)
def test_naive_gated_rms_norm_matches_transformers(shape, dtype):
    torch.manual_seed(3)
    x, z = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    ref = Qwen3NextRMSNormGated(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        ref.weight.normal_(1, 0.5)
        expected = ref(x, z)
    # Same ops in the same order as transformers': bit for bit, in bf16 too.
    assert torch.equal(naive.gated_rms_norm(x, z, ref.weight.detach(), 1e-6), expected)


def test_naive_shape_errors_name_the_tensors():
    with pytest.raises(ValueError, match="weight"):
        naive.rms_norm(torch.randn(2, 8), torch.randn(4), 1e-6)
    with pytest.raises(ValueError, match="z"):
        naive.gated_rms_norm(torch.randn(2, 8), torch.randn(2, 4), torch.randn(8), 1e-6)


# --- Triton kernels ------------------------------------------------------------------------

# The kernels reduce in a different order than torch (the mean of squares over the row). In bf16,
# besides, the Triton interpreter truncates fp32 -> bf16 where the GPU (and torch) round to nearest:
# each rounding point may move an element by one bf16 ulp; the norm has two of them (the normalised
# value, the weighted one), the gated norm three (and the gate).
NORM_ROUNDINGS = {torch.float32: 1, torch.bfloat16: 2}
GATED_NORM_ROUNDINGS = {torch.float32: 1, torch.bfloat16: 3}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero_centered", [True, False], ids=["zero-centred", "plain"])
@pytest.mark.parametrize("shape", [(1, 48), (7, 96), (33, 128), (2, 3, 2048)], ids=str)
def test_triton_rms_norm(shape, zero_centered, dtype, poisoned_empty, close):
    torch.manual_seed(10)
    x, weight = torch.randn(shape, dtype=dtype), torch.randn(shape[-1], dtype=dtype) * 0.5
    with poisoned_empty():
        got = triton_norms.rms_norm(x, weight, 1e-6, zero_centered=zero_centered)
    expected = naive.rms_norm(x, weight, 1e-6, zero_centered=zero_centered)
    assert got.shape == expected.shape and got.dtype == dtype
    close(got, expected, reduction=shape[-1], roundings=NORM_ROUNDINGS[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 48), (33, 96)], ids=str)
def test_triton_rms_norm_fused_residual(shape, dtype, poisoned_empty, close):
    torch.manual_seed(11)
    x, residual = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    weight = torch.randn(shape[-1], dtype=dtype) * 0.5
    with poisoned_empty():
        y, new_residual = triton_norms.rms_norm(x, weight, 1e-6, residual=residual)
    expected_y, expected_residual = naive.rms_norm(x, weight, 1e-6, residual=residual)
    close(new_residual, expected_residual, reduction=2, what="residual")  # one add, one rounding
    close(y, expected_y, reduction=shape[-1] + 2, roundings=NORM_ROUNDINGS[dtype] + 1, what="y")


def test_triton_rms_norm_strided_rows(close):
    """A slice whose rows are not back to back (e.g. one half of a fused projection)."""
    torch.manual_seed(12)
    x = torch.randn(7, 2, 96)[:, 0]
    weight = torch.randn(96)
    close(triton_norms.rms_norm(x, weight, 1e-6), naive.rms_norm(x, weight, 1e-6), reduction=96)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", [None, torch.float32], ids=["w-like-x", "w-fp32"])
@pytest.mark.parametrize("shape", [(1, 128), (7, 3, 48), (33, 32)], ids=str)
def test_triton_gated_rms_norm(shape, weight_dtype, dtype, poisoned_empty, close):
    torch.manual_seed(13)
    x, z = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1])).to(weight_dtype or dtype)
    with poisoned_empty():
        got = triton_norms.gated_rms_norm(x, z, weight, 1e-6)
    expected = naive.gated_rms_norm(x, z, weight, 1e-6)
    assert got.dtype == dtype
    close(got, expected, reduction=shape[-1], roundings=GATED_NORM_ROUNDINGS[dtype])


def test_ops_dispatch_to_triton(monkeypatch, close):
    monkeypatch.setenv("NEXTSERVE_KERNELS", "triton")
    calls = []
    for name in ("rms_norm", "gated_rms_norm"):
        fn = getattr(triton_norms, name)
        monkeypatch.setattr(triton_norms, name,
                            lambda *a, _fn=fn, _name=name, **kw: calls.append(_name) or _fn(*a, **kw))
    torch.manual_seed(14)
    x, z, weight = torch.randn(7, 48), torch.randn(7, 48), torch.randn(48)
    close(ops.rms_norm(x, weight, 1e-6), naive.rms_norm(x, weight, 1e-6), reduction=48)
    close(ops.gated_rms_norm(x, z, weight, 1e-6), naive.gated_rms_norm(x, z, weight, 1e-6), reduction=48)
    assert calls == ["rms_norm", "gated_rms_norm"]
