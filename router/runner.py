"""The router's model: the dense weights in this process, the routed experts on the workers.

`ModelRunner` is the only router file that touches torch tensors of the model: it keeps each
sequence's state and sampler, and turns a `ScheduledBatch` into one forward pass and the sampled
tokens. It runs on its own thread; the expert dispatch inside the forward pass hops to the event loop.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
from torch import nn

from nextserve.model.moe import SparseMoeBlock
from nextserve.model.qwen3_next import Qwen3NextForCausalLM
from nextserve.model.sampling import Sampler, SamplingParams
from nextserve.model.state import ForwardBatch, SequenceState

from .overlap import ComputeBaton, cut_in_two, ping_pong
from .scheduler import ScheduledBatch
from .shards import ShardPool


class RemoteExperts(nn.Module):
    """Stands where a MoE block's local `Experts` would: sends the routed tokens to the workers."""

    def __init__(self, pool: ShardPool, layer: int):
        super().__init__()
        self.pool, self.layer = pool, layer

    def dispatch(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor):
        return self.pool.dispatch(self.layer, hidden, expert_ids, weights).result


def load_dense_model(checkpoint: str | Path, pool: ShardPool, dtype="float32", device="cpu") -> Qwen3NextForCausalLM:
    """The model without a single routed-expert weight (expert_ids=[]), its experts served by `pool`."""
    model = Qwen3NextForCausalLM.from_pretrained(checkpoint, dtype=dtype, device=device, expert_ids=[])
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, SparseMoeBlock):
            layer.mlp.experts = RemoteExperts(pool, i)
    return model


class ModelRunner:
    def __init__(self, model: Qwen3NextForCausalLM, ping_pong: ComputeBaton | None = None):
        """ping_pong: the shard pool's baton, to run each step as two micro-batches that take turns
        (one computes while the other's tokens are at the workers); None: one forward pass per step."""
        self.model = model
        self.device = model.lm_head.weight.device
        self.states: dict[int, SequenceState] = {}
        self.samplers: dict[int, Sampler] = {}
        self.baton = ping_pong
        self._micro_batch_threads = ThreadPoolExecutor(2, thread_name_prefix="micro-batch") if ping_pong else None

    def add(self, seq_id: int, params: SamplingParams) -> None:
        self.states[seq_id] = self.model.new_state()
        self.samplers[seq_id] = Sampler(params, device=self.device)

    def free(self, seq_id: int) -> None:
        self.states.pop(seq_id, None)
        self.samplers.pop(seq_id, None)

    @torch.inference_mode()
    def step(self, batch: ScheduledBatch) -> dict[int, int]:
        """Run the step's forward pass (as two micro-batches taking turns, with ping_pong); returns
        seq_id -> sampled token for the sequences that reached their end."""
        seqs = batch.seqs
        cut = cut_in_two(batch.num_new_tokens) if self.baton is not None else 0
        if cut:
            halves = [(seqs[:cut], batch.num_new_tokens[:cut]), (seqs[cut:], batch.num_new_tokens[cut:])]
            logits = torch.cat(ping_pong(self.baton, self._micro_batch_threads,
                                         [partial(self._forward, s, n) for s, n in halves]))
        else:
            logits = self._forward(seqs, batch.num_new_tokens)
        sampled = {}
        for row, (seq, samples) in enumerate(zip(seqs, batch.samples())):
            if samples:
                sampled[seq.seq_id] = self.samplers[seq.seq_id](logits[row], seq.prompt_ids, seq.output_ids)
        return sampled

    def _forward(self, seqs, num_new_tokens: list[int]) -> torch.Tensor:
        """Logits [len(seqs), V] of the last new token of each sequence; advances their states."""
        ids = [t for s, n in zip(seqs, num_new_tokens) for t in s.token_slice(n)]
        forward = ForwardBatch.build([self.states[s.seq_id] for s in seqs], num_new_tokens, self.device)
        logits, _ = self.model.forward_batch(torch.tensor(ids, dtype=torch.long, device=self.device), forward)
        return logits
