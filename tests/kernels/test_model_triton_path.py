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


def verify_then_roll_back(model, prefixes, fed, kept):
    """A speculative verification pass (every row feeding the same number of tokens) after a prefill,
    rolled back to `kept`: its logits and the DeltaNet states it leaves in each slot."""
    from nextserve.model.spec_states import keep_state_at
    from nextserve.model.state import ForwardBatch
    cache = StaticCache(model, len(prefixes), 80)
    for n, prefix in enumerate(prefixes):
        model.forward_batch(prefix, cache.batch([n], [len(prefix)]))
    rows = list(range(len(prefixes)))
    batch = ForwardBatch.build(cache.pools, [len(p) for p in prefixes], [len(f) for f in fed], cache.tables, rows,
                               cache.device, keep_states_rows=len(rows))
    logits = model.lm_head(model.model(torch.cat(fed), batch)).float()
    keep_state_at(batch, rows, kept)
    return logits, [cache.pools.read_state(n) for n in rows]


def test_triton_verify_pass_matches_torch_path(model, monkeypatch, logits_close, close, model_chain):
    gen = torch.Generator().manual_seed(1)
    prefixes = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in (6, 9)]
    fed = [torch.randint(0, model.config.vocab_size, (3,), generator=gen) for _ in prefixes]
    kept = {0: 1}  # row 0 rejected its second draft; row 1 kept everything
    monkeypatch.setenv("NEXTSERVE_KERNELS", "torch")
    ref_logits, ref_states = verify_then_roll_back(model, prefixes, fed, kept)
    monkeypatch.setenv("NEXTSERVE_KERNELS", "triton")
    got_logits, got_states = verify_then_roll_back(model, prefixes, fed, kept)
    logits_close(got_logits, ref_logits, model.config, 12)
    chain = model_chain(model.config, 12)
    for n, (got, ref) in enumerate(zip(got_states, ref_states)):
        for layer, (g, r) in enumerate(zip(got, ref)):
            if r is not None:
                close(g.conv, r.conv, reduction=chain, what=f"row {n} layer {layer} conv window")
                close(g.recurrent, r.recurrent, reduction=chain, what=f"row {n} layer {layer} recurrent state")
