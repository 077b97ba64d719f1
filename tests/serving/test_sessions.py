"""The Responses API's session store: entries expire after their TTL and the least recently used go first."""
import asyncio

import pytest

from nextserve.router.sessions import InMemorySessionStore, StoredResponse


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def stored(i: int) -> StoredResponse:
    return StoredResponse(f"resp_{i}", (1, 2, i), "tiny", "stop")


def test_entries_expire_after_the_ttl():
    clock = Clock()
    store = InMemorySessionStore(ttl_seconds=10, max_entries=100, clock=clock)
    asyncio.run(store.put(stored(1)))
    clock.now += 9.9
    assert asyncio.run(store.get("resp_1")).token_ids == (1, 2, 1)
    clock.now += 0.2
    assert asyncio.run(store.get("resp_1")) is None and len(store) == 0


def test_the_bound_evicts_the_least_recently_used():
    store = InMemorySessionStore(ttl_seconds=60, max_entries=3, clock=Clock())

    async def scenario():
        for i in range(3):
            await store.put(stored(i))
        assert await store.get("resp_0") is not None  # 0 is now the most recently used; 1 the least
        await store.put(stored(3))
        return [i for i in range(4) if await store.get(f"resp_{i}") is not None]

    assert asyncio.run(scenario()) == [0, 2, 3]
    assert len(store) == 3
    assert asyncio.run(store.delete("resp_2")) and not asyncio.run(store.delete("resp_2"))


@pytest.mark.parametrize("ttl, bound", [(0, 10), (-1, 10), (10, 0)])
def test_bad_limits_are_refused(ttl, bound):
    with pytest.raises(ValueError, match="ttl_seconds > 0"):
        InMemorySessionStore(ttl, bound)
