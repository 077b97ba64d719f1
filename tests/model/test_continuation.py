"""Continuing from a cached state equals recomputing from scratch (transformers cannot be the
oracle here: it restarts DeltaNet state when more than one new token arrives)."""
import pytest
import torch

from nextserve.model import Qwen3NextForCausalLM, StaticCache
from nextserve.model.moe import Experts


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Qwen3NextForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokens(model):
    return torch.randint(0, model.config.vocab_size, (150,), generator=torch.Generator().manual_seed(7))


def run(model, cache, seq, ids, **kw):
    """Feed `ids` to sequence `seq` of `cache`; returns every new token's logits and the batch."""
    batch = cache.batch([seq], [len(ids)], **kw)
    return model.forward_batch(ids, batch, all_logits=True)[0], batch


def full_forward(model, ids):
    return run(model, StaticCache(model, 1, len(ids)), 0, ids)[0]


def test_prefill_then_continue_in_one_piece_equals_full_forward(model, tokens, logits_close):
    full = full_forward(model, tokens)
    cache = StaticCache(model, 1, 150)
    run(model, cache, 0, tokens[:100])
    continued, _ = run(model, cache, 0, tokens[100:])
    logits_close(continued, full[100:], model.config, 150)
    assert cache.lengths == [150]


def test_prefill_then_decode_token_by_token_equals_full_forward(model, tokens, logits_close):
    full = full_forward(model, tokens)
    cache = StaticCache(model, 1, 150)
    run(model, cache, 0, tokens[:90])
    for t in range(90, 150):
        step, _ = run(model, cache, 0, tokens[t:t + 1])
        logits_close(step[0], full[t], model.config, 150)


def test_batched_sequences_continue_independently(model, tokens, logits_close):
    """Two sequences at different depths in one packed batch: each matches its own full forward."""
    a, b = tokens[:120], tokens[30:]
    full_a, full_b = full_forward(model, a), full_forward(model, b)
    cache = StaticCache(model, 2, 120)
    run(model, cache, 1, b[:70])  # the second slot and blocks first: nothing may assume sequence order
    run(model, cache, 0, a[:50])
    logits, _ = model.forward_batch(torch.cat([a[50:], b[70:]]), cache.batch([0, 1], [70, 50]), all_logits=True)
    logits_close(logits[:70], full_a[50:], model.config, 120)
    logits_close(logits[70:], full_b[70:], model.config, 120)


def test_chunk_boundary_checkpoints_equal_recurrent_states(model, tokens, rms_close, model_chain):
    cache = StaticCache(model, 2, 140)
    _, batch = run(model, cache, 0, tokens[:140], record_checkpoints=True)
    [checkpoints] = batch.checkpoints
    assert sorted(checkpoints) == [64, 128]

    # the recurrent (token-by-token) form reaches the same states at the same positions
    for t in range(128):
        run(model, cache, 1, tokens[t:t + 1])
        if t + 1 in (64, 128):
            for i, (saved, live) in enumerate(zip(checkpoints[t + 1], cache.pools.read_state(1))):
                if model.config.layer_types[i] == "linear_attention":
                    # the layers below feed these states: the whole model's chain up to here
                    rms_close(saved.recurrent, live.recurrent, reduction=model_chain(model.config, t + 1))
                    rms_close(saved.conv, live.conv, reduction=model_chain(model.config, t + 1))
                else:
                    assert saved is None and live is None


def test_resume_from_checkpoint_equals_full_forward(model, tokens, logits_close):
    full = full_forward(model, tokens)
    cache = StaticCache(model, 2, 150)
    _, batch = run(model, cache, 0, tokens[:140], record_checkpoints=True)
    cache.resume(1, 0, 64, batch.checkpoints[0][64])
    assert cache.lengths[1] == 64
    logits_close(run(model, cache, 1, tokens[64:])[0], full[64:], model.config, 150)
    with pytest.raises(ValueError, match="multiples of 64"):
        cache.resume(1, 0, 100, batch.checkpoints[0][64])


def test_expert_shards_sum_to_all_experts(model, close):
    """What a worker computes: disjoint expert subsets add up to the full routed output."""
    block = model.model.layers[0].mlp
    E, H, inter = block.experts.num_experts, model.config.hidden_size, block.experts.intermediate_size
    x = torch.randn(9, H)
    weights, ids = block.route(x)
    shards = [list(range(0, 5)), list(range(5, E))]
    parts = []
    for held in shards:
        part = Experts(E, H, inter, held)
        rows = torch.tensor(held)
        part.w13.data, part.w2.data = block.experts.w13.data[rows], block.experts.w2.data[rows]
        parts.append(part(x, ids, weights))
    close(parts[0] + parts[1], block.experts(x, ids, weights), reduction=H + inter + weights.shape[1])


def test_router_view_loads_no_expert_weights(tiny_checkpoint):
    dense = Qwen3NextForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, expert_ids=[])
    full = Qwen3NextForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    for layer_dense, layer_full in zip(dense.model.layers, full.model.layers):
        assert layer_dense.mlp.experts.w13.numel() == 0
        torch.testing.assert_close(layer_dense.mlp.gate.weight, layer_full.mlp.gate.weight)
    n_dense = sum(p.numel() for p in dense.parameters())
    n_full = sum(p.numel() for p in full.parameters())
    n_experts = sum(layer.mlp.experts.w13.numel() + layer.mlp.experts.w2.numel() for layer in full.model.layers)
    assert n_dense == n_full - n_experts
