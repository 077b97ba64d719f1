"""Our model against transformers' Qwen3NextForCausalLM on the same checkpoint, in float32."""
import dataclasses

import pytest
import torch
import transformers

from nextserve.model import Qwen3NextForCausalLM, SamplingParams, StaticCache, generate
from nextserve.model.make_checkpoint import make_checkpoint
from nextserve.model.presets import config_from_preset

# Random configurations that stress the layouts: GQA ratios, key:value head ratios 1 and 2,
# expert counts that are not powers of two, several top-k.
CONFIGS = {
    "gqa2-kv2-e12-top3": {},
    "mha-kv1-e10-top1": dict(num_key_value_heads=4, linear_num_value_heads=2, num_experts=10, num_experts_per_tok=1),
    "gqa4-kv2-e7-top4": dict(num_key_value_heads=1, num_experts=7, num_experts_per_tok=4, head_dim=24,
                             linear_key_head_dim=24, linear_value_head_dim=8),
    "no-renorm-interval2": dict(norm_topk_prob=False, num_hidden_layers=4, layer_types=[], full_attention_interval=2,
                                num_experts=5, num_experts_per_tok=2),
}


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    config = dataclasses.replace(config_from_preset("tiny"), **CONFIGS[request.param])
    config.__post_init__()  # re-derive layer_types for a changed interval
    out = tmp_path_factory.mktemp(request.param)
    make_checkpoint(out, config, seed=len(request.param), progress=False)
    return out


def load_pair(path):
    ours = Qwen3NextForCausalLM.from_pretrained(path, dtype=torch.float32)
    theirs = transformers.Qwen3NextForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, theirs




def test_logits_match_transformers_over_ragged_batch(checkpoint, logits_close):
    ours, theirs = load_pair(checkpoint)
    vocab = ours.config.vocab_size
    lengths = [130, 37, 64, 1]  # across chunk boundaries, exactly one chunk, a single token
    prompts = [torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]

    batch = StaticCache(ours, len(prompts), max(lengths)).batch(list(range(len(prompts))), lengths)
    logits, _ = ours.forward_batch(torch.cat(prompts), batch, all_logits=True)
    with torch.no_grad():
        for ids, got in zip(prompts, logits.split(lengths)):
            ref = theirs(ids[None]).logits[0]
            logits_close(got, ref, ours.config, len(ids))
    # the transformers-shaped entry point too
    with torch.no_grad():
        ids = torch.stack([prompts[0][:70], prompts[0][60:130]])
        logits_close(ours(ids), theirs(ids).logits, ours.config, ids.shape[1])


def test_greedy_generation_matches_transformers_generate(checkpoint):
    ours, theirs = load_pair(checkpoint)
    prompt = torch.randint(0, ours.config.vocab_size, (20,), generator=torch.Generator().manual_seed(3))
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    [completion] = generate(ours, [prompt.tolist()], params)
    with torch.no_grad():
        ref = theirs.generate(prompt[None], max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert completion.output_ids == ref[0, 20:].tolist()
