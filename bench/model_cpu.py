"""In-process prefill and decode of nextserve's model against transformers: same checkpoint, same
prompts, same process, same torch threads (printed first), greedy.

    python bench/model_cpu.py --checkpoint checkpoints/small --threads 2
    python bench/model_cpu.py --checkpoint /tmp/tiny --quick        # a smoke run in seconds

The workload is the project's reference one (bench/workload.py): 128-token prompts, 64 greedy tokens, batches 1
and 16, decode = batch*(N-1)/(t(N)-t(1)). transformers does the same work: `logits_to_keep=1`, so
its prefill computes the lm_head for the last token only, as nextserve's does. Beside each
nextserve row: the decode step's bytes (weights touched + K/V + states, bench/roofline.py) over
its time, as a fraction of the bandwidth a 1 GiB fp32 stream reads on this machine, and the ops
and host syncs of one decode step (bench/step_profile.py). Then a long-prompt case: a 32k-token
prompt prefilled in chunks, and the decode step's time in the DeltaNet layers at that context
against a short one (it should be flat: their state does not grow). With --json, one JSON line per
row. Publish only numbers from an otherwise idle machine (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import roofline
import step_profile
import workload


# -- the two engines: (t(1), t(N)) of one batch ---------------------------------------------------

@torch.inference_mode()
def run_nextserve(model, prompts: list[list[int]], new_tokens: int, on_step=None) -> tuple[float, float]:
    from nextserve.model import StaticCache
    B, P = len(prompts), len(prompts[0])
    cache, seqs = StaticCache(model, B, P + new_tokens), list(range(B))
    t0 = time.perf_counter()
    logits, _ = model.forward_batch(torch.tensor(prompts).reshape(-1), cache.batch(seqs, [P] * B))
    next_ids = logits.argmax(-1)
    t_first = time.perf_counter() - t0
    for _ in range(new_tokens - 1):
        logits, _ = model.forward_batch(next_ids, cache.batch(seqs, [1] * B))
        next_ids = logits.argmax(-1)
        if on_step is not None:
            on_step()
    return t_first, time.perf_counter() - t0


@torch.inference_mode()
def run_transformers(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    out = model(input_ids=torch.tensor(prompts), use_cache=True, logits_to_keep=1)
    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    t_first = time.perf_counter() - t0
    for _ in range(new_tokens - 1):
        out = model(input_ids=next_ids, cache=_cache_of(out), use_cache=True, logits_to_keep=1)
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    return t_first, time.perf_counter() - t0


def _cache_of(out):
    # transformers 5.24 renamed past_key_values to cache on inputs; outputs carry either name
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


# -- what is measured beside the throughput -------------------------------------------------------

def decode_roofline(model, prompts, new_tokens: int, step_s: float, bandwidth: float) -> dict:
    """Bytes a decode step of this batch reads (experts as its gates picked them) vs its time."""
    touched = roofline.ExpertsTouched(model)
    per_step: list[list[int]] = []
    try:
        run_nextserve(model, prompts, min(new_tokens, 8), on_step=lambda: per_step.append(touched.take()))
    finally:
        touched.close()
    mean_experts = [sum(col) / len(col) for col in zip(*per_step)]
    need = roofline.decode_step_bytes(model, len(prompts), len(prompts[0]) + new_tokens / 2, mean_experts)
    return {**need, "achieved_GB_s": need["total_bytes"] / step_s / 1e9,
            "roofline_fraction": need["total_bytes"] / step_s / bandwidth}


def decode_step_counts(model, batch: int, prompt_len: int) -> dict:
    from nextserve.model import StaticCache
    cache, seqs = StaticCache(model, batch, prompt_len + 2), list(range(batch))
    with torch.inference_mode():
        model.forward_batch(torch.zeros(batch * prompt_len, dtype=torch.long), cache.batch(seqs, [prompt_len] * batch))
        ids = torch.zeros(batch, dtype=torch.long)
        return step_profile.count_step(lambda: model.forward_batch(ids, cache.batch(seqs, [1] * batch)))


class MixerTimes:
    """Wall time spent in each kind of token mixer (DeltaNet / attention) per forward, by hooks."""

    def __init__(self, model):
        self.seconds = {"linear_attention": 0.0, "full_attention": 0.0}
        self._handles = []
        for layer in model.model.layers:
            kind = layer.layer_type
            self._handles.append(layer.mixer.register_forward_pre_hook(lambda *_: setattr(self, "_t", time.perf_counter())))
            self._handles.append(layer.mixer.register_forward_hook(
                lambda *_, kind=kind: self.seconds.__setitem__(kind, self.seconds[kind] + time.perf_counter() - self._t)))

    def take(self) -> dict:
        out = dict(self.seconds)
        self.seconds = dict.fromkeys(out, 0.0)
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@torch.inference_mode()
def long_prompt(model, length: int, chunk: int, decode_steps: int, short: int) -> dict:
    """Prefill `length` tokens in `chunk`-token passes, then per-step mixer times at that context
    and at `short` tokens of context."""
    from nextserve.model import StaticCache
    vocab = model.config.vocab_size
    out = {"prompt_len": length, "chunk": chunk}
    for name, context in (("short", short), ("long", length)):
        cache = StaticCache(model, 1, context + decode_steps + 1)
        ids = torch.tensor(workload.prompts(vocab, 1, context)[0])
        t0 = time.perf_counter()
        for start in range(0, context, chunk):
            part = ids[start:start + chunk]
            logits, _ = model.forward_batch(part, cache.batch([0], [len(part)]))
        if name == "long":
            out["prefill_s"] = time.perf_counter() - t0
            out["prefill_tok_s"] = length / out["prefill_s"]
            out["kv_pool_bytes"] = sum(k.numel() * k.element_size() * 2 for k, _ in cache.pools.kv.values())
        times = MixerTimes(model)
        try:
            next_ids, steps = logits.argmax(-1), []
            for _ in range(decode_steps):
                t0 = time.perf_counter()
                logits, _ = model.forward_batch(next_ids, cache.batch([0], [1]))
                next_ids = logits.argmax(-1)
                steps.append((time.perf_counter() - t0, times.take()))
        finally:
            times.close()
        out[f"{name}_step_ms"] = 1e3 * sorted(s for s, _ in steps)[len(steps) // 2]
        for kind in ("linear_attention", "full_attention"):
            out[f"{name}_{kind}_ms"] = 1e3 * sorted(m[kind] for _, m in steps)[len(steps) // 2]
    out["deltanet_long_over_short"] = out["long_linear_attention_ms"] / out["short_linear_attention_ms"]
    return out


# -- the run ----------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir (`nextserve checkpoint make --preset small`)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="both engines' weights and activations (the reference table is bf16)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch intra-op threads for both engines (default: every core, %(default)s)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(workload.BATCH_SIZES))
    parser.add_argument("--prompt-len", type=int, default=workload.PROMPT_LEN)
    parser.add_argument("--new-tokens", type=int, default=workload.NEW_TOKENS, help="greedy tokens per sequence (N)")
    parser.add_argument("--engines", nargs="+", choices=("nextserve", "transformers"),
                        default=["nextserve", "transformers"])
    parser.add_argument("--long-prompt", type=int, default=32768, help="tokens of the long-prompt case (0: skip it)")
    parser.add_argument("--long-chunk", type=int, default=2048, help="prefill chunk of the long prompt")
    parser.add_argument("--bandwidth-mib", type=int, default=1024, help="size of the bandwidth probe's fp32 tensor")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, to check the script runs (numbers meaningless)")
    parser.add_argument("--json", action="store_true", help="also print one JSON line per row")
    args = parser.parse_args()
    if args.quick:
        args.prompt_len, args.new_tokens = workload.QUICK["prompt_len"], workload.QUICK["new_tokens"]
        args.batch_sizes, args.long_prompt, args.long_chunk = list(workload.QUICK["batch_sizes"]), 512, 256
        args.bandwidth_mib = 64

    print(workload.set_threads(args.threads), f"; dtype {args.dtype}", flush=True)
    dtype = getattr(torch, args.dtype)
    bandwidth = roofline.stream_bandwidth(args.bandwidth_mib)
    print(f"stream bandwidth ({args.bandwidth_mib} MiB fp32 sum): {bandwidth / 1e9:.1f} GB/s")
    emit = (lambda row: print(json.dumps(row))) if args.json else (lambda row: None)
    emit({"bandwidth_GB_s": bandwidth / 1e9, "threads": torch.get_num_threads(), "dtype": args.dtype})

    from nextserve.model import Qwen3NextForCausalLM
    models = {}
    if "nextserve" in args.engines:
        models["nextserve"] = (Qwen3NextForCausalLM.from_pretrained(args.checkpoint, dtype=dtype), run_nextserve)
    if "transformers" in args.engines:
        import transformers
        theirs = transformers.Qwen3NextForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).eval()
        models["transformers"] = (theirs, run_transformers)
    vocab = workload.vocab_size(args.checkpoint)

    print(f"{'engine':<14}{'batch':>6}{'prefill tok/s':>15}{'decode tok/s':>14}{'step ms':>9}"
          f"{'MB/step':>9}{'roofline':>10}{'ops':>7}{'syncs':>7}")
    for B in args.batch_sizes:
        prompts = workload.prompts(vocab, B, args.prompt_len)
        for name, (model, run) in models.items():
            run(model, workload.warmup_prompts(vocab, B, args.prompt_len), 2)  # as peer_vllm_cpu.py warms vLLM
            row = {"engine": name, "batch": B, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                   **workload.rates(B, args.prompt_len, args.new_tokens, *run(model, prompts, args.new_tokens))}
            extra = ""
            if name == "nextserve":
                row.update(decode_roofline(model, prompts, args.new_tokens, row["step_s"], bandwidth))
                row.update(decode_step_counts(model, B, args.prompt_len))
                extra = (f"{row['total_bytes'] / 1e6:>9.1f}{row['roofline_fraction']:>10.1%}"
                         f"{row['ops']:>7}{row['host_syncs']:>7}")
            print(f"{name:<14}{B:>6}{row['prefill_tok_s']:>15.0f}{row['decode_tok_s']:>14.1f}"
                  f"{1e3 * row['step_s']:>9.1f}{extra}", flush=True)
            emit(row)

    if args.long_prompt and "nextserve" in models:
        model = models["nextserve"][0]
        steps = 4 if args.quick else 16
        row = long_prompt(model, args.long_prompt, args.long_chunk, steps, short=args.prompt_len)
        print(f"long prompt: {row['prompt_len']} tokens prefilled in {row['prefill_s']:.1f} s "
              f"({row['prefill_tok_s']:.0f} tok/s, {row['chunk']}-token chunks, K/V pool "
              f"{row['kv_pool_bytes'] / 2**20:.0f} MiB); decode step {row['short_step_ms']:.1f} ms at "
              f"{args.prompt_len} tokens, {row['long_step_ms']:.1f} ms at {row['prompt_len']}; DeltaNet layers "
              f"{row['short_linear_attention_ms']:.2f} -> {row['long_linear_attention_ms']:.2f} ms "
              f"(x{row['deltanet_long_over_short']:.2f}, flat is ~1), attention layers "
              f"{row['short_full_attention_ms']:.2f} -> {row['long_full_attention_ms']:.2f} ms")
        emit({"case": "long_prompt", **row})


if __name__ == "__main__":
    main()
