"""In-process generation: prefill every prompt in one packed pass, then decode them together.

This is the reference the distributed router is measured against; it has no scheduler (all
requests start together) and no network.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .qwen3_next import Qwen3NextForCausalLM
from .sampling import Sampler, SamplingParams
from .state import ForwardBatch, SequenceState
from nextserve.router.requests import check_prompt


@dataclass
class Completion:
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (eos / stop token) or "length"
    state: SequenceState | None = None


def generate_stream(model: Qwen3NextForCausalLM, prompts: list[list[int]], params: list[SamplingParams],
                    eos_token_id: int | None = None) -> Iterator[tuple[int, int, Completion]]:
    """Yield (request index, new token, completion) as tokens are produced, in step order."""
    cfg = model.config
    for p in prompts:
        check_prompt(p, cfg.vocab_size, cfg.max_position_embeddings)
    device = model.lm_head.weight.device
    done = [Completion(list(p), sp, state=model.new_state()) for p, sp in zip(prompts, params)]
    samplers = [Sampler(sp) for sp in params]

    active = list(range(len(done)))
    feed = [list(c.prompt_ids) for c in done]
    while active:
        batch = ForwardBatch.build([done[i].state for i in active], [len(feed[i]) for i in active], device)
        ids = torch.tensor([t for i in active for t in feed[i]], device=device)
        logits, _ = model.forward_batch(ids, batch)
        still = []
        for row, i in enumerate(active):
            c = done[i]
            token = samplers[i](logits[row], c.prompt_ids, c.output_ids)
            c.output_ids.append(token)
            c.finish_reason = _finish_reason(c, token, eos_token_id, cfg.max_position_embeddings)
            yield i, token, c
            if c.finish_reason is None:
                feed[i] = [token]
                still.append(i)
        active = still


def generate(model, prompts, params, eos_token_id=None) -> list[Completion]:
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    results: dict[int, Completion] = {}
    for i, _, c in generate_stream(model, prompts, params, eos_token_id):
        results[i] = c
    return [results[i] for i in range(len(prompts))]


def _finish_reason(c: Completion, token: int, eos_token_id: int | None, context_limit: int) -> str | None:
    p = c.params
    if token in p.stop_token_ids or (token == eos_token_id and not p.ignore_eos):
        return "stop"
    if len(c.output_ids) >= p.max_tokens or len(c.prompt_ids) + len(c.output_ids) >= context_limit:
        return "length"
    return None
