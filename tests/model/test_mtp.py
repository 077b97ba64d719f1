"""The multi-token-prediction head: loads from the checkpoint's mtp.* tensors and keeps its own KV cache."""
import pytest
import torch

from nextserve.model import Qwen3NextForCausalLM, StaticCache
from nextserve.model.checkpoint import CheckpointReader


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Qwen3NextForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, with_mtp=True)


def test_mtp_weights_come_from_the_checkpoint(model, tiny_checkpoint):
    reader = CheckpointReader(tiny_checkpoint)
    torch.testing.assert_close(model.mtp.fc.weight, reader.get("mtp.fc.weight"))
    torch.testing.assert_close(model.mtp.layers[0].mlp.experts.w2[3], reader.get("mtp.layers.0.mlp.experts.3.down_proj.weight"))


def draft(model, cache, tokens, following):
    batch = cache.batch([0], [len(tokens)])
    _, hidden = model.forward_batch(tokens, batch, all_logits=True)
    return model.mtp_logits(following, hidden, batch)


def test_mtp_continues_from_its_cache_like_a_full_pass(model, logits_close):
    tokens = torch.randint(0, model.config.vocab_size, (41,), generator=torch.Generator().manual_seed(1))
    full = draft(model, StaticCache(model, 1, 40), tokens[:40], tokens[1:41])
    assert full.shape == (40, model.config.vocab_size) and torch.isfinite(full).all()
    cache = StaticCache(model, 1, 40)
    first = draft(model, cache, tokens[:25], tokens[1:26])
    rest = draft(model, cache, tokens[25:40], tokens[26:41])
    # the MTP layer sits on top of the main model's chain
    logits_close(torch.cat([first, rest]), full, model.config, 41)


def test_mtp_needs_its_weights(tiny_checkpoint):
    plain = Qwen3NextForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    batch = StaticCache(plain, 1, 3).batch([0], [3])
    _, hidden = plain.forward_batch(torch.tensor([1, 2, 3]), batch)
    with pytest.raises(ValueError, match="with_mtp=True"):
        plain.mtp_logits(torch.tensor([2, 3, 4]), hidden, batch)


def two_sequences(model, cache, lengths, seed):
    """Run the main model over two sequences of `lengths` tokens; returns (tokens, following, hidden, batch)."""
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(0, model.config.vocab_size, (n + 1,), generator=g) for n in lengths]
    batch = cache.batch([0, 1], list(lengths))
    _, hidden = model.forward_batch(torch.cat([t[:-1] for t in tokens]), batch, all_logits=True)
    following = torch.cat([t[1:] for t in tokens])
    return following, hidden, batch


def test_the_last_position_only_pass_gives_the_full_pass_output_there_and_the_same_cache(model, logits_close):
    lengths = (9, 70)  # 70: past a KV block
    full_cache, last_cache = StaticCache(model, 2, 80), StaticCache(model, 2, 80)
    following, hidden, batch = two_sequences(model, full_cache, lengths, seed=2)
    embeds = model.model.embed_tokens(following)
    full = model.mtp(embeds, hidden, batch)
    _, _, last_batch = two_sequences(model, last_cache, lengths, seed=2)
    last = model.mtp(embeds, hidden, last_batch, last_only=True)
    assert last.shape == (2, model.config.hidden_size)
    logits_close(model.lm_head(last), model.lm_head(full[[8, 78]]), model.config, 71)
    layer = model.config.num_hidden_layers
    for got, want in zip(last_cache.pools.kv[layer], full_cache.pools.kv[layer]):
        slots = batch.slot_mapping
        torch.testing.assert_close(got.view(-1, *got.shape[2:])[slots], want.view(-1, *want.shape[2:])[slots],
                                   rtol=0, atol=0)  # the same ops on the same inputs


def test_writing_only_keys_and_values_fills_the_cache_as_the_full_pass_does(model, close):
    lengths = (5, 66)
    full_cache, kv_cache = StaticCache(model, 2, 80), StaticCache(model, 2, 80)
    following, hidden, batch = two_sequences(model, full_cache, lengths, seed=3)
    embeds = model.model.embed_tokens(following)
    model.mtp(embeds, hidden, batch)
    _, _, kv_batch = two_sequences(model, kv_cache, lengths, seed=3)
    layer = model.config.num_hidden_layers
    for cache in kv_cache.pools.kv[layer]:
        cache.fill_(float("nan"))  # whatever was there: every position is written
    model.mtp.write_kv(embeds, hidden, kv_batch)
    slots = batch.slot_mapping
    for got, want in zip(kv_cache.pools.kv[layer], full_cache.pools.kv[layer]):
        got, want = got.view(-1, *got.shape[2:])[slots], want.view(-1, *want.shape[2:])[slots]
        # keys pass the norm and rotation as the query half of the op's pair too: same math, same inputs
        close(got, want, reduction=2 * model.config.hidden_size, what="MTP keys/values")


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 20])
def test_the_lm_head_gives_the_linear_layers_logits_for_any_number_of_rows(model, rows, close):
    x = torch.randn(rows, model.config.hidden_size, generator=torch.Generator().manual_seed(rows))
    got = model.lm_head(x)
    assert got.shape == (rows, model.config.vocab_size)
    close(got, torch.nn.functional.linear(x, model.lm_head.weight), reduction=model.config.hidden_size)
