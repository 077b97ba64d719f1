"""Step by step, what the goodput rule chose and what each step cost.

    python bench/spec_steps.py --checkpoint models/stdlib --batch 16 --speculative-tokens 2 --threads 2

A fresh speculative engine with router/goodput.py's rule (bench/spec_profile.py's engine: the router's
scheduler and runner, as bench/speculative.py builds one per run, so its exploration is in the
figures) decodes `--batch` greedy prompts for `--steps` steps after their prefill. Prints every step
(the k it verified, the k the rule chose next, milliseconds, tokens) and the mean milliseconds and
tokens per step for each verified k. For throughput against plain decoding, bench/speculative.py.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict


from spec_profile import Engine, add_engine_arguments, load_model
from speculative import make_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(parser, 16, 64, "decode steps, after the prefill")
    args = parser.parse_args()
    model = load_model(args)
    prompts = make_prompts(args.checkpoint, args.batch, args.prompt_len, None)
    k = args.speculative_tokens
    engine = Engine(model, prompts, (args.steps + 2) * (k + 1) + 8, k, adaptive=True)
    while not engine.decoding():
        engine.step()
    decoder = engine.runner.speculative
    trace = []
    for _ in range(args.steps):
        verified = max((len(d) for d in engine.runner.drafts.values()), default=0)
        start = time.perf_counter()
        tokens = engine.step()
        trace.append((verified, decoder.last_k, 1e3 * (time.perf_counter() - start), tokens))
    print(f"batch {args.batch}, {args.steps} decode steps, K = {k}, {args.dtype}")
    print("steps (verified k > next k: ms / tokens):")
    print("  " + " ".join(f"{v}>{c}:{ms:.1f}/{n}" for v, c, ms, n in trace))
    by_k = defaultdict(list)
    for v, _, ms, n in trace:
        by_k[v].append((ms, n))
    for v, rows in sorted(by_k.items()):
        print(f"verified k = {v}: {len(rows)} steps, {sum(ms for ms, _ in rows) / len(rows):.1f} ms and "
              f"{sum(n for _, n in rows) / len(rows):.1f} tokens per step")


if __name__ == "__main__":
    main()
