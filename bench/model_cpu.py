"""In-process prefill and decode throughput of nextserve's model against transformers, same run.

    python bench/model_cpu.py --checkpoint checkpoints/small --batch-sizes 1 16

Both models load the same checkpoint in float32 on the CPU; both decode greedily with their own
caches. Prints a table and, with --json, one JSON line per row for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def time_ours(model, prompts: torch.Tensor, steps: int):
    from nextserve.model import StaticCache
    B, P = prompts.shape
    cache, seqs = StaticCache(model, B, P + steps), list(range(B))
    t0 = time.perf_counter()
    logits, _ = model.forward_batch(prompts.reshape(-1), cache.batch(seqs, [P] * B))
    prefill = time.perf_counter() - t0
    step_times = []
    for _ in range(steps):
        next_ids = logits.argmax(-1)
        t0 = time.perf_counter()
        logits, _ = model.forward_batch(next_ids, cache.batch(seqs, [1] * B))
        step_times.append(time.perf_counter() - t0)
    return prefill, step_times


@torch.inference_mode()
def time_transformers(model, prompts: torch.Tensor, steps: int):
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    out = model(prompts, cache=cache, use_cache=True)
    prefill = time.perf_counter() - t0
    step_times = []
    for _ in range(steps):
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        out = model(next_ids, cache=out.cache if hasattr(out, "cache") else out.past_key_values, use_cache=True)
        step_times.append(time.perf_counter() - t0)
    return prefill, step_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir (e.g. from `nextserve checkpoint make --preset small`)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from nextserve.model import Qwen3NextForCausalLM
    ours = Qwen3NextForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    theirs = transformers.Qwen3NextForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    vocab = ours.config.vocab_size

    print(f"{'engine':<14}{'batch':>6}{'prefill tok/s':>15}{'decode tok/s':>14}{'TPOT ms':>10}")
    for B in args.batch_sizes:
        prompts = torch.randint(0, vocab, (B, args.prompt_len), generator=torch.Generator().manual_seed(B))
        for name, fn, model in (("nextserve", time_ours, ours), ("transformers", time_transformers, theirs)):
            fn(model, prompts[:, :16], 2)  # warm-up
            prefill, steps = fn(model, prompts, args.decode_steps)
            tpot = statistics.median(steps)
            row = dict(engine=name, batch=B, prompt_len=args.prompt_len, prefill_tok_s=B * args.prompt_len / prefill,
                       decode_tok_s=B / tpot, tpot_ms=1e3 * tpot, threads=torch.get_num_threads())
            print(f"{name:<14}{B:>6}{row['prefill_tok_s']:>15.0f}{row['decode_tok_s']:>14.1f}{row['tpot_ms']:>10.1f}")
            if args.json:
                print(json.dumps(row))


if __name__ == "__main__":
    main()
