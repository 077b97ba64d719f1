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
