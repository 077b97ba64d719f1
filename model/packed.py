"""Projections that read the same input, computed as one matmul.

At decode sizes a matmul costs a fixed ~20 us on the CPU (oneDNN, bf16) before it reads a byte, so
two projections of the same input cost twice that for the same bytes. `PackedRows` keeps such
linears' weights as row blocks of one [sum of out_features, in_features] tensor: after `pack()` (the
loader packs every model it loads) each linear's weight IS a view of its block, so parameter names,
state_dict entries and in-place loads stay as they were, and one F.linear on `weight()` computes
every projection with the same dot products.

Until packed (a model built for training), or once a weight no longer lives in the packed tensor
(moved or replaced since), `weight()` is the weights' concatenation, which autograd sees through:
the forward code is the same either way.
"""
from __future__ import annotations

import torch
from torch import nn

from nextserve.kernels import ops


class PackedRows:
    def __init__(self, *linears: nn.Linear):
        self.linears = linears
        self.sizes = [linear.out_features for linear in linears]
        self._packed: torch.Tensor | None = None
        self._addresses: list[int] = []

    def pack(self) -> None:
        """Move the weights into one tensor, each weight a view of its rows."""
        weights = [linear.weight for linear in self.linears]
        # a model loaded under inference mode must still be trainable: pack with ordinary tensors
        with torch.inference_mode(False), torch.no_grad():
            packed = torch.cat([w.detach() for w in weights])
            for w, rows in zip(weights, packed.split(self.sizes)):
                w.data = rows
        self._packed, self._addresses = packed, [w.data_ptr() for w in weights]

    def weight(self) -> torch.Tensor:
        """[sum of out_features, in_features]: the packed tensor while every weight is a view of it and
        no gradient is wanted, else the weights concatenated."""
        weights = [linear.weight for linear in self.linears]
        if (self._packed is not None and [w.data_ptr() for w in weights] == self._addresses
                and not (torch.is_grad_enabled() and any(w.requires_grad for w in weights))):
            return self._packed
        return torch.cat(weights)


def pack_projections(model: nn.Module) -> None:
    """Pack every PackedRows of the model's modules (after its weights are loaded)."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, PackedRows):
                value.pack()


def prepack_linears(model: nn.Module) -> int:
    """After loading, for serving: keep every projection's weight in the CPU path's matmul layout as
    well (`ops.prepack_linear`: bf16 on a CPU with native bf16, nothing elsewhere). The linears of a
    PackedRows are packed as its one tensor, which is what the model multiplies by; modules with a
    `prepack()` of their own (the routed experts, the DeltaNet's in_proj in its column order) do
    theirs instead. Returns how many weights were packed."""
    in_rows, weights, own = set(), [], 0
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, PackedRows):
                in_rows.update(id(linear) for linear in value.linears)
                if not hasattr(module, "prepack"):
                    with torch.no_grad():  # the packed tensor itself, as inference multiplies by it
                        weights.append(value.weight())
        if hasattr(module, "prepack"):
            own += module.prepack()
    weights += [m.weight for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in in_rows]
    return own + sum(ops.prepack_linear(w) for w in weights)
