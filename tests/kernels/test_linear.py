"""Dense projections (kernels/linear): the CPU path's kept weight layouts against F.linear.

The layout kept is oneDNN's bf16 one on a CPU with native bf16 and an fp32 copy elsewhere; the fp32
copy is also tested on a machine that has native bf16 (`kept_layout`). Every side is bf16 values
multiplied exactly and summed in fp32, rounded once to bf16, so they agree to the conftest rule over
the input width. The kept copy must follow the weight: after an in-place update (how a checkpoint
load writes) the product is the new weight's, never the stale copy's.
"""
import pytest
import torch
import torch.nn.functional as F

from nextserve.kernels import ops
from nextserve.kernels.linear import cpu as linear_cpu
from nextserve.kernels.linear import naive as linear_naive

@pytest.fixture(autouse=True)
def cpu_path(monkeypatch):
    monkeypatch.setenv("NEXTSERVE_KERNELS", "cpu")


@pytest.fixture(params=["this-machine", "fp32-copy"])
def kept_layout(request, monkeypatch):
    """The layout this machine keeps, or the fp32 copy a CPU without native bf16 keeps."""
    if request.param == "fp32-copy":
        monkeypatch.setattr(linear_cpu, "packing_supported", lambda: False)
    return request.param


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen).to(torch.bfloat16)


# 1: one row; 3 and 16: W x^T from an fp32 copy; the last past oneDNN's packed copy and the fp32 W x^T
@pytest.mark.parametrize("rows", [1, 3, 16, linear_cpu.PACKED_MAX_ROWS + 66])
@pytest.mark.parametrize("weight_shape", [(96, 40), (4, 24, 40)], ids=["projection", "stacked-experts"])
def test_prepacked_linear_equals_the_reference(rows, weight_shape, kept_layout, close):
    gen = torch.Generator().manual_seed(rows + len(weight_shape))
    weight, x = randn(gen, *weight_shape), randn(gen, rows, weight_shape[-1])
    assert ops.prepack_linear(weight) and ops.is_prepacked(weight)
    kept = linear_cpu.packed_weight(weight)
    assert (kept.dtype == torch.float32) == (kept_layout == "fp32-copy" or not linear_cpu.packing_supported())
    with torch.inference_mode():
        y = ops.linear(x, weight)
    expected = F.linear(x.float(), weight.flatten(0, -2).float())
    assert y.dtype == torch.bfloat16 and y.shape == (rows, weight.flatten(0, -2).shape[0])
    close(y, expected, reduction=weight_shape[-1], dtype=torch.bfloat16)
    close(linear_naive.linear(x, weight), expected, reduction=weight_shape[-1], dtype=torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 4, linear_cpu.PACKED_MAX_ROWS + 16], ids=["one-row", "packed-copy", "past-packed-rows"])
def test_a_row_order_packed_in_equals_the_gathered_product(rows, kept_layout, close):
    gen = torch.Generator().manual_seed(6)
    weight, x = randn(gen, 40, 24), randn(gen, rows, 24)
    order = torch.randperm(40, generator=gen)
    ops.prepack_linear(weight, row_order=order)
    with torch.inference_mode():
        y = ops.linear(x, weight, row_order=order)
        other = ops.linear(x, weight, row_order=order.flip(0))  # not the order packed: gathered
    expected = F.linear(x.float(), weight.float())
    close(y, expected[:, order], reduction=24, dtype=torch.bfloat16)
    close(other, expected[:, order.flip(0)], reduction=24, dtype=torch.bfloat16)
    assert ops.is_prepacked(weight, order) and not ops.is_prepacked(weight)


def test_the_packed_copy_follows_in_place_updates_of_the_weight(kept_layout, close):
    gen = torch.Generator().manual_seed(7)
    weight, x = randn(gen, 64, 32), randn(gen, 5, 32)
    ops.prepack_linear(weight)
    with torch.inference_mode():
        before = ops.linear(x, weight)
    with torch.no_grad():
        weight.copy_(randn(gen, 64, 32))   # a reload in place
    with torch.inference_mode():
        after = ops.linear(x, weight)
    expected = F.linear(x.float(), weight.float())
    close(after, expected, reduction=32, dtype=torch.bfloat16)
    assert not torch.equal(after, before)


def test_what_is_not_packed_is_f_linear():
    gen = torch.Generator().manual_seed(8)
    weight, x = torch.randn(48, 16, generator=gen), torch.randn(3, 16, generator=gen)
    assert not ops.prepack_linear(weight)      # fp32, the exactness mode: left to F.linear, bit for bit
    assert torch.equal(ops.linear(x, weight), F.linear(x, weight))
    no_experts = torch.empty(0, 8, 16, dtype=torch.bfloat16)   # a router that holds no routed experts
    assert not ops.prepack_linear(no_experts)
    assert ops.linear(x.bfloat16(), no_experts).shape == (3, 0)


def test_gradients_flow_through_a_packed_weight(kept_layout):
    """Training runs the same modules: with autograd on, the product is F.linear's, gradients included."""
    gen = torch.Generator().manual_seed(9)
    weight = randn(gen, 24, 16).requires_grad_()
    ops.prepack_linear(weight)
    x = randn(gen, 2, 16)
    ops.linear(x, weight).float().sum().backward()
    assert weight.grad is not None and torch.equal(weight.grad, F.linear(x, weight).new_ones(2, 24).t() @ x)
