"""Speculative decoding with the prefix cache through real routers, in-process workers over gRPC and
a real redis-server: a repeated prompt resumes from the local tier and, on another router, from Redis;
the answer is the in-process model's greedy answer, the drafts accepted are those of the cold run, and
the MTP head's keys and values that came from Redis are the ones the first router computed. A router
without speculation shares the Redis but never reads the speculating routers' blocks.

The small-vocabulary checkpoint: over 8 tokens the head's drafts are accepted often enough that a head
resuming without its keys and values would be seen in the acceptance."""
import pytest
import torch

from nextserve.client import Client
from nextserve.model import Qwen3NextForCausalLM, SamplingParams, generate

MAX_TOKENS = 10
SPECULATION = dict(speculative_tokens=2, speculative_adaptive=False)  # fixed k: every step drafts


def prompt(n: int) -> list[int]:
    return [(5 * i + (i * i) % 7) % 8 for i in range(n)]


@pytest.fixture(scope="module")
def reference(small_vocab_checkpoint):
    model = Qwen3NextForCausalLM.from_pretrained(small_vocab_checkpoint, dtype=torch.float32)
    return lambda ids: generate(model, [ids], SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                             ignore_eos=True))[0].output_ids


@pytest.fixture
def deployment(small_vocab_workers, routers, small_vocab_checkpoint, redis_url):
    plan, workers = small_vocab_workers
    return lambda **options: routers(plan, workers.addresses, checkpoint=small_vocab_checkpoint,
                                     cache_url=redis_url, **options)


def mtp_kv(router, token_ids: list[int]) -> torch.Tensor:
    """The MTP layer's keys and values at the positions of `token_ids`, from the router's cached blocks."""
    engine = router.engine
    blocks, pools = engine.scheduler.blocks, engine.runner.pools
    k, v = pools.kv[engine.runner.model.config.num_hidden_layers]
    found = [blocks.cached_block(key.hex) for key in blocks.keys(token_ids)]
    return torch.stack([torch.cat([pool[b, :n] for b, n in found]) for pool in (k, v)])


def test_speculation_resumes_a_prompt_locally_and_from_redis_as_cold(servers, deployment, reference):
    first, second = deployment(**SPECULATION), deployment(**SPECULATION)
    ids = prompt(150)
    want = reference(ids)
    with Client(f"127.0.0.1:{first.port}", timeout=120) as a, Client(f"127.0.0.1:{second.port}", timeout=120) as b:
        run = lambda client: client.generate(ids, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        cold = run(a)
        assert cold.cached_tokens == 0 and cold.token_ids == want and cold.draft_tokens > 0
        local = run(a)
        servers.run(first.engine.redis_cache.tier.drain())  # its writes are in Redis
        remote = run(b)
    for resumed in (local, remote):
        assert resumed.cached_tokens == len(ids) - 1
        assert resumed.token_ids == want
        assert (resumed.draft_tokens, resumed.accepted_draft_tokens) == (cold.draft_tokens, cold.accepted_draft_tokens)
    assert cold.accepted_draft_tokens > 0
    counters = second.engine.redis_cache.tier.counters.snapshot()
    assert counters["hits"] == 1 and counters["hit_tokens"] == len(ids) - 1
    # the resumed positions' MTP keys and values are a copy of what the first router computed cold
    computed = ids + want[:-1]  # both routers registered the blocks of all they computed
    assert torch.equal(mtp_kv(second, computed)[:, :len(ids) - 1], mtp_kv(first, computed)[:, :len(ids) - 1])


def test_a_router_without_speculation_never_reads_blocks_with_the_mtp_head(servers, deployment, reference):
    speculating, plain = deployment(**SPECULATION), deployment()
    ids = prompt(140)
    with Client(f"127.0.0.1:{speculating.port}", timeout=120) as client:
        client.generate(ids, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    servers.run(speculating.engine.redis_cache.tier.drain())
    assert speculating.engine.redis_cache.tier.counters.snapshot()["values_written"] > 0
    with Client(f"127.0.0.1:{plain.port}", timeout=120) as client:
        got = client.generate(ids, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    assert got.cached_tokens == 0 and got.token_ids == reference(ids)
    counters = plain.engine.redis_cache.tier.counters.snapshot()
    # another namespace: nothing found at all, not values found and refused
    assert counters["hits"] == 0 and not any(v for k, v in counters.items() if k.startswith("verification_failures"))
