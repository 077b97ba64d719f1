"""The model on its memory pools as the engine drives it: KV in shared 64-token blocks, DeltaNet
state in reused slots, sequences joining and leaving the batch. Every new token's logits must equal
the sequence's own full forward, whatever the blocks and slot held before."""
import pytest
import torch

from nextserve.model import Qwen3NextForCausalLM, SamplingParams, StaticCache, generate
from nextserve.model.state import ForwardBatch
from nextserve.router.block_manager import BlockManager


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Qwen3NextForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, with_mtp=True)


def full_forward(model, ids):
    return model.forward_batch(ids, StaticCache(model, 1, len(ids)).batch([0], [len(ids)]), all_logits=True)[0]


# Per step: tokens each sequence feeds (prefill, decode, or a multi-token continuation); None: it leaves.
STEPS = [
    {"a": 70},
    {"a": 1, "b": 5},
    {"a": 1, "b": 1},
    {"a": None, "b": 1, "c": 40},   # a leaves; c takes its state slot and its blocks
    {"b": 1, "c": 1},
    {"b": 20, "c": 1},              # a continuation across a block boundary beside a decode
    {"b": 1, "c": 25},
    {"b": 1, "c": 1},
]


def test_sequences_joining_and_leaving_match_their_own_full_forward(model, logits_close):
    gen = torch.Generator().manual_seed(3)
    streams = {name: torch.randint(0, model.config.vocab_size, (n,), generator=gen)
               for name, n in {"a": 72, "b": 30, "c": 68}.items()}
    reference = {name: full_forward(model, ids) for name, ids in streams.items()}
    pools = model.allocate_pools(num_blocks=4, num_slots=2)
    for pool in [*pools.conv.values(), *pools.recurrent.values(), *(t for kv in pools.kv.values() for t in kv)]:
        pool.fill_(float("nan"))  # nothing may be read before it is written (or zeroed, for a new slot)
    blocks = BlockManager(num_blocks=4, num_slots=2)
    held = {}
    for step, plan in enumerate(STEPS):
        for name in [n for n, count in plan.items() if count is None]:
            blocks.release(name)
            del held[name]
        feeding = [(n, count) for n, count in plan.items() if count is not None]
        for name, count in feeding:
            if name not in held:
                blocks.admit(name, count)
                pools.zero_slots(torch.tensor([blocks.slot(name)]))
                held[name] = 0
            blocks.grow(name, held[name] + count)
        blocks.check()
        names = [n for n, _ in feeding]
        counts = [c for _, c in feeding]
        batch = ForwardBatch.build(pools, [held[n] for n in names], counts, [blocks.table(n) for n in names],
                                   [blocks.slot(n) for n in names], "cpu")
        ids = torch.cat([streams[n][held[n]:held[n] + c] for n, c in feeding])
        logits, hidden = model.forward_batch(ids, batch, all_logits=True)
        model.mtp_logits(ids, hidden, batch)  # MTP writes its own KV blocks through the same tables
        for (name, count), got in zip(feeding, logits.split(counts)):
            logits_close(got, reference[name][held[name]:held[name] + count], model.config, len(streams[name]),
                         what=f"step {step}, sequence {name}")
            held[name] += count
    assert blocks.slot("c") in (0, 1) and held == {"b": 30, "c": 68}


def test_generation_under_a_pool_that_forces_preemption_gives_the_same_greedy_tokens(model):
    prompts = [list(range(10 + 9 * i, 60 + 9 * i)) for i in range(3)]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    ample = generate(model, prompts, params)
    # 3 blocks and 3 slots: all three 50-token prompts are admitted (one block each), and each needs a
    # second block at position 64, when none is free: decodes must preempt
    from nextserve.router.cache_budget import block_bytes, slot_bytes
    budget = 3 * block_bytes(model.config, "float32", 1) + 3 * slot_bytes(model.config, "float32")
    tight = generate(model, prompts, params, kv_cache_memory=str(budget), max_batch_tokens=64)
    assert [c.output_ids for c in tight] == [c.output_ids for c in ample]
    assert all(len(c.output_ids) == 30 and c.finish_reason == "length" for c in tight)


def test_batches_for_the_mtp_passes_are_what_build_makes():
    pools = object()  # never touched: a batch only says where things go
    tables = [[3, 7], [1], [4, 5, 6]]
    parent = ForwardBatch.build(pools, [60, 2, 100], [5, 1, 3], tables, [2, 0, 1], "cpu")
    fields = ("positions", "cu_seqlens", "slot_mapping", "seq_lens_k", "state_slots")

    def same(got, want):
        assert (got.seq_lens, got.context_lens) == (want.seq_lens, want.context_lens)
        for name in fields:
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        width = want.block_tables.shape[1]
        assert torch.equal(got.block_tables[:, :width], want.block_tables)

    assert parent.prefix_of([0, 1, 2], [5, 1, 3]) is parent
    same(parent.prefix_of([0, 1, 2], [2, 1, 3]), ForwardBatch.build(pools, [60, 2, 100], [2, 1, 3], tables, [2, 0, 1], "cpu"))
    same(parent.prefix_of([0, 2], [5, 1]), ForwardBatch.build(pools, [60, 100], [5, 1], [tables[0], tables[2]], [2, 1], "cpu"))
    with pytest.raises(ValueError, match="prefix lengths"):
        parent.prefix_of([0], [6])
    one = ForwardBatch.one_token_each(pools, [63, 10, 130], tables, torch.tensor([2, 0, 1]), "cpu")
    same(one, ForwardBatch.build(pools, [63, 10, 130], [1, 1, 1], tables, [2, 0, 1], "cpu"))
    with pytest.raises(ValueError, match="blocks hold"):
        ForwardBatch.one_token_each(pools, [128], [[3, 7]], torch.tensor([2]), "cpu")
