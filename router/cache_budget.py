"""Sizing the KV block pool and the DeltaNet state-slot pool from one memory budget (torch-free).

`--kv-cache-memory` is either an amount (`4GiB`, `512MiB`, `1e9`) or a fraction in (0, 1] of the memory
free on the device when the router starts (after its weights are loaded). A block holds BLOCK_SIZE
tokens of K and V for every attention layer (MTP's included); a state slot holds one sequence's conv
window and fp32 recurrent state for every DeltaNet layer. Slots are cheap next to a long context, so
the budget first gives every sequence that may run a slot (up to --max-running-requests), then the rest
to blocks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from nextserve.kernels.paging import BLOCK_SIZE

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_cache_memory(text: str) -> int | float:
    """"4GiB" -> 4294967296 (bytes, int); "0.5" -> 0.5 (fraction of free memory). Raises ValueError."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"--kv-cache-memory {text!r}: expected an amount such as 4GiB or 512MiB, or a fraction "
                         f"of free memory in (0, 1] such as 0.5")
    value = float(m.group(1))
    if not unit and value <= 1:
        if value <= 0:
            raise ValueError(f"--kv-cache-memory {text!r}: a fraction must be in (0, 1]")
        return value
    return int(value * _UNITS[unit])


@dataclass(frozen=True, slots=True)
class PoolSizes:
    num_blocks: int
    num_slots: int
    block_bytes: int
    slot_bytes: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * BLOCK_SIZE

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.block_bytes + self.num_slots * self.slot_bytes

    def describe(self) -> str:
        size = self.total_bytes
        amount = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
        return (f"KV cache {amount}: {self.num_blocks} blocks of {BLOCK_SIZE} tokens "
                f"({self.num_tokens} tokens) and {self.num_slots} DeltaNet state slots ({self.num_slots} sequences)")


def block_bytes(config, dtype: str, num_extra_attention_layers: int = 0) -> int:
    """Bytes of one BLOCK_SIZE-token KV block across every attention layer (+ MTP's)."""
    layers = sum(t == "full_attention" for t in config.layer_types) + num_extra_attention_layers
    return layers * 2 * BLOCK_SIZE * config.num_key_value_heads * config.head_dim * DTYPE_BYTES[dtype]


def slot_bytes(config, dtype: str) -> int:
    """Bytes of one sequence's DeltaNet memory: conv window (activation dtype) + recurrent state (fp32)."""
    layers = sum(t == "linear_attention" for t in config.layer_types)
    conv_dim = 2 * config.linear_num_key_heads * config.linear_key_head_dim + \
        config.linear_num_value_heads * config.linear_value_head_dim
    conv = conv_dim * (config.linear_conv_kernel_dim - 1) * DTYPE_BYTES[dtype]
    recurrent = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
    return layers * (conv + recurrent)


def size_pools(budget: int, block_bytes: int, slot_bytes: int, max_seqs: int) -> PoolSizes:
    """Slots for up to `max_seqs` sequences (each with at least one block), the rest of `budget` to blocks."""
    if max_seqs < 1:
        raise ValueError(f"need max_seqs >= 1, got {max_seqs}")
    num_slots = min(max_seqs, budget // (slot_bytes + block_bytes)) if slot_bytes else max_seqs
    num_blocks = (budget - num_slots * slot_bytes) // block_bytes if block_bytes else 0
    if num_slots < 1 or num_blocks < 1:
        raise ValueError(f"a KV cache budget of {budget} bytes holds no sequence: one needs a {slot_bytes}-byte "
                         f"state slot and a {block_bytes}-byte block of {BLOCK_SIZE} tokens")
    return PoolSizes(int(num_blocks), int(num_slots), block_bytes, slot_bytes)


def available_host_memory() -> int:
    """MemAvailable from /proc/meminfo (Linux), in bytes: the base of a fractional budget on CPU."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("MemAvailable not found in /proc/meminfo")
