"""Decode throughput and acceptance with and without MTP speculative decoding, same run, same engine.

    python bench/speculative.py --checkpoint checkpoints/stdlib --batch-sizes 1 4 16 --speculative-tokens 2

For each batch size, the in-process engine (`model.generate`, the router's scheduler and runner)
generates `--decode-tokens` greedy tokens for that many prompts, first without speculation, then with
`--speculative-tokens K` (each step drafts the k in 0..K that router/goodput.py's rule measures to
pay, from this engine's own step times; `--fixed`: always K). Decode tok/s counts generated tokens
over the time after the first token of every request (prefill is timed apart, from the same run). Greedy output must be identical with and without speculation: the
script checks it. Prompts come from `--prompt-file` (text, tokenized by the checkpoint's tokenizer;
default: a slice of this file) or are random ids when the checkpoint has no tokenizer. Prints a table
and, with --json, one JSON line per row. Acceptance means something only on a trained model: random
weights draft random tokens.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def make_prompts(checkpoint: str, n: int, length: int, prompt_file: str | None) -> list[list[int]]:
    from nextserve.model.tokenizer import load_tokenizer_if_present
    tokenizer = load_tokenizer_if_present(checkpoint)
    if tokenizer is None:
        from nextserve.model.checkpoint import load_config
        g = torch.Generator().manual_seed(0)
        return [torch.randint(1, load_config(checkpoint).vocab_size, (length,), generator=g).tolist() for _ in range(n)]
    ids = tokenizer.encode(Path(prompt_file or __file__).read_text())
    stride = max(1, (len(ids) - length) // max(1, n))
    return [ids[i * stride:i * stride + length] for i in range(n)]


def run(model, prompts, max_tokens: int, speculative_tokens: int, adaptive: bool = True) -> dict:
    from nextserve.model import SamplingParams, generate_stream
    params = [SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)] * len(prompts)
    start = time.perf_counter()
    first: dict[int, float] = {}
    done = {}
    for i, _, completion in generate_stream(model, prompts, params, speculative_tokens=speculative_tokens,
                                            speculative_adaptive=adaptive):
        first.setdefault(i, time.perf_counter())
        done[i] = completion
    end = time.perf_counter()
    decode_start = max(first.values())  # every request past its prefill
    decoded = sum(len(c.output_ids) - 1 for c in done.values())
    drafted = sum(c.num_draft_tokens for c in done.values())
    accepted = sum(c.num_accepted_tokens for c in done.values())
    return {"outputs": [done[i].output_ids for i in range(len(prompts))],
            "prefill_s": decode_start - start, "decode_tok_s": decoded / max(end - decode_start, 1e-9),
            "acceptance": accepted / drafted if drafted else None, "drafted": drafted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint with its MTP head (mtp.* tensors)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--speculative-tokens", type=int, default=2, choices=range(1, 5))
    parser.add_argument("--fixed", action="store_true", help="draft K every step (default: the goodput rule's k)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prompt-file", default=None, help="text to cut prompts from (default: this script)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each, plain and speculative taking turns; rates are the medians (a busy "
                             "machine's load then falls on both alike)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)

    from nextserve.model import Qwen3NextForCausalLM
    model = Qwen3NextForCausalLM.from_pretrained(args.checkpoint, dtype=args.dtype, device=args.device, with_mtp=True)
    if not args.json:
        print(f"{'batch':>5} {'plain tok/s':>12} {'spec tok/s':>11} {'speedup':>8} {'acceptance':>11}")
    for batch in args.batch_sizes:
        prompts = make_prompts(args.checkpoint, batch, args.prompt_len, args.prompt_file)
        run(model, prompts[:1], 4, args.speculative_tokens, not args.fixed)  # warm-up: first-call costs
        plains, specs = [], []
        for _ in range(args.repeats):
            plains.append(run(model, prompts, args.decode_tokens, 0))
            specs.append(run(model, prompts, args.decode_tokens, args.speculative_tokens, not args.fixed))
            if specs[-1]["outputs"] != plains[-1]["outputs"]:
                raise SystemExit(f"batch {batch}: speculative greedy output differs from plain greedy output")
        plain_rate = statistics.median(r["decode_tok_s"] for r in plains)
        spec_rate = statistics.median(r["decode_tok_s"] for r in specs)
        drafted = sum(r["drafted"] for r in specs)
        accepted = sum(r["acceptance"] * r["drafted"] for r in specs if r["drafted"])
        row = {"batch": batch, "speculative_tokens": args.speculative_tokens,
               "plain_decode_tok_s": plain_rate, "spec_decode_tok_s": spec_rate, "speedup": spec_rate / plain_rate,
               "acceptance": accepted / drafted if drafted else None, "drafted": drafted // args.repeats,
               "repeats": args.repeats, "plain_runs_tok_s": [r["decode_tok_s"] for r in plains],
               "spec_runs_tok_s": [r["decode_tok_s"] for r in specs],
               "adaptive": not args.fixed, "device": args.device, "dtype": args.dtype}
        if args.json:
            print(json.dumps(row))
        else:
            acceptance = "-" if row["acceptance"] is None else f"{row['acceptance']:.2f}"
            print(f"{batch:>5} {row['plain_decode_tok_s']:>12.1f} {row['spec_decode_tok_s']:>11.1f} "
                  f"{row['speedup']:>7.2f}x {acceptance:>11}")


if __name__ == "__main__":
    main()
