"""Named model sizes: `tiny` for tests, `small` for benchmarks, `stdlib` for the model nextserve
trains and ships, `80b-a3b` for the real shapes.

The two synthetic presets keep every structural feature of Qwen3-Next that the serving math depends
on: a 3:1 DeltaNet:attention layer pattern, more value heads than key heads, GQA, partial RoPE, a
shared expert, and an expert count that is not a power of two (tiny) so nothing silently assumes one.
Their vocab sizes are what the built-in byte-level BPE tokenizer reaches (see `model.tokenizer`).
"""
from __future__ import annotations

from .config import Qwen3NextConfig

_LINEAR_X3_FULL = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]

PRESETS: dict[str, dict] = {
    # ~0.56M parameters; every shape small and awkward enough to catch layout mistakes.
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=4,
        layer_types=list(_LINEAR_X3_FULL),
        full_attention_interval=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        partial_rotary_factor=0.25,  # rotary dim 4
        rope_theta=1e7,
        max_position_embeddings=4096,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        num_experts=12,
        num_experts_per_tok=3,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        intermediate_size=128,
        eos_token_id=0,
        torch_dtype="float32",
    ),
    # ~74M parameters (~22M active per token): big enough that kernels and expert dispatch show
    # realistic costs, small enough to make and load in seconds.
    "small": dict(
        vocab_size=4096,
        hidden_size=512,
        num_hidden_layers=8,
        full_attention_interval=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        partial_rotary_factor=0.25,  # rotary dim 16
        rope_theta=1e7,
        max_position_embeddings=32768,
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        num_experts=64,
        num_experts_per_tok=8,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=256,
        intermediate_size=1024,
        eos_token_id=0,
        torch_dtype="float32",
    ),
    # The model that ships trained (`nextserve train`, docs/training.md): every Qwen3-Next feature
    # (DeltaNet and gated attention 3:1, more value than key heads, GQA, partial RoPE, routed experts
    # top-k > 1 plus a shared expert, an MTP layer) at a size a 2-core CPU trains in about an hour
    # and that stays under 30 MB in bf16. The vocab is what its tokenizer is trained to on the
    # standard library's sources. RoPE base 1e4, not 1e7: with 16 rotary dims and 256-token training
    # windows, a 1e7 base would leave most rotary frequencies nearly constant over the window.
    "stdlib": dict(
        vocab_size=8192,
        hidden_size=256,
        num_hidden_layers=4,
        layer_types=list(_LINEAR_X3_FULL),
        full_attention_interval=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        partial_rotary_factor=0.25,  # rotary dim 16
        rope_theta=1e4,
        max_position_embeddings=4096,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        num_experts=16,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=256,
        intermediate_size=1024,
        eos_token_id=0,
        torch_dtype="bfloat16",
    ),
    # Qwen3-Next-80B-A3B: ~80B parameters, ~3B active. For planning and docs only.
    "80b-a3b": dict(
        vocab_size=151936,
        hidden_size=2048,
        num_hidden_layers=48,
        full_attention_interval=4,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=256,
        partial_rotary_factor=0.25,
        rope_theta=1e7,
        max_position_embeddings=262144,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        num_experts=512,
        num_experts_per_tok=10,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        intermediate_size=5120,
        bos_token_id=151643,
        eos_token_id=151645,
        torch_dtype="bfloat16",
    ),
}


def config_from_preset(name: str) -> Qwen3NextConfig:
    """A fresh config for preset `name` (lists are copied, so callers may mutate the result)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    kwargs = {k: list(v) if isinstance(v, list) else v for k, v in PRESETS[name].items()}
    return Qwen3NextConfig(**kwargs)
