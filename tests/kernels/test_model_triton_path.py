"""The whole model on the Triton kernels (interpreted on the CPU) against the torch references."""
import pytest
import torch

from nextserve.model import Qwen3NextForCausalLM, StaticCache


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Qwen3NextForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)


def prefill_then_decode(model, prompts, steps):
    """Logits of a packed ragged prefill, then `steps` greedy decode steps of every sequence."""
    cache, seqs = StaticCache(model, len(prompts), max(len(p) for p in prompts) + steps), list(range(len(prompts)))
    batch = cache.batch(seqs, [len(p) for p in prompts])
    logits, _ = model.forward_batch(torch.cat(prompts), batch, all_logits=True)
    outputs = [logits]
    last = logits[batch.last_token_indices()]
    for _ in range(steps):
        last, _ = model.forward_batch(last.argmax(-1), cache.batch(seqs, [1] * len(prompts)))
        outputs.append(last)
    return outputs


def test_triton_path_matches_torch_path(model, monkeypatch, logits_close):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in (70, 5)]
    monkeypatch.setenv("NEXTSERVE_KERNELS", "torch")
    reference = prefill_then_decode(model, prompts, steps=3)
    monkeypatch.setenv("NEXTSERVE_KERNELS", "triton")
    triton = prefill_then_decode(model, prompts, steps=3)
    for ref, got in zip(reference, triton):
        logits_close(got, ref, model.config, 73)
