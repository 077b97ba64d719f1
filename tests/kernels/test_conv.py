"""Triton causal conv1d kernels (run by Triton's CPU interpreter) against the torch reference."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from nextserve.kernels import ops
from nextserve.kernels.conv import naive, triton_conv


def make_inputs(lengths, C, W, *, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lengths), C, generator=gen).to(dtype)
    weight = torch.randn(C, W, generator=gen).to(dtype)
    h0 = torch.randn(len(lengths), C, W - 1, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return x, weight, h0, cu


def check(close, ref_y, y, ref_state, state, width):
    """Outputs to the rounding of a `width`-tap sum (one rounding to the dtype apart); states are
    copies of inputs, so bit-exact."""
    assert y.dtype == ref_y.dtype and state.dtype == ref_state.dtype
    assert torch.isfinite(state).all()
    close(y, ref_y, reduction=width, what="conv output")
    assert torch.equal(state, ref_state)


@pytest.mark.parametrize("lengths", [(1,), (2, 1, 7), (63, 3, 65), (100,)], ids=["T1", "short", "ragged", "T100"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("activation", ["silu", None])
def test_prefill_matches_reference(lengths, with_state, activation, poison_empty, close):
    x, weight, h0, cu = make_inputs(lengths, 80, 4)  # 80 channels: two channel blocks, the second ragged
    h0 = h0 if with_state else None
    ref = naive.causal_conv1d(x, weight, initial_state=h0, cu_seqlens=cu, activation=activation)
    poison_empty()
    out = triton_conv.causal_conv1d(x, weight, initial_state=h0, cu_seqlens=cu, activation=activation)
    check(close, ref[0], out[0], ref[1], out[1], weight.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("W", [2, 4])
def test_prefill_single_sequence_strided_inputs(dtype, W, poison_empty, close):
    x, weight, h0, _ = make_inputs((37,), 24, W, dtype=dtype)
    # x as a column slice of a wider projection, the state as a strided view of a larger cache
    wide = torch.cat([x, torch.randn(37, 8).to(dtype)], dim=1)
    cache = torch.randn(3, W - 1, 24).to(dtype)
    cache[1] = h0[0].t()
    state_view = cache[1:2].transpose(1, 2)
    ref = naive.causal_conv1d(x, weight, initial_state=h0)
    poison_empty()
    out = triton_conv.causal_conv1d(wide[:, :24], weight, initial_state=state_view)
    check(close, ref[0], out[0], ref[1], out[1], weight.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_update_matches_reference_in_place_on_cache_rows(dtype, poison_empty, close):
    x, weight, h0, _ = make_inputs((1, 1, 1), 40, 4, dtype=dtype)
    cache = torch.randn(5, 40, 3).to(dtype)
    cache[1:4] = h0
    ref_state = h0.clone()
    ref_y = naive.causal_conv1d_update(x, ref_state, weight)
    poison_empty()
    untouched = cache[[0, 4]].clone()
    y = triton_conv.causal_conv1d_update(x, cache[1:4], weight)
    check(close, ref_y, y, ref_state, cache[1:4], 4)
    assert torch.equal(cache[[0, 4]], untouched)


def test_prefill_then_decode_equals_prefill_of_whole(close):
    lengths = (5, 2, 40)
    x, weight, h0, cu = make_inputs(lengths, 24, 4)
    n_decode = 3
    new = torch.randn(n_decode, len(lengths), 24, generator=torch.Generator().manual_seed(1))
    _, state = triton_conv.causal_conv1d(x, weight, initial_state=h0, cu_seqlens=cu)
    ys = [triton_conv.causal_conv1d_update(new[i], state, weight) for i in range(n_decode)]
    whole = torch.cat([torch.cat([x[cu[n]:cu[n + 1]], new[:, n]]) for n in range(len(lengths))])
    cu_whole = cu + torch.arange(len(lengths) + 1, dtype=torch.int32) * n_decode
    y_whole, state_whole = triton_conv.causal_conv1d(whole, weight, initial_state=h0, cu_seqlens=cu_whole)
    for n in range(len(lengths)):
        tail = y_whole[cu_whole[n + 1] - n_decode:cu_whole[n + 1]]
        close(torch.stack([y[n] for y in ys]), tail, reduction=4)
    assert torch.equal(state, state_whole)


def test_ops_dispatch_to_triton_matches_torch(monkeypatch, close):
    x, weight, h0, cu = make_inputs((9, 4), 16, 4)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("NEXTSERVE_KERNELS", backend)
        y, state = ops.causal_conv1d(x, weight, initial_state=h0, cu_seqlens=cu)
        results[backend] = (y, state, ops.causal_conv1d_update(x[:2], state, weight), state)
    for got, expected in zip(results["triton"], results["torch"]):
        close(got, expected, reduction=4)


def test_rejects_bad_shapes():
    x, weight, h0, cu = make_inputs((4, 4), 8, 4)
    with pytest.raises(ValueError, match="initial_state"):
        triton_conv.causal_conv1d(x, weight, initial_state=h0[:1], cu_seqlens=cu)
    with pytest.raises(ValueError, match="conv_state"):
        triton_conv.causal_conv1d_update(x[:2], h0[:, :, :2], weight)
