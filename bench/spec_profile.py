"""Where one speculative decode step spends its time, against a plain decode step, at a given batch.

    python bench/spec_profile.py --checkpoint models/stdlib --batch 1 --speculative-tokens 2 --threads 2

Drives the in-process engine (the router's scheduler and runner, as `model.generate` does) on
`--batch` greedy prompts until every sequence decodes, then runs `--steps` steps of plain decoding
(no MTP head) and of speculative decoding with K drafts every step (fixed K, so that every step
drafts), the two engines taking turns step by step so that a machine's load falls on both alike.
Prints per step: median wall milliseconds and tokens yielded; the median milliseconds inside each
part of the model (the main model's mixers and MoE blocks, the MTP head, the LM head by the rows it
projects, with how many calls); top-level aten ops and host syncs of one step (bench/step_profile.py's definitions); and
torch.profiler's ops with the most self CPU time. Milliseconds on a shared machine are noisy; op and
sync counts are not.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import step_profile
from speculative import make_prompts


class Engine:
    """The scheduler and runner of `model.generate`, stepped one at a time."""

    def __init__(self, model, prompts: list[list[int]], max_tokens: int, speculative_tokens: int,
                 adaptive: bool = False):
        """speculative_tokens: K (0: no speculation); adaptive: the goodput rule's k, else K at every step."""
        from nextserve.model import SamplingParams
        from nextserve.router.acceptance import SpeculativeConfig
        from nextserve.router.block_manager import BlockManager, blocks_for
        from nextserve.router.cache_budget import PoolSizes
        from nextserve.router.runner import ModelRunner
        from nextserve.router.scheduler import Scheduler, Sequence, StopCriteria

        stops = [StopCriteria(max_tokens, model.config.max_position_embeddings, ignore_eos=True) for _ in prompts]
        sizes = PoolSizes(sum(blocks_for(s.max_fed_tokens(len(p))) for p, s in zip(prompts, stops)), len(prompts), 0, 0)
        self.scheduler = Scheduler(4096, len(prompts), len(prompts), BlockManager(sizes.num_blocks, sizes.num_slots))
        config = SpeculativeConfig(speculative_tokens, adaptive=adaptive) if speculative_tokens else None
        self.runner = ModelRunner(model, sizes, speculative=config)
        for i, (p, stop) in enumerate(zip(prompts, stops)):
            self.scheduler.add(Sequence(i, list(p), stop))
            self.runner.add(i, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))

    def step(self) -> int:
        """One step; returns the tokens it yielded."""
        batch = self.scheduler.schedule()
        sampled = self.runner.step(batch)
        self.scheduler.postprocess(batch, sampled, self.runner.drafts)
        return sum(len(t) for t in sampled.values())

    def decoding(self) -> bool:
        """Whether every sequence has been scheduled and is past its prompt (before the first step
        nothing runs yet: that is not decoding)."""
        running = self.scheduler.running
        return bool(running) and all(not s.is_prefilling for s in running)


class PartTimes:
    """Wall seconds of every call of the model's parts, by forward hooks, for whichever engine steps."""

    def __init__(self, model):
        self.calls: dict[str, list[float]] = defaultdict(list)
        self._handles = []
        self._hook("lm_head", model.lm_head)
        self._hook("mtp head", model.mtp)
        for layer in model.model.layers:  # (none of these runs inside another)
            self._hook(f"mixer ({layer.layer_type})", layer.mixer)
            self._hook("moe block", layer.mlp)

    def _hook(self, name, module):
        self._handles.append(module.register_forward_pre_hook(lambda *_: setattr(self, "_t", time.perf_counter())))

        def done(module, inputs, output, name=name):
            if name == "lm_head":  # its cost depends on the rows (bench's point: see model/layers.py)
                name = f"lm_head ({inputs[0].shape[0]} rows)"
            self.calls[name].append(time.perf_counter() - self._t)
        self._handles.append(module.register_forward_hook(done))

    def take(self) -> dict[str, list[float]]:
        out, self.calls = self.calls, defaultdict(list)
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def add_engine_arguments(parser, batch: int, steps: int, steps_help: str) -> None:
    """The flags this script and bench/spec_steps.py share: checkpoint, batch, K, steps, prompt, dtype, threads."""
    parser.add_argument("--checkpoint", required=True, help="a checkpoint with its MTP head (mtp.* tensors)")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--speculative-tokens", type=int, default=2, choices=range(1, 5))
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights and activations (default float32, the CPU's exactness mode)")


def load_model(args):
    """The checkpoint with its MTP head, on the threads asked for."""
    if args.threads:
        torch.set_num_threads(args.threads)
    from nextserve.model import Qwen3NextForCausalLM
    return Qwen3NextForCausalLM.from_pretrained(args.checkpoint, dtype=args.dtype, with_mtp=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(parser, 1, 40, "steps timed per engine (after the prefill)")
    parser.add_argument("--top", type=int, default=15, help="rows of the profiler's table")
    args = parser.parse_args()
    model = load_model(args)
    prompts = make_prompts(args.checkpoint, args.batch, args.prompt_len, None)
    k = args.speculative_tokens
    engines = {"plain": Engine(model, prompts, 8 * (args.steps + 8) * (k + 1), 0),
               f"speculative k={k}": Engine(model, prompts, 8 * (args.steps + 8) * (k + 1), k)}
    for engine in engines.values():
        while not engine.decoding():
            engine.step()
        for _ in range(3):  # past the first decode steps' one-off costs
            engine.step()
    parts = PartTimes(model)
    seconds = {name: [] for name in engines}
    tokens = dict.fromkeys(engines, 0)
    calls = {name: defaultdict(list) for name in engines}
    for _ in range(args.steps):
        for name, engine in engines.items():
            start = time.perf_counter()
            tokens[name] += engine.step()
            seconds[name].append(time.perf_counter() - start)
            for part, times in parts.take().items():
                calls[name][part].append(times)
    parts.close()
    for name, engine in engines.items():
        ms = 1e3 * median(seconds[name])
        per_step = tokens[name] / args.steps
        counts = step_profile.count_step(engine.step)
        print(f"== {name}, batch {args.batch}: {ms:.2f} ms/step (median), {per_step:.2f} tokens/step "
              f"({1e3 * per_step / ms:.0f} tok/s), {counts['ops']} ops, {counts['host_syncs']} host syncs "
              f"{counts['sync_ops']}")
        for part, steps in sorted(calls[name].items()):
            flat = [t for step in steps for t in step]
            print(f"   {part:28s} {len(flat) / args.steps:5.2f} calls/step, {1e3 * median([sum(s) for s in steps]):7.3f} "
                  f"ms/step (median call {1e3 * median(flat):.3f} ms)")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
