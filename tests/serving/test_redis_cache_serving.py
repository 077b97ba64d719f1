"""The prefix cache's Redis tier through two routers sharing one real redis-server: the second router
resumes what the first computed, and every fault (Redis killed and restarted, FLUSHALL, a value corrupted
by hand, a value from another checkpoint, a KV block evicted, Redis at maxmemory) still gives the cold
answer, moves the counters, and shows in ModelInfo as degraded until Redis works again.

The two routers of most tests are separate Router instances (own pools, own local tier, own Redis
client) in this test process; all they share is Redis. The last test runs `nextserve router` as its own
OS process.
"""
import sys
import time

import httpx2
import pytest

from nextserve.client import Client
from nextserve.router.cache import codec
from nextserve.router.cache.keys import CacheNamespace

@pytest.fixture(scope="module")
def two_routers(servers, in_process_workers, tiny_checkpoint, redis_server, helpers):
    from nextserve.router.server import RouterOptions, start_router

    workers = in_process_workers(2)
    plan = helpers.contiguous_plan(tiny_checkpoint, 2)
    started = [servers.run(start_router(RouterOptions(
        checkpoint=str(tiny_checkpoint), plan=plan, workers=workers.addresses, host="127.0.0.1", port=0,
        dtype="float32", device="cpu", cache_url=redis_server.url, http_port=0))) for _ in range(2)]
    yield started
    for router in started:
        servers.run(router.stop(0))


@pytest.fixture
def redis(redis_server):
    if not redis_server.running:
        redis_server.start()
    with redis_server.admin() as r:
        r.config_set("maxmemory", 0)
        r.config_set("maxmemory-policy", "noeviction")
        yield r


class Deployment:
    def __init__(self, servers, routers, reference):
        self.servers, self.routers, self.reference = servers, routers, reference
        self.clients = [Client(f"127.0.0.1:{r.port}", timeout=120) for r in routers]

    def generate(self, which: int, prompt, max_tokens=5):
        got = self.clients[which].generate(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)
        assert got.token_ids == self.reference(prompt, max_tokens, ignore_eos=True)[0]  # cached or not: the cold answer
        return got

    def drain(self, which: int) -> None:
        """Wait until the router's queued Redis writes are written."""
        self.servers.run(self.routers[which].engine.redis_cache.tier.drain())

    def counters(self, which: int) -> dict:
        return self.routers[which].engine.redis_cache.tier.counters.snapshot()

    def metric(self, which: int, name: str, **labels) -> float | None:
        return self.routers[which].engine.telemetry.registry.get_sample_value(
            "nextserve_router_prefix_cache_" + name, labels)

    def http_health(self, which: int) -> dict:
        return httpx2.get(f"http://127.0.0.1:{self.routers[which].http.port}/health", timeout=10).json()

    def cache_info(self, which: int):
        return self.clients[which].model_info().cache

    def close(self):
        for c in self.clients:
            c.close()


@pytest.fixture
def deployment(servers, two_routers, reference, redis):
    d = Deployment(servers, two_routers, reference)
    yield d
    d.close()


_seed = iter(range(1000))


def fresh_prompt(n: int) -> list[int]:
    s = next(_seed)
    return [(s * 131 + 17 * i + (i * i) % 7) % 450 + 30 for i in range(n)]


def state_keys(redis, namespace_prefix=""):
    return sorted(k for k in redis.scan_iter("nextserve:*:state:*") if b":part:" not in k)


def test_the_second_router_resumes_what_the_first_stored(deployment):
    prompt = fresh_prompt(150)
    first = deployment.generate(0, prompt)
    assert first.cached_tokens == 0
    deployment.drain(0)
    hits = deployment.counters(1)["hits"]
    second = deployment.generate(1, prompt)
    assert second.cached_tokens == 149  # the whole prompt but its last token, from Redis
    assert deployment.counters(1)["hits"] == hits + 1 and deployment.counters(1)["hit_tokens"] > 0
    info = deployment.cache_info(1)
    assert (info.tiers, info.degraded) == ("local+redis", False)
    # the same counters as Prometheus series
    assert deployment.metric(1, "hits_total", tier="redis") == hits + 1
    assert deployment.metric(1, "hit_tokens_total", tier="redis") >= 149
    assert deployment.metric(0, "bytes_total", tier="redis", direction="written") > 0
    assert deployment.metric(1, "degraded", tier="redis") == 0
    # the first router's own local tier hits too, with no Redis round trip
    assert deployment.generate(0, prompt).cached_tokens == 149
    assert deployment.metric(0, "hits_total", tier="local") >= 1


def test_flushall_between_requests_is_a_miss(deployment, redis):
    prompt = fresh_prompt(100)
    deployment.generate(0, prompt)
    deployment.drain(0)
    redis.flushall()
    assert deployment.generate(1, prompt).cached_tokens == 0


def test_a_value_corrupted_by_hand_is_refused_and_a_shallower_one_used(deployment, redis):
    prompt = fresh_prompt(150)  # snapshots at 128 (the last block boundary), 149 and the request's end
    before = set(state_keys(redis))
    deployment.generate(0, prompt)
    deployment.drain(0)
    new = [k for k in state_keys(redis) if k not in before]
    (deepest,) = [k for k in new if codec_position(redis.get(k)) == 149]  # what the same prompt looks up
    raw = bytearray(redis.get(deepest))
    raw[-1] ^= 0x40  # one flipped bit of the payload
    redis.set(deepest, bytes(raw))
    got = deployment.generate(1, prompt)
    assert got.cached_tokens == 128
    assert deployment.counters(1).get("verification_failures_checksum", 0) >= 1


def test_a_value_from_another_checkpoint_is_refused(deployment, redis, tiny_checkpoint):
    prompt = fresh_prompt(60)  # snapshots at 59 and at the request's end
    before = set(state_keys(redis))
    deployment.generate(0, prompt)
    deployment.drain(0)
    (key,) = [k for k in state_keys(redis) if k not in before and codec_position(redis.get(k)) == 59]
    ours = deployment.routers[0].engine.redis_cache.tier.namespace
    header = codec.read_header(redis.get(key), ours, "state", block_key_of(redis.get(key)))
    tensors = codec.decode(header)
    foreign = CacheNamespace("ee" * 8, ours.dtype)
    value = codec.encode(foreign, "state", block_key_of(redis.get(key)), tensors)
    redis.set(key, value.head)  # another checkpoint's state, under this checkpoint's key
    assert deployment.generate(1, prompt).cached_tokens == 0
    assert deployment.counters(1).get("verification_failures_fingerprint", 0) >= 1


def test_an_evicted_kv_block_ends_the_chain_before_it(deployment, redis):
    prompt = fresh_prompt(150)
    deployment.generate(0, prompt)
    deployment.drain(0)
    ours = deployment.routers[0].engine.redis_cache.tier.namespace
    keys = deployment.routers[0].engine.scheduler.blocks.keys(prompt[:-1])
    redis.delete(codec.value_key(ours, "kv", keys[2]))  # the partial tail [128, 149): only 128 stays resumable
    assert deployment.generate(1, prompt).cached_tokens == 128


def test_redis_killed_and_restarted_degrades_then_recovers(deployment, redis_server):
    redis_server.kill()
    prompt = fresh_prompt(90)
    assert deployment.generate(0, prompt).cached_tokens == 0
    assert deployment.generate(1, prompt).cached_tokens == 0
    info = deployment.cache_info(1)
    assert info.degraded and "Redis" in info.reason
    assert deployment.http_health(1)["cache"] == {"tiers": "local+redis", "degraded": True, "reason": info.reason}
    assert deployment.counters(1)["read_errors"] >= 1
    assert deployment.metric(1, "degraded", tier="redis") == 1
    assert deployment.metric(1, "errors_total", tier="redis", kind="read") >= 1
    redis_server.start()
    deadline = time.monotonic() + 30
    while deployment.cache_info(0).degraded or deployment.cache_info(1).degraded:
        assert time.monotonic() < deadline, f"the cache did not recover: {deployment.cache_info(0)} {deployment.cache_info(1)}"
        time.sleep(0.2)
    assert deployment.http_health(1)["cache"]["degraded"] is False
    again = fresh_prompt(90)
    deployment.generate(0, again)
    deployment.drain(0)
    assert deployment.generate(1, again).cached_tokens == 89


def test_redis_at_maxmemory_refuses_writes_and_the_router_serves_on(deployment, redis):
    redis.config_set("maxmemory", 1)  # every write is refused under noeviction
    prompt = fresh_prompt(80)
    errors = deployment.counters(0)["write_errors"]
    deployment.generate(0, prompt)
    deployment.drain(0)
    assert deployment.counters(0)["write_errors"] > errors
    info = deployment.cache_info(0)
    assert info.degraded and "maxmemory" in info.reason
    assert deployment.generate(1, prompt).cached_tokens == 0
    redis.config_set("maxmemory", 0)


def codec_position(raw: bytes) -> int:
    return json_header(raw)["position"]


def json_header(raw: bytes) -> dict:
    import json
    import struct
    (n,) = struct.unpack("<I", raw[4:8])
    return json.loads(raw[8:8 + n])


def block_key_of(raw: bytes):
    from nextserve.router.cache.keys import BlockKey
    h = json_header(raw)
    return BlockKey(h["position"], bytes.fromhex(h["key"]))


def test_a_router_process_resumes_what_another_router_stored(deployment, tiny_checkpoint, redis_server, tmp_path,
                                                              helpers):
    """`nextserve router --cache-url` as its own OS process, over the same workers and Redis."""
    import os
    import subprocess

    router = deployment.routers[0]
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(helpers.contiguous_plan(tiny_checkpoint, 2).to_json())
    port = helpers.free_port()
    argv = [sys.executable, "-m", "nextserve.cli.main", "router", "--checkpoint", str(tiny_checkpoint),
            "--plan", str(plan_file), "--port", str(port), "--host", "127.0.0.1", "--no-http", "--device", "cpu",
            "--dtype", "float32", "--cache-url", redis_server.url, "--cache-ttl", "600",
            *[f"--worker={c.shard}={c.address}" for c in router.pool.connections]]
    log = tmp_path / "router.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        prompt = fresh_prompt(150)
        deployment.generate(0, prompt)
        deployment.drain(0)
        with Client(f"127.0.0.1:{port}", timeout=120) as client:
            deadline = time.monotonic() + 120
            while not _ready(client):
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            got = client.generate(prompt, max_tokens=5, temperature=0, ignore_eos=True)
            assert got.cached_tokens == 149
            assert got.token_ids == deployment.reference(prompt, 5, ignore_eos=True)[0]
            assert client.model_info().cache.tiers == "local+redis"
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _ready(client) -> bool:
    try:
        return client.health()
    except Exception:
        return False
