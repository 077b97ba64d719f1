"""The tensors of the local prefix cache's DeltaNet state snapshots, by key (the runner's side).

Which snapshots exist is the block manager's business (router/prefix_cache.py, torch-free); the
runner keeps their tensors here, on the model's device so that a restore is a device copy, and
does what each batch asks in this order: take the states of sequences that ended (their slots are
about to be reused), free evicted snapshots, copy partial tail blocks, load restored slots; after
the pass, keep the snapshots the pass reached.

Bound: the manager keeps at most `max_snapshots` (LRU); each costs one state slot's bytes
(`cache_budget.slot_bytes`), so the store never holds more than max_snapshots x slot_bytes.
"""
from __future__ import annotations

from nextserve.model.state import CachePools, ForwardBatch, LinearAttentionState

from .cache.layout import ModelLayout

State = list[LinearAttentionState | None]


class SnapshotStore:
    def __init__(self):
        self._states: dict[str, State] = {}

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: str) -> bool:
        return key in self._states

    def put(self, key: str, state: State) -> None:
        self._states[key] = state

    def drop(self, key: str) -> None:
        self._states.pop(key, None)

    def peek(self, key: str) -> State | None:
        return self._states.get(key)

    def get(self, key: str) -> State:
        try:
            return self._states[key]
        except KeyError:
            raise RuntimeError(f"the prefix cache restores snapshot {key} that the runner never took (a bug)") from None


def copy_block_rows(pools: CachePools, src: int, dst: int, rows: int) -> None:
    """KV of the first `rows` tokens of block `src` into block `dst`, in every attention layer."""
    if src == dst:
        return
    for k, v in pools.kv.values():
        k[dst, :rows] = k[src, :rows]
        v[dst, :rows] = v[src, :rows]


def apply_before_pass(pools: CachePools, store: SnapshotStore, batch) -> None:
    """The prefix cache's work that must happen before the batch's forward pass (see the module doc)."""
    for slot, key in batch.end_snapshots:
        store.put(key, pools.read_state(slot))
    for key in batch.dropped:
        store.drop(key)
    for copy in batch.copies:
        copy_block_rows(pools, copy.src, copy.dst, copy.rows)
    for slot, key in batch.restores:
        pools.write_state(slot, store.get(key))


def checkpoints_inside(due, num_computed: list[int], counts: list[int]) -> bool:
    """Does a snapshot of `due` ((row, position, key) of this pass) lie inside its row's chunk, so that
    the pass must record the chunked prefill's checkpoints (one at the chunk's end is the slot itself)?"""
    return any(p < num_computed[i] + counts[i] for i, p, _ in due)


def want_checkpoints(forward: ForwardBatch, due) -> None:
    """Keep only the checkpoints of a recording pass that `due` asks for."""
    forward.keep_checkpoints = [set() for _ in forward.seq_lens]
    for i, p, _ in due:
        forward.keep_checkpoints[i].add(p)


def take_snapshots(pools: CachePools, store: SnapshotStore, forward: ForwardBatch, due, num_computed: list[int],
                   counts: list[int], slots: list[int]) -> None:
    """After the pass: put the state after p tokens of each (row, p, key) of `due` in the store, from
    the slot when the row's chunk ends there, else from the pass's checkpoints. The rows' slots must
    hold their final state (a verified row's rollback done)."""
    for i, p, key in due:
        at_end = p == num_computed[i] + counts[i]
        store.put(key.hex, pools.read_state(slots[i]) if at_end else forward.checkpoints[i][p])


def restore_remote(pools: CachePools, layout: ModelLayout, slot: int, table: list[int], hit) -> None:
    """Write a Redis hit (router/cache/redis_tier.py `Lookup`) into a sequence's own blocks, in table
    order, and its state slot."""
    for j, block in enumerate(hit.kv_blocks):
        for i in layout.attention_layers:
            k, v = pools.kv[i]
            key, value = block[f"layers.{i}.key"], block[f"layers.{i}.value"]
            k[table[j], :key.shape[0]] = key.to(k.device)
            v[table[j], :value.shape[0]] = value.to(v.device)
    states = [LinearAttentionState(hit.state[f"layers.{i}.conv"].to(pools.conv[i].device),
                                   hit.state[f"layers.{i}.recurrent"].to(pools.recurrent[i].device))
              if i in pools.conv else None for i in range(pools.num_layers)]
    pools.write_state(slot, states)
