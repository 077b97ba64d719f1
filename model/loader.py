"""Loading HF-layout checkpoints into `Qwen3NextForCausalLM`.

Every tensor name in the checkpoint is a parameter name of the model, except the routed experts:
the checkpoint keeps one tensor per expert and projection, the model stacks the experts it holds
(`mlp.experts.w13` = [gate_proj; up_proj] per expert, `mlp.experts.w2` = down_proj).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from nextserve.kernels.host_allocator import reuse_large_allocations

from .checkpoint import (EXPERT_TENSOR, MTP_PREFIX, CheckpointError, CheckpointReader, dense_predicate,
                         expert_tensor_predicate, resolve_dtype, validate)
from .config import Qwen3NextConfig
from .moe import Experts
from .packed import pack_projections, prepack_linears


def tensor_filter(held: set[int] | None, with_mtp: bool):
    """The checkpoint tensors a model built with these experts (None: all) and MTP choice needs."""
    mine = expert_tensor_predicate(held) if held is not None else None

    def keep(name: str) -> bool:
        if name.startswith(MTP_PREFIX) and not with_mtp:
            return False
        return mine is None or dense_predicate(name) or mine(name)
    return keep


def copy_expert_tensor(experts: Experts, expert: int, proj: str, tensor: torch.Tensor, name: str) -> bool:
    """Copy one per-expert checkpoint tensor into its row of the stacked weights (gate_proj and up_proj
    into w13, down_proj into w2). Returns False when `experts` does not hold that expert."""
    row = int(experts.local_index("cpu")[expert])
    if row < 0:
        return False
    inter = experts.intermediate_size
    target = {"gate_proj": experts.w13.data[row, :inter], "up_proj": experts.w13.data[row, inter:],
              "down_proj": experts.w2.data[row]}[proj]
    _copy(target, tensor, name)
    return True


def load_weights(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into the model; every parameter must be written exactly once."""
    params = dict(model.named_parameters())
    unwritten = {n for n, p in params.items() if p.numel()}  # a shard holding no experts has empty stacks
    expert_rows: dict[str, int] = {}
    for name, tensor in tensors:
        m = EXPERT_TENSOR.match(name)
        if m is None:
            if name not in params:
                raise CheckpointError(f"the model has no parameter for checkpoint tensor {name}")
            _copy(params[name].data, tensor, name)
            unwritten.discard(name)
            continue
        if copy_expert_tensor(model.get_submodule(m["experts"]), int(m["expert"]), m["proj"], tensor, name):
            expert_rows[m["experts"]] = expert_rows.get(m["experts"], 0) + 1
    for prefix, count in expert_rows.items():
        experts = model.get_submodule(prefix)
        if count == 3 * len(experts.expert_ids):
            unwritten -= {f"{prefix}.w13", f"{prefix}.w2"}
    if unwritten:
        names = sorted(unwritten)
        raise CheckpointError(f"{len(names)} model parameters were not in the checkpoint: {', '.join(names[:5])}"
                              + (" ..." if len(names) > 5 else ""))


def _copy(target: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if tuple(target.shape) != tuple(tensor.shape):
        raise CheckpointError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(target.shape)}")
    target.copy_(tensor)


def load_model(cls, path: str | Path, *, dtype, device, expert_ids: Iterable[int] | None, with_mtp: bool):
    config = Qwen3NextConfig.from_pretrained(path)
    dtype = resolve_dtype(dtype)
    if torch.device(device).type == "cpu":
        reuse_large_allocations()  # a CPU engine's forward temporaries: see kernels/host_allocator.py
    held = None if expert_ids is None else set(int(e) for e in expert_ids)
    # Build on the meta device, so no memory is touched before the weights arrive.
    with torch.device("meta"):
        model = cls(config, expert_ids=held, with_mtp=with_mtp)
    model = model.to(dtype).to_empty(device=device)
    reader = CheckpointReader(path)
    keep = tensor_filter(held, with_mtp)
    validate(reader, config, predicate=keep, allow_missing_mtp=not with_mtp)
    load_weights(model, ((name, reader.get(name, dtype=dtype, device=device)) for name in reader.names() if keep(name)))
    pack_projections(model)
    prepack_linears(model)
    return model.eval()
