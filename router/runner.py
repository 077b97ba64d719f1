"""The engine's model side: the memory pools, one forward pass per scheduled batch, batch sampling.

`ModelRunner` is the only engine file that touches torch tensors of the model: it owns the KV block
and DeltaNet state pools (sized by the block manager's counts), each sequence's sampler, and turns a
`ScheduledBatch` into one `ForwardBatch`, one forward pass and the sampled tokens. In the router it
runs on its own thread with the routed experts on the workers (the dispatch inside the forward pass
hops to the event loop); in-process generation runs it with the experts local.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from nextserve.model.moe import SparseMoeBlock
from nextserve.model.qwen3_next import Qwen3NextForCausalLM
from nextserve.model.sampling import Sampler, SamplingParams, sample_batch
from nextserve.model.state import ForwardBatch

from .cache_budget import PoolSizes, available_host_memory, block_bytes, parse_cache_memory, size_pools, slot_bytes
from .acceptance import SpeculativeConfig
from .overlap import ComputeBaton, cut_in_two, ping_pong
from .scheduler import ScheduledBatch
from .cache.layout import ModelLayout
from .snapshots import (SnapshotStore, apply_before_pass, checkpoints_inside, restore_remote, take_snapshots,
                        want_checkpoints)
from .speculative import SpeculativeDecoder

if TYPE_CHECKING:  # the in-process engine runs without gRPC
    from .shards import ShardPool


class RemoteExperts(nn.Module):
    """Stands where a MoE block's local `Experts` would: sends the routed tokens to the workers."""

    def __init__(self, pool: "ShardPool", layer: int):
        super().__init__()
        self.pool, self.layer = pool, layer

    def dispatch(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor):
        return self.pool.dispatch(self.layer, hidden, expert_ids, weights).result


def load_dense_model(checkpoint: str | Path, pool: "ShardPool", dtype="float32", device="cpu",
                     with_mtp: bool = False) -> Qwen3NextForCausalLM:
    """The model without a single routed-expert weight (expert_ids=[]), its experts served by `pool`;
    with_mtp: with the MTP head, its MoE layer's experts served as layer index num_hidden_layers."""
    model = Qwen3NextForCausalLM.from_pretrained(checkpoint, dtype=dtype, device=device, expert_ids=[],
                                                 with_mtp=with_mtp)
    layers = list(model.model.layers) + (list(model.mtp.layers) if model.mtp is not None else [])
    for i, layer in enumerate(layers):
        if isinstance(layer.mlp, SparseMoeBlock):
            layer.mlp.experts = RemoteExperts(pool, i)
    return model


def plan_cache(model: Qwen3NextForCausalLM, kv_cache_memory: str, max_seqs: int) -> PoolSizes:
    """Pool sizes for `--kv-cache-memory` (an amount, or a fraction of the memory free now on the
    model's device), with slots for up to `max_seqs` sequences."""
    device = model.lm_head.weight.device
    dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    spec = parse_cache_memory(kv_cache_memory)
    if isinstance(spec, float):
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_host_memory()
        spec = int(spec * free)
    extra = 1 if model.mtp is not None else 0
    return size_pools(spec, block_bytes(model.config, dtype, extra), slot_bytes(model.config, dtype), max_seqs)


class ModelRunner:
    def __init__(self, model: Qwen3NextForCausalLM, sizes: PoolSizes, ping_pong: ComputeBaton | None = None,
                 speculative: SpeculativeConfig | None = None):
        """ping_pong: the shard pool's baton, to run each step as two micro-batches that take turns
        (one computes while the other's tokens are at the workers); None: one forward pass per step.
        speculative: draft with the model's MTP head and verify (router/speculative.py); None: off."""
        if ping_pong is not None and speculative is not None:
            raise ValueError("speculative decoding runs each step as one pass: it does not combine with "
                             "ping-pong micro-batches")
        self.model = model
        self.device = model.lm_head.weight.device
        self.pools = model.allocate_pools(sizes.num_blocks, sizes.num_slots)
        self.samplers: dict[int, Sampler] = {}
        self.snapshots = SnapshotStore()  # the prefix cache's state snapshots (empty without one)
        self.layout = ModelLayout.from_config(model.config, str(model.lm_head.weight.dtype).removeprefix("torch."),
                                              with_mtp=model.mtp is not None)
        self.baton = ping_pong
        self._micro_batch_threads = ThreadPoolExecutor(2, thread_name_prefix="micro-batch") if ping_pong else None
        self.speculative = (SpeculativeDecoder(model, self.pools, speculative, self.device)
                            if speculative is not None else None)
        self.drafts: dict[int, list[int]] = {}  # what the last step proposed, for Scheduler.postprocess

    def add(self, seq_id: int, params: SamplingParams) -> None:
        self.samplers[seq_id] = Sampler(params, device=self.device)
        if self.speculative is not None:
            self.speculative.add(seq_id, params)

    def free(self, seq_id: int) -> None:
        self.samplers.pop(seq_id, None)
        if self.speculative is not None:
            self.speculative.free(seq_id)

    @torch.inference_mode()
    def step(self, batch: ScheduledBatch) -> dict[int, list[int]]:
        """Run the step's forward pass (as two micro-batches taking turns, with ping_pong); returns
        seq_id -> new tokens for the sequences that reached their end (one each, or with speculation
        the accepted drafts and one more; the next drafts are then in `self.drafts`)."""
        seqs = batch.seqs
        apply_before_pass(self.pools, self.snapshots, batch)
        for slot, table, hit in batch.remote_restores:
            restore_remote(self.pools, self.layout, slot, table, hit)
        fresh = [slot for s, slot in zip(seqs, batch.state_slots) if s.num_computed == 0]
        if fresh:  # admitted, or readmitted after a preemption: its DeltaNet state starts from zeros
            self.pools.zero_slots(torch.tensor(fresh, device=self.device))
        if self.speculative is not None:
            sampled, self.drafts = self.speculative.step(batch, self.samplers, self.snapshots)
            return sampled
        cut = cut_in_two(batch.num_new_tokens) if self.baton is not None else 0
        if cut:
            halves = [slice(0, cut), slice(cut, len(seqs))]
            logits = torch.cat(ping_pong(self.baton, self._micro_batch_threads,
                                         [partial(self._forward, batch, half) for half in halves]))
        else:
            logits = self._forward(batch, slice(0, len(seqs)))
        rows = [i for i, samples in enumerate(batch.samples()) if samples]
        if not rows:
            return {}
        tokens = sample_batch(logits[rows] if len(rows) < len(seqs) else logits,
                              [self.samplers[seqs[i].seq_id] for i in rows],
                              [(seqs[i].prompt_ids, seqs[i].output_ids) for i in rows])
        return {seqs[i].seq_id: [t] for i, t in zip(rows, tokens)}

    def _forward(self, batch: ScheduledBatch, part: slice) -> torch.Tensor:
        """Logits [len(part), V] of the last new token of each sequence in `part` of the batch; advances
        their states (each sequence owns its blocks and slot, so the two halves never touch the same memory)."""
        seqs, counts = batch.seqs[part], batch.num_new_tokens[part]
        ids = [t for s, n in zip(seqs, counts) for t in s.token_slice(n)]
        first = part.start
        due = [(i - first, p, key) for i, p, key in batch.snapshots if part.start <= i < part.stop]
        computed = [s.num_computed for s in seqs]
        inside = checkpoints_inside(due, computed, counts)
        forward = ForwardBatch.build(self.pools, computed, counts, batch.block_tables[part],
                                     batch.state_slots[part], self.device, record_checkpoints=inside)
        if inside:
            want_checkpoints(forward, due)
        logits, _ = self.model.forward_batch(torch.tensor(ids, dtype=torch.long, device=self.device), forward)
        take_snapshots(self.pools, self.snapshots, forward, due, computed, counts, batch.state_slots[part])
        return logits
