"""The tiny model's real cache through a real Redis: the DeltaNet states and attention KV that a prefill
records fit the layout the codec checks, come back bit for bit, and a sequence resumed from them
continues exactly as one resumed from the in-memory checkpoint (and within rounding of a cold run).

The conversion between the model's per-sequence state and cache values lives here, not in the cache
package: the engine's paged blocks and state slots (issue 10) will replace `SequenceState`.
"""
import pytest
import pytest_asyncio
import torch

from nextserve.model import ForwardBatch, Qwen3NextForCausalLM
from nextserve.model.state import KVCache, LinearAttentionState, SequenceState
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


def run(model, state, ids, **kw):
    return model.forward_batch(ids, ForwardBatch.build([state], [len(ids)], "cpu", **kw), all_logits=True)[0]


def cache_values(state: SequenceState, position: int, layout: ModelLayout):
    """The KV blocks of [0, position) and the state snapshot at position, as cache values (CPU copies)."""
    saved = state.checkpoints[position]
    snapshot = {}
    for i in layout.linear_layers:
        snapshot[f"layers.{i}.conv"] = saved[i].conv.clone()
        snapshot[f"layers.{i}.recurrent"] = saved[i].recurrent.clone()
    blocks = []
    for start in range(0, position, BLOCK_TOKENS):
        block = {}
        for i in layout.attention_layers:
            keys, values = state.layers[i].view()
            block[f"layers.{i}.key"] = keys[start:start + BLOCK_TOKENS].clone()
            block[f"layers.{i}.value"] = values[start:start + BLOCK_TOKENS].clone()
        blocks.append(block)
    return blocks, snapshot


def restored(num_layers: int, hit, layout: ModelLayout) -> SequenceState:
    layers = [None] * num_layers
    for i in layout.linear_layers:
        layers[i] = LinearAttentionState(hit.state[f"layers.{i}.conv"], hit.state[f"layers.{i}.recurrent"])
    for i in layout.attention_layers:
        keys = torch.cat([b[f"layers.{i}.key"] for b in hit.kv_blocks])
        values = torch.cat([b[f"layers.{i}.value"] for b in hit.kv_blocks])
        layers[i] = KVCache(keys, values, keys.shape[0])
    return SequenceState(layers, hit.position)


async def test_a_prefix_stored_in_redis_resumes_exactly_as_the_in_memory_checkpoint(model, tier, logits_close):
    tokens = torch.randint(0, model.config.vocab_size, (150,), generator=torch.Generator().manual_seed(11))
    cold = model.new_state()
    full = run(model, cold, tokens, record_checkpoints=True)
    assert sorted(cold.checkpoints) == [64, 128]
    keys = chain_keys(tier.namespace, tokens.tolist())
    blocks, snapshot = cache_values(cold, 128, tier.layout)
    for key, block in zip(keys, blocks):
        assert tier.submit_kv(key, block)  # raises ValueError if the model's tensors were not the layout's
    assert tier.submit_state(keys[1], snapshot)
    await tier.drain()

    # a second request with the same 150-token prompt: everything but its last token is cacheable
    hit = await tier.lookup(chain_keys(tier.namespace, tokens[:149].tolist()))
    assert hit.position == 128
    resumed = restored(len(cold.layers), hit, tier.layout)
    from_redis = run(model, resumed, tokens[128:])
    from_memory = run(model, cold.resume_from_checkpoint(128), tokens[128:])
    assert torch.equal(from_redis, from_memory)  # the same bits in, the same bits out
    logits_close(from_redis, full[128:], model.config, 150, dtype=model.lm_head.weight.dtype)
