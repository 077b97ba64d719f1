"""The local prefix cache inside the engine: a request that shares a prefix with an earlier one resumes
from its KV blocks and DeltaNet state snapshot, and produces exactly what it produces cold.

The engine here is the router's own scheduler, block manager and model runner, driven step by step on
the tiny model with the experts local (what `generate` runs), one request at a time so that each sees
what the earlier ones left in the cache.
"""
import pytest
import torch

from nextserve.model import Qwen3NextForCausalLM
from nextserve.model.sampling import SamplingParams
from nextserve.router.block_manager import BlockManager, blocks_for
from nextserve.router.cache.keys import CacheNamespace
from nextserve.router.cache_budget import PoolSizes
from nextserve.router.prefix_cache import CachingBlockManager
from nextserve.router.requests import StopCriteria
from nextserve.router.runner import ModelRunner
from nextserve.router.scheduler import Scheduler, Sequence

VOCAB = 200  # below the tiny preset's vocabulary
NAMESPACE = CacheNamespace("ab" * 8, "float32")


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Qwen3NextForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)


class Engine:
    """Scheduler + block manager + runner, with logits of every sampling step kept for comparison."""

    def __init__(self, model, blocks: BlockManager, max_batch_tokens: int = 512):
        self.model, self.blocks = model, blocks
        self.scheduler = Scheduler(max_batch_tokens, max_running=4, max_queue=8, blocks=blocks)
        self.runner = ModelRunner(model, PoolSizes(blocks.num_blocks, blocks.num_slots, 0, 0))
        self.ids = iter(range(1, 10**6))
        self.logits: dict[int, list[torch.Tensor]] = {}
        forward = self.runner._forward

        def keep_logits(batch, part):
            logits = forward(batch, part)
            for row, (seq, sample) in enumerate(zip(batch.seqs[part], batch.samples()[part])):
                if sample:
                    self.logits.setdefault(seq.seq_id, []).append(logits[row].clone())
            return logits
        self.runner._forward = keep_logits

    def serve(self, *prompts: list[int], max_tokens: int = 6) -> list[Sequence]:
        seqs = []
        for prompt in prompts:
            seq = Sequence(next(self.ids), list(prompt), StopCriteria(max_tokens, 10**6, ignore_eos=True))
            self.scheduler.add(seq)
            self.runner.add(seq.seq_id, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
            seqs.append(seq)
        while self.scheduler.has_work():
            batch = self.scheduler.schedule()
            sampled = self.runner.step(batch)
            self.scheduler.postprocess(batch, sampled)
            self.blocks.check()
        return seqs


def caching(num_blocks=32, num_slots=4, max_snapshots=8, interval=1024) -> CachingBlockManager:
    return CachingBlockManager(num_blocks, num_slots, NAMESPACE, max_snapshots, interval)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def cold(model, prompt, max_tokens=6):
    engine = Engine(model, BlockManager(blocks_for(len(prompt) + max_tokens), 1))
    (seq,) = engine.serve(prompt, max_tokens=max_tokens)
    return seq.output_ids, torch.stack(engine.logits[seq.seq_id])


@pytest.mark.parametrize("shared, expect_cached", [(60, 0), (64, 64), (100, 64), (130, 128)])
def test_a_shared_prefix_resumes_exactly_as_cold(model, logits_close, shared, expect_cached):
    prefix = tokens(shared, 1)
    first, second = prefix + tokens(40, 2), prefix + tokens(37, 3)
    engine = Engine(model, caching(interval=64))  # a snapshot at every block boundary of the first prompt
    (a,) = engine.serve(first)
    (b,) = engine.serve(second)
    assert a.num_cached == 0 and b.num_cached == expect_cached
    want_ids, want_logits = cold(model, second)
    assert b.output_ids == want_ids
    logits_close(torch.stack(engine.logits[b.seq_id]), want_logits, model.config, len(second) + 6)


@pytest.mark.parametrize("length", [60, 64, 150])
def test_the_same_prompt_twice_hits_at_all_but_its_last_token(model, logits_close, length):
    prompt = tokens(length, 4)
    engine = Engine(model, caching())
    (a,) = engine.serve(prompt)
    (b,) = engine.serve(prompt)
    assert a.num_cached == 0 and b.num_cached == length - 1
    assert a.output_ids == b.output_ids
    logits_close(torch.stack(engine.logits[b.seq_id]), torch.stack(engine.logits[a.seq_id]), model.config, length + 6)


def test_the_next_turn_of_a_conversation_resumes_where_the_last_one_ended(model, logits_close):
    engine = Engine(model, caching())
    (a,) = engine.serve(tokens(70, 5), max_tokens=5)
    history = a.prompt_ids + a.output_ids
    # the first turn's state is kept at all it computed: its prompt and every output token but the last
    turn = history + tokens(20, 6)
    (b,) = engine.serve(turn)
    assert b.num_cached == len(history) - 1
    want_ids, want_logits = cold(model, turn)
    assert b.output_ids == want_ids
    logits_close(torch.stack(engine.logits[b.seq_id]), want_logits, model.config, len(turn) + 6)


def test_snapshots_every_interval_during_a_long_prefill(model):
    prompt = tokens(300, 7)
    engine = Engine(model, caching(interval=128), max_batch_tokens=512)
    engine.serve(prompt)
    # every 128 tokens, the prompt's last block boundary, the prompt minus one token, and the request's end
    positions = sorted(engine.blocks._snapshots.values())
    assert positions == [128, 256, 299, 300 + 6 - 1]
    assert len(engine.runner.snapshots) == len(positions) - 1  # the end one is copied at the next step


def test_concurrent_requests_sharing_a_prefix_and_eviction_stay_correct(model):
    prefix = tokens(128, 8)
    prompts = [prefix + tokens(10 + i, 20 + i) for i in range(3)]
    engine = Engine(model, caching(num_blocks=12, num_slots=2, max_snapshots=3))
    engine.serve(prompts[0])
    seqs = engine.serve(*prompts[1:])  # both resume from the first's prefix, one waits for a slot
    assert [s.num_cached for s in seqs] == [128, 128]
    for seq, prompt in zip(seqs, prompts[1:]):
        assert seq.output_ids == cold(model, prompt)[0]
    # fill the cache with unrelated requests: the LRU blocks and snapshots go, answers stay right
    for i in range(3):
        engine.serve(tokens(150, 40 + i))
    assert engine.blocks.stats.evicted_blocks > 0 and engine.blocks.stats.evicted_snapshots > 0
    assert len(engine.runner.snapshots) <= engine.blocks.max_snapshots + 1
    (again,) = engine.serve(prompts[0])
    assert again.output_ids == cold(model, prompts[0])[0]
