"""`nextserve train`: train the small Qwen3-Next that ships with nextserve (docs/training.md)."""
from __future__ import annotations

import argparse
from pathlib import Path

from nextserve.model.presets import PRESETS


def add_parser(sub) -> None:
    from nextserve.model.train import TrainConfig  # torch-free module level: defaults come from here

    d = TrainConfig()
    p = sub.add_parser(
        "train", help="train the small model on the Python standard library's sources",
        description="Train a Qwen3-Next (MTP head included) with plain torch autograd on the CPU: a "
                    "byte-level BPE tokenizer and the model are trained on the *.py files of this "
                    "Python's standard library (PSF License; 2%% of the files, chosen by path hash, are "
                    "held out for validation). OUT becomes an HF-layout checkpoint (bf16 weights, ChatML "
                    "tokenizer) that transformers and nextserve load, rewritten every --save-every steps, "
                    "plus train-state.pt (for --resume; not part of the checkpoint) and training.json "
                    "(corpus digest, losses, timings). Set OMP_NUM_THREADS to the cores you can spare.",
        epilog="example (the shipped model, about an hour on 2 idle cores):\n"
               "  nextserve train --out checkpoints/stdlib\n"
               "continue an interrupted run:  nextserve train --out checkpoints/stdlib --resume",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output directory (checkpoint + training state)")
    p.add_argument("--preset", default="stdlib", choices=[n for n in PRESETS if n != "80b-a3b"],
                   help="model shape (default stdlib: ~15M parameters, 29 MB in bf16)")
    p.add_argument("--corpus", type=Path, default=None, metavar="DIR",
                   help="train on the *.py files under DIR instead of the standard library")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in OUT (same settings required; losses continue exactly)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N more steps, saving state (train in sessions; --resume continues)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; the torch reference kernels run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (validation lines still print)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"windows per step (default {d.batch_size})")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens scored per window (default {d.seq_len})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate (default {d.lr})")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help=f"the cosine ends at lr * this (default {d.min_lr_ratio})")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help=f"linear warmup steps (default {d.warmup_steps})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW weight decay on matrices (default {d.weight_decay})")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help=f"gradient norm clip (default {d.grad_clip})")
    g.add_argument("--mtp-weight", type=float, default=d.mtp_weight,
                   help=f"weight of the MTP (token after next) loss (default {d.mtp_weight})")
    g.add_argument("--router-weight", type=float, default=d.router_weight,
                   help=f"weight of the router load-balancing loss (default {d.router_weight})")
    g.add_argument("--seed", type=int, default=d.seed, help=f"seed of the init and the data order (default {d.seed})")
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help=f"validate every N steps and at the end (default {d.eval_every})")
    g.add_argument("--eval-windows", type=int, default=d.eval_windows,
                   help=f"validation windows, fixed for the run (default {d.eval_windows})")
    g.add_argument("--save-every", type=int, default=d.save_every,
                   help=f"write checkpoint and state every N steps and at the end (default {d.save_every})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nextserve.model.train import TrainConfig, train

    try:
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                          min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps,
                          weight_decay=args.weight_decay, grad_clip=args.grad_clip, mtp_weight=args.mtp_weight,
                          router_weight=args.router_weight, seed=args.seed, eval_every=args.eval_every,
                          eval_windows=args.eval_windows, save_every=args.save_every)
    except AssertionError as e:
        print(f"error: invalid training settings: {e}")
        return 2
    if args.stop_after is not None and args.stop_after < 1:
        print("error: --stop-after must be at least 1")
        return 2
    try:
        result = train(args.out, preset=args.preset, cfg=cfg, corpus_dir=args.corpus, resume=args.resume,
                       stop_after=args.stop_after, device=args.device, progress=not args.no_progress)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 1
    last = result.evals[-1] if result.evals else None
    step = result.history[-1]["step"] if result.history else 0
    summary = f"; validation loss {last['val_loss']:.4f}, MTP {last['val_mtp']:.4f}" if last else ""
    print(f"trained to step {step} of {cfg.steps} in {args.out}{summary}")
    for prompt, sample in (last["samples"].items() if last else ()):
        print(f"--- greedy sample after {prompt!r} ---\n{sample}")
    return 0
