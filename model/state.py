"""What the model remembers about a sequence between forward passes, and the batch a pass runs on.

A hybrid model keeps two kinds of memory: Gated DeltaNet layers keep a fixed-size conv window and a
recurrent state (constant in sequence length), attention layers keep a KV cache that grows.
`SequenceState` holds both for one sequence; `ForwardBatch` packs several sequences for one pass.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch


@dataclass
class LinearAttentionState:
    conv: torch.Tensor       # [conv_dim, kernel - 1]: the last kernel-1 conv inputs (vLLM's convention)
    recurrent: torch.Tensor  # [Hv, K, V] fp32

    def clone(self) -> "LinearAttentionState":
        return LinearAttentionState(self.conv.clone(), self.recurrent.clone())


@dataclass
class KVCache:
    """One attention layer's keys and values for one sequence, grown by doubling (amortised O(1) append)."""
    keys: torch.Tensor    # [capacity, Hkv, D]
    values: torch.Tensor  # [capacity, Hkv, D]
    length: int = 0

    @classmethod
    def empty(cls, num_kv_heads: int, head_dim: int, dtype, device, capacity: int = 64) -> "KVCache":
        shape = (capacity, num_kv_heads, head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        new_length = self.length + k.shape[0]
        if new_length > self.keys.shape[0]:
            capacity = max(new_length, 2 * self.keys.shape[0])
            for name in ("keys", "values"):
                old = getattr(self, name)
                grown = old.new_empty((capacity, *old.shape[1:]))
                grown[: self.length] = old[: self.length]
                setattr(self, name, grown)
        self.keys[self.length:new_length] = k
        self.values[self.length:new_length] = v
        self.length = new_length

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[: self.length], self.values[: self.length]

    def truncated(self, length: int) -> "KVCache":
        """A copy holding only the first `length` positions (to resume from an earlier checkpoint)."""
        return KVCache(self.keys[:length].clone(), self.values[:length].clone(), length)


LayerState = LinearAttentionState | KVCache | None


@dataclass
class SequenceState:
    """Everything the model keeps for one sequence: per-layer memory and how many tokens it has seen.

    `checkpoints` maps an absolute token position to the DeltaNet states right after that many
    tokens ([per decoder layer: LinearAttentionState or None]). Prefill records one at every
    64-token chunk boundary when asked: a prefix cache stores them, and together with the first
    `position` KV entries they resume the sequence without re-reading its history.
    """
    layers: list[LayerState]
    num_tokens: int = 0
    checkpoints: dict[int, list[LinearAttentionState | None]] = field(default_factory=dict)

    @classmethod
    def empty(cls, num_layers: int) -> "SequenceState":
        return cls([None] * num_layers)

    def clone(self) -> "SequenceState":
        layers = [None if s is None else (s.truncated(s.length) if isinstance(s, KVCache) else s.clone())
                  for s in self.layers]
        return SequenceState(layers, self.num_tokens, dict(self.checkpoints))

    def resume_from_checkpoint(self, position: int) -> "SequenceState":
        """The state after the first `position` tokens, rebuilt from a recorded checkpoint."""
        if position not in self.checkpoints:
            raise KeyError(f"no checkpoint at position {position}; have {sorted(self.checkpoints)}")
        saved = self.checkpoints[position]
        layers = [saved[i].clone() if isinstance(s, LinearAttentionState) else
                  (s.truncated(position) if isinstance(s, KVCache) else None)
                  for i, s in enumerate(self.layers)]
        return SequenceState(layers, position)


@dataclass
class ForwardBatch:
    """Several sequences, each adding some new tokens, packed along one token axis."""
    states: list[SequenceState]
    seq_lens: list[int]          # new tokens per sequence
    positions: torch.Tensor      # [T] int64 absolute position of each new token
    cu_seqlens: torch.Tensor     # [N + 1] int32 offsets of each sequence's new tokens
    record_checkpoints: bool = False

    @classmethod
    def build(cls, states: list[SequenceState], seq_lens: list[int], device,
              record_checkpoints: bool = False) -> "ForwardBatch":
        if len(states) != len(seq_lens) or not states:
            raise ValueError(f"need one length per sequence, got {len(states)} states and {len(seq_lens)} lengths")
        if min(seq_lens) < 1:
            raise ValueError(f"every sequence must add at least one token, got lengths {seq_lens}")
        positions = torch.cat([torch.arange(s.num_tokens, s.num_tokens + n) for s, n in zip(states, seq_lens)])
        cu = torch.tensor([0, *seq_lens], dtype=torch.int64).cumsum(0).to(torch.int32)
        return cls(states, list(seq_lens), positions.to(device), cu.to(device), record_checkpoints)

    @property
    def is_decode(self) -> bool:
        """One new token per sequence: the recurrent and rolling-window paths apply."""
        return max(self.seq_lens) == 1

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    @property
    def spans(self) -> list[tuple[int, int]]:
        """(start, end) of each sequence's new tokens along the packed axis, on the host: reading
        them from `cu_seqlens` would sync with the device once per sequence and layer."""
        ends = list(itertools.accumulate(self.seq_lens))
        return list(zip([0, *ends[:-1]], ends))

    def last_token_indices(self) -> torch.Tensor:
        return self.cu_seqlens[1:].long() - 1

    def finish(self) -> None:
        for state, n in zip(self.states, self.seq_lens):
            state.num_tokens += n
