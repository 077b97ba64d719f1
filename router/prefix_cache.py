"""The local tier of the prefix cache: KV blocks and DeltaNet state snapshots found by content (torch-free).

A cache hit at position p needs both the attention K/V of tokens [0, p) and the DeltaNet state after
exactly p tokens. `CachingBlockManager` keeps the books of both; the tensors of a snapshot live with
the model runner (router/snapshots.py), which this module only names by key.

- Blocks: a block whose tokens are covered by a snapshot is registered under the chain key
  (router/cache/keys.py) of the prefix it ends (a full block [64i, 64i+64), or a partial tail
  [64i, p) of a key that ends off a block boundary). When its last sequence lets go it is not freed
  but kept, unreferenced, in least-recently-used order; allocation takes keyless free blocks first and
  evicts the least recently used cached block only when none is left. So the cache uses exactly the
  memory the budget gave the pools, and can never take a block from a running sequence.
- Sharing: a new sequence whose prompt starts with a cached prefix takes references to its full blocks
  (ref count > 0 while shared). A shared block is never written: a sequence writes only positions at
  or after the hit, which lie in blocks of its own. A partial tail block is copied into a fresh block
  of the new sequence instead (it will write the rest of that block).
- Snapshots: an index of keys with a state snapshot, least recently used first, bounded by
  `max_snapshots`; what it evicts is handed to the runner (`take_dropped`) to free the tensors.
- With the MTP head (`namespace.mtp`) a block's last row holds the head's keys for the pair (hidden
  state there, the token after it), and that next token lies outside the prefix the key names. So
  each cached key records the token its writer had there, and a hit at p needs the new sequence's
  token p to be that one: then its restored MTP rows equal what a cold run computes.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from .block_manager import BlockManager, OutOfBlocks, blocks_for
from .cache.keys import BlockKey, CacheNamespace, chain_keys, next_digest

# The router keeps up to this many state snapshots per state slot, on the model's device beside the
# pools (each costs one slot's bytes): enough for every running sequence's last prompt snapshot and
# the end of its previous turn.
SNAPSHOTS_PER_SLOT = 2


@dataclass(frozen=True, slots=True)
class LocalHit:
    """A cached prefix [0, position): its full blocks to share, a partial tail block to copy, its snapshot."""
    position: int
    shared_blocks: tuple[int, ...]
    partial: tuple[int, int] | None  # (block, rows valid) of a tail that ends off a block boundary
    snapshot: str                    # the key hex of the state snapshot at `position`


@dataclass(frozen=True, slots=True)
class BlockCopy:
    """Copy the first `rows` token rows of KV block `src` into block `dst` (every attention layer)."""
    src: int
    dst: int
    rows: int


@dataclass(slots=True)
class CacheStats:
    queries: int = 0
    hits: int = 0
    hit_tokens: int = 0
    evicted_blocks: int = 0
    evicted_snapshots: int = 0


class CachingBlockManager(BlockManager):
    """A BlockManager whose freed blocks stay findable by content, plus the index of state snapshots."""

    caching = True

    def __init__(self, num_blocks: int, num_slots: int, namespace: CacheNamespace, max_snapshots: int,
                 snapshot_interval: int = 1024):
        super().__init__(num_blocks, num_slots)
        if max_snapshots < 1:
            raise ValueError(f"the prefix cache needs room for at least one state snapshot, got {max_snapshots}")
        if snapshot_interval < self.block_size or snapshot_interval % self.block_size:
            raise ValueError(f"--cache-snapshot-interval must be a positive multiple of {self.block_size} tokens, "
                             f"got {snapshot_interval}")
        self.namespace, self.max_snapshots, self.snapshot_interval = namespace, max_snapshots, snapshot_interval
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, oldest first
        self._block_of: dict[str, tuple[int, int]] = {}          # key hex -> (block, rows valid)
        self._keys_of: dict[int, list[str]] = {}                 # block -> key hexes it holds
        self._snapshots: OrderedDict[str, int] = OrderedDict()   # key hex -> position, least recent first
        # Partial tails, by the digest they chain onto: a longer prompt's own chain never contains the key of
        # a tail that ended mid-block (the next turn of a conversation), so lookups try these too.
        self._partials: dict[bytes, dict[str, int]] = {}          # parent digest -> {key hex: tail tokens}
        self._partial_parent: dict[str, tuple[bytes, int]] = {}  # key hex -> (parent digest, tail tokens)
        self._next_token: dict[str, int] = {}                   # key hex -> token at its position (with MTP)
        self._dropped: list[str] = []
        self.pending_copies: list[BlockCopy] = []
        self.stats = CacheStats()

    # -- queries ---------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: keyless free ones and unreferenced cached ones."""
        return len(self._free_blocks) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._keys_of)

    @property
    def num_snapshots(self) -> int:
        return len(self._snapshots)

    def keys(self, token_ids: Sequence[int]) -> list[BlockKey]:
        """The chain keys of `token_ids`, with a partial tail (a prompt shorter than a block can hit)."""
        return chain_keys(self.namespace, token_ids, partial_tail=True)

    def cached_block(self, key_hex: str) -> tuple[int, int] | None:
        """(block, rows valid) holding the KV of a key's block, while it is cached."""
        return self._block_of.get(key_hex)

    def has_snapshot(self, key_hex: str) -> bool:
        return key_hex in self._snapshots

    def next_token(self, key_hex: str) -> int | None:
        """With MTP: the token after a cached key's prefix that its block's last MTP row was computed with."""
        return self._next_token.get(key_hex)

    def lookup(self, keys: Sequence[BlockKey], token_ids: Sequence[int], next_token: int | None = None) -> LocalHit | None:
        """The deepest prefix of `token_ids` (whose chain is `keys`) with every KV block cached and a
        snapshot at its end, or None. A prefix may end on a block boundary or inside a block (a cached
        partial tail that these tokens continue). next_token: the token after `token_ids`; with MTP a
        prefix ending at p is a hit only if the token at p is the one its last block was written with."""
        def follows(key_hex: str, position: int) -> bool:
            if not self.namespace.mtp:
                return True
            token = token_ids[position] if position < len(token_ids) else next_token
            return token is not None and self._next_token.get(key_hex) == token

        best = (0, 0, None)  # position, full blocks shared, key hex of the tail ending it (None: a full block)
        parent, bs = self.namespace.root, self.block_size
        for i in range(len(keys) + 1):
            start = i * bs
            for tail, q in sorted(self._partials.get(parent, {}).items(), key=lambda item: -item[1]):
                if best[0] < start + q <= len(token_ids) and tail in self._snapshots and follows(tail, start + q) and \
                        next_digest(parent, token_ids[start:start + q]).hex() == tail:
                    best = (start + q, i, tail)
                    break
            if i == len(keys):
                break
            key = keys[i]
            found = self._block_of.get(key.hex)
            if found is None or found[1] != key.num_tokens:
                break
            if key.hex in self._snapshots and key.position > best[0] and follows(key.hex, key.position):
                best = (key.position, i + 1, None) if key.is_full_block else (key.position, i, key.hex)
            if not key.is_full_block:
                break
            parent = key.digest
        position, num_full, tail = best
        if not position:
            return None
        full = tuple(self._block_of[k.hex][0] for k in keys[:num_full])
        if tail is None:
            return LocalHit(position, full, None, keys[num_full - 1].hex)
        return LocalHit(position, full, self._block_of[tail], tail)

    def can_admit(self, num_tokens: int, hit: LocalHit | None = None) -> bool:
        if not self._free_slots:
            return False
        shared = hit.shared_blocks if hit is not None else ()
        pinned = sum(1 for b in shared if b in self._evictable)  # leave the evictable set once shared
        return blocks_for(num_tokens, self.block_size) - len(shared) <= self.num_free_blocks - pinned

    # -- changes ---------------------------------------------------------------------------------

    def admit(self, seq_id: int, num_tokens: int, hit: LocalHit | None = None) -> None:
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already holds blocks")
        if not self.can_admit(num_tokens, hit):
            raise OutOfBlocks(f"sequence {seq_id} needs {blocks_for(num_tokens, self.block_size)} blocks and a slot; "
                              f"{self.num_free_blocks} blocks and {len(self._free_slots)} slots are free")
        self.stats.queries += 1
        table: list[int] = []
        self._tables[seq_id] = table
        self._slots[seq_id] = self._take_slot()
        if hit is not None:
            for block in hit.shared_blocks:
                self._evictable.pop(block, None)
                self._ref_counts[block] += 1
                table.append(block)
            self._snapshots.move_to_end(hit.snapshot)
            if hit.partial is not None:
                src, rows = hit.partial
                dst = self._take_block()
                self._ref_counts[dst] = 1
                table.append(dst)
                # Copied before the next forward pass, which is the first that may write `dst` or (if it
                # was evicted just now) `src`; copies run in the order they were planned.
                self.pending_copies.append(BlockCopy(src, dst, rows))
            self.stats.hits += 1
            self.stats.hit_tokens += hit.position
        self.grow(seq_id, num_tokens)

    def grow(self, seq_id: int, num_tokens: int) -> None:
        missing = self._missing(seq_id, num_tokens)
        if missing > self.num_free_blocks:
            raise OutOfBlocks(f"sequence {seq_id} needs {missing} more blocks; {self.num_free_blocks} are free")
        table = self._tables[seq_id]
        for _ in range(missing):
            block = self._take_block()
            self._ref_counts[block] = 1
            table.append(block)

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        return self._missing(seq_id, num_tokens) <= self.num_free_blocks

    def release(self, seq_id: int) -> None:
        table = self._tables.pop(seq_id, None)
        if table is None:
            return
        self._return_slot(self._slots.pop(seq_id))
        # Front blocks last: they are shared by the most prefixes, so they should be evicted last.
        for block in reversed(table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if block in self._keys_of:
                    self._evictable[block] = None
                else:
                    self._free_blocks.append(block)

    def register(self, seq_id: int, keys: Sequence[BlockKey], token_ids: Sequence[int] = ()) -> str | None:
        """Record that sequence `seq_id` holds the prefix of `keys` (its blocks, in table order) and has a
        state snapshot at the last key's position (the runner took it). Returns the snapshot's key hex.
        token_ids: with MTP, the sequence's tokens, at least one past the last key (see the module doc)."""
        if not keys:
            return None
        if self.namespace.mtp and len(token_ids) <= keys[-1].position:
            raise ValueError(f"with the MTP head a prefix is registered with the token after it: got "
                             f"{len(token_ids)} tokens for a prefix of {keys[-1].position}")
        table = self._tables[seq_id]
        for i, key in enumerate(keys):
            if key.hex in self._block_of:
                continue  # already cached (the shared blocks of a hit, or another sequence's equal prefix)
            block = table[i]
            self._block_of[key.hex] = (block, key.num_tokens)
            self._keys_of.setdefault(block, []).append(key.hex)
            if self.namespace.mtp:
                self._next_token[key.hex] = token_ids[key.position]
            if not key.is_full_block:
                parent = keys[i - 1].digest if i else self.namespace.root
                self._partials.setdefault(parent, {})[key.hex] = key.num_tokens
                self._partial_parent[key.hex] = (parent, key.num_tokens)
        end = keys[-1].hex
        self._snapshots[end] = keys[-1].position
        self._snapshots.move_to_end(end)
        while len(self._snapshots) > self.max_snapshots:
            old, _ = self._snapshots.popitem(last=False)
            self._dropped.append(old)
            self.stats.evicted_snapshots += 1
        return end

    def discard_snapshot(self, key_hex: str) -> None:
        """The runner took a snapshot that is not kept (its sequence went away): free its tensors."""
        if key_hex not in self._snapshots:
            self._dropped.append(key_hex)

    def take_dropped(self) -> list[str]:
        dropped, self._dropped = self._dropped, []
        return dropped

    def take_copies(self) -> list[BlockCopy]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def check(self) -> None:
        owned = Counter(b for t in self._tables.values() for b in t)
        free, evictable = list(self._free_blocks), list(self._evictable)
        assert len(set(free)) == len(free), "a block is on the free list twice"
        assert not set(free) & owned.keys(), "a free block is also owned"
        assert not set(evictable) & owned.keys(), "an evictable block is also owned"
        assert not set(free) & set(evictable), "a block is both free and cached"
        assert not set(free) & self._keys_of.keys(), "a free block still has keys"
        assert all(b in self._keys_of for b in evictable), "an evictable block has no key"
        assert len(owned) + len(free) + len(evictable) == self.num_blocks, "blocks were lost or invented"
        wrong = [b for b in range(self.num_blocks) if self._ref_counts[b] != owned[b]]
        assert not wrong, f"blocks {wrong[:5]}: ref counts disagree with the tables"
        for key, (block, _) in self._block_of.items():
            assert key in self._keys_of.get(block, ()), "the key index and the block index disagree"
        slots = list(self._slots.values())
        assert len(set(slots)) == len(slots) and not set(slots) & set(self._free_slots), "a slot is shared"
        assert len(slots) + len(self._free_slots) == self.num_slots, "slots were lost or invented"
        assert len(self._snapshots) <= self.max_snapshots, "more snapshots than the bound"

    def _take_block(self) -> int:
        if self._free_blocks:
            return self._free_blocks.popleft()
        if not self._evictable:
            raise OutOfBlocks("no free or cached block left")
        block, _ = self._evictable.popitem(last=False)
        for key in self._keys_of.pop(block):
            del self._block_of[key]
            self._next_token.pop(key, None)
            if key in self._partial_parent:
                parent, _ = self._partial_parent.pop(key)
                tails = self._partials[parent]
                del tails[key]
                if not tails:
                    del self._partials[parent]
        self.stats.evicted_blocks += 1
        return block
