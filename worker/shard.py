"""One worker's share of the model: the routed experts of its shard, for every MoE layer.

Only the tensors of the shard's experts are read from the checkpoint (memory-mapped, one at a
time), so a worker's memory is proportional to its share of the experts.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from nextserve.kernels import ops
from nextserve.kernels.host_allocator import reuse_large_allocations
from nextserve.model.checkpoint import CheckpointReader, expert_tensor_predicate, load_config, resolve_dtype, validate
from nextserve.model.config import Qwen3NextConfig
from nextserve.model.loader import copy_expert_tensor
from nextserve.model.moe import Experts


class ShardExperts:
    """{decoder layer index: Experts} for the experts one shard holds."""

    def __init__(self, config: Qwen3NextConfig, layers: dict[int, Experts]):
        self.config = config
        self.layers = layers
        first = next(iter(layers.values()))
        self.expert_ids: list[int] = list(first.expert_ids)
        self.dtype = first.w13.dtype
        self.device = first.w13.device

    @classmethod
    def load(cls, path: str | Path, expert_ids: Iterable[int], dtype="float32", device="cpu") -> "ShardExperts":
        config = load_config(path)
        dtype, held = resolve_dtype(dtype), sorted(set(int(e) for e in expert_ids))
        if not held:
            raise ValueError("a worker must hold at least one expert")
        if torch.device(device).type == "cpu":
            reuse_large_allocations()  # as the router's loader does: kernels/host_allocator.py
        reader = CheckpointReader(path)
        mine = expert_tensor_predicate(held)
        # The MTP head's experts are optional (a checkpoint may ship without the head), so not checked.
        validate(reader, config, predicate=lambda name: mine(name) and not name.startswith("mtp."))
        # Decoder layers by index, and the MTP head's MoE layer after them (its index in the router's
        # dispatch, as in CachePools), when the checkpoint has it: the router's speculative decoding runs it.
        prefixes = {i: f"model.layers.{i}." for i in range(config.num_hidden_layers) if config.is_moe_layer(i)}
        if config.num_experts and f"mtp.layers.0.mlp.experts.{held[0]}.gate_proj.weight" in reader:
            prefixes[config.num_hidden_layers] = "mtp.layers.0."
        layers: dict[int, Experts] = {}
        for i, prefix in prefixes.items():
            with torch.device("meta"):
                experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size, held)
            experts = experts.to(dtype).to_empty(device=device)
            for e in experts.expert_ids:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    name = f"{prefix}mlp.experts.{e}.{proj}.weight"
                    copy_expert_tensor(experts, e, proj, reader.get(name, dtype, device), name)
            experts.prepack()  # as the router's in-process twin does (model/loader.py)
            layers[i] = experts.eval()
        reader.close()
        if not layers:
            raise ValueError(f"{path}: the model has no MoE layers, so there is nothing for a worker to serve")
        return cls(config, layers)

    @property
    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for experts in self.layers.values() for p in experts.parameters())

    @torch.inference_mode()
    def forward(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] in the worker's dtype; expert_ids [T, k] GLOBAL ids, -1 = skip; weights [T, k] fp32
        -> [T, H] fp32: the partial sum unrounded, so the router adds the shards' partials before rounding.

        Slots naming an expert this shard does not hold contribute nothing, as do -1 slots (the router
        sends -1 where another shard computes the slot, e.g. a replicated expert)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not an MoE layer this worker serves ({sorted(self.layers)})")
        if hidden.dtype != self.dtype:
            # Converting would compute something the router's in-process twin never computes.
            raise ValueError(f"hidden states arrive in {hidden.dtype}, but this worker computes in {self.dtype}")
        T, H = hidden.shape
        if H != self.config.hidden_size or expert_ids.shape != weights.shape or expert_ids.shape[0] != T:
            raise ValueError(f"inconsistent shapes: hidden {list(hidden.shape)}, expert_ids {list(expert_ids.shape)}, "
                             f"weights {list(weights.shape)} (hidden size {self.config.hidden_size})")
        ids = expert_ids.to(self.device, torch.int64)
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= self.config.num_experts):
            raise ValueError(f"expert ids must lie in [-1, {self.config.num_experts})")
        experts = self.layers[layer]
        local = experts.local_index(self.device)[ids.clamp(min=0)].masked_fill(ids < 0, -1)
        out = ops.expert_ffn(hidden.to(self.device), local, weights.to(self.device, torch.float32),
                             experts.w13, experts.w2, out_dtype=torch.float32)
        return out
