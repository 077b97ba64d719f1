"""`nextserve checkpoint make|inspect`: write random test checkpoints and look inside real ones."""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from nextserve.model.checkpoint import (
    CheckpointError, CheckpointReader, load_config, parameter_counts, validate,
)
from nextserve.model.presets import PRESETS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `checkpoint` and its actions; each action sets `args.func`."""
    parser = subparsers.add_parser(
        "checkpoint",
        help="make a random checkpoint or inspect one",
        description="Create randomly initialised Qwen3-Next checkpoints in the Hugging Face layout, "
        "or inspect and validate an existing checkpoint directory.",
    )
    actions = parser.add_subparsers(dest="checkpoint_action", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    make = actions.add_parser(
        "make",
        help="write a random checkpoint for a preset",
        description="Write config.json, generation_config.json, a byte-level BPE tokenizer and random "
        "weights (MTP layer included) for a preset. The same preset, seed, dtype and shard size always "
        "produce byte-identical files.",
    )
    make.add_argument("--preset", required=True, choices=[p for p in PRESETS if p != "80b-a3b"],
                      help="model size: tiny (~0.6M parameters, for tests), small (~74M, for benchmarks) or stdlib "
                      "(~15M, the shape `nextserve train` trains)")
    make.add_argument("--out", required=True, type=Path, help="output directory (created; old weights replaced)")
    make.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")
    make.add_argument("--max-shard-size", default=None,
                      help="split the weights into shards of at most this size, e.g. 100MB or 1GiB "
                      "(default: one model.safetensors)")
    make.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                      help="dtype of the stored weights (default: float32)")
    make.set_defaults(func=run_make)

    inspect = actions.add_parser(
        "inspect",
        help="summarise and validate a checkpoint directory",
        description="Print the config summary, parameter counts and weight files of a checkpoint, then "
        "check that it holds exactly the tensors its config needs. Exits 1 if it does not.",
    )
    inspect.add_argument("dir", type=Path, help="checkpoint directory (config.json + safetensors)")
    inspect.set_defaults(func=run_inspect)
    return parser


def run_make(args: argparse.Namespace) -> int:
    from nextserve.model.make_checkpoint import make_checkpoint  # tqdm and training only when used

    config = make_checkpoint(args.out, args.preset, seed=args.seed, max_shard_size=args.max_shard_size,
                             dtype=args.dtype, progress=True)
    counts = parameter_counts(config)
    print(f"wrote {args.preset} checkpoint to {args.out}: {counts['total']:,} parameters, dtype {args.dtype}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.dir)
        reader = CheckpointReader(args.dir)
    except CheckpointError as e:
        print(f"error: {e}")
        return 1
    layer_types = Counter(config.layer_types)
    counts = parameter_counts(config)
    stored = sum(_numel(s) for s in reader.shapes().values())
    print(f"checkpoint    {args.dir}")
    print(f"layers        {config.num_hidden_layers} ({layer_types['linear_attention']} Gated DeltaNet, "
          f"{layer_types['full_attention']} gated attention) + {config.num_nextn_predict_layers} MTP")
    print(f"hidden        {config.hidden_size}, vocab {config.vocab_size}, dtype {config.torch_dtype}")
    print(f"attention     {config.num_attention_heads} q / {config.num_key_value_heads} kv heads x {config.head_dim}, "
          f"rotary dim {config.rotary_dim}")
    print(f"deltanet      {config.linear_num_key_heads} k / {config.linear_num_value_heads} v heads x "
          f"{config.linear_key_head_dim}/{config.linear_value_head_dim}, conv {config.linear_conv_kernel_dim}")
    print(f"moe           {config.num_experts} experts, top-{config.num_experts_per_tok}, width "
          f"{config.moe_intermediate_size}, shared {config.shared_expert_intermediate_size}")
    print(f"parameters    {counts['total']:,} expected ({counts['mtp']:,} MTP), {counts['active']:,} active per token;"
          f" {stored:,} stored")
    print(f"files         {len(reader.files())}: {', '.join(reader.files())}")
    try:
        checked = validate(reader, config)
    except CheckpointError as e:
        print(f"validation    FAILED\n{e}")
        return 1
    print(f"validation    ok ({checked} tensors)")
    return 0


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
