"""The CPU path of the routed experts: naive.py's numerics in a handful of ops and no host sync.

naive.py groups the token slots by expert on the host and runs two matmuls per active expert:
five ops per expert, ~50 at a decode step's 8 experts of the small preset, and a `nonzero` and
a `.tolist()` to find the groups. At decode sizes that per-op overhead, not the arithmetic, is
the cost, so this module computes the same products in one of these forms:

- `gathered`: each token slot gathers its expert's weights (w13[ids], w2[ids]) and the slots run
  as one batched matmul of [1, H] x [H, 2I] products. Copies T*k experts' weights: cheap while
  T*k is small.
- `dense`: every local expert runs on every token ([T, H] x [H, E*2I], then a batched down
  projection over the experts) and each slot picks its expert's row. Reads each weight once but
  computes E/k times the products the tokens need: the better form once T*k approaches E.
- `grouped`: the slots sorted by expert into one zero-padded [E, width, H] batch (width: the
  busiest expert's slot count) and two batched matmuls over the experts. Reads every local
  expert's weights once, busy or idle, and computes width*E rows instead of the dense form's T*E:
  the prefill-sized form once there are at least as many slots as experts (most experts busy),
  while the padding stays small next to the per-expert loop's 5*E ops. One host sync (the width).
  Its sort, SwiGLU and weighted sum run as cpu_grouped.py's C++ ops where those were built.
- `fused` (cpu_fused.py, bf16): one C++ op reads each active expert's weight rows once, straight
  from w13 and w2, for all the slots routed to it: the decode form, up to a few dozen tokens.

Below one slot per local expert (an 80B-A3B decode step: 10 slots over 512 experts, whose weights
are too big to gather) the per-expert loop of naive.py is left. `expert_ffn` picks by shapes
only (never values), with the crossovers bench/kernels_moe.py measured.

Each form computes every (token, expert) product as its own row with the same bf16 roundings as
naive.py (gate/up product, SwiGLU, down product, then the fp32 weighted sum over the k slots in
slot order). Where the CPU's matmul of one row does not depend on how many rows run beside it (as
on the 2-core EPYC the benchmarks ran on) the forms agree with naive.py to the bit; the tests hold
them to the tolerance rule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cpu_extensions import needs_backward
from ..linear.cpu import batched as linear_batched
from ..linear.cpu import linear as cpu_linear
from . import cpu_fused, cpu_grouped, naive
from .naive import check_expert_ffn_args

__all__ = ["expert_ffn", "moe_route", "choose_form", "FORMS"]

moe_route = naive.moe_route  # softmax, top-k, renormalise: already four ops and no sync

# Crossovers measured by bench/kernels_moe.py (2 threads, bf16, small preset whole and split in two;
# docs/benchmarks.md says how to rerun it). The gathered form copies each slot's expert weights:
# fastest while the copies stay small and cover at most half the local experts. The dense form does
# E_local / k times the products the tokens need: fastest up to ~4 slots per expert, and only where
# that waste factor is the small preset's 8 or less (at 80B-A3B's 512 / 10 it never pays). The
# grouped form then wins as far as it was measured, 2048 slots per expert (a 2048-token batch of the
# small preset: 15 ms against the loop's 32 ms per layer; 8192 tokens: 50 against 106), so the loop
# is left for fewer slots than experts, where neither dense nor gathered pays. Measured with routing
# drawn afresh for every call, as serving sees it; timed on one fixed routing the loop looked better
# than it is, because its per-expert products then repeat their shapes. The 2-core AMD EPYC the
# dense crossover was first measured on favoured it up to ~16 slots per expert; the grouped form,
# measured on a 2-core Xeon (AMX), did not exist then.
# The fused kernel (cpu_fused.cpp, bf16 only, where it could be built) reads each active expert's
# weights once and beats every torch form up to 256 slots (small preset, per layer: batch 1 0.06 ms
# against gathered's 0.31, batch 16 0.52 against dense's 0.96, batch 32 0.80 against grouped's 0.98).
# With its sort, SwiGLU and sum in C++ (cpu_grouped.cpp) the grouped form is 2-4x faster: it ties the
# fused kernel at 192 slots (0.60 ms) and wins from 256 (0.65 against 0.73), and it beats the dense
# form wherever that one paid (fp32, batch 4: 0.68 against 1.09 ms; batch 32: 1.15 against 2.82).
FUSED_MAX_SLOTS = 192
GATHERED_MAX_BYTES = 8 * 2**20
DENSE_MAX_SLOTS_PER_EXPERT = 4
DENSE_MAX_WASTE = 8
GROUPED_MAX_SLOTS_PER_EXPERT = 2048


def choose_form(num_tokens: int, top_k: int, num_local_experts: int, expert_bytes: int,
                fused: bool = False, grouped_ops: bool = False) -> str:
    """"fused", "gathered", "dense", "grouped" or "loop" for T = num_tokens tokens of k slots each over
    E_local experts of expert_bytes each (w13 and w2 rows together); "fused" only where `fused` says
    the kernel can run (bf16, built); with `grouped_ops` (cpu_grouped.cpp built) the grouped form
    also takes the dense form's sizes."""
    slots = num_tokens * top_k
    if fused and slots <= FUSED_MAX_SLOTS:
        return "fused"
    if 2 * slots <= num_local_experts and slots * expert_bytes <= GATHERED_MAX_BYTES:
        return "gathered"
    dense_pays = (slots <= DENSE_MAX_SLOTS_PER_EXPERT * num_local_experts
                  and num_local_experts <= DENSE_MAX_WASTE * top_k)
    if dense_pays:
        return "grouped" if grouped_ops else "dense"
    if num_local_experts <= slots <= GROUPED_MAX_SLOTS_PER_EXPERT * num_local_experts:
        return "grouped"
    return "loop"


def _ids(expert_ids: torch.Tensor) -> torch.Tensor:
    """int64 ids with the slots of other shards (-1) reading expert 0; _weighted_sum drops them."""
    return (expert_ids if expert_ids.dtype == torch.int64 else expert_ids.long()).clamp(min=0)


# Tokens per pass of the weighted sum past which it runs in slices: its fp32 [rows, k, H] temporaries
# then stay in cache instead of streaming 32 MiB three times at a 2048-token prefill (~30% faster
# there, the same sums).
SUM_SLICE_TOKENS = 256


def _weighted_sum(per_slot: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                  out_dtype) -> torch.Tensor:
    """per_slot [T, k, H] (hidden dtype) -> sum_j w[t, j] * per_slot[t, j] in fp32, in slot order, the
    slots of other shards (-1) contributing an exact zero, as naive.py's zero rows do: their weight is
    zeroed (on [T, k], not on the [T, k, H] products) and their rows are finite (some expert's output
    or zeros), so each such product is 0."""
    weights = expert_weights if expert_weights.dtype == torch.float32 else expert_weights.float()
    weights = weights.masked_fill(expert_ids < 0, 0.0).unsqueeze(-1)
    T = per_slot.shape[0]
    if T <= SUM_SLICE_TOKENS:
        out = (per_slot.float() * weights).sum(1)
    else:
        out = per_slot.new_empty((T, per_slot.shape[2]), dtype=torch.float32)
        for start in range(0, T, SUM_SLICE_TOKENS):
            rows = slice(start, start + SUM_SLICE_TOKENS)
            torch.sum(per_slot[rows].float() * weights[rows], 1, out=out[rows])
    return out if out.dtype == out_dtype else out.to(out_dtype)


def gathered_expert_ffn(hidden, expert_ids, expert_weights, w13, w2, *, out_dtype=None):
    """The gathered form: one [1, H] x [H, 2I] and one [1, I] x [I, H] product per token slot."""
    check_expert_ffn_args(hidden, expert_ids, expert_weights, w13, w2)
    T, k = expert_ids.shape
    E, two_I, H = w13.shape
    ids = _ids(expert_ids).view(-1)                                        # [T*k]
    # index_select, not w13[ids]: advanced indexing copies the rows several times slower on the CPU
    w13_t = w13.index_select(0, ids).view(T, k, two_I, H).transpose(-1, -2)  # [T, k, H, 2I]
    w2_t = w2.index_select(0, ids).view(T, k, H, two_I // 2).transpose(-1, -2)
    gate, up = (hidden.view(T, 1, 1, H) @ w13_t).chunk(2, dim=-1)          # [T, k, 1, I] each
    down = (F.silu(gate) * up) @ w2_t                                      # [T, k, 1, H]
    return _weighted_sum(down.view(T, k, H), expert_ids, expert_weights, out_dtype or hidden.dtype)


def dense_expert_ffn(hidden, expert_ids, expert_weights, w13, w2, *, out_dtype=None):
    """The dense form: every local expert on every token, then each slot's expert picked."""
    check_expert_ffn_args(hidden, expert_ids, expert_weights, w13, w2)
    T, k = expert_ids.shape
    E, two_I, H = w13.shape
    # w13 as one [E * 2I, H] projection, in its kept oneDNN layout when the loader prepacked it
    gate, up = cpu_linear(hidden, w13).view(T, E, two_I).transpose(0, 1).chunk(2, dim=-1)  # [E, T, I]
    down = linear_batched(F.silu(gate) * up, w2)                         # [E, T, H]
    tokens = torch.arange(T, device=hidden.device).view(T, 1)
    return _weighted_sum(down[_ids(expert_ids), tokens], expert_ids, expert_weights, out_dtype or hidden.dtype)


def padded_width(busiest: int) -> int:
    """The grouped batch's width for a busiest expert of `busiest` slots: rounded up to a multiple of an
    eighth of its power of two (at most 12.5% more rows, eight widths per octave). oneDNN builds a
    primitive for every new bf16 bmm shape (~1.5 ms at a 2048-token batch, more than the padding
    costs), and the busiest expert's count changes with every batch; rounded, the widths recur."""
    step = max(1, (1 << (busiest.bit_length() - 1)) // 8)
    return -(-busiest // step) * step


def grouped_expert_ffn(hidden, expert_ids, expert_weights, w13, w2, *, out_dtype=None):
    """The grouped form: the slots sorted by expert into one zero-padded batch per expert."""
    check_expert_ffn_args(hidden, expert_ids, expert_weights, w13, w2)
    T, k = expert_ids.shape
    E, two_I, H = w13.shape
    if not needs_backward(hidden, expert_weights, w13, w2) and cpu_grouped.available():
        # the sort, SwiGLU and weighted sum in one C++ pass each, around the same two bmm calls
        ids = expert_ids if expert_ids.dtype == torch.int64 else expert_ids.long()
        counts = torch.bincount(ids.view(-1) + 1, minlength=E + 1)[1:]   # other shards' -1 counted apart
        busiest = int(counts.max())                                      # the one host sync
        if busiest == 0:
            return hidden.new_zeros((T, H), dtype=out_dtype or hidden.dtype)
        return cpu_grouped.expert_ffn(hidden, ids, expert_weights, w13, w2, padded_width(busiest),
                                      out_dtype=out_dtype)
    flat = _ids(expert_ids).view(-1)
    key = flat.masked_fill(expert_ids.view(-1) < 0, E)                    # other shards' slots sort last
    order = torch.argsort(key, stable=True)                                # slots grouped by expert
    counts = torch.bincount(key, minlength=E + 1)
    sorted_key = key.index_select(0, order)
    rank = torch.arange(key.numel(), device=key.device) - (counts.cumsum(0) - counts).index_select(0, sorted_key)
    busiest = int(counts[:E].max())                                        # the one host sync
    if busiest == 0:                                                       # no slot is this shard's
        return hidden.new_zeros((T, H), dtype=out_dtype or hidden.dtype)
    width = padded_width(busiest)
    # (expert, rank) -> token row; unused places read the zero row T, other shards' slots land in row E
    table = torch.full((E + 1, width + 1), T, dtype=torch.long, device=key.device)
    table[sorted_key, rank.clamp(max=width)] = order // k
    rows = torch.cat([hidden, hidden.new_zeros(1, H)]).index_select(0, table[:E, :width].reshape(-1))
    gate, up = linear_batched(rows.view(E, width, H), w13).chunk(2, dim=-1)  # [E, width, I]
    down = linear_batched(F.silu(gate) * up, w2)                          # [E, width, H]
    # back to slot order in one gather: slot s reads the row its (expert, rank) place holds; other
    # shards' slots read row 0, a finite row whose weight _weighted_sum zeroes
    place = torch.where(sorted_key < E, sorted_key * width + rank, 0)
    place_of_slot = torch.empty_like(place).index_copy_(0, order, place)
    per_slot = down.reshape(E * width, H).index_select(0, place_of_slot)
    return _weighted_sum(per_slot.view(T, k, H), expert_ids, expert_weights, out_dtype or hidden.dtype)


FORMS = {"fused": cpu_fused.expert_ffn, "gathered": gathered_expert_ffn, "dense": dense_expert_ffn,
         "grouped": grouped_expert_ffn, "loop": naive.expert_ffn}
BF16_ONLY = {"fused"}


def expert_ffn(hidden, expert_ids, expert_weights, w13, w2, *, out_dtype=None):
    """naive.expert_ffn's contract and numerics, in the form `choose_form` picks for these shapes.

    Unlike naive.py, ids past E_local are not checked here (that needs a host sync): an id >= E_local
    raises torch's index error instead of a ValueError naming it.
    """
    if expert_ids.dim() != 2 or w13.dim() != 3:
        check_expert_ffn_args(hidden, expert_ids, expert_weights, w13, w2)  # raises, naming the shape
    if w13.shape[0] == 0 or expert_ids.numel() == 0:
        return naive.expert_ffn(hidden, expert_ids, expert_weights, w13, w2, out_dtype=out_dtype)
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    inference = not needs_backward(hidden, expert_weights, w13, w2)
    fused = hidden.dtype == w13.dtype == w2.dtype == torch.bfloat16 and inference and cpu_fused.available()
    grouped_ops = inference and cpu_grouped.available()
    form = FORMS[choose_form(expert_ids.shape[0], expert_ids.shape[1], w13.shape[0], expert_bytes, fused,
                             grouped_ops)]
    return form(hidden, expert_ids, expert_weights, w13, w2, out_dtype=out_dtype)
