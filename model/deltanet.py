"""Gated DeltaNet: the linear-attention mixer of 3 in 4 Qwen3-Next layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nextserve.kernels import ops
from nextserve.kernels.paging import BLOCK_SIZE

from .config import Qwen3NextConfig
from .layers import GatedRMSNorm, Linear
from .packed import PackedRows
from .state import ForwardBatch, LinearAttentionState

CHUNK = BLOCK_SIZE  # the chunked delta rule's block: states at its boundaries come for free


class GatedDeltaNet(nn.Module):
    def __init__(self, config: Qwen3NextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_dim, self.value_dim = config.linear_key_dim, config.linear_value_dim
        self.conv_dim = config.linear_conv_dim
        self.kernel_size = config.linear_conv_kernel_dim
        h = config.hidden_size
        self.in_proj_qkvz = Linear(h, 2 * self.key_dim + 2 * self.value_dim)
        self.in_proj_ba = Linear(h, 2 * self.num_v_heads)
        self.in_proj = PackedRows(self.in_proj_qkvz, self.in_proj_ba)  # both read x: one matmul
        self._order: torch.Tensor | None = None
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel_size, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, config.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, h)

    def projection_order(self, device) -> torch.Tensor:
        """Column order that turns in_proj's output, interleaved per key-head group ([q | k | v | z] and
        [b | a] per group), into [q | k | v | z | b | a], each part head-major: the conv inputs are then
        the first conv_dim columns, and every part a view. Built lazily (not a buffer), so that a model
        materialised from the meta device gets it right."""
        if self._order is None or self._order.device != torch.device(device):
            K, r, V = self.head_k_dim, self.num_v_heads // self.num_k_heads, self.head_v_dim
            group = 2 * K + 2 * r * V
            parts = [(0, K), (K, K), (2 * K, r * V), (2 * K + r * V, r * V)]  # q, k, v, z within a group
            order = [g * group + start + i for start, size in parts for g in range(self.num_k_heads)
                     for i in range(size)]
            ba = self.num_k_heads * group
            order += [ba + g * 2 * r + start + i for start in (0, r) for g in range(self.num_k_heads) for i in range(r)]
            with torch.inference_mode(False):  # built in a decode step, it must also serve a training one
                self._order = torch.tensor(order, device=device)
        return self._order

    def prepack(self) -> bool:
        """Keep in_proj's rows in projection order in the CPU path's matmul layout: its product then
        comes out in that order, with no column gather per step."""
        with torch.no_grad():
            weight = self.in_proj.weight()
        ops.prepare_cpu_kernels(weight.device)  # the CPU path's C++ ops, built before any request
        return ops.prepack_linear(weight, row_order=self.projection_order(weight.device))

    def split_projections(self, x: torch.Tensor):
        """(conv inputs [T, conv_dim], z [T, Hv, V], b [T, Hv], a [T, Hv]) from one matmul of x."""
        T = x.shape[0]
        projected = ops.linear(x, self.in_proj.weight(), row_order=self.projection_order(x.device))
        conv_inputs, z, b, a = projected.split([self.conv_dim, self.value_dim, self.num_v_heads, self.num_v_heads],
                                               dim=-1)
        return conv_inputs, z.view(T, self.num_v_heads, self.head_v_dim), b, a

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # x: [T, hidden] packed over the batch's sequences; their states are rows of the layer's pools,
        # read and written in place by slot
        T = x.shape[0]
        conv_inputs, z, b, a = self.split_projections(x)
        m = batch.keep_states_rows
        if m == 0:
            decode = batch.is_decode
            o = self._mix(conv_inputs, a, b, batch, batch.cu_seqlens,
                          batch.decode_state_slots if decode else batch.state_slots, decode, 0)
        else:  # speculative verification: rows [0, m) keep every token's state; the others run as usual
            cut = batch.spans[m - 1][1]
            o = self._verify(conv_inputs[:cut], a[:cut], b[:cut], batch, m)
            if cut < T:
                rest = self._mix(conv_inputs[cut:], a[cut:], b[cut:], batch, batch.cu_seqlens[m:] - cut,
                                 batch.state_slots[m:], max(batch.seq_lens[m:]) == 1, m)
                o = torch.cat([o.flatten(0, 1), rest.flatten(0, 1)])  # [T, Hv, V]: rest may be laid out [N, 1]
        o = self.norm(o.reshape(T, self.num_v_heads, self.head_v_dim), z)
        return self.out_proj(o.reshape(T, self.value_dim))

    def _qkv(self, mixed: torch.Tensor, batch_rows: bool = False):
        """q, k [1, T, Hk, K] and v [1, T, Hv, V] (tokens packed), or [T, 1, ...] with batch_rows (one
        token per sequence)."""
        B, T = (mixed.shape[0], 1) if batch_rows else (1, mixed.shape[0])
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        return (q.reshape(B, T, self.num_k_heads, self.head_k_dim), k.reshape(B, T, self.num_k_heads, self.head_k_dim),
                v.reshape(B, T, self.num_v_heads, self.head_v_dim))

    def _mix(self, conv_inputs, a, b, batch: ForwardBatch, cu_seqlens, state_slots, decode: bool, first_row: int):
        """Conv + delta rule for rows [first_row, N) of the batch, states read and written by slot (when
        decoding, state_slots may be the batch's slot range)."""
        conv_weight = self.conv1d.weight.squeeze(1)  # [conv_dim, kernel]
        conv_pool = batch.pools.conv[self.layer_idx]            # [S, conv_dim, kernel - 1]
        recurrent_pool = batch.pools.recurrent[self.layer_idx]  # [S, Hv, K, V] fp32
        if decode:
            mixed = ops.causal_conv1d_update(conv_inputs, conv_pool, conv_weight, state_slots=state_slots)
        else:
            mixed, _ = ops.causal_conv1d(conv_inputs, conv_weight, initial_state=conv_pool,
                                         state_slots=state_slots, cu_seqlens=cu_seqlens)
        if decode:
            # one token per sequence: laid out [N, 1] rather than packed, so that no kernel needs the
            # sequences' lengths (cu_seqlens) to find them
            q, k, v = self._qkv(mixed, batch_rows=True)
            o, _, _ = ops.fused_recurrent_gated_delta_rule(
                q, k, v, a[:, None], b[:, None], self.A_log, self.dt_bias,
                initial_state=recurrent_pool, state_slots=state_slots)
        else:
            q, k, v = self._qkv(mixed)
            g, beta = ops.gdn_gating(a, b, self.A_log, self.dt_bias)
            o, _, chunk_states = ops.chunk_gated_delta_rule(
                q, k, v, g[None], beta[None], initial_state=recurrent_pool, cu_seqlens=cu_seqlens,
                output_chunk_states=batch.record_checkpoints, state_slots=state_slots)
            if chunk_states is not None:
                self._record_checkpoints(batch, conv_inputs, chunk_states, first_row)
        return o

    def _verify(self, conv_inputs, a, b, batch: ForwardBatch, m: int):
        """Rows [0, m): a few tokens each (the pending token and its drafts), token by token, keeping the
        recurrent state after every token and the conv window they started from (the window after
        token j is that window followed by the inputs up to j: nothing to store per token)."""
        from .spec_states import TokenStates  # the speculative decoder's view of this layer

        conv_weight = self.conv1d.weight.squeeze(1)
        conv_pool, recurrent_pool = batch.pools.conv[self.layer_idx], batch.pools.recurrent[self.layer_idx]
        slots = batch.state_slots[:m]
        start_windows = conv_pool.index_select(0, slots)  # a copy, taken before the conv rolls the pool
        T = batch.seq_lens[0]
        if all(n == T for n in batch.seq_lens[1:m]):
            # every row feeds k + 1 tokens (one k per step): T decode steps' kernels on an [m, T] layout,
            # the arithmetic of plain decoding token for token, with no packed-sequence bookkeeping
            decode_slots = slots if batch.slot_range is None else batch.slot_range[:m]
            mixed = ops.causal_conv1d_update_steps(conv_inputs.view(m, T, self.conv_dim), conv_pool, conv_weight,
                                                   state_slots=decode_slots)
            q, k, v = (x.view(m, T, *x.shape[2:]) for x in self._qkv(mixed.view(m * T, self.conv_dim)))
            o, _, all_states = ops.fused_recurrent_gated_delta_rule(
                q, k, v, a.view(m, T, -1), b.view(m, T, -1), self.A_log, self.dt_bias,
                initial_state=recurrent_pool, state_slots=decode_slots, output_all_states=True)
            batch.token_states[self.layer_idx] = TokenStates(start_windows, conv_inputs, all_states.flatten(0, 1))
            return o.view(1, m * T, *o.shape[2:])
        cu = batch.cu_seqlens[:m + 1]
        mixed, _ = ops.causal_conv1d(conv_inputs, conv_weight, initial_state=conv_pool, state_slots=slots,
                                     cu_seqlens=cu)
        q, k, v = self._qkv(mixed)
        o, _, all_states = ops.fused_recurrent_gated_delta_rule(
            q, k, v, a[None], b[None], self.A_log, self.dt_bias, initial_state=recurrent_pool, cu_seqlens=cu,
            state_slots=slots, output_all_states=True)
        batch.token_states[self.layer_idx] = TokenStates(start_windows, conv_inputs, all_states[0])
        return o

    def _record_checkpoints(self, batch: ForwardBatch, conv_inputs: torch.Tensor, chunk_states: torch.Tensor,
                            first_row: int = 0):
        """Keep the state after every full 64-token chunk: the recurrent state comes free from the
        chunked pass; the conv window is the kernel-1 inputs just before the boundary. `conv_inputs`
        holds rows [first_row, N)."""
        width, used = self.kernel_size - 1, 0
        num_layers = batch.pools.num_layers
        base = batch.spans[first_row][0]
        rows = slice(first_row, None)
        keep = batch.keep_checkpoints or [None] * len(batch.checkpoints)
        for saved, start, (offset, stop), wanted in zip(batch.checkpoints[rows], batch.context_lens[rows],
                                                         [(o - base, e - base) for o, e in batch.spans[rows]],
                                                         keep[rows]):
            for end in range(CHUNK, stop - offset + 1, CHUNK):
                if wanted is not None and start + end not in wanted:
                    used += 1
                    continue
                window = conv_inputs[offset + end - width: offset + end].t().contiguous()
                layers = saved.setdefault(start + end, [None] * num_layers)
                layers[self.layer_idx] = LinearAttentionState(window, chunk_states[used].clone())
                used += 1
