"""Gated delta rule (Qwen3-Next's linear attention): torch references and Triton kernels.

- `chunk_gated_delta_rule`: chunked (64-token WY form) Triton kernels, for prefill.
- `fused_recurrent_gated_delta_rule`: token-by-token Triton kernel with the gating fused in, for decode.
- `naive_*` and `gdn_gating`: plain torch references (the CPU path, and the tests' oracle).
"""
from .chunk import chunk_gated_delta_rule
from .fused_recurrent import fused_recurrent_gated_delta_rule
from .naive import (
    gdn_gating,
    naive_chunk_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
    naive_recurrent_gated_delta_rule_from_gates,
)

__all__ = [
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "gdn_gating",
    "naive_chunk_gated_delta_rule",
    "naive_recurrent_gated_delta_rule",
    "naive_recurrent_gated_delta_rule_from_gates",
]
