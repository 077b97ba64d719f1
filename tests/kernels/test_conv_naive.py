"""The torch reference of the causal depthwise conv1d: against F.conv1d, and prefill/decode consistency."""


import pytest
import torch
import torch.nn.functional as F

from nextserve.kernels.conv.naive import causal_conv1d, causal_conv1d_update


def make_inputs(lengths, C, W, *, dtype=torch.float32, with_state=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lengths), C, generator=gen).to(dtype)
    weight = torch.randn(C, W, generator=gen).to(dtype)
    h0 = torch.randn(len(lengths), C, W - 1, generator=gen).to(dtype) if with_state else None
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return x, weight, h0, cu


def conv1d_per_sequence(x, weight, h0, cu, activation):
    """F.conv1d on [state | sequence] for each sequence; returns (y [T, C], final_state [N, C, W-1])."""
    C, W = weight.shape
    ys, states = [], []
    for n in range(cu.numel() - 1):
        seq = x[cu[n]:cu[n + 1]].double().t()  # [C, L]
        state = torch.zeros(C, W - 1, dtype=torch.float64) if h0 is None else h0[n].double()
        ext = torch.cat([state, seq], dim=1)
        y = F.conv1d(ext[None], weight.double()[:, None, :], groups=C)[0].t()
        ys.append(F.silu(y) if activation == "silu" else y)
        states.append(ext[:, ext.shape[1] - (W - 1):])
    return torch.cat(ys), torch.stack(states)


@pytest.mark.parametrize("lengths", [(1,), (2, 1, 7), (63, 3, 65), (100,)], ids=["T1", "short", "ragged", "T100"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("activation", ["silu", None])
def test_prefill_matches_conv1d(lengths, with_state, activation, close):
    x, weight, h0, cu = make_inputs(lengths, 24, 4, with_state=with_state)
    y, state = causal_conv1d(x, weight, initial_state=h0, cu_seqlens=cu, activation=activation)
    y_ref, state_ref = conv1d_per_sequence(x, weight, h0, cu, activation)
    close(y, y_ref, reduction=weight.shape[1], dtype=x.dtype)
    # the state holds inputs, copied exactly
    assert torch.equal(state.double(), state_ref)
    assert y.dtype == state.dtype == x.dtype


def test_without_cu_seqlens_is_one_sequence():
    x, weight, h0, cu = make_inputs((37,), 16, 4)
    y, state = causal_conv1d(x, weight, initial_state=h0)
    y_ref, state_ref = causal_conv1d(x, weight, initial_state=h0, cu_seqlens=cu)
    assert torch.equal(y, y_ref) and torch.equal(state, state_ref)


@pytest.mark.parametrize("W", [2, 4])
def test_prefill_then_decode_equals_prefill_of_whole(W, close):
    lengths = (5, 2, 40)
    x, weight, h0, cu = make_inputs(lengths, 12, W)
    n_decode = 6
    gen = torch.Generator().manual_seed(1)
    new = torch.randn(n_decode, len(lengths), 12, generator=gen)
    _, state = causal_conv1d(x, weight, initial_state=h0, cu_seqlens=cu)
    ys = [causal_conv1d_update(new[i], state, weight) for i in range(n_decode)]
    # the same tokens appended to each sequence and prefilled in one go
    whole = torch.cat([torch.cat([x[cu[n]:cu[n + 1]], new[:, n]]) for n in range(len(lengths))])
    cu_whole = cu + torch.arange(len(lengths) + 1, dtype=torch.int32) * n_decode
    y_whole, state_whole = causal_conv1d(whole, weight, initial_state=h0, cu_seqlens=cu_whole)
    for n in range(len(lengths)):
        tail = y_whole[cu_whole[n + 1] - n_decode:cu_whole[n + 1]]
        close(torch.stack([y[n] for y in ys]), tail, reduction=W)
    assert torch.equal(state, state_whole)


def test_split_prefill_carries_state(close):
    x, weight, h0, cu = make_inputs((50,), 8, 4)
    y, state = causal_conv1d(x, weight, initial_state=h0)
    y1, s1 = causal_conv1d(x[:2], weight, initial_state=h0)  # shorter than W - 1: keeps part of h0
    y2, s2 = causal_conv1d(x[2:], weight, initial_state=s1)
    close(torch.cat([y1, y2]), y, reduction=4)
    assert torch.equal(s2, state)
    assert torch.equal(s1[0, :, :1], h0[0, :, 2:]) and torch.equal(s1[0, :, 1:], x[:2].t())


def test_bf16_accumulates_in_fp32(close):
    x, weight, h0, cu = make_inputs((9, 30), 32, 4, dtype=torch.bfloat16)
    y, state = causal_conv1d(x, weight, initial_state=h0, cu_seqlens=cu)
    y_ref, state_ref = conv1d_per_sequence(x, weight, h0, cu, "silu")
    assert y.dtype == torch.bfloat16
    # accumulated in fp32 and rounded to bf16 once; a bf16 accumulation would round W times
    close(y, y_ref, reduction=4, dtype=torch.bfloat16)
    assert torch.equal(state.double(), state_ref)


@pytest.mark.parametrize("bad", ["x", "weight", "state", "activation"])
def test_shape_errors_name_the_tensor(bad):
    x, weight, h0, cu = make_inputs((4, 4), 8, 4)
    kwargs = dict(initial_state=h0, cu_seqlens=cu)
    if bad == "x":
        x = x[None]
    elif bad == "weight":
        weight = weight[:4]
    elif bad == "state":
        kwargs["initial_state"] = h0[:1]
    else:
        kwargs["activation"] = "gelu"
    with pytest.raises(ValueError, match=bad):
        causal_conv1d(x, weight, **kwargs)


def test_update_shape_error_names_the_state():
    x, weight, h0, _ = make_inputs((4, 4), 8, 4)
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update(x[:2], h0[:, :, :2], weight)
