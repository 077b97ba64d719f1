"""Session records: per session id, the token history and where its latest state checkpoint is.

A turn on a session reads the record, runs, and writes the extended record back. Two turns at once on
one session would interleave its history, so a turn holds the session: `begin` takes a lease (the
second concurrent `begin` raises SessionBusy, which the gRPC layer maps to ABORTED) and `commit`
writes the new record only while that lease is still the session's (compare-and-set on its token).
A lease expires by itself (`lease_seconds`), so a router that dies mid-turn never locks a session forever.

The checkpoint is a pointer into the prefix cache (position and chain-key hex), not a copy: the cache
verifies it like any other lookup, and after a model update (another fingerprint) it simply misses and
the history is recomputed from `token_ids`.

`InMemorySessionStore` (this module; bounded, LRU + TTL) is the embedded default; `RedisSessionStore`
(redis_sessions.py) has the same interface and lets any router replica continue a session.
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

_SESSION_ID = re.compile(r"[A-Za-z0-9._:\-]{1,256}")
_RECORD_MAGIC = b"NXSR1"


class SessionBusy(Exception):
    """Another turn holds the session (gRPC ABORTED): retry when it has finished."""


class SessionStoreUnavailable(Exception):
    """The shared session store cannot be reached (gRPC UNAVAILABLE): the session's history is unknown."""


def check_session_id(session_id: str) -> str:
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise ValueError(f"session id {session_id!r}: expected 1 to 256 characters from A-Z a-z 0-9 . _ : -")
    return session_id


@dataclass(frozen=True, slots=True)
class SessionRecord:
    session_id: str
    token_ids: tuple[int, ...]            # the whole conversation so far, as the model saw it
    checkpoint_position: int = 0          # a state snapshot of tokens [0, p) was submitted to the cache (0: none)
    checkpoint_key: str | None = None     # BlockKey.hex of that snapshot's chain key
    metadata: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable extras (e.g. a stored response)

    def __post_init__(self):
        check_session_id(self.session_id)
        object.__setattr__(self, "token_ids", tuple(self.token_ids))
        if not 0 <= self.checkpoint_position <= len(self.token_ids):
            raise ValueError(f"session {self.session_id}: checkpoint position {self.checkpoint_position} outside "
                             f"its {len(self.token_ids)} tokens")
        if (self.checkpoint_key is None) != (self.checkpoint_position == 0):
            raise ValueError(f"session {self.session_id}: a checkpoint needs both a position > 0 and a key")

    def to_bytes(self) -> bytes:
        header = json.dumps({"session_id": self.session_id, "checkpoint_position": self.checkpoint_position,
                             "checkpoint_key": self.checkpoint_key, "metadata": self.metadata,
                             "num_tokens": len(self.token_ids)}, sort_keys=True, separators=(",", ":")).encode()
        body = struct.pack(f"<I{len(self.token_ids)}I", len(header), *self.token_ids) + header
        return _RECORD_MAGIC + hashlib.blake2b(body, digest_size=16).digest() + body

    @classmethod
    def from_bytes(cls, raw: bytes) -> "SessionRecord":
        """Raises ValueError on anything that is not an intact record (the caller treats it as absent)."""
        if raw[:len(_RECORD_MAGIC)] != _RECORD_MAGIC:
            raise ValueError("not a session record")
        digest, body = raw[len(_RECORD_MAGIC):len(_RECORD_MAGIC) + 16], raw[len(_RECORD_MAGIC) + 16:]
        if hashlib.blake2b(body, digest_size=16).digest() != digest:
            raise ValueError("session record checksum mismatch")
        (header_len,) = struct.unpack_from("<I", body)
        header = json.loads(body[len(body) - header_len:])
        n = header["num_tokens"]
        if 4 + 4 * n + header_len != len(body):
            raise ValueError("session record length mismatch")
        tokens = struct.unpack_from(f"<{n}I", body, 4)
        return cls(header["session_id"], tokens, header["checkpoint_position"], header["checkpoint_key"],
                   header["metadata"])


@dataclass(slots=True)
class Turn:
    """A held session: `record` is what was stored when the turn began (None for a new session)."""
    session_id: str
    token: str
    record: SessionRecord | None
    done: bool = False


class SessionStore(Protocol):
    async def get(self, session_id: str) -> SessionRecord | None:
        """The record (its TTL refreshed), or None when unknown or expired."""

    async def put(self, record: SessionRecord) -> None:
        """Store unconditionally (a new id nobody else writes, e.g. a Responses API response id)."""

    async def delete(self, session_id: str) -> bool:
        """True when it was there."""

    async def begin(self, session_id: str) -> Turn:
        """Hold the session for one turn. Raises SessionBusy when another turn holds it."""

    async def commit(self, turn: Turn, record: SessionRecord) -> None:
        """Store `record` and end the turn. Raises SessionBusy when the lease expired and another turn took it."""

    async def release(self, turn: Turn) -> None:
        """End the turn without storing (it failed); the stored record stays as it was."""


@asynccontextmanager
async def session_turn(store: SessionStore, session_id: str):
    """`async with session_turn(store, id) as turn:` ... `await store.commit(turn, new_record)`; a turn
    that leaves without committing (an error, a cancelled request) is released."""
    turn = await store.begin(session_id)
    try:
        yield turn
    finally:
        if not turn.done:
            await store.release(turn)


class InMemorySessionStore:
    """The embedded default: one router process, at most `max_entries` records (least recently used go first)."""

    def __init__(self, ttl_seconds: float = 3600.0, max_entries: int = 10_000, lease_seconds: float = 600.0,
                 clock: Callable[[], float] = time.monotonic):
        if not ttl_seconds > 0 or not lease_seconds > 0 or max_entries < 1:
            raise ValueError(f"need ttl_seconds > 0, lease_seconds > 0 and max_entries >= 1, got "
                             f"{ttl_seconds}, {lease_seconds}, {max_entries}")
        self.ttl, self.lease, self.max_entries, self._clock = ttl_seconds, lease_seconds, max_entries, clock
        self._records: OrderedDict[str, tuple[float, SessionRecord]] = OrderedDict()  # id -> (expiry, record)
        self._leases: dict[str, tuple[str, float]] = {}                                # id -> (token, expiry)

    def __len__(self) -> int:
        self._expire()
        return len(self._records)

    async def get(self, session_id: str) -> SessionRecord | None:
        check_session_id(session_id)
        self._expire()
        entry = self._records.get(session_id)
        if entry is None:
            return None
        self._store(entry[1])  # used: TTL refreshed, last to be evicted
        return entry[1]

    async def put(self, record: SessionRecord) -> None:
        self._expire()
        self._store(record)

    async def delete(self, session_id: str) -> bool:
        return self._records.pop(check_session_id(session_id), None) is not None

    async def begin(self, session_id: str) -> Turn:
        check_session_id(session_id)
        now = self._clock()
        held = self._leases.get(session_id)
        if held is not None and held[1] > now:
            raise SessionBusy(f"session {session_id} is busy: another turn on it is still running")
        token = secrets.token_hex(16)
        self._leases[session_id] = (token, now + self.lease)
        return Turn(session_id, token, await self.get(session_id))

    async def commit(self, turn: Turn, record: SessionRecord) -> None:
        if record.session_id != turn.session_id:
            raise ValueError(f"a turn on session {turn.session_id} cannot store session {record.session_id}")
        self._check_held(turn)
        self._expire()
        self._store(record)
        del self._leases[turn.session_id]
        turn.done = True

    async def release(self, turn: Turn) -> None:
        held = self._leases.get(turn.session_id)
        if held is not None and held[0] == turn.token:
            del self._leases[turn.session_id]
        turn.done = True

    def _check_held(self, turn: Turn) -> None:
        held = self._leases.get(turn.session_id)
        if turn.done or held is None or held[0] != turn.token or held[1] <= self._clock():
            turn.done = True
            raise SessionBusy(f"session {turn.session_id}: this turn's lease expired (after {self.lease:g} s) "
                              f"and the session moved on; its result was not stored")

    def _store(self, record: SessionRecord) -> None:
        self._records[record.session_id] = (self._clock() + self.ttl, record)
        self._records.move_to_end(record.session_id)
        while len(self._records) > self.max_entries:
            self._records.popitem(last=False)

    def _expire(self) -> None:
        # LRU order is refresh order and every refresh sets expiry = now + ttl, so expired ones lead.
        now = self._clock()
        while self._records and next(iter(self._records.values()))[0] <= now:
            self._records.popitem(last=False)
        for sid in [s for s, (_, expiry) in self._leases.items() if expiry <= now]:
            del self._leases[sid]
