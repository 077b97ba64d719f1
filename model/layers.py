"""Small building blocks shared by the mixers and the MoE block."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nextserve.kernels import ops

from .packed import PackedRows


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: y = x_hat * (1 + w). With `residual`, returns (y, x + residual)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.rms_norm(x, self.weight, self.eps, zero_centered=True, residual=residual)


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm with a plain weight, gated by silu(z): the DeltaNet output norm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ops.gated_rms_norm(x, z, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear without bias whose product goes through `ops.linear` (on the CPU: the weight's kept
    oneDNN layout once the loader has prepacked it)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight)


class LMHead(nn.Linear):
    """The projection onto the vocabulary (no bias). On the CPU, 2 to 8 rows (a verification's k + 1
    positions, a small decode batch) go as W x^T: MKL's GEMM for a handful of rows against a weight
    this wide repacks all of it on every call, about 3.5x the time of one row at 3 rows (an 8 MiB
    weight, bench/spec_profile.py); W x^T streams it once, as one row does."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops.is_prepacked(self.weight):  # a kept layout: no repacking at any row count
            return ops.linear(x, self.weight)
        if x.device.type == "cpu" and x.dim() == 2 and 2 <= x.shape[0] <= 8:
            return torch.mm(self.weight, x.t()).t()  # [N, V], a transposed view
        return super().forward(x)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the shared expert (and the dense MLP of mlp_only_layers)."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, pack_gate_up: bool = True):
        """pack_gate_up=False: an owner packs gate_proj and up_proj with its own projections of x (the
        MoE block) and calls `down`."""
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size)
        self.up_proj = Linear(hidden_size, intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)
        # both read x: one matmul
        self.gate_up_proj = PackedRows(self.gate_proj, self.up_proj) if pack_gate_up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            return self.down(self.gate_proj(x), self.up_proj(x))
        return self.down(*ops.linear(x, self.gate_up_proj.weight()).chunk(2, dim=-1))

    def down(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(gate) * up)
