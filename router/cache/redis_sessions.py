"""Session records in Redis, so that any router replica can continue a session another one served.

Per session two keys: `{prefix}:{id}` holds the record (expires after `ttl_seconds`, refreshed by every
read and write) and `{prefix}:{id}:lease` the token of the turn holding it (SET NX PX: it expires by
itself). `commit` is one Lua script: it stores the record and drops the lease only if the lease still
holds this turn's token, so a turn whose lease ran out can never overwrite the turn that followed it.

Unlike the prefix cache, the session store is not optional once a request names a session: when Redis
cannot be reached the methods raise SessionStoreUnavailable (gRPC UNAVAILABLE), never guess a history.
"""
from __future__ import annotations

import asyncio
import logging
import secrets

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .sessions import SessionBusy, SessionRecord, SessionStoreUnavailable, Turn, check_session_id

log = logging.getLogger("nextserve.cache")

_COMMIT = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisSessionStore:
    def __init__(self, client: aioredis.Redis, *, ttl_seconds: float = 3600.0, lease_seconds: float = 600.0,
                 timeout_s: float = 1.0, prefix: str = "nextserve:session"):
        """`client`: e.g. RedisTierOptions(url).client(), shared with the cache tier or not."""
        if not ttl_seconds > 0 or not lease_seconds > 0 or not timeout_s > 0:
            raise ValueError(f"need ttl_seconds, lease_seconds and timeout_s > 0, got "
                             f"{ttl_seconds}, {lease_seconds}, {timeout_s}")
        self.client, self.prefix, self.timeout = client, prefix, timeout_s
        self.ttl_ms, self.lease_ms = int(ttl_seconds * 1000), int(lease_seconds * 1000)
        self._commit = client.register_script(_COMMIT)
        self._release = client.register_script(_RELEASE)

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}:{check_session_id(session_id)}"

    async def _call(self, what: str, awaitable):
        try:
            return await asyncio.wait_for(awaitable, self.timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise SessionStoreUnavailable(f"session store unreachable while {what} ({type(e).__name__}: {e}); "
                                          f"retry when Redis is back") from None

    def _parse(self, session_id: str, raw: bytes | None) -> SessionRecord | None:
        if raw is None:
            return None
        try:
            record = SessionRecord.from_bytes(raw)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("session %s: stored record is damaged (%s); treating it as absent", session_id, e)
            return None
        if record.session_id != session_id:
            log.warning("session %s: the stored record names session %s; treating it as absent",
                        session_id, record.session_id)
            return None
        return record

    async def get(self, session_id: str) -> SessionRecord | None:
        raw = await self._call(f"reading session {session_id}", self.client.getex(self._key(session_id), px=self.ttl_ms))
        return self._parse(session_id, raw)

    async def put(self, record: SessionRecord) -> None:
        await self._call(f"storing session {record.session_id}",
                         self.client.set(self._key(record.session_id), record.to_bytes(), px=self.ttl_ms))

    async def delete(self, session_id: str) -> bool:
        return bool(await self._call(f"deleting session {session_id}", self.client.delete(self._key(session_id))))

    async def begin(self, session_id: str) -> Turn:
        key, token = self._key(session_id), secrets.token_hex(16)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(f"{key}:lease", token, nx=True, px=self.lease_ms)
        pipe.getex(key, px=self.ttl_ms)
        acquired, raw = await self._call(f"starting a turn on session {session_id}", pipe.execute())
        if not acquired:
            raise SessionBusy(f"session {session_id} is busy: another turn on it is still running")
        return Turn(session_id, token, self._parse(session_id, raw))

    async def commit(self, turn: Turn, record: SessionRecord) -> None:
        if record.session_id != turn.session_id:
            raise ValueError(f"a turn on session {turn.session_id} cannot store session {record.session_id}")
        key = self._key(turn.session_id)
        stored = await self._call(f"storing session {turn.session_id}", self._commit(
            keys=[key, f"{key}:lease"], args=[turn.token, record.to_bytes(), self.ttl_ms]))
        turn.done = True
        if not stored:
            raise SessionBusy(f"session {turn.session_id}: this turn's lease expired (after {self.lease_ms / 1000:g} s) "
                              f"and the session moved on; its result was not stored")

    async def release(self, turn: Turn) -> None:
        turn.done = True
        key = self._key(turn.session_id)
        try:
            await self._call(f"ending a turn on session {turn.session_id}",
                             self._release(keys=[f"{key}:lease"], args=[turn.token]))
        except SessionStoreUnavailable as e:
            log.warning("%s; its lease expires by itself", e)  # releasing is best-effort: the lease is bounded
