"""The few-rows bf16 projection (kernels/linear/cpu_fused.cpp) against naive.py, on fresh random inputs.

Its contract is naive.linear's: bf16 values multiplied exactly, summed in fp32, rounded once to bf16,
so it agrees with the fp32 product of the same values to the conftest rule over the input width.
Its dot products run in one order whatever the rows around them (kernels/cpu_dots.h), so a row's
output must be the same bits alone and inside a batch: what lets a speculative verification's rows
give the tokens one-row decode steps give.
"""
import pytest
import torch
import torch.nn.functional as F

from nextserve.kernels.linear import cpu_fused



@pytest.fixture(autouse=True, scope="module")
def built():
    assert cpu_fused.available(), "the few-rows kernel did not build (the test setup installs g++)"


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen).to(torch.bfloat16)


# widths: a multiple of 16 (vector loop) and not (the portable loop); outputs: odd, past one thread's share
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 12])
@pytest.mark.parametrize("out_features,in_features", [(37, 48), (600, 40), (5, 200)])
def test_few_rows_linear_equals_the_reference(rows, out_features, in_features, close):
    gen = torch.Generator().manual_seed(rows * 1000 + out_features + in_features)
    weight, x = randn(gen, out_features, in_features), randn(gen, rows, in_features)
    y = cpu_fused.few_rows_linear(x, weight)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out_features)
    close(y, F.linear(x.float(), weight.float()), reduction=in_features, dtype=torch.bfloat16)


def test_a_rows_output_does_not_depend_on_the_rows_beside_it():
    gen = torch.Generator().manual_seed(11)
    weight, x = randn(gen, 300, 256), randn(gen, 12, 256)
    together = cpu_fused.few_rows_linear(x, weight)
    for r in range(x.shape[0]):
        assert torch.equal(cpu_fused.few_rows_linear(x[r:r + 1], weight), together[r:r + 1])
    assert torch.equal(cpu_fused.few_rows_linear(x[5:9], weight), together[5:9])


def test_leading_dims_and_strided_rows_are_taken():
    gen = torch.Generator().manual_seed(12)
    weight, x = randn(gen, 64, 96), randn(gen, 2, 3, 192)
    strided = x[..., ::2]  # a view with a stride, as a split of a wider projection gives
    y = cpu_fused.few_rows_linear(strided, weight)
    assert y.shape == (2, 3, 64)
    assert torch.equal(y, cpu_fused.few_rows_linear(strided.contiguous(), weight))


def test_mismatched_shapes_and_dtypes_are_refused():
    weight = torch.zeros(8, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="x \\[R, K\\] and weight \\[N, K\\]"):
        cpu_fused.few_rows_linear(torch.zeros(2, 8, dtype=torch.bfloat16), weight)
    with pytest.raises(RuntimeError, match="bf16 rows and weight"):
        cpu_fused.few_rows_linear(torch.zeros(2, 16), weight)
