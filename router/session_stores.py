"""The router's session records: gRPC sessions and the HTTP Responses API's stored responses.

In memory (bounded, LRU + TTL) unless a cache URL is given; then in Redis, so that stored
conversations survive a router restart and any router replica continues them. The Redis is the one
the prefix cache's URL points at (`--cache-url`: one Redis for both).

Both APIs keep SessionRecords, in two keyspaces of the same kind of store: a gRPC session_id can then
never name (and overwrite) a stored response, whatever id a client picks.
"""
from __future__ import annotations

from dataclasses import dataclass

from .cache.sessions import InMemorySessionStore, SessionStore


@dataclass(slots=True)
class SessionStores:
    sessions: SessionStore    # gRPC session_id -> the session's token history
    responses: SessionStore   # Responses API response id -> its conversation and response object
    where: str                # for the startup log: "in memory" or the Redis URL without credentials
    _client: object = None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def open_session_stores(cache_url: str | None, ttl_seconds: float, max_entries: int) -> SessionStores:
    """Raises ValueError for a URL that is not redis:// or rediss://. Connects lazily: a Redis that is
    down at startup makes session requests fail with UNAVAILABLE, not the router."""
    if cache_url is None:
        return SessionStores(InMemorySessionStore(ttl_seconds, max_entries),
                             InMemorySessionStore(ttl_seconds, max_entries), "in memory")
    from urllib.parse import urlsplit

    from .cache.redis_sessions import RedisSessionStore
    from .cache.redis_tier import RedisTierOptions

    client = RedisTierOptions(cache_url).client()
    parts = urlsplit(cache_url)
    return SessionStores(RedisSessionStore(client, ttl_seconds=ttl_seconds, prefix="nextserve:session"),
                         RedisSessionStore(client, ttl_seconds=ttl_seconds, prefix="nextserve:response"),
                         f"Redis at {parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}", client)
