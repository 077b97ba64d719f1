"""The workload every CPU model benchmark runs, so that engines compare on the same tokens.

Torch only (no nextserve import): bench/peer_vllm_cpu.py runs it inside vLLM's own venv.
The reference workload: 128-token prompts, 64 greedy tokens, batches 1 and 16, and
decode tok/s = batch * (N - 1) / (t(N) - t(1)), where t(k) is the wall time until every
sequence has k generated tokens (t(1) is prefill plus the first token).
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

PROMPT_LEN, NEW_TOKENS, BATCH_SIZES = 128, 64, (1, 16)
QUICK = dict(prompt_len=16, new_tokens=4, batch_sizes=(1, 2))


def prompts(vocab_size: int, batch: int, prompt_len: int) -> list[list[int]]:
    """The batch's prompts: uniform random ids from a fixed seed per batch size (same on every engine)."""
    generator = torch.Generator().manual_seed(1000 + batch)
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=generator).tolist()


def warmup_prompts(vocab_size: int, batch: int, prompt_len: int) -> list[list[int]]:
    """Other prompts of the same shape, for the warm-up run every engine gets before it is timed: it
    leaves first-touch memory, lazy inits and compiled shapes behind, but not the timed prompts' own
    routing, which no server sees twice (a product whose shapes repeat runs from cached primitives)."""
    generator = torch.Generator().manual_seed(2000 + batch)
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=generator).tolist()


def vocab_size(checkpoint: str) -> int:
    return int(json.loads((Path(checkpoint) / "config.json").read_text())["vocab_size"])


def rates(batch: int, prompt_len: int, new_tokens: int, t_first: float, t_all: float) -> dict:
    """Prefill and decode throughput from t(1) and t(N), as docs/benchmarks.md defines them."""
    if new_tokens < 2 or t_all <= t_first:
        raise ValueError(f"decode needs N >= 2 tokens and t(N) > t(1); got N={new_tokens}, "
                         f"t(1)={t_first:.4f} s, t(N)={t_all:.4f} s")
    return {"prefill_tok_s": batch * prompt_len / t_first,
            "decode_tok_s": batch * (new_tokens - 1) / (t_all - t_first),
            "step_s": (t_all - t_first) / (new_tokens - 1)}


def set_threads(threads: int) -> str:
    """Give torch `threads` intra-op threads and say so (the line goes at the top of every report)."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)  # nothing here runs ops concurrently; callable once, before any work
    except RuntimeError:
        pass
    return (f"torch threads: {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op; "
            f"{platform.machine()}, torch {torch.__version__}")
