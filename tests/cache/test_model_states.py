"""The tiny model's real cache through a real Redis: the DeltaNet states and attention KV that a prefill
records fit the layout the codec checks, come back bit for bit, and a sequence resumed from them
continues exactly as one resumed from the in-memory checkpoint (and within rounding of a cold run).

The conversion between the engine's pools (KV blocks by block table, DeltaNet state slots) and cache
values lives here: it is what the engine does when it snapshots and restores.
"""
import pytest
import pytest_asyncio
import torch

from nextserve.model import Qwen3NextForCausalLM, StaticCache
from nextserve.model.state import LinearAttentionState
from nextserve.router.cache.keys import BLOCK_TOKENS, CacheNamespace, chain_keys
from nextserve.router.cache.layout import ModelLayout
from nextserve.router.cache.redis_tier import RedisTier, RedisTierOptions

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request, tiny_checkpoint):
    return Qwen3NextForCausalLM.from_pretrained(tiny_checkpoint, dtype=getattr(torch, request.param))


@pytest_asyncio.fixture
async def tier(redis_url, model):
    dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    tier = RedisTier(RedisTierOptions(redis_url, inline_bytes=1024, part_bytes=4096),
                     CacheNamespace("00" * 8, dtype), ModelLayout.from_config(model.config, dtype))
    await tier.start()
    yield tier
    await tier.close()


def snapshot_of(checkpoint, layout: ModelLayout) -> dict:
    """A DeltaNet checkpoint (per decoder layer: LinearAttentionState or None) as a state value."""
    snapshot = {}
    for i in layout.linear_layers:
        snapshot[f"layers.{i}.conv"] = checkpoint[i].conv.clone()
        snapshot[f"layers.{i}.recurrent"] = checkpoint[i].recurrent.clone()
    return snapshot


def checkpoint_of(hit, layout: ModelLayout, num_layers: int) -> list:
    return [LinearAttentionState(hit.state[f"layers.{i}.conv"], hit.state[f"layers.{i}.recurrent"])
            if i in layout.linear_layers else None for i in range(num_layers)]


class Sequences:
    """Sequences 0 (cold), 1 (resumed from the in-memory checkpoint), 2 (resumed from Redis) in one StaticCache."""

    def __init__(self, model, max_tokens: int):
        self.model, self.cache = model, StaticCache(model, 3, max_tokens)

    def run(self, seq: int, ids, **kw):
        batch = self.cache.batch([seq], [len(ids)], **kw)
        return self.model.forward_batch(ids, batch, all_logits=True)[0], batch

    def prefill_cold(self, ids):
        full, batch = self.run(0, ids, record_checkpoints=True)
        return full, batch.checkpoints[0]

    def kv_blocks(self, position: int, layout: ModelLayout) -> list[dict]:
        return [{f"layers.{i}.{name}": pool[self.cache.tables[0][j]].clone()
                 for i in layout.attention_layers for name, pool in zip(("key", "value"), self.cache.pools.kv[i])}
                for j in range(position // BLOCK_TOKENS)]

    def continue_from_memory(self, position: int, checkpoint, ids):
        self.cache.resume(1, 0, position, checkpoint)
        return self.run(1, ids)[0]

    def continue_from_hit(self, hit, layout: ModelLayout, ids):
        for j, block in enumerate(hit.kv_blocks):
            for i in layout.attention_layers:
                for name, pool in zip(("key", "value"), self.cache.pools.kv[i]):
                    pool[self.cache.tables[2][j]] = block[f"layers.{i}.{name}"]
        self.cache.pools.write_state(2, checkpoint_of(hit, layout, self.cache.pools.num_layers))
        self.cache.lengths[2] = hit.position
        return self.run(2, ids)[0]


async def test_a_prefix_stored_in_redis_resumes_exactly_as_the_in_memory_checkpoint(model, tier, logits_close):
    tokens = torch.randint(0, model.config.vocab_size, (150,), generator=torch.Generator().manual_seed(11))
    seqs = Sequences(model, 150)
    full, checkpoints = seqs.prefill_cold(tokens)
    assert sorted(checkpoints) == [64, 128]
    keys = chain_keys(tier.namespace, tokens.tolist())
    for key, block in zip(keys, seqs.kv_blocks(128, tier.layout)):
        assert tier.submit_kv(key, block)  # raises ValueError if the model's tensors were not the layout's
    assert tier.submit_state(keys[1], snapshot_of(checkpoints[128], tier.layout))
    await tier.drain()

    # a second request with the same 150-token prompt: everything but its last token is cacheable
    hit = await tier.lookup(chain_keys(tier.namespace, tokens[:149].tolist()))
    assert hit.position == 128
    from_redis = seqs.continue_from_hit(hit, tier.layout, tokens[128:])
    from_memory = seqs.continue_from_memory(128, checkpoints[128], tokens[128:])
    assert torch.equal(from_redis, from_memory)  # the same bits in, the same bits out
    logits_close(from_redis, full[128:], model.config, 150, dtype=model.lm_head.weight.dtype)
