"""gRPC sessions (session_id, append_to_session) on a router + 2 in-process workers, with the session store
in memory and in a real redis-server: appended turns equal the whole history sent at once (greedy), a
second router sharing the Redis and a restarted router continue a session, one turn at a time, TTL
expiry, Redis killed or flushed. The reference for every turn is a stateless request of the whole
history to the same deployment (stateless serving is itself checked against the model in test_router.py).
"""
import threading
import time

import grpc
import pytest

from nextserve.client import Client
from nextserve.client.messages import ServingError

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def start(started_routers):
    """start(**options) -> a started in-process Router over 2 workers (see started_routers)."""
    return started_routers


@pytest.fixture(scope="module")
def memory_router(start):
    return start()


@pytest.fixture(scope="module")
def redis_router(start, redis_server):
    return start(cache_url=redis_server.url)


@pytest.fixture(params=["memory", "redis"])
def router(request, redis_url):
    """Each kind once; for Redis the server is running and empty (redis_url flushes it)."""
    return request.getfixturevalue(f"{request.param}_router")


def client(router) -> Client:
    return Client(f"127.0.0.1:{router.port}", timeout=120, retries=0)


def stored_tokens(servers, router, session_id):
    record = servers.run(router.sessions.sessions.get(session_id))
    return None if record is None else list(record.token_ids)


def test_appended_turns_equal_the_whole_history_sent_at_once(servers, router):
    turns = [[11, 12, 13, 14, 15, 16, 17], [21, 22, 23], [31, 32]]
    with client(router) as c:
        first = c.generate(turns[0], max_tokens=5, session_id="chat-1", **GREEDY)
        assert first.session_id == "chat-1" and len(first.token_ids) == 5
        history = [*turns[0], *first.token_ids]
        assert stored_tokens(servers, router, "chat-1") == history
        for new in turns[1:]:
            appended = c.generate(new, max_tokens=5, session_id="chat-1", append_to_session=True, **GREEDY)
            history += new
            whole = c.generate(history, max_tokens=5, **GREEDY)  # stateless: the router keeps nothing
            assert appended.token_ids == whole.token_ids and len(whole.token_ids) == 5
            assert appended.prompt_tokens == whole.prompt_tokens == len(history)
            history += appended.token_ids
            assert stored_tokens(servers, router, "chat-1") == history
        # without append_to_session the prompt is the whole conversation and replaces the record
        restart = c.generate(turns[0], max_tokens=5, session_id="chat-1", **GREEDY)
        assert restart.token_ids == first.token_ids
        assert stored_tokens(servers, router, "chat-1") == history[:len(turns[0]) + 5]


def test_a_second_router_on_the_same_redis_continues_and_a_restart_keeps_the_session(servers, start, redis_url,
                                                                                      redis_router):
    other = start(cache_url=redis_url)
    with client(redis_router) as a, client(other) as b:
        first = a.generate([5, 6, 7, 8], max_tokens=4, session_id="shared", **GREEDY)
        second = b.generate([9, 10], max_tokens=4, session_id="shared", append_to_session=True, **GREEDY)
        history = [5, 6, 7, 8, *first.token_ids, 9, 10]
        assert second.token_ids == a.generate(history, max_tokens=4, **GREEDY).token_ids
        history += second.token_ids
    start.stop(other)
    restarted = start(cache_url=redis_url)  # a new process would see only what Redis holds
    with client(restarted) as c:
        third = c.generate([3, 4], max_tokens=4, session_id="shared", append_to_session=True, **GREEDY)
        assert third.token_ids == c.generate([*history, 3, 4], max_tokens=4, **GREEDY).token_ids
        assert third.prompt_tokens == len(history) + 2
    start.stop(restarted)


def test_a_concurrent_second_turn_is_aborted_and_the_history_never_interleaves(servers, router):
    with client(router) as c:
        first = c.generate([1, 2, 3], max_tokens=3, session_id="busy", **GREEDY)
        before = stored_tokens(servers, router, "busy")
        long_turn = c.generate_stream([4, 5], max_tokens=400, session_id="busy", append_to_session=True, **GREEDY)
        next(long_turn)  # admitted and decoding: the turn holds the session
        with pytest.raises(ServingError) as busy:
            c.generate([6], max_tokens=2, session_id="busy", append_to_session=True, **GREEDY)
        assert busy.value.code == grpc.StatusCode.ABORTED and "busy" in busy.value.details
        assert c.generate([6], max_tokens=2, **GREEDY).finish_reason == "length"  # others are served meanwhile
        long_turn.close()  # cancelled: nothing stored, the session is free again
        deadline = time.monotonic() + 30
        while True:  # the router notices the cancel asynchronously
            try:
                after = c.generate([6], max_tokens=2, session_id="busy", append_to_session=True, **GREEDY)
                break
            except ServingError as e:
                if e.code != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert before == [1, 2, 3, *first.token_ids]
        assert stored_tokens(servers, router, "busy") == [*before, 6, *after.token_ids]


def test_two_turns_racing_on_one_session_store_one_history(servers, router):
    """Both turns start at once: one runs, the other is ABORTED (never both appended to the same record)."""
    with client(router) as c:
        c.generate([7, 7, 7], max_tokens=2, session_id="race", **GREEDY)
        results, barrier = {}, threading.Barrier(2)

        def turn(name, new):
            barrier.wait()
            try:
                results[name] = c.generate(new, max_tokens=30, session_id="race", append_to_session=True, **GREEDY)
            except ServingError as e:
                results[name] = e

        threads = [threading.Thread(target=turn, args=(n, new)) for n, new in (("a", [1]), ("b", [2]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        errors = [r for r in results.values() if isinstance(r, ServingError)]
        done = [(n, r) for n, r in results.items() if not isinstance(r, ServingError)]
        # Usually one is aborted; if the first finished before the second began, both ran in turn.
        assert all(e.code == grpc.StatusCode.ABORTED for e in errors) and len(done) >= 1
        stored = stored_tokens(servers, router, "race")
        if len(done) == 1:
            name, completion = done[0]
            assert stored[-31:] == [1 if name == "a" else 2, *completion.token_ids]
        assert len(stored) == 3 + 2 + len(done) * 31


def test_bad_session_requests_are_invalid_arguments(router):
    with client(router) as c:
        for kwargs, message in ((dict(append_to_session=True), "needs a session_id"),
                                (dict(session_id="has space"), "session id"),
                                (dict(session_id="x" * 257), "session id")):
            with pytest.raises(ServingError) as e:
                c.generate([1, 2], max_tokens=2, **kwargs)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details
        with pytest.raises(ServingError) as e:
            c.generate([1, 2], max_tokens=2, session_id="never-started", append_to_session=True)
        assert e.value.code == grpc.StatusCode.NOT_FOUND and "no stored history" in e.value.details


def test_records_expire_after_the_ttl_refreshed_on_use(servers, start, redis_server, redis_url):
    ttl = 1.5
    short = start(cache_url=redis_url, session_ttl=ttl)
    with client(short) as c, redis_server.admin() as admin:
        c.generate([1, 2, 3], max_tokens=2, session_id="brief", **GREEDY)
        assert 0 < admin.pttl("nextserve:session:brief") <= ttl * 1000
        time.sleep(ttl * 0.6)
        c.generate([4], max_tokens=2, session_id="brief", append_to_session=True, **GREEDY)  # used: TTL refreshed
        time.sleep(ttl * 0.6)  # past the first turn's expiry, within the second's
        c.generate([5], max_tokens=2, session_id="brief", append_to_session=True, **GREEDY)
        time.sleep(ttl + 0.5)
        with pytest.raises(ServingError) as e:
            c.generate([6], max_tokens=2, session_id="brief", append_to_session=True, **GREEDY)
        assert e.value.code == grpc.StatusCode.NOT_FOUND and "expired" in e.value.details
    start.stop(short)


def test_flushall_between_turns_is_a_clear_error_never_a_wrong_continuation(servers, redis_server, redis_url,
                                                                            redis_router):
    with client(redis_router) as c, redis_server.admin() as admin:
        first = c.generate([8, 9, 10], max_tokens=3, session_id="flushed", **GREEDY)
        admin.flushall()
        with pytest.raises(ServingError) as e:
            c.generate([11], max_tokens=3, session_id="flushed", append_to_session=True, **GREEDY)
        assert e.value.code == grpc.StatusCode.NOT_FOUND and "send the whole conversation" in e.value.details
        # re-sending the whole history starts the session again
        c.generate([8, 9, 10, *first.token_ids, 11], max_tokens=3, session_id="flushed", **GREEDY)
        assert len(stored_tokens(servers, redis_router, "flushed")) == 3 + 3 + 1 + 3


def test_redis_down_fails_session_requests_with_unavailable_and_serves_stateless_ones(servers, redis_server, redis_url,
                                                                                      redis_router):
    with client(redis_router) as c:
        first = c.generate([2, 3, 4], max_tokens=3, session_id="outage", **GREEDY)
        redis_server.kill()
        try:
            for kwargs in (dict(session_id="outage", append_to_session=True), dict(session_id="new-one")):
                with pytest.raises(ServingError) as e:
                    c.generate([5], max_tokens=2, **kwargs, **GREEDY)
                assert e.value.code == grpc.StatusCode.UNAVAILABLE
                assert "session store unreachable" in e.value.details and "without its stored history" in e.value.details
            assert c.generate([2, 3, 4], max_tokens=3, **GREEDY).token_ids == first.token_ids
        finally:
            redis_server.start()  # empty, as a Redis pod without a volume restarts
        deadline = time.monotonic() + 10
        while True:  # the router reconnects by itself; the lost session is reported, not guessed
            try:
                c.generate([5], max_tokens=2, session_id="outage", append_to_session=True, **GREEDY)
                pytest.fail("a session whose history Redis lost was continued")
            except ServingError as e:
                if e.code == grpc.StatusCode.NOT_FOUND:
                    break
                assert e.code == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                time.sleep(0.1)


def test_redis_lost_during_a_turn_ends_it_with_unavailable_and_stores_nothing(servers, redis_server, redis_url,
                                                                              redis_router):
    with client(redis_router) as c:
        c.generate([3, 1, 4], max_tokens=2, session_id="midway", **GREEDY)
        stream = c.generate_stream([1, 5], max_tokens=40, session_id="midway", append_to_session=True, **GREEDY)
        next(stream)  # the turn holds the session and decodes
        redis_server.kill()
        try:
            with pytest.raises(ServingError) as e:
                for chunk in stream:
                    assert chunk.finish_reason is None  # the last message never comes: the turn was not stored
            assert e.value.code == grpc.StatusCode.UNAVAILABLE and "not stored" in e.value.details
        finally:
            redis_server.start()
