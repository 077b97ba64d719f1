"""Merge concurrent expert requests for the same layer into one forward pass.

Several routers (router replicas) send their tokens for a layer at about the same moment; one
grouped GEMM over all of them reads each expert's weights once instead of once per router.

The forward runs on the event loop's own thread, right where the request was read: handing it to
a compute thread and the answer back would cost two thread wake-ups per request, which on shared
cores are most of a small layer's round trip. A request schedules the drain with `call_soon`, so
every request read in the same turn of the loop joins the same forward; whatever arrives while a
forward runs waits in gRPC's queue and is merged into the next one, so a lone request never waits.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Forward = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class _Pending:
    layer: int
    hidden: torch.Tensor      # [T, H]
    expert_ids: torch.Tensor  # [T, k]
    weights: torch.Tensor     # [T, k]
    trace: object = None      # the sending step's trace context, for the forward's span (None: untraced)
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class LayerBatcher:
    def __init__(self, forward: Forward, on_forward: Callable | None = None):
        self.forward = forward
        # on_forward(layer, trace contexts, expert_ids, start_ns, end_ns, error) after every forward (telemetry)
        self.on_forward = on_forward
        self.pending: list[_Pending] = []
        self.forwards = 0  # forward passes run (fewer than requests when merging happened)

    async def submit(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                     weights: torch.Tensor, trace=None) -> torch.Tensor:
        item = _Pending(layer, hidden, expert_ids, weights, trace)
        self.pending.append(item)
        if len(self.pending) == 1:  # the first since the last drain: the others read in this turn join it
            asyncio.get_running_loop().call_soon(self._drain)
        return await item.done

    def _drain(self) -> None:
        taken, self.pending = self.pending, []
        by_layer: dict[int, list[_Pending]] = {}
        for item in taken:
            by_layer.setdefault(item.layer, []).append(item)
        for group in by_layer.values():
            self._run_group(group)

    def _run_group(self, group: list[_Pending]) -> None:
        if len(group) > 1 and len({(g.hidden.dtype, g.hidden.shape[1], g.expert_ids.shape[1]) for g in group}) == 1:
            try:
                out = self._forward(group, group[0].layer, torch.cat([g.hidden for g in group]),
                                    torch.cat([g.expert_ids for g in group]), torch.cat([g.weights for g in group]))
            except Exception:  # noqa: BLE001 - one bad request must not fail the others: one by one below
                pass
            else:
                for g, part in zip(group, out.split([g.hidden.shape[0] for g in group])):
                    _resolve(g, part)
                return
        for g in group:
            try:
                _resolve(g, self._forward([g], g.layer, g.hidden, g.expert_ids, g.weights))
            except Exception as e:  # noqa: BLE001 - every waiter gets an answer, never a hang
                _resolve(g, e)

    def _forward(self, items, layer, hidden, expert_ids, weights) -> torch.Tensor:
        self.forwards += 1
        if self.on_forward is None:
            return self.forward(layer, hidden, expert_ids, weights)
        start, error = time.time_ns(), None
        try:
            return self.forward(layer, hidden, expert_ids, weights)
        except Exception as e:
            error = e
            raise
        finally:
            self.on_forward(layer, [g.trace for g in items], expert_ids, start, time.time_ns(), error)


def _resolve(item: _Pending, result) -> None:
    if item.done.done():  # its stream was cancelled meanwhile: nobody waits for the answer
        return
    if isinstance(result, Exception):
        item.done.set_exception(result)
    else:
        item.done.set_result(result)
