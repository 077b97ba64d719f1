"""The prefix cache with speculative decoding: a request that resumes a cached prefix answers exactly as
plain greedy decoding does cold, and its MTP head drafts exactly as a cold speculative run does, because
the cached blocks carry the head's keys and values for every position they hold.

The engine is the router's scheduler, block manager and model runner with the MTP head, driven step by
step on the tiny model with the experts local, one request at a time so that each sees what the
earlier ones left in the cache. Drafting is fixed at k (never adaptive), so every step drafts and the
drafts of two runs can be compared step for step.
"""
import pytest
import torch

from nextserve.model import Qwen3NextForCausalLM, generate
from nextserve.model.sampling import SamplingParams
from nextserve.router.acceptance import SpeculativeConfig
from nextserve.router.cache.keys import CacheNamespace
from nextserve.router.cache_budget import PoolSizes
from nextserve.router.prefix_cache import CachingBlockManager
from nextserve.router.requests import StopCriteria
from nextserve.router.runner import ModelRunner
from nextserve.router.scheduler import Scheduler, Sequence

VOCAB = 200  # below the tiny preset's vocabulary
K = 2
NAMESPACE = CacheNamespace("ab" * 8, "float32", mtp=True)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Qwen3NextForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, with_mtp=True)


class SpeculatingEngine:
    """Scheduler + caching block manager + speculative runner; keeps every step's drafts per request."""

    def __init__(self, model, num_blocks=32, max_snapshots=8, interval=64):
        self.blocks = CachingBlockManager(num_blocks, 4, NAMESPACE, max_snapshots, interval)
        self.scheduler = Scheduler(512, max_running=4, max_queue=8, blocks=self.blocks)
        self.runner = ModelRunner(model, PoolSizes(num_blocks, 4, 0, 0), speculative=SpeculativeConfig(K, adaptive=False))
        self.ids = iter(range(1, 10**6))
        self.drafts: dict[int, list[list[int]]] = {}

    def serve(self, prompt: list[int], max_tokens: int = 12, speculative_tokens: int | None = None) -> Sequence:
        seq = Sequence(next(self.ids), list(prompt), StopCriteria(max_tokens, 10**6, ignore_eos=True))
        self.scheduler.add(seq)
        self.runner.add(seq.seq_id, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                                   speculative_tokens=speculative_tokens))
        while self.scheduler.has_work():
            batch = self.scheduler.schedule()
            sampled = self.runner.step(batch)
            for seq_id, drafts in self.runner.drafts.items():
                self.drafts.setdefault(seq_id, []).append(list(drafts))
            for done in self.scheduler.postprocess(batch, sampled, self.runner.drafts):
                self.runner.free(done.seq_id)
            self.blocks.check()
        return seq

    def mtp_kv(self, seq: Sequence, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP layer's keys and values [num_tokens, Hkv, D] at the first positions of a finished
        request, from the blocks its end snapshot registered (those it resumed, or its own)."""
        k, v = self.runner.pools.kv[self.runner.model.config.num_hidden_layers]
        found = [self.blocks.cached_block(key.hex)
                 for key in self.blocks.keys((seq.prompt_ids + seq.output_ids)[:seq.num_computed])]
        return tuple(torch.cat([pool[b, :n] for b, n in found])[:num_tokens] for pool in (k, v))


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def plain_greedy(model, prompt, max_tokens=12) -> list[int]:
    return generate(model, [prompt], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0].output_ids


def assert_resumes_as_cold(model, close, model_chain, engine, seq, expect_cached):
    """`seq` ran in `engine` after others: it resumed `expect_cached` tokens, answers as plain greedy cold,
    drafts as a cold speculative run, and the MTP keys and values it resumed equal the cold ones."""
    assert seq.num_cached == expect_cached
    assert seq.output_ids == plain_greedy(model, seq.prompt_ids)
    cold = SpeculatingEngine(model)
    again = cold.serve(seq.prompt_ids)
    assert again.num_cached == 0 and again.output_ids == seq.output_ids
    assert engine.drafts[seq.seq_id] == cold.drafts[again.seq_id]
    assert (seq.num_draft_tokens, seq.num_accepted_tokens) == (again.num_draft_tokens, again.num_accepted_tokens)
    if expect_cached:
        reduction = model_chain(model.config, expect_cached)
        for got, want, what in zip(engine.mtp_kv(seq, expect_cached), cold.mtp_kv(again, expect_cached),
                                   ("MTP keys", "MTP values")):
            close(got, want, reduction=reduction, what=what)


# (tokens the prompts share, where the second resumes): a snapshot sits at every block boundary of the
# first prompt; a prefix that ends exactly where the prompts part (128) is refused, since the head's
# last row there was computed with the first prompt's next token, so the second resumes a block earlier
@pytest.mark.parametrize("shared, expect_cached", [(100, 64), (130, 128), (128, 64), (64, 0)])
def test_a_shared_prefix_resumes_and_speculates_as_cold(model, close, model_chain, shared, expect_cached):
    prefix = tokens(shared, 1)
    engine = SpeculatingEngine(model)
    engine.serve(prefix + tokens(40, 2))
    second = engine.serve(prefix + tokens(37, 3))
    assert_resumes_as_cold(model, close, model_chain, engine, second, expect_cached)


def test_the_same_prompt_twice_hits_at_all_but_its_last_token(model, close, model_chain):
    prompt = tokens(150, 4)
    engine = SpeculatingEngine(model)
    first = engine.serve(prompt)
    second = engine.serve(prompt)
    assert first.num_cached == 0
    assert_resumes_as_cold(model, close, model_chain, engine, second, len(prompt) - 1)


def test_the_next_turn_resumes_where_a_speculating_turn_ended(model, close, model_chain):
    engine = SpeculatingEngine(model)
    first = engine.serve(tokens(70, 5), max_tokens=9)
    assert first.num_draft_tokens > 0
    history = first.prompt_ids + first.output_ids
    # the end snapshot holds all it computed, accepted drafts included: every output token but the last
    second = engine.serve(history + tokens(20, 6))
    assert_resumes_as_cold(model, close, model_chain, engine, second, len(history) - 1)


def test_a_request_that_does_not_draft_still_leaves_the_heads_keys_in_its_blocks(model, close, model_chain):
    prefix = tokens(130, 7)
    engine = SpeculatingEngine(model)
    first = engine.serve(prefix + tokens(30, 8), speculative_tokens=0)
    assert first.num_draft_tokens == 0
    second = engine.serve(prefix + tokens(25, 9))
    assert_resumes_as_cold(model, close, model_chain, engine, second, 128)


def test_a_prefix_is_registered_with_the_token_after_it():
    blocks = CachingBlockManager(4, 1, NAMESPACE, 2)
    prompt = tokens(70, 10)
    keys = blocks.keys(prompt[:64])
    blocks.admit(1, 70)
    with pytest.raises(ValueError, match="token after it"):
        blocks.register(1, keys, prompt[:64])
    blocks.register(1, keys, prompt)
    assert blocks.next_token(keys[-1].hex) == prompt[64]
    assert blocks.lookup(keys, prompt[:64], prompt[64]).position == 64
    assert blocks.lookup(keys, prompt[:64], (prompt[64] + 1) % VOCAB) is None
    assert blocks.lookup(keys, prompt[:64]) is None  # the token after it unknown: no hit


def test_snapshots_inside_a_long_prompt_chunk_come_from_the_verify_passs_checkpoints(model, close, model_chain):
    prefix = tokens(200, 11)
    engine = SpeculatingEngine(model, interval=128)
    engine.serve(prefix + tokens(100, 12))  # one 299-token chunk: the snapshots at 128 and 256 lie inside it
    assert sorted(engine.blocks._snapshots.values())[:3] == [128, 256, 299]
    second = engine.serve(prefix + tokens(40, 13))
    assert_resumes_as_cold(model, close, model_chain, engine, second, 128)
