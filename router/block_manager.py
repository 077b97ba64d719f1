"""Accounting of the engine's two memories, on plain data (never imports torch).

Attention layers keep K/V in fixed BLOCK_SIZE-token blocks; a sequence owns a block table (its
blocks in order: token p lives in block table[p // BLOCK_SIZE] at offset p % BLOCK_SIZE). DeltaNet
layers keep a fixed-size state per sequence in one of a fixed number of state slots. The block
manager hands both out and takes them back; the model's pools are sized to its counts, so it can
never hand out memory the model does not have.

Blocks carry reference counts so that the prefix cache (router/prefix_cache.py, a subclass) can share
a block between sequences and keep freed blocks findable by content; here every block has one owner.
"""
from __future__ import annotations

import heapq
from collections import Counter, deque

from nextserve.kernels.paging import BLOCK_SIZE


class OutOfBlocks(Exception):
    """An allocation the caller should have checked with can_admit / can_grow (a scheduler bug)."""


def blocks_for(num_tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    caching = False  # no prefix cache: router/prefix_cache.py's CachingBlockManager adds one

    def __init__(self, num_blocks: int, num_slots: int, block_size: int = BLOCK_SIZE):
        if num_blocks < 1 or num_slots < 1 or block_size < 1:
            raise ValueError(f"need at least one block, one state slot and block_size >= 1; got {num_blocks} "
                             f"blocks, {num_slots} slots, block_size {block_size}")
        self.num_blocks, self.num_slots, self.block_size = num_blocks, num_slots, block_size
        self._free_blocks: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        # A min-heap: the lowest free slot first, so that sequences admitted together hold consecutive
        # slots and their decode batch updates the state pools through one view (ForwardBatch.slot_range)
        self._free_slots: list[int] = list(range(num_slots))
        self._tables: dict[int, list[int]] = {}
        self._slots: dict[int, int] = {}

    # -- queries --------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def holds(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def table(self, seq_id: int) -> list[int]:
        return self._tables[seq_id]

    def slot(self, seq_id: int) -> int:
        return self._slots[seq_id]

    def lookup(self, keys, token_ids, next_token=None) -> None:
        """A cached prefix of these chain keys: never, without a prefix cache."""
        return None

    def can_admit(self, num_tokens: int, hit=None) -> bool:
        """Is there a state slot and room for `num_tokens` tokens of K/V?"""
        return bool(self._free_slots) and blocks_for(num_tokens, self.block_size) <= len(self._free_blocks)

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        """Can the sequence's table cover `num_tokens` tokens in all?"""
        return self._missing(seq_id, num_tokens) <= len(self._free_blocks)

    # -- changes --------------------------------------------------------------------------------

    def admit(self, seq_id: int, num_tokens: int, hit=None) -> None:
        """Give a new sequence a state slot and blocks for its first `num_tokens` tokens."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already holds blocks")
        if not self.can_admit(num_tokens):
            raise OutOfBlocks(f"sequence {seq_id} needs {blocks_for(num_tokens, self.block_size)} blocks and a "
                              f"slot; {len(self._free_blocks)} blocks and {len(self._free_slots)} slots are free")
        self._tables[seq_id] = []
        self._slots[seq_id] = self._take_slot()
        self.grow(seq_id, num_tokens)

    def grow(self, seq_id: int, num_tokens: int) -> None:
        """Extend the sequence's table to cover `num_tokens` tokens in all (no-op when it already does)."""
        missing = self._missing(seq_id, num_tokens)
        if missing > len(self._free_blocks):
            raise OutOfBlocks(f"sequence {seq_id} needs {missing} more blocks; {len(self._free_blocks)} are free")
        table = self._tables[seq_id]
        for _ in range(missing):
            block = self._free_blocks.popleft()
            self._ref_counts[block] = 1
            table.append(block)

    def release(self, seq_id: int) -> None:
        """Return the sequence's slot and its references to its blocks (idempotent)."""
        table = self._tables.pop(seq_id, None)
        if table is None:
            return
        self._return_slot(self._slots.pop(seq_id))
        for block in reversed(table):  # the tail first: a later prefix cache evicts from the front of the free list
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free_blocks.append(block)

    def check(self) -> None:
        """Assert the books balance (tests call it after every step)."""
        owned = Counter(b for t in self._tables.values() for b in t)
        free = list(self._free_blocks)
        assert len(set(free)) == len(free), "a block is on the free list twice"
        assert not set(free) & owned.keys(), "a free block is also owned"
        assert len(owned) + len(free) == self.num_blocks, "blocks were lost or invented"
        wrong = [b for b in range(self.num_blocks) if self._ref_counts[b] != owned[b]]
        assert not wrong, f"blocks {wrong[:5]}: ref counts disagree with the tables"
        slots = list(self._slots.values())
        assert len(set(slots)) == len(slots) and not set(slots) & set(self._free_slots), "a slot is shared"
        assert len(slots) + len(self._free_slots) == self.num_slots, "slots were lost or invented"

    def _take_slot(self) -> int:
        return heapq.heappop(self._free_slots)

    def _return_slot(self, slot: int) -> None:
        heapq.heappush(self._free_slots, slot)

    def _missing(self, seq_id: int, num_tokens: int) -> int:
        return max(0, blocks_for(num_tokens, self.block_size) - len(self._tables[seq_id]))
