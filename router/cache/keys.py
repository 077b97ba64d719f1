"""Content keys of the prefix cache: a hash chain over 64-token blocks (torch-free).

A key names the state of a sequence after its first `position` tokens, so two requests (or two router
replicas) that share a prefix compute the same keys without talking to each other:

    key_0 = H(namespace root || block 0 token ids),  key_i = H(key_{i-1} || block i token ids)

H is BLAKE2b (128-bit digests): stable across processes, machines and Python versions, unlike
Python's `hash`. The chain is rooted in the namespace: the checkpoint fingerprint (the same one the
router and its workers compare in their handshake), the serving dtype (the same weights in another
dtype compute other states) and the cache format version; with the MTP head (speculative decoding)
also that fact, since then every KV block holds the head's layer too. Another model, dtype, format or
layout therefore yields other keys everywhere, and a stale entry can never be found, let alone used.

Full blocks end at 64, 128, ...; `chain_keys(..., partial_tail=True)` also keys a last partial block
(its position is not a multiple of 64), so a prompt shorter than a block can still be cached.
"""
from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from nextserve.kernels.paging import BLOCK_SIZE

# The paged-KV block and DeltaNet chunk size: a full block's KV and the state recorded at a chunk
# boundary end at the same position, so every cache key can name both.
BLOCK_TOKENS = BLOCK_SIZE
CACHE_FORMAT_VERSION = 1
SERVING_DTYPES = ("float32", "bfloat16", "float16")
DIGEST_BYTES = 16
_MAX_TOKEN_ID = 2**32 - 1  # token ids are hashed as little-endian uint32


def _h(*chunks: bytes) -> bytes:
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for chunk in chunks:
        digest.update(chunk)
    return digest.digest()


@dataclass(frozen=True, slots=True)
class CacheNamespace:
    """Whose states a key may name: one checkpoint, served in one dtype, in one cache format."""
    fingerprint: str      # nextserve.worker.fingerprint.checkpoint_fingerprint(checkpoint)
    dtype: str            # the serving dtype: "float32", "bfloat16" or "float16" ("torch." prefix allowed)
    format_version: int = CACHE_FORMAT_VERSION
    mtp: bool = False     # the KV blocks hold the MTP head's attention layer (a router that speculates)

    def __post_init__(self):
        if not re.fullmatch(r"[0-9a-f]{8,64}", self.fingerprint):
            raise ValueError(f"cache namespace: fingerprint {self.fingerprint!r} is not a hex checkpoint "
                             f"fingerprint (nextserve.worker.fingerprint.checkpoint_fingerprint)")
        dtype = str(self.dtype).removeprefix("torch.")
        if dtype not in SERVING_DTYPES:
            raise ValueError(f"cache namespace: dtype {self.dtype!r} is not one of {', '.join(SERVING_DTYPES)}")
        object.__setattr__(self, "dtype", dtype)
        if not isinstance(self.format_version, int) or self.format_version < 1:
            raise ValueError(f"cache namespace: format_version must be a positive int, got {self.format_version!r}")

    @property
    def root(self) -> bytes:
        """The chain's parent of block 0."""
        layout = "\0mtp" if self.mtp else ""  # (without the head: the keys every cache had before)
        return _h(b"nextserve-cache\0", f"{self.format_version}\0{self.fingerprint}\0{self.dtype}{layout}".encode())

    @property
    def redis_prefix(self) -> str:
        """Readable Redis key prefix (the digests alone already separate namespaces): SCAN-able per model."""
        return f"nextserve:v{self.format_version}:{self.fingerprint}:{self.dtype}" + (":mtp" if self.mtp else "")


@dataclass(frozen=True, slots=True)
class BlockKey:
    """The key of tokens [0, position): the block [start, position) chained onto all blocks before it."""
    position: int
    digest: bytes

    @property
    def hex(self) -> str:
        return self.digest.hex()

    @property
    def start(self) -> int:
        return (self.position - 1) // BLOCK_TOKENS * BLOCK_TOKENS

    @property
    def num_tokens(self) -> int:
        """Tokens of the block itself: 64, or fewer for a partial tail."""
        return self.position - self.start

    @property
    def is_full_block(self) -> bool:
        return self.position % BLOCK_TOKENS == 0


def next_digest(parent: bytes, block: Sequence[int]) -> bytes:
    """The digest of `block` (1..64 token ids) chained onto `parent` (the namespace root or the previous key)."""
    if not 1 <= len(block) <= BLOCK_TOKENS:
        raise ValueError(f"a cache block holds 1..{BLOCK_TOKENS} tokens, got {len(block)}")
    for t in block:
        if not isinstance(t, int) or not 0 <= t <= _MAX_TOKEN_ID:
            raise ValueError(f"token id {t!r} is not an int in [0, 2**32)")
    # The count is hashed too: a partial tail never collides with a full block's encoding.
    return _h(parent, struct.pack(f"<I{len(block)}I", len(block), *block))


def chain_keys(namespace: CacheNamespace, token_ids: Sequence[int], *, partial_tail: bool = False) -> list[BlockKey]:
    """The keys of every full 64-token block of `token_ids` in order (positions 64, 128, ...), and with
    `partial_tail` one more for the trailing partial block when len(token_ids) is not a multiple of 64."""
    token_ids = list(token_ids)
    end = len(token_ids) if partial_tail else len(token_ids) // BLOCK_TOKENS * BLOCK_TOKENS
    keys, parent = [], namespace.root
    for start in range(0, end, BLOCK_TOKENS):
        block = token_ids[start:min(start + BLOCK_TOKENS, end)]
        parent = next_digest(parent, block)
        keys.append(BlockKey(start + len(block), parent))
    return keys
