"""Loading HF-layout checkpoints into `Qwen3NextForCausalLM`.

Every tensor name in the checkpoint is a parameter name of the model, except the routed experts:
the checkpoint keeps one tensor per expert and projection, the model stacks the experts it holds
(`mlp.experts.w13` = [gate_proj; up_proj] per expert, `mlp.experts.w2` = down_proj).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

from .checkpoint import CheckpointError, CheckpointReader, resolve_dtype, validate
from .config import Qwen3NextConfig

EXPERT_TENSOR = re.compile(r"^(?P<experts>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def wanted(name: str, held: set[int] | None, with_mtp: bool) -> bool:
    """Does a model built with these experts (None: all) and MTP choice need this checkpoint tensor?"""
    if name.startswith("mtp.") and not with_mtp:
        return False
    m = EXPERT_TENSOR.match(name)
    return m is None or held is None or int(m["expert"]) in held


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
        experts = model.get_submodule(m["experts"])
        row = int(experts.local_index("cpu")[int(m["expert"])])
        if row < 0:
            continue  # held by another process
        inter = experts.intermediate_size
        target = {"gate_proj": experts.w13.data[row, :inter], "up_proj": experts.w13.data[row, inter:],
                  "down_proj": experts.w2.data[row]}[m["proj"]]
        _copy(target, tensor, name)
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
    held = None if expert_ids is None else set(int(e) for e in expert_ids)
    # Build on the meta device, so no memory is touched before the weights arrive.
    with torch.device("meta"):
        model = cls(config, expert_ids=held, with_mtp=with_mtp)
    model = model.to(dtype).to_empty(device=device)
    reader = CheckpointReader(path)
    keep = lambda name: wanted(name, held, with_mtp)  # noqa: E731
    validate(reader, config, predicate=keep, allow_missing_mtp=not with_mtp)
    load_weights(model, ((name, reader.get(name, dtype=dtype, device=device)) for name in reader.names() if keep(name)))
    return model.eval()
