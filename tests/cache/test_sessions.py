"""Session records, in memory and in a real Redis: the same interface, TTLs, bounds, and one turn at a time."""
import asyncio

import pytest
import pytest_asyncio

from nextserve.router.cache.redis_sessions import RedisSessionStore
from nextserve.router.cache.redis_tier import RedisTierOptions
from nextserve.router.cache.sessions import (InMemorySessionStore, SessionBusy, SessionRecord, SessionStoreUnavailable,
                                             session_turn)

pytestmark = pytest.mark.asyncio


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest_asyncio.fixture(params=["memory", "redis"])
async def stores(request):
    """make(**kwargs) -> a store; for Redis every store made shares one server, as router replicas do."""
    clients = []

    def make(**kwargs):
        if request.param == "memory":
            return InMemorySessionStore(**kwargs)
        client = RedisTierOptions(request.getfixturevalue("redis_url")).client()
        clients.append(client)
        return RedisSessionStore(client, **kwargs)
    make.kind = request.param
    yield make
    for client in clients:
        await client.aclose()


def record(session_id="s-1", tokens=(1, 2, 3), position=0, key=None, **metadata) -> SessionRecord:
    return SessionRecord(session_id, tokens, position, key, metadata)


async def test_a_record_survives_its_bytes_and_damage_is_detected():
    r = record(tokens=tuple(range(5000)), position=4096, key="ab" * 16, model="tiny", body={"id": "resp_1"})
    assert SessionRecord.from_bytes(r.to_bytes()) == r
    damaged = bytearray(r.to_bytes())
    damaged[100] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        SessionRecord.from_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="checkpoint"):
        record(position=64)  # beyond its 3 tokens
    with pytest.raises(ValueError, match="session id"):
        record(session_id="has space")


async def test_get_put_delete(stores):
    store = stores()
    assert await store.get("s-1") is None
    await store.put(record(tokens=(5, 6), model="tiny"))
    got = await store.get("s-1")
    assert got.token_ids == (5, 6) and got.metadata == {"model": "tiny"}
    assert await store.delete("s-1") and not await store.delete("s-1") and await store.get("s-1") is None


async def test_a_turn_appends_and_a_second_concurrent_turn_is_busy(stores):
    store = stores()
    await store.put(record(tokens=(1, 2, 3)))
    async with session_turn(store, "s-1") as turn:
        assert turn.record.token_ids == (1, 2, 3)
        with pytest.raises(SessionBusy, match="busy"):
            await store.begin("s-1")
        await store.commit(turn, record(tokens=(1, 2, 3, 4, 5), position=4, key="cd" * 16))
    again = await store.begin("s-1")  # the first turn is over: the session is free again
    assert again.record.token_ids == (1, 2, 3, 4, 5) and again.record.checkpoint_position == 4
    await store.release(again)


async def test_concurrent_turns_on_one_session_never_interleave_the_history(stores):
    replicas = [stores(), stores()]  # for Redis: two router replicas sharing one server
    await replicas[0].put(record(tokens=(1,)))

    async def turn(store, token: int):
        async with session_turn(store, "s-1") as t:
            await asyncio.sleep(0.05)  # the model runs
            await store.commit(t, record(tokens=(*t.record.token_ids, token)))
        return token

    if stores.kind == "memory":  # in-process, both turns share the one store (one router)
        replicas = [replicas[0], replicas[0]]
    results = await asyncio.gather(turn(replicas[0], 10), turn(replicas[1], 20), return_exceptions=True)
    busy = [r for r in results if isinstance(r, SessionBusy)]
    done = [r for r in results if not isinstance(r, BaseException)]
    assert len(busy) == 1 and len(done) == 1
    assert (await replicas[1].get("s-1")).token_ids == (1, done[0])


async def test_a_failed_turn_releases_the_session_and_keeps_the_record(stores):
    store = stores()
    await store.put(record(tokens=(1, 2)))
    with pytest.raises(RuntimeError):
        async with session_turn(store, "s-1"):
            raise RuntimeError("the request failed")
    turn = await store.begin("s-1")
    assert turn.record.token_ids == (1, 2)
    await store.release(turn)


async def test_an_expired_lease_frees_the_session_and_its_late_commit_is_refused(stores):
    if stores.kind == "memory":
        clock = FakeClock()
        store = later = InMemorySessionStore(lease_seconds=5, clock=clock)
    else:
        store, later = stores(lease_seconds=0.2), stores(lease_seconds=0.2)
    slow = await store.begin("s-1")  # a router that stalls (or dies) mid-turn
    if stores.kind == "memory":
        clock.now += 6
    else:
        await asyncio.sleep(0.3)
    fresh = await later.begin("s-1")
    await later.commit(fresh, record(tokens=(7,)))
    with pytest.raises(SessionBusy, match="lease expired"):
        await store.commit(slow, record(tokens=(8,)))
    assert (await later.get("s-1")).token_ids == (7,)


async def test_in_memory_records_expire_and_the_least_recently_used_go_first():
    clock = FakeClock()
    store = InMemorySessionStore(ttl_seconds=10, max_entries=2, clock=clock)
    await store.put(record("a"))
    await store.put(record("b"))
    clock.now += 6
    assert await store.get("a") is not None    # used: its TTL is refreshed and "b" is now the oldest
    await store.put(record("c"))
    assert await store.get("b") is None and len(store) == 2
    clock.now += 6
    assert await store.get("a") is not None and await store.get("c") is not None
    clock.now += 11
    assert len(store) == 0


async def test_redis_records_have_a_ttl_refreshed_on_use(redis_server, redis_url):
    client = RedisTierOptions(redis_url).client()
    store = RedisSessionStore(client, ttl_seconds=100)
    await store.put(record())
    admin = redis_server.admin()
    assert 0 < admin.ttl("nextserve:session:s-1") <= 100
    admin.expire("nextserve:session:s-1", 5)
    await store.get("s-1")
    assert admin.ttl("nextserve:session:s-1") > 90
    admin.set("nextserve:session:s-1", b"garbage")
    assert await store.get("s-1") is None  # a damaged record is unknown, never a wrong history
    await client.aclose()


async def test_redis_down_is_a_clear_unavailable_error(redis_server, redis_url):
    client = RedisTierOptions(redis_url, connect_timeout_s=0.2).client()
    store = RedisSessionStore(client, timeout_s=0.5)
    redis_server.kill()
    try:
        for call in (store.get("s-1"), store.put(record()), store.begin("s-1")):
            with pytest.raises(SessionStoreUnavailable, match="unreachable"):
                await call
    finally:
        redis_server.start()
        await client.aclose()


@pytest.mark.parametrize("ttl, bound", [(0, 10), (-1, 10), (10, 0)])
async def test_bad_in_memory_limits_are_refused(ttl, bound):
    with pytest.raises(ValueError, match="ttl_seconds > 0"):
        InMemorySessionStore(ttl, bound)
