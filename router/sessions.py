"""Stored conversations for the Responses API's `previous_response_id`.

A stored response is the conversation as the model saw it: every token id of its prompt and its
output, so the next turn is that history plus the new input, token for token (re-encoding the text
could tokenize differently). Entries expire after a TTL and the store is bounded (least recently used
goes first): unlike a plain dict, it never grows without limit.

`SessionStore` is the interface the HTTP API uses; `InMemorySessionStore` backs it in the router's
process. It is async so that a shared store (Redis, with the prefix cache that can also resume the
model state of `token_ids`) can back it without changing the callers.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class StoredResponse:
    response_id: str
    token_ids: tuple[int, ...]     # prompt + output: the whole conversation so far, as the model saw it
    model: str
    finish_reason: str             # "stop" or "length" of the last turn
    body: dict[str, Any] = field(default_factory=dict)  # the response object as returned to the client


class SessionStore(Protocol):
    async def get(self, response_id: str) -> StoredResponse | None:
        """The stored response, or None when unknown or expired."""

    async def put(self, response: StoredResponse) -> None: ...

    async def delete(self, response_id: str) -> bool:
        """True when it was there."""


class InMemorySessionStore:
    def __init__(self, ttl_seconds: float = 3600.0, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        if not ttl_seconds > 0 or max_entries < 1:
            raise ValueError(f"need ttl_seconds > 0 and max_entries >= 1, got {ttl_seconds}, {max_entries}")
        self.ttl, self.max_entries, self._clock = ttl_seconds, max_entries, clock
        self._entries: OrderedDict[str, tuple[float, StoredResponse]] = OrderedDict()  # id -> (expiry, response)

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    async def get(self, response_id: str) -> StoredResponse | None:
        self._expire()
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        self._entries.move_to_end(response_id)  # recently used: last to be evicted
        return entry[1]

    async def put(self, response: StoredResponse) -> None:
        self._expire()
        self._entries[response.response_id] = (self._clock() + self.ttl, response)
        self._entries.move_to_end(response.response_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def delete(self, response_id: str) -> bool:
        return self._entries.pop(response_id, None) is not None

    def _expire(self) -> None:
        # Expiry times grow with insertion but not with use, so scan (the bound keeps it small).
        now = self._clock()
        for key in [k for k, (expiry, _) in self._entries.items() if expiry <= now]:
            del self._entries[key]
