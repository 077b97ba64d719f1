"""Paged KV: `reshape_and_cache` writes exactly the mapped slots, and `paged_attention` (the torch
reference and the Triton kernels) equals contiguous `attention` on the same keys.

The caches are built the way the engine builds them: 64-token blocks handed out in shuffled
order, block-table entries past a sequence's blocks set to -1, and every block and slot that no
sequence owns (spare blocks, the tail of each last block) filled with NaN, so a kernel reading
outside the table poisons its output.
"""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from nextserve.kernels import ops
from nextserve.kernels.attention import naive, triton_attention

BLOCK = 64
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]


# Roundings to the dtype on the way (probabilities before P @ V, the output, sigmoid(gate), their
# product), for the conftest rule; the reduction is the keys plus the head dim.
ATTENTION_ROUNDINGS = {torch.float32: 1, torch.bfloat16: 4}


def pack(lengths):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def paged_layout(lengths, *, spare_blocks, seed):
    """Block tables [N, max_blocks] int32 (shuffled block ids, -1 past each sequence's blocks, one
    spare column) and the slot mapping [sum(lengths)] int64 of every token, packed in order."""
    n_blocks = [math.ceil(L / BLOCK) for L in lengths]
    num_blocks = sum(n_blocks) + spare_blocks
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    tables = torch.full((len(lengths), max(n_blocks) + 1), -1, dtype=torch.int32)
    slots, used = [], 0
    for n, (L, nb) in enumerate(zip(lengths, n_blocks)):
        ids = order[used:used + nb]
        used += nb
        tables[n, :nb] = ids.to(torch.int32)
        pos = torch.arange(L)
        slots.append(ids[pos // BLOCK] * BLOCK + pos % BLOCK)
    return tables, torch.cat(slots), num_blocks


def nan_cache(num_blocks, Hkv, D, dtype):
    return torch.full((num_blocks, BLOCK, Hkv, D), float("nan"), dtype=dtype)


PAGED_CASES = {
    # name: (Lq per sequence, Lk per sequence, Hq, Hkv, D)
    "prefill-across-blocks": ([65, 1, 64], [65, 1, 64], 4, 2, 32),
    # chunked prefill after cached blocks
    "continuation": ([3, 70], [131, 140], 4, 2, 16),
    # D > 128 takes 32-key tiles: every other tile starts mid-block
    "continuation-D160": ([1, 40], [97, 100], 4, 2, 160),
    "decode": ([1, 1, 1, 1], [1, 64, 65, 130], 8, 2, 32),
    # an idle sequence (Lq = 0), MHA-like G = 3 and a head dim that is not a power of two
    "mixed-D24": ([5, 0, 1, 66], [5, 3, 129, 66], 6, 2, 24),
}


def paged_inputs(case, dtype, seed, spare_blocks=3):
    """Contiguous q, k, v, gate, cu_seqlens and the same keys written into NaN-filled paged caches."""
    Lq, Lk, Hq, Hkv, D = PAGED_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(Lq), Hq, D, generator=gen).to(dtype)
    k = torch.randn(sum(Lk), Hkv, D, generator=gen).to(dtype)
    v = torch.randn(sum(Lk), Hkv, D, generator=gen).to(dtype)
    gate = torch.randn(sum(Lq), Hq, D, generator=gen).to(dtype)
    tables, slot_mapping, num_blocks = paged_layout(Lk, spare_blocks=spare_blocks, seed=seed)
    k_cache, v_cache = nan_cache(num_blocks, Hkv, D, dtype), nan_cache(num_blocks, Hkv, D, dtype)
    naive.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    seq_lens_k = torch.tensor(Lk, dtype=torch.int32)
    return dict(q=q, k=k, v=v, gate=gate, cu_q=pack(Lq), cu_k=pack(Lk), k_cache=k_cache, v_cache=v_cache,
                tables=tables, seq_lens_k=seq_lens_k, D=D, max_len=max(Lk))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(PAGED_CASES))
def test_reference_paged_attention_equals_contiguous(case, dtype):
    """The reference gathers exactly the contiguous keys, so it agrees bit for bit."""
    x = paged_inputs(case, dtype, seed=len(case))
    scale = x["D"] ** -0.5
    got = naive.paged_attention(x["q"], x["k_cache"], x["v_cache"], x["tables"], x["cu_q"], x["seq_lens_k"],
                                scale=scale, gate=x["gate"])
    expected = naive.attention(x["q"], x["k"], x["v"], x["cu_q"], x["cu_k"], scale=scale, gate=x["gate"])
    assert torch.equal(got, expected)


def test_reference_paged_attention_rejects_bad_tables():
    x = paged_inputs("decode", torch.float32, seed=0)
    args = (x["q"], x["k_cache"], x["v_cache"])
    with pytest.raises(ValueError, match="block table row holds at most"):
        naive.paged_attention(*args, x["tables"][:, :1], x["cu_q"], x["seq_lens_k"], scale=1.0)
    bad = x["tables"].clone()
    bad[3, 2] = x["k_cache"].shape[0]
    with pytest.raises(ValueError, match="outside the cache"):
        naive.paged_attention(*args, bad, x["cu_q"], x["seq_lens_k"], scale=1.0)
    with pytest.raises(ValueError, match="seq_lens_k"):
        naive.paged_attention(*args, x["tables"], x["cu_q"], x["seq_lens_k"][:2], scale=1.0)
    with pytest.raises(ValueError, match="Hkv"):
        naive.paged_attention(x["q"][:, :3], x["k_cache"], x["v_cache"], x["tables"], x["cu_q"], x["seq_lens_k"],
                              scale=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache_writes_exactly_the_mapped_slots(backend, dtype):
    gen = torch.Generator().manual_seed(7)
    T, Hkv, D, num_blocks = 9, 2, 24, 4
    # k and v as views of one fused projection, as the model produces them
    kv = torch.randn(T, 2, Hkv, D, generator=gen).to(dtype)
    k, v = kv[:, 0], kv[:, 1]
    slot_mapping = torch.tensor([130, 5, -1, 64, 255, 0, -1, 191, 63])  # scattered blocks, two padding tokens
    k_cache = torch.randn(num_blocks, BLOCK, Hkv, D, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK, Hkv, D, generator=gen).to(dtype)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            expected_k[slot // BLOCK, slot % BLOCK] = k[t]
            expected_v[slot // BLOCK, slot % BLOCK] = v[t]
    assert ops.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping) is None
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_reshape_and_cache_rejects_bad_arguments():
    k, cache = torch.randn(3, 2, 8), torch.zeros(2, BLOCK, 2, 8)
    with pytest.raises(ValueError, match="slot_mapping"):
        naive.reshape_and_cache(k, k, cache, cache, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside the cache"):
        naive.reshape_and_cache(k, k, cache, cache, torch.tensor([0, 1, 2 * BLOCK]))
    with pytest.raises(ValueError, match="num_blocks, block_size"):
        naive.reshape_and_cache(k, k, cache[..., :4], cache[..., :4], torch.tensor([0, 1, 2]))


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("NEXTSERVE_KERNELS", request.param)
    return request.param


# --- Triton (under the interpreter on CPU) ------------------------------------------------------

def contiguous_reference(x, gate):
    return naive.attention(x["q"], x["k"], x["v"], x["cu_q"], x["cu_k"], scale=x["D"] ** -0.5, gate=gate)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(PAGED_CASES))
def test_triton_paged_attention_equals_contiguous(case, dtype, poisoned_empty, close):
    x = paged_inputs(case, dtype, seed=len(case))
    with poisoned_empty():
        got = triton_attention.paged_attention(x["q"], x["k_cache"], x["v_cache"], x["tables"], x["cu_q"],
                                               x["seq_lens_k"], scale=x["D"] ** -0.5, gate=x["gate"])
    close(got, contiguous_reference(x, x["gate"]), reduction=x["max_len"] + x["D"], roundings=ATTENTION_ROUNDINGS[dtype])


@pytest.mark.parametrize("case", ["decode", "continuation-D160"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_paged_split_keys_ungated_through_ops(num_splits, case, monkeypatch, poisoned_empty, close):
    """Keys split over programs (splits that start mid-block, splits with no keys), no gate."""
    monkeypatch.setenv("NEXTSERVE_KERNELS", "triton")
    x = paged_inputs(case, torch.float32, seed=11)
    args = (x["q"], x["k_cache"], x["v_cache"], x["tables"], x["cu_q"], x["seq_lens_k"])
    with poisoned_empty():
        got = triton_attention.paged_attention(*args, scale=x["D"] ** -0.5, num_splits=num_splits)
        via_ops = ops.paged_attention(*args, scale=x["D"] ** -0.5)
    expected = contiguous_reference(x, None)
    roundings = ATTENTION_ROUNDINGS[expected.dtype]
    close(got, expected, reduction=x["max_len"] + x["D"], roundings=roundings, what="kernel")
    close(via_ops, expected, reduction=x["max_len"] + x["D"], roundings=roundings, what="through ops")


def test_triton_paged_attention_rejects_what_it_cannot_read():
    x = paged_inputs("decode", torch.float32, seed=0)
    with pytest.raises(ValueError, match="share a dtype"):
        triton_attention.paged_attention(x["q"].bfloat16(), x["k_cache"], x["v_cache"], x["tables"], x["cu_q"],
                                         x["seq_lens_k"], scale=1.0)
    small = x["k_cache"].reshape(-1, 8, 2, 32)
    with pytest.raises(ValueError, match="power of two >= 16"):
        triton_attention.paged_attention(x["q"], small, small, x["tables"], x["cu_q"], x["seq_lens_k"], scale=1.0)
