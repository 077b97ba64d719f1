"""Concurrent expert requests for one layer share a forward pass and get their own rows back."""
import asyncio

import pytest
import torch

from nextserve.worker.batcher import LayerBatcher
from nextserve.worker.shard import ShardExperts


@pytest.fixture(scope="module")
def shard(tiny_checkpoint):
    return ShardExperts.load(tiny_checkpoint, range(12), dtype="float32")


def expert_chain(shard) -> int:
    """Accumulation behind an expert output: gate/up over the hidden size, down over the expert width,
    the sum over the k experts (a merged forward may take another BLAS path than a single one)."""
    return shard.config.hidden_size + shard.config.moe_intermediate_size + shard.config.num_experts_per_tok


def requests(shard, n, layer=0):
    g = torch.Generator().manual_seed(n)
    H, E, k = shard.config.hidden_size, shard.config.num_experts, shard.config.num_experts_per_tok
    return [(layer, torch.randn(t, H, generator=g), torch.randint(0, E, (t, k), generator=g),
             torch.rand(t, k, generator=g)) for t in range(1, n + 1)]


def test_concurrent_requests_for_a_layer_are_merged_and_split_back(shard, close):
    batcher = LayerBatcher(shard.forward)
    reqs = requests(shard, 5) + requests(shard, 2, layer=1)

    async def send_all():
        return await asyncio.gather(*(batcher.submit(*r) for r in reqs))

    outputs = asyncio.run(send_all())
    for r, out in zip(reqs, outputs):
        close(out, shard.forward(*r), reduction=expert_chain(shard))
    assert batcher.forwards < len(reqs)  # merging happened


def test_a_bad_request_fails_alone(shard, close):
    batcher = LayerBatcher(shard.forward)
    good = requests(shard, 2)
    layer, hidden, ids, weights = good[0]
    bad = (layer, hidden, torch.full_like(ids, shard.config.num_experts + 5), weights)

    async def send_all():
        return await asyncio.gather(*(batcher.submit(*r) for r in [good[0], bad, good[1]]), return_exceptions=True)

    first, failed, second = asyncio.run(send_all())
    assert isinstance(failed, ValueError) and "expert ids" in str(failed)
    close(first, shard.forward(*good[0]), reduction=expert_chain(shard))
    close(second, shard.forward(*good[1]), reduction=expert_chain(shard))
