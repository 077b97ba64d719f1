"""What the model remembers between forward passes, and the batch metadata a pass runs on.

A hybrid model keeps two kinds of memory, both in pools allocated once:
- attention layers keep K/V in BLOCK_SIZE-token blocks, one pool per layer [num_blocks, 64, Hkv, D];
  a sequence's block table says which blocks hold its tokens, in order;
- Gated DeltaNet layers keep a fixed-size state per sequence, in one row (its state slot) of a conv
  window pool [S, conv_dim, kernel-1] (activation dtype) and a recurrent pool [S, Hv, K, V] (fp32).
Which blocks and slot a sequence uses is the block manager's business (router/block_manager.py);
`ForwardBatch` is all the layers see of it, built once per step, like nano-vllm's context.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from nextserve.kernels.paging import BLOCK_SIZE

from .config import Qwen3NextConfig


@dataclass
class LinearAttentionState:
    """One DeltaNet layer's state for one sequence (a checkpoint, or a copy read out of the pools)."""
    conv: torch.Tensor       # [conv_dim, kernel - 1]: the last kernel-1 conv inputs (vLLM's convention)
    recurrent: torch.Tensor  # [Hv, K, V] fp32

    def clone(self) -> "LinearAttentionState":
        return LinearAttentionState(self.conv.clone(), self.recurrent.clone())


class CachePools:
    """Every layer's memory for `num_blocks` KV blocks and `num_slots` DeltaNet state slots.

    Keys are decoder layer indices; the MTP head's attention layer is index num_hidden_layers.
    """

    def __init__(self, config: Qwen3NextConfig, num_blocks: int, num_slots: int, dtype: torch.dtype, device,
                 with_mtp: bool = False):
        self.num_blocks, self.num_slots = num_blocks, num_slots
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.recurrent: dict[int, torch.Tensor] = {}
        kv_shape = (num_blocks, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
        attention_layers = [i for i, t in enumerate(config.layer_types) if t == "full_attention"]
        # Allocated, not zeroed: a key is read only after it is written, and a state slot is zeroed when
        # it is given to a sequence (zero_slots). Filling gigabytes up front would touch every page.
        for i in attention_layers + ([config.num_hidden_layers] if with_mtp else []):
            self.kv[i] = (torch.empty(kv_shape, dtype=dtype, device=device),
                          torch.empty(kv_shape, dtype=dtype, device=device))
        for i, t in enumerate(config.layer_types):
            if t == "linear_attention":
                self.conv[i] = torch.empty(num_slots, config.linear_conv_dim, config.linear_conv_kernel_dim - 1,
                                           dtype=dtype, device=device)
                self.recurrent[i] = torch.empty(num_slots, config.linear_num_value_heads, config.linear_key_head_dim,
                                                config.linear_value_head_dim, dtype=torch.float32, device=device)
        self.num_layers = config.num_hidden_layers + (1 if with_mtp else 0)

    def zero_slots(self, slots: torch.Tensor) -> None:
        """Clear the DeltaNet state of newly assigned slots (a sequence starts from zeros)."""
        for pool in itertools.chain(self.conv.values(), self.recurrent.values()):
            pool.index_fill_(0, slots, 0)

    def read_state(self, slot: int) -> list[LinearAttentionState | None]:
        """A copy of one slot's state per decoder layer (None for attention layers)."""
        return [LinearAttentionState(self.conv[i][slot].clone(), self.recurrent[i][slot].clone())
                if i in self.conv else None for i in range(self.num_layers)]

    def write_state(self, slot: int, states: list[LinearAttentionState | None]) -> None:
        """Load a saved state (e.g. a chunk-boundary checkpoint) into a slot."""
        for i, s in enumerate(states):
            if s is not None:
                self.conv[i][slot].copy_(s.conv)
                self.recurrent[i][slot].copy_(s.recurrent)


def consecutive(slots: list[int]) -> range | None:
    """slots as a range if they are consecutive and ascending, else None."""
    first = slots[0]
    return range(first, first + len(slots)) if list(slots) == list(range(first, first + len(slots))) else None


@dataclass
class ForwardBatch:
    """Several sequences, each adding some new tokens, packed along one token axis.

    `checkpoints[n]`, when recording, maps an absolute position p of sequence n to the DeltaNet
    states right after p tokens ([per decoder layer: LinearAttentionState or None]), one at every
    full 64-token chunk of this pass; with the KV blocks of the first p tokens they resume the
    sequence without re-reading its history (what the prefix cache stores).
    """
    pools: CachePools
    seq_lens: list[int]          # host: new tokens per sequence
    context_lens: list[int]      # host: tokens each sequence already holds in the pools
    positions: torch.Tensor      # [T] int64 absolute position of each new token
    cu_seqlens: torch.Tensor     # [N + 1] int32 offsets of each sequence's new tokens
    slot_mapping: torch.Tensor   # [T] int64 where each new token's K/V goes: block * BLOCK_SIZE + offset
    block_tables: torch.Tensor   # [N, max_blocks] int32
    seq_lens_k: torch.Tensor     # [N] int32 keys per sequence, the new ones included
    state_slots: torch.Tensor    # [N] int64 each sequence's DeltaNet state slot
    record_checkpoints: bool = False
    checkpoints: list[dict[int, list[LinearAttentionState | None]]] = field(default_factory=list)
    # Speculative verification: the first `keep_states_rows` sequences keep their DeltaNet state after
    # every new token (layer index -> model.spec_states.TokenStates), so that the pass can be rolled
    # back to its last accepted token (`model.spec_states.keep_state_at`).
    keep_states_rows: int = 0
    token_states: dict = field(default_factory=dict)
    # When recording: per sequence, the positions to keep (None: every chunk boundary). Each kept one
    # is a copy of a whole state slot, so the prefix cache asks only for the ones it stores.
    keep_checkpoints: list[set[int]] | None = None
    # The state slots as a range when they are consecutive and ascending (a batch admitted together
    # usually is): the decode kernels then update those pool rows through one view (kernels/ops.py).
    slot_range: range | None = None

    @property
    def decode_state_slots(self) -> torch.Tensor | range:
        """What the decode kernels take as the state slots: the range when there is one."""
        return self.state_slots if self.slot_range is None else self.slot_range

    @classmethod
    def build(cls, pools: CachePools, context_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
              state_slots: list[int], device, record_checkpoints: bool = False,
              keep_states_rows: int = 0) -> "ForwardBatch":
        N = len(seq_lens)
        if not N or not len(context_lens) == len(block_tables) == len(state_slots) == N:
            raise ValueError(f"need one context length, block table and state slot per sequence; got {N} lengths, "
                             f"{len(context_lens)} contexts, {len(block_tables)} tables, {len(state_slots)} slots")
        if min(seq_lens) < 1:
            raise ValueError(f"every sequence must add at least one token, got lengths {seq_lens}")
        for n, (c, s, table) in enumerate(zip(context_lens, seq_lens, block_tables)):
            if c + s > len(table) * BLOCK_SIZE:
                raise ValueError(f"sequence {n} would hold {c + s} tokens; its {len(table)} blocks hold "
                                 f"{len(table) * BLOCK_SIZE}")
        # Built on the host in plain Python and handed over as two tensors (one per dtype), each field a
        # view of one of them: at decode sizes every torch op here would cost more than the arithmetic.
        positions = [c + i for c, s in zip(context_lens, seq_lens) for i in range(s)]
        slot_mapping = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                        for c, s, table in zip(context_lens, seq_lens, block_tables) for p in range(c, c + s)]
        width = max(len(t) for t in block_tables)
        tables = [b for t in block_tables for b in (*t, *[0] * (width - len(t)))]
        cu = list(itertools.accumulate(seq_lens, initial=0))
        seq_lens_k = [c + s for c, s in zip(context_lens, seq_lens)]
        T = len(positions)
        longs = torch.tensor(positions + slot_mapping + list(state_slots), dtype=torch.int64, device=device)
        ints = torch.tensor(cu + tables + seq_lens_k, dtype=torch.int32, device=device)
        positions_t, slot_mapping_t, state_slots_t = longs.split([T, T, N])
        cu_t, tables_t, seq_lens_k_t = ints.split([N + 1, N * width, N])
        return cls(pools, list(seq_lens), list(context_lens), positions_t, cu_t, slot_mapping_t,
                   tables_t.view(N, width), seq_lens_k_t, state_slots_t, record_checkpoints,
                   [{} for _ in range(N)] if record_checkpoints else [], keep_states_rows,
                   slot_range=consecutive(state_slots))

    @classmethod
    def one_token_each(cls, pools: CachePools, positions: list[int], block_tables: list[list[int]],
                       state_slots: torch.Tensor, device, tables: torch.Tensor | None = None) -> "ForwardBatch":
        """What `build` makes for one new token per sequence at absolute `positions` (context_lens =
        positions), from host lists in four small tensors: the MTP head's chained drafts run one such
        pass per draft. tables: `block_tables` already as the padded int32 tensor, if at hand."""
        for n, (p, table) in enumerate(zip(positions, block_tables)):
            if p >= len(table) * BLOCK_SIZE:
                raise ValueError(f"sequence {n} would hold {p + 1} tokens; its {len(table)} blocks hold "
                                 f"{len(table) * BLOCK_SIZE}")
        if tables is None:
            width = max(len(t) for t in block_tables)
            tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32).to(device)
        N = len(positions)
        slot_mapping = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p, table in zip(positions, block_tables)]
        return cls(pools, [1] * N, list(positions), torch.tensor(positions, device=device),
                   torch.arange(N + 1, dtype=torch.int32, device=device), torch.tensor(slot_mapping, device=device),
                   tables, torch.tensor([p + 1 for p in positions], dtype=torch.int32, device=device), state_slots)

    def prefix_of(self, rows: list[int], lengths: list[int]) -> "ForwardBatch":
        """The first lengths[i] new tokens of sequence rows[i] of this pass, as a pass of their own over
        the same blocks and slots (the MTP head's pass over what verification kept): this batch itself
        when that is all of it, else its tensors indexed, with no host-side rebuild."""
        if list(rows) == list(range(len(self.seq_lens))) and list(lengths) == self.seq_lens:
            return self
        spans = self.spans
        if any(not 1 <= n <= self.seq_lens[r] for r, n in zip(rows, lengths)):
            raise ValueError(f"prefix lengths {lengths} of rows {rows} must be in 1..{[self.seq_lens[r] for r in rows]}")
        device = self.positions.device
        picked = torch.tensor([i for r, n in zip(rows, lengths) for i in range(spans[r][0], spans[r][0] + n)],
                              device=device)
        context = [self.context_lens[r] for r in rows]
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
        seq_lens_k = torch.tensor([c + n for c, n in zip(context, lengths)], dtype=torch.int32, device=device)
        if list(rows) == list(range(len(self.seq_lens))):
            tables, slots = self.block_tables, self.state_slots
        else:
            index = torch.tensor(rows, device=device)
            tables, slots = self.block_tables[index], self.state_slots[index]
        return ForwardBatch(self.pools, list(lengths), context, self.positions[picked], cu,
                            self.slot_mapping[picked], tables, seq_lens_k, slots)

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


class StaticCache:
    """Pools for a fixed set of sequences, each given blocks for up to `max_tokens` tokens up front.

    What the transformers-shaped forward, tests and benchmarks use to run sequences without a
    scheduler; serving allocates through the block manager instead. `batch()` builds the next
    pass for some of the sequences and counts its tokens as held.
    """

    def __init__(self, model, num_seqs: int, max_tokens: int):
        per_seq = -(-max_tokens // BLOCK_SIZE)
        self.pools = model.allocate_pools(num_seqs * per_seq, num_seqs)
        self.device = model.lm_head.weight.device
        self.pools.zero_slots(torch.arange(num_seqs, device=self.device))
        self.tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(num_seqs)]
        self.lengths = [0] * num_seqs

    def batch(self, seqs: list[int], seq_lens: list[int], record_checkpoints: bool = False) -> ForwardBatch:
        batch = ForwardBatch.build(self.pools, [self.lengths[s] for s in seqs], seq_lens,
                                   [self.tables[s] for s in seqs], list(seqs), self.device, record_checkpoints)
        for s, n in zip(seqs, seq_lens):
            self.lengths[s] += n
        return batch

    def resume(self, dst: int, src: int, position: int, checkpoint: list[LinearAttentionState | None]) -> None:
        """Make sequence `dst` hold the first `position` (64-aligned) tokens of `src`: their KV blocks
        copied and the DeltaNet state of a checkpoint at `position` loaded into its slot."""
        if position % BLOCK_SIZE:
            raise ValueError(f"checkpoints sit at multiples of {BLOCK_SIZE} tokens, not at {position}")
        n = position // BLOCK_SIZE
        for k, v in self.pools.kv.values():
            for cache in (k, v):
                cache[self.tables[dst][:n]] = cache[self.tables[src][:n]]
        self.pools.write_state(dst, checkpoint)
        self.lengths[dst] = position
