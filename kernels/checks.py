"""Argument checks shared by the op families."""
from __future__ import annotations

import torch


def num_sequences(cu_seqlens: torch.Tensor | None, default: int) -> int:
    """N for packed sequences delimited by cu_seqlens [N + 1] (int32/int64); `default` without them.
    Raises ValueError naming what is wrong."""
    if cu_seqlens is None:
        return default
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens {tuple(cu_seqlens.shape)} must be 1-D [N + 1] with N >= 1")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    return cu_seqlens.numel() - 1


def check_state_slots(state_slots: torch.Tensor | range | None, pool: torch.Tensor | None, N: int,
                      state_shape: tuple[int, ...], pool_name: str) -> None:
    """Shapes of a slot-indexed state: pool [S, *state_shape] (any S) and state_slots [N] int32/int64
    on the pool's device, or a range of N consecutive slots. Sequence n reads and writes
    pool[state_slots[n]]. Checks shapes only (no host sync); `check_slot_values` checks the indices
    of a tensor.
    Raises ValueError naming what is wrong."""
    if state_slots is None:
        return
    if pool is None:
        raise ValueError(f"state_slots needs {pool_name}: the state pool [S, {', '.join(map(str, state_shape))}] "
                         f"the slots index")
    if isinstance(state_slots, range):
        check_slot_range(state_slots, pool, N)
    elif state_slots.dim() != 1 or state_slots.numel() != N:
        raise ValueError(f"state_slots {tuple(state_slots.shape)} must be [N] = ({N},), one slot per sequence")
    elif state_slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"state_slots must be int32 or int64, got {state_slots.dtype}")
    elif state_slots.device != pool.device:
        raise ValueError(f"state_slots on {state_slots.device} and {pool_name} on {pool.device} must share a device")
    if pool.dim() != 1 + len(state_shape) or tuple(pool.shape[1:]) != tuple(state_shape):
        raise ValueError(f"{pool_name} {tuple(pool.shape)} must be a pool [S, {', '.join(map(str, state_shape))}]")


def check_slot_range(state_slots: range, pool: torch.Tensor | None, N: int | None = None) -> None:
    """A range of consecutive slots (ForwardBatch.slot_range): its bounds are host values, so they are
    checked in full, for every kernel path (a tensor's values are not: that would sync)."""
    if (pool is None or state_slots.step != 1 or not 0 <= state_slots.start <= state_slots.stop <= len(pool)
            or (N is not None and len(state_slots) != N)):
        raise ValueError(f"state_slots {state_slots} must be {'' if N is None else f'N = {N} '}consecutive slots "
                         f"inside the pool's [0, {None if pool is None else len(pool)})")


def slot_tensor(state_slots, device) -> torch.Tensor | None:
    """state_slots as the int tensor the Triton and reference paths take (a range made one)."""
    if isinstance(state_slots, range):
        return torch.arange(state_slots.start, state_slots.stop, dtype=torch.int64, device=device)
    return state_slots


def check_slot_values(state_slots: torch.Tensor, num_slots: int) -> None:
    """Every slot in [0, num_slots) and no slot twice (two sequences writing one state would race).
    One host sync: the torch references call it, the Triton launchers do not."""
    slots = state_slots.tolist()
    bad = [s for s in slots if not 0 <= s < num_slots]
    if bad:
        raise ValueError(f"state_slots {slots}: {bad} outside the pool's [0, {num_slots})")
    if len(set(slots)) != len(slots):
        raise ValueError(f"state_slots {slots}: a slot appears twice")
