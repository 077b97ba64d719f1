"""How one MoE layer's routed tokens are cut between shards and their replicas, on the host.

Pure functions over host tensors (no sockets): `to_host` brings a layer's hidden states, expert ids
and routing weights to the host in one device-to-host copy, `split_tokens` assigns every (token,
slot) to exactly one worker, and `add_partials` sums the workers' fp32 partials in a fixed order.
They run on the model thread for every MoE layer, so the split is done in numpy: a decode step's
arrays are a few dozen elements, and a torch op's fixed cost (microseconds, several times numpy's)
would add up to a good part of the layer's round trip.

Which worker computes a slot: its expert's owner shard (the first shard in plan order with a
healthy replica; see `Routing`), and within that shard the healthy replicas share the shard's
tokens in contiguous chunks. The chunk that goes to the first replica rotates with `turn` (one turn
per layer dispatch), so a single decoding token also alternates between replicas.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Routing:
    """Who computes what while health stays as it is (rebuilt, never mutated, when health changes)."""
    owner: torch.Tensor                    # [num_experts] int64: expert -> owner shard, -1 if no healthy holder
    replicas: dict[int, tuple[int, ...]]   # owner shard -> its healthy connections (indices, plan order)


@dataclass(frozen=True)
class Assignment:
    """One worker's part of a layer: `rows` index the layer's tokens; `expert_ids` [len(rows), k] are the
    global ids of the slots this worker computes, -1 for the slots other workers compute."""
    shard: int
    connection: int
    rows: torch.Tensor        # [R] int64
    expert_ids: torch.Tensor  # [R, k] int32


def to_host(hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor):
    """(hidden [T, H], expert_ids [T, k] int32, weights [T, k] fp32) on the host, in ONE device-to-host copy.

    The three tensors are packed as bytes side by side on the device, copied once and unpacked: on
    a GPU each separate copy would be a synchronisation of its own, per layer. On the host there is
    nothing to copy."""
    parts = [hidden.contiguous(), expert_ids.to(torch.int32).contiguous(), weights.to(torch.float32).contiguous()]
    if hidden.device.type == "cpu":
        return parts[0], parts[1], parts[2]
    T = hidden.shape[0]
    widths = [p.shape[1] * p.element_size() for p in parts]
    packed = torch.cat([p.view(torch.uint8).view(T, w) for p, w in zip(parts, widths)], dim=1).cpu()
    host = [chunk.contiguous().view(p.dtype) for chunk, p in zip(packed.split(widths, dim=1), parts)]
    return host[0], host[1], host[2]


def unowned_experts(routing: Routing, expert_ids: torch.Tensor) -> list[int]:
    """The experts named in expert_ids (-1 = nothing to do) that no healthy worker holds."""
    ids = expert_ids.numpy()
    needed = ids[ids >= 0]
    return sorted(set(needed[routing.owner.numpy()[needed] < 0].tolist()))


def split_tokens(routing: Routing, expert_ids: torch.Tensor, turn: int = 0) -> list[Assignment]:
    """Assign each slot of expert_ids [T, k] (global ids, -1 = nothing to do) to one worker.

    Every expert named must have an owner (check `unowned_experts` first). A worker gets only the
    rows with at least one slot for it. Assignments come in shard order, then chunk order: the order
    in which `add_partials` sums them."""
    ids = expert_ids.to(torch.int32).numpy()
    named = ids >= 0
    owner = np.where(named, routing.owner.numpy()[np.maximum(ids, 0)], -1)
    if (named & (owner < 0)).any():
        raise ValueError(f"experts without a healthy holder: {unowned_experts(routing, expert_ids.to(torch.int32))}")
    parts = []
    for shard in np.unique(owner[owner >= 0]).tolist():
        mine = owner == shard
        rows = np.flatnonzero(mine.any(axis=1))
        shard_ids = np.where(mine[rows], ids[rows], np.int32(-1))
        replicas = routing.replicas[shard]
        # contiguous chunks, the first len(rows) % len(replicas) one row longer (as tensor_split cuts)
        size, longer = divmod(len(rows), len(replicas))
        start = 0
        for c in range(len(replicas)):
            stop = start + size + (c < longer)
            if stop > start:
                parts.append(Assignment(shard, replicas[(c + turn) % len(replicas)], torch.from_numpy(rows[start:stop]),
                                        torch.from_numpy(shard_ids[start:stop])))
            start = stop
    return parts


def add_partials(num_tokens: int, hidden_size: int, partials: list[tuple[Assignment, torch.Tensor]]) -> torch.Tensor:
    """[num_tokens, hidden_size] fp32: the partials [len(rows), H] fp32 added into their rows, in shard order.

    Replicas of a shard hold disjoint rows, so each token's sum runs over the shards in plan order
    whichever replicas computed it: the same fp32 additions every time."""
    out = torch.zeros(num_tokens, hidden_size, dtype=torch.float32)
    for assignment, partial in sorted(partials, key=lambda p: p[0].shard):
        out.index_add_(0, assignment.rows, partial)
    return out
