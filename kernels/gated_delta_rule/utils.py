"""Shape checks shared by the torch reference and the Triton kernels of the gated delta rule."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_state_slots, num_sequences


@dataclass(frozen=True, slots=True)
class GDNShapes:
    """Sizes read off validated inputs. N is the number of sequences (B, or len(cu_seqlens) - 1)."""
    B: int
    T: int
    Hk: int
    Hv: int
    K: int
    V: int
    N: int


def check_gdn_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: tuple[torch.Tensor, ...],
                     gate_names: tuple[str, ...], initial_state: torch.Tensor | None,
                     cu_seqlens: torch.Tensor | None, state_slots: torch.Tensor | None = None) -> GDNShapes:
    """Validate the gated-delta-rule inputs and return their sizes; raise ValueError naming the bad shape.

    q, k: [B, T, Hk, K]; v: [B, T, Hv, V]; each gate: [B, T, Hv]; initial_state: [N, Hv, K, V], or
    with state_slots [N] the fp32 pool [S, Hv, K, V]; cu_seqlens: [N + 1] integer offsets starting
    at 0 (then B must be 1).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, T, H, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape [B, T, Hk, K]")
    B, T, Hk, K = k.shape
    if v.shape[:2] != (B, T):
        raise ValueError(f"v {tuple(v.shape)} must share [B, T] = {(B, T)} with k {tuple(k.shape)}")
    Hv, V = v.shape[2], v.shape[3]
    if Hv % Hk != 0:
        raise ValueError(f"value heads Hv={Hv} (v {tuple(v.shape)}) must be a multiple of key heads Hk={Hk} "
                         f"(k {tuple(k.shape)})")
    for name, t in zip(gate_names, gates):
        if tuple(t.shape) != (B, T, Hv):
            raise ValueError(f"{name} {tuple(t.shape)} must be [B, T, Hv] = {(B, T, Hv)}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T); got q "
                         f"{tuple(q.shape)}")
    N = num_sequences(cu_seqlens, default=B)
    if state_slots is not None:
        check_state_slots(state_slots, initial_state, N, (Hv, K, V), "initial_state")
        if initial_state.dtype != torch.float32:
            # the pool is updated in place, so it cannot be converted: it must already be fp32
            raise ValueError(f"the recurrent state pool must be fp32, got initial_state {initial_state.dtype}")
    elif initial_state is not None and tuple(initial_state.shape) != (N, Hv, K, V):
        raise ValueError(f"initial_state {tuple(initial_state.shape)} must be [N, Hv, K, V] = {(N, Hv, K, V)}")
    return GDNShapes(B=B, T=T, Hk=Hk, Hv=Hv, K=K, V=V, N=N)


def sequence_offsets(shapes: GDNShapes, cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Token offsets [N + 1] (int64) of each sequence in the flattened [B * T] token axis."""
    if cu_seqlens is not None:
        return cu_seqlens.to(device=device, dtype=torch.int64)
    return torch.arange(shapes.B + 1, device=device, dtype=torch.int64) * shapes.T
