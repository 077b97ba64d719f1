"""Slot-indexed DeltaNet state: the conv and delta-rule ops reading and writing a per-layer pool by
slot equal the same ops on per-sequence states stacked for the call, on both kernel paths.

The slot path runs the same arithmetic as the stacked path (only the addresses of the states
differ), so outputs and states must agree bit for bit: no tolerance. Unused pool slots hold NaN
and must stay NaN, and every output must be finite, which proves that nothing outside the
batch's slots is read or written. That each path equals the other path (Triton vs torch) is
what test_conv.py and test_gated_delta_rule.py check.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from nextserve.kernels import ops

C, W = 40, 4                  # conv channels (awkward: a ragged channel block), kernel width
HK, HV, K, V = 1, 2, 24, 20   # more value heads than key heads, head dims that are not powers of two
NUM_SLOTS = 7

BACKENDS = [pytest.param("torch", id="torch"), pytest.param("cpu", id="cpu"), pytest.param("triton", id="triton")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("NEXTSERVE_KERNELS", request.param)
    return request.param


def cu_seqlens_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


class Pools:
    """One layer's state pools beside a dict of per-sequence reference states.

    Every call runs twice: on the pools by slot, and on the reference states stacked in batch
    order (the existing per-sequence form). `check` then compares pool rows with the references.
    """

    def __init__(self, dtype, seed):
        self.dtype = dtype
        self.gen = torch.Generator().manual_seed(seed)
        self.conv_weight = torch.randn(C, W, generator=self.gen).to(dtype)
        self.A_log = torch.rand(HV, generator=self.gen) * 2 - 1
        self.dt_bias = torch.randn(HV, generator=self.gen) * 0.5
        # never-assigned slots hold NaN: reading one would poison an output
        self.conv_pool = torch.full((NUM_SLOTS, C, W - 1), float("nan"), dtype=dtype)
        self.rec_pool = torch.full((NUM_SLOTS, HV, K, V), float("nan"), dtype=torch.float32)
        self.slot, self.conv_ref, self.rec_ref = {}, {}, {}

    def join(self, name, slot, *, warm=False):
        """A new sequence in `slot` (zeroed, as the engine does on assignment); warm: a random
        state instead, as if it had run before."""
        if warm:
            self.conv_pool[slot] = torch.randn(C, W - 1, generator=self.gen).to(self.dtype)
            self.rec_pool[slot] = torch.randn(HV, K, V, generator=self.gen)
        else:
            self.conv_pool[slot], self.rec_pool[slot] = 0, 0
        self.slot[name] = slot
        self.conv_ref[name], self.rec_ref[name] = self.conv_pool[slot].clone(), self.rec_pool[slot].clone()

    def leave(self, name):
        slot = self.slot.pop(name)
        del self.conv_ref[name], self.rec_ref[name]
        self.conv_pool[slot], self.rec_pool[slot] = float("nan"), float("nan")

    def _slots(self, names):
        return torch.tensor([self.slot[n] for n in names], dtype=torch.int32)

    def _inputs(self, T):
        x = torch.randn(T, C, generator=self.gen).to(self.dtype)
        q = torch.randn(1, T, HK, K, generator=self.gen).to(self.dtype)
        k = torch.randn(1, T, HK, K, generator=self.gen).to(self.dtype)
        v = torch.randn(1, T, HV, V, generator=self.gen).to(self.dtype)
        a = (torch.randn(1, T, HV, generator=self.gen) * 2).to(self.dtype)
        b = (torch.randn(1, T, HV, generator=self.gen) * 2).to(self.dtype)
        return x, q, k, v, a, b

    def prefill(self, names, lengths):
        """Chunked-prefill ops for `names` (fresh or continuing), packed in that order."""
        x, q, k, v, a, b = self._inputs(sum(lengths))
        cu, slots = cu_seqlens_of(lengths), self._slots(names)
        g, beta = ops.gdn_gating(a, b, self.A_log, self.dt_bias)

        y, no_conv_state = ops.causal_conv1d(x, self.conv_weight, initial_state=self.conv_pool, state_slots=slots,
                                             cu_seqlens=cu)
        o, no_state, chunk_states = ops.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=self.rec_pool,
                                                               state_slots=slots, cu_seqlens=cu,
                                                               output_chunk_states=True)
        assert no_conv_state is None and no_state is None

        y_ref, conv_final = ops.causal_conv1d(x, self.conv_weight, cu_seqlens=cu,
                                              initial_state=torch.stack([self.conv_ref[n] for n in names]))
        o_ref, rec_final, chunk_states_ref = ops.chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state=torch.stack([self.rec_ref[n] for n in names]), cu_seqlens=cu,
            output_chunk_states=True)
        self._keep(names, conv_final, rec_final)
        assert torch.equal(y, y_ref) and torch.equal(o, o_ref) and torch.equal(chunk_states, chunk_states_ref)
        assert torch.isfinite(y).all() and torch.isfinite(o).all()
        self.check()

    def decode(self, names):
        """One decode step for `names`, in that order (the recurrent op packed by cu_seqlens, as the model runs it)."""
        N = len(names)
        x, q, k, v, a, b = self._inputs(N)
        slots = self._slots(names)
        cu = cu_seqlens_of([1] * N)

        y = ops.causal_conv1d_update(x, self.conv_pool, self.conv_weight, state_slots=slots)
        o, no_state, all_states = ops.fused_recurrent_gated_delta_rule(
            q, k, v, a, b, self.A_log, self.dt_bias, initial_state=self.rec_pool, state_slots=slots, cu_seqlens=cu,
            output_all_states=True)
        assert no_state is None

        conv_state = torch.stack([self.conv_ref[n] for n in names])
        y_ref = ops.causal_conv1d_update(x, conv_state, self.conv_weight)  # rolls conv_state
        o_ref, rec_final, all_states_ref = ops.fused_recurrent_gated_delta_rule(
            q, k, v, a, b, self.A_log, self.dt_bias, initial_state=torch.stack([self.rec_ref[n] for n in names]),
            cu_seqlens=cu, output_all_states=True)
        self._keep(names, conv_state, rec_final)
        assert torch.equal(y, y_ref) and torch.equal(o, o_ref) and torch.equal(all_states, all_states_ref)
        assert torch.isfinite(y).all() and torch.isfinite(o).all()
        self.check()

    def decode_rows(self, names, *, as_range=False):
        """One decode step laid out as the model runs it without cu_seqlens: one row per sequence
        ([N, 1] tokens), the slots a tensor or (as_range, for names holding consecutive ascending
        slots) the range ForwardBatch.slot_range would hand the kernels."""
        N = len(names)
        x, q, k, v, a, b = self._inputs(N)
        q, k, v, a, b = (t.transpose(0, 1) for t in (q, k, v, a, b))  # [N, 1, ...]
        slots = self._slots(names)
        if as_range:
            first = int(slots[0])
            assert slots.tolist() == list(range(first, first + N)), "as_range needs consecutive slots"
            slots = range(first, first + N)

        y = ops.causal_conv1d_update(x, self.conv_pool, self.conv_weight, state_slots=slots)
        o, no_state, _ = ops.fused_recurrent_gated_delta_rule(
            q, k, v, a, b, self.A_log, self.dt_bias, initial_state=self.rec_pool, state_slots=slots)
        assert no_state is None

        conv_state = torch.stack([self.conv_ref[n] for n in names])
        y_ref = ops.causal_conv1d_update(x, conv_state, self.conv_weight)
        o_ref, rec_final, _ = ops.fused_recurrent_gated_delta_rule(
            q, k, v, a, b, self.A_log, self.dt_bias, initial_state=torch.stack([self.rec_ref[n] for n in names]))
        self._keep(names, conv_state, rec_final)
        assert torch.equal(y, y_ref) and torch.equal(o, o_ref)
        assert torch.isfinite(y).all() and torch.isfinite(o).all()
        self.check()

    def _keep(self, names, conv_states, rec_states):
        for i, n in enumerate(names):
            self.conv_ref[n], self.rec_ref[n] = conv_states[i].clone(), rec_states[i].clone()

    def check(self):
        for n, s in self.slot.items():
            assert torch.equal(self.conv_pool[s], self.conv_ref[n]), f"conv state of {n} (slot {s})"
            assert torch.equal(self.rec_pool[s], self.rec_ref[n]), f"recurrent state of {n} (slot {s})"
        unused = sorted(set(range(NUM_SLOTS)) - set(self.slot.values()))
        assert torch.isnan(self.conv_pool[unused]).all() and torch.isnan(self.rec_pool[unused]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_and_decode_while_sequences_join_and_leave(backend, dtype):
    pools = Pools(dtype, seed=1)
    for name, slot in (("a", 4), ("b", 0), ("c", 2)):
        pools.join(name, slot)
    # lengths across the 64-token chunk and shorter than the conv window
    pools.prefill(["a", "b", "c"], [70, 5, 1])
    pools.decode(["a", "b", "c"])
    pools.decode(["c", "a", "b"])
    pools.leave("b")
    pools.join("d", 0)   # b's slot, reused
    # d's fresh prefill packed with a's chunked-prefill continuation (2 tokens: shorter than the window)
    pools.prefill(["d", "a"], [66, 2])
    pools.decode(["d", "c", "a"])
    pools.join("e", 5, warm=True)
    pools.decode(["a", "e", "d", "c"])
    pools.leave("a")
    pools.decode(["e", "c", "d"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_rows_by_slot_tensor_or_consecutive_range(backend, dtype):
    pools = Pools(dtype, seed=3)
    for name, slot in (("a", 2), ("b", 3), ("c", 4), ("d", 0)):
        pools.join(name, slot, warm=name != "b")
    pools.decode_rows(["a", "b", "c"], as_range=True)   # slots 2..4: the pool rows through one view
    pools.decode_rows(["c", "a", "d"])                  # any order: by tensor
    pools.decode_rows(["b", "c"], as_range=True)
    pools.leave("b")
    pools.decode_rows(["a", "c", "d"])                  # a hole at slot 3
    pools.decode_rows(["d"], as_range=True)
    x = torch.randn(3, C).to(dtype)
    with pytest.raises(ValueError, match="consecutive slots inside the pool"):
        ops.causal_conv1d_update(x, pools.conv_pool, pools.conv_weight, state_slots=range(5, 8))


def test_prefill_slots_in_any_order_with_warm_states(backend):
    pools = Pools(torch.float32, seed=2)
    for name, slot in (("a", 6), ("b", 1), ("c", 3), ("d", 0)):
        pools.join(name, slot, warm=True)
    pools.prefill(["b", "d", "a", "c"], [64, 3, 129, 2])


def test_reference_rejects_bad_slots(monkeypatch):
    monkeypatch.setenv("NEXTSERVE_KERNELS", "torch")
    x, w = torch.randn(3, C), torch.randn(C, W)
    pool = torch.zeros(NUM_SLOTS, C, W - 1)
    cu = cu_seqlens_of([2, 1])
    with pytest.raises(ValueError, match="appears twice"):
        ops.causal_conv1d(x, w, initial_state=pool, state_slots=torch.tensor([1, 1]), cu_seqlens=cu)
    with pytest.raises(ValueError, match="outside"):
        ops.causal_conv1d_update(x[:2], pool, w, state_slots=torch.tensor([0, NUM_SLOTS]))
    with pytest.raises(ValueError, match=r"must be \[N\]"):
        ops.causal_conv1d(x, w, initial_state=pool, state_slots=torch.tensor([1]), cu_seqlens=cu)
    with pytest.raises(ValueError, match="needs initial_state"):
        ops.causal_conv1d(x, w, state_slots=torch.tensor([0, 1]), cu_seqlens=cu)
    q = torch.randn(1, 3, HK, K)
    v, g = torch.randn(1, 3, HV, V), -torch.rand(1, 3, HV)
    with pytest.raises(ValueError, match="must be fp32"):
        ops.chunk_gated_delta_rule(q, q, v, g, g.neg(), initial_state=torch.zeros(NUM_SLOTS, HV, K, V).bfloat16(),
                                   state_slots=torch.tensor([0, 1]), cu_seqlens=cu)
    with pytest.raises(ValueError, match="pool"):
        ops.chunk_gated_delta_rule(q, q, v, g, g.neg(), initial_state=torch.zeros(NUM_SLOTS, HV, K, 2 * V),
                                   state_slots=torch.tensor([0, 1]), cu_seqlens=cu)


def test_triton_rejects_a_pool_it_cannot_update_in_place(monkeypatch):
    monkeypatch.setenv("NEXTSERVE_KERNELS", "triton")
    q = torch.randn(1, 3, HK, K)
    v, a = torch.randn(1, 3, HV, V), torch.randn(1, 3, HV)
    strided_pool = torch.zeros(NUM_SLOTS, HV, V, K).transpose(2, 3)
    with pytest.raises(ValueError, match="contiguous"):
        ops.fused_recurrent_gated_delta_rule(q, q, v, a, a, torch.zeros(HV), torch.zeros(HV),
                                             initial_state=strided_pool, state_slots=torch.tensor([2, 0]),
                                             cu_seqlens=cu_seqlens_of([2, 1]))
