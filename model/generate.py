"""In-process generation: the router's scheduler and model runner, with the experts in this process.

The same engine as serving (router/scheduler.py, router/runner.py): batching, chunked prefill,
stopping and validation exist once. This is the reference the distributed router is measured against.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .qwen3_next import Qwen3NextForCausalLM
from .sampling import SamplingParams


@dataclass
class Completion:
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (eos / stop token) or "length"
    num_draft_tokens: int = 0     # speculative decoding: drafts the model judged...
    num_accepted_tokens: int = 0  # ...and those it accepted


def generate_stream(model: Qwen3NextForCausalLM, prompts: list[list[int]], params: list[SamplingParams],
                    eos_token_id: int | None = None, *, kv_cache_memory: str | None = None,
                    max_batch_tokens: int = 4096, speculative_tokens: int = 0,
                    speculative_adaptive: bool = True) -> Iterator[tuple[int, int, Completion]]:
    """Yield (request index, new token, completion) as tokens are produced, in step order.

    speculative_tokens: draft up to that many tokens per step with the model's MTP head (1..4; 0 off),
    each step as many as router/goodput.py's rule finds pay from this engine's step times
    (speculative_adaptive=False: always that many, within each request's limits).

    kv_cache_memory: the pools' budget as `--kv-cache-memory` takes it (requests then queue and may be
    preempted under it); None sizes the pools so that every request runs at once to its end.
    Raises ValueError for a bad prompt or one that cannot fit in the budget.
    """
    # Imported here: the router package imports this model package.
    from nextserve.router.acceptance import SpeculativeConfig
    from nextserve.router.block_manager import BlockManager, blocks_for
    from nextserve.router.cache_budget import PoolSizes
    from nextserve.router.requests import StopCriteria, check_prompt
    from nextserve.router.runner import ModelRunner, plan_cache
    from nextserve.router.scheduler import Scheduler, Sequence

    cfg = model.config
    limit = cfg.max_position_embeddings
    for p in prompts:
        check_prompt(p, cfg.vocab_size, limit)
    if not prompts:
        return
    stops = [StopCriteria(sp.max_tokens, limit, frozenset(sp.stop_token_ids), eos_token_id, sp.ignore_eos)
             for sp in params]
    if kv_cache_memory is None:
        sizes = PoolSizes(sum(blocks_for(s.max_fed_tokens(len(p))) for p, s in zip(prompts, stops)), len(prompts), 0, 0)
    else:
        sizes = plan_cache(model, kv_cache_memory, len(prompts))
    scheduler = Scheduler(max_batch_tokens, max_running=len(prompts), max_queue=len(prompts),
                          blocks=BlockManager(sizes.num_blocks, sizes.num_slots))
    from nextserve.router.acceptance import check_speculation
    for sp in params:
        check_speculation(sp.speculative_tokens, speculative_tokens > 0)
    speculative = None
    if speculative_tokens:
        speculative = SpeculativeConfig(speculative_tokens, adaptive=speculative_adaptive)
    runner = ModelRunner(model, sizes, speculative=speculative)
    done = [Completion(list(p), sp) for p, sp in zip(prompts, params)]
    for i, (p, stop) in enumerate(zip(prompts, stops)):
        scheduler.add(Sequence(i, list(p), stop))  # RequestTooLarge (a ValueError) when it never fits
        runner.add(i, params[i])
    while scheduler.has_work():
        batch = scheduler.schedule()
        sampled = runner.step(batch)
        before = {s.seq_id: len(s.output_ids) for s in batch.seqs}
        finished = {s.seq_id: s.finish_reason for s in scheduler.postprocess(batch, sampled, runner.drafts)}
        for seq in batch.seqs:
            if seq.seq_id in sampled:
                c = done[seq.seq_id]
                new = seq.output_ids[before[seq.seq_id]:]  # a stop among several new tokens ends them
                c.num_draft_tokens, c.num_accepted_tokens = seq.num_draft_tokens, seq.num_accepted_tokens
                for n, token in enumerate(new):
                    c.output_ids.append(token)
                    c.finish_reason = finished.get(seq.seq_id) if n == len(new) - 1 else None
                    if c.finish_reason is not None:
                        runner.free(seq.seq_id)
                    yield seq.seq_id, token, c


def generate(model, prompts, params, eos_token_id=None, **engine) -> list[Completion]:
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    results: dict[int, Completion] = {}
    for i, _, c in generate_stream(model, prompts, params, eos_token_id, **engine):
        results[i] = c
    return [results[i] for i in range(len(prompts))]
