"""The Redis tier against a real redis-server: hits are bit-exact, and every fault (killed, hung, flushed,
full, evicting, damaged or foreign values) is a miss or a dropped write, never an exception or a wrong value."""
import asyncio
import time

import pytest
import pytest_asyncio
import torch

from nextserve.model.presets import config_from_preset
from nextserve.router.cache import codec
from nextserve.router.cache.keys import CacheNamespace, chain_keys
from nextserve.router.cache.layout import KV, STATE, ModelLayout
from nextserve.router.cache.redis_tier import RedisTier, RedisTierOptions

pytestmark = pytest.mark.asyncio

TOKENS = [(7 * i + 3) % 1000 for i in range(4 * 64 + 20)]  # 4 full blocks and a 20-token tail
LAYOUT = ModelLayout.from_config(config_from_preset("tiny"), "bfloat16")
# Small payload thresholds so that the tiny model's values are split into several parts, as real ones are.
SPLIT = dict(inline_bytes=1024, part_bytes=4096)


@pytest_asyncio.fixture
async def make_tier(redis_url, namespace):
    tiers = []

    async def make(url=redis_url, ns=namespace, **overrides) -> RedisTier:
        options = RedisTierOptions(url, **{"retry_after_s": 0.2, **SPLIT, **overrides})
        tier = RedisTier(options, ns, LAYOUT)
        await tier.start()
        tiers.append(tier)
        return tier
    yield make
    for tier in tiers:
        await tier.close(drain_timeout_s=2)


def bit_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[n].dtype == b[n].dtype and torch.equal(a[n].contiguous().view(torch.uint8), b[n].contiguous().view(torch.uint8))
        for n in a)


async def store(tier, keys, tensors_like, states_at=(), kv_upto=None):
    """Write random KV blocks for keys[:kv_upto] and states at the given chain indices; returns what was written."""
    kv_upto = len(keys) if kv_upto is None else kv_upto
    kv = [tensors_like(LAYOUT.kv(k.num_tokens)) for k in keys[:kv_upto]]
    states = {i: tensors_like(LAYOUT.state()) for i in states_at}
    for key, tensors in zip(keys, kv):
        assert tier.submit_kv(key, tensors)
    for i, tensors in states.items():
        assert tier.submit_state(keys[i], tensors)
    await tier.drain()
    return kv, states


def assert_hit(hit, keys, kv, states, index):
    assert hit.position == keys[index].position
    assert len(hit.kv_blocks) == index + 1 and all(bit_equal(a, b) for a, b in zip(hit.kv_blocks, kv))
    assert bit_equal(hit.state, states[index])


async def test_the_deepest_prefix_with_its_state_is_restored_bit_exact_and_the_counters_move(make_tier, namespace,
                                                                                           tensors_like):
    tier = await make_tier()
    keys = chain_keys(namespace, TOKENS)
    kv, states = await store(tier, keys, tensors_like, states_at=(0, 2))
    assert tier.counters.values_written == len(keys) + 2 and tier.counters.bytes_written > 0
    hit = await tier.lookup(keys)
    assert_hit(hit, keys, kv, states, 2)  # block 3 has KV but no state: KV alone never counts
    c = tier.counters
    assert (c.queries, c.hits, c.hit_tokens) == (1, 1, keys[2].position) and c.bytes_read > 0
    assert tier.degraded is None
    # a prompt that diverges inside block 2 resumes from the state at block 0's end
    other = list(TOKENS)
    other[150] += 1
    assert_hit(await tier.lookup(chain_keys(namespace, other)), keys, kv, states, 0)


async def test_kv_blocks_alone_never_hit(make_tier, namespace, tensors_like):
    tier = await make_tier()
    keys = chain_keys(namespace, TOKENS)
    await store(tier, keys, tensors_like)
    hit = await tier.lookup(keys)
    assert not hit.hit and hit.reason == "absent" and tier.counters.hits == 0


async def test_a_prompt_shorter_than_a_block_hits_through_its_partial_tail(make_tier, namespace, tensors_like):
    tier = await make_tier()
    keys = chain_keys(namespace, TOKENS[:60], partial_tail=True)
    kv, states = await store(tier, keys, tensors_like, states_at=(0,))
    hit = await tier.lookup(chain_keys(namespace, TOKENS[:60], partial_tail=True))
    assert_hit(hit, keys, kv, states, 0)
    assert hit.position == 60 and hit.kv_blocks[0][f"layers.{LAYOUT.attention_layers[0]}.key"].shape[0] == 60


async def test_values_are_shared_by_two_router_replicas(make_tier, namespace, tensors_like):
    writer, reader = await make_tier(), await make_tier()
    keys = chain_keys(namespace, TOKENS)
    kv, states = await store(writer, keys, tensors_like, states_at=(3,))
    assert_hit(await reader.lookup(keys), keys, kv, states, 3)


async def test_a_value_corrupted_by_hand_is_refused_and_the_lookup_falls_back(make_tier, redis_server, namespace,
                                                                           tensors_like):
    tier = await make_tier()
    keys = chain_keys(namespace, TOKENS)
    kv, states = await store(tier, keys, tensors_like, states_at=(0, 3))
    header = codec.read_header(redis_server.admin().get(codec.value_key(namespace, KV, keys[2])), namespace, KV, keys[2])
    with redis_server.admin() as r:
        part = r.get(header.parts[0])
        r.setrange(header.parts[0], 200, bytes([part[200] ^ 0xFF]))
    hit = await tier.lookup(keys)
    assert_hit(hit, keys, kv, states, 0)  # block 2 is bad: the state at block 3 is unusable, the one at 0 is fine
    assert hit.reason == "checksum" and tier.counters.verification_failures["checksum"] == 1


async def test_a_value_written_by_another_checkpoint_is_refused(make_tier, redis_server, namespace, tensors_like):
    foreign_ns = CacheNamespace("fedcba9876543210", namespace.dtype)
    tier, foreign = await make_tier(), await make_tier(ns=foreign_ns)
    keys, foreign_keys = chain_keys(namespace, TOKENS), chain_keys(foreign_ns, TOKENS)
    await store(foreign, foreign_keys, tensors_like, states_at=(1,))
    assert not (await tier.lookup(keys)).hit  # other keys altogether: a plain miss
    with redis_server.admin() as r:  # now copy its values to our keys, as a key collision or a bug would
        for kind in (KV, STATE):
            for k, fk in zip(keys, foreign_keys):
                raw = r.get(codec.value_key(foreign_ns, kind, fk))
                if raw is not None:
                    r.set(codec.value_key(namespace, kind, k), raw)
    hit = await tier.lookup(keys)
    assert not hit.hit and hit.reason == "fingerprint"
    assert tier.counters.verification_failures["fingerprint"] >= 1


async def test_a_key_of_ours_holding_another_redis_type_is_a_malformed_value_not_a_broken_redis(
        make_tier, redis_server, namespace, tensors_like):
    tier = await make_tier()
    keys = chain_keys(namespace, TOKENS)
    kv, states = await store(tier, keys, tensors_like, states_at=(0, 3))
    with redis_server.admin() as r:
        r.delete(codec.value_key(namespace, KV, keys[1]))
        r.hset(codec.value_key(namespace, KV, keys[1]), "field", "value")
    hit = await tier.lookup(keys)
    assert_hit(hit, keys, kv, states, 0)
    assert hit.reason == "malformed" and tier.degraded is None and tier.counters.read_errors == 0


async def test_an_evicted_part_is_a_missing_part_miss(make_tier, redis_server, namespace, tensors_like):
    tier = await make_tier()
    keys = chain_keys(namespace, TOKENS)
    kv, states = await store(tier, keys, tensors_like, states_at=(1, 3))
    with redis_server.admin() as r:
        header = codec.read_header(r.get(codec.value_key(namespace, STATE, keys[3])), namespace, STATE, keys[3])
        r.delete(header.parts[-1])
    hit = await tier.lookup(keys)
    assert_hit(hit, keys, kv, states, 1)
    assert hit.reason == "missing_part" and tier.counters.verification_failures["missing_part"] == 1


async def test_flushall_between_turns_is_a_plain_miss_and_the_next_write_hits_again(make_tier, redis_server, namespace,
                                                                                  tensors_like):
    tier = await make_tier()
    keys = chain_keys(namespace, TOKENS)
    await store(tier, keys, tensors_like, states_at=(3,))
    assert (await tier.lookup(keys)).hit
    redis_server.admin().flushall()
    hit = await tier.lookup(keys)
    assert not hit.hit and hit.reason == "absent" and tier.degraded is None
    kv, states = await store(tier, keys, tensors_like, states_at=(3,))
    assert_hit(await tier.lookup(keys), keys, kv, states, 3)


async def test_redis_killed_mid_run_degrades_then_recovers_by_itself_after_restart(make_tier, redis_server, namespace,
                                                                                 tensors_like):
    tier = await make_tier()
    keys = chain_keys(namespace, TOKENS)
    await store(tier, keys, tensors_like, states_at=(3,))
    assert (await tier.lookup(keys)).hit
    redis_server.kill()
    hit = await tier.lookup(keys)
    assert not hit.hit and hit.reason.startswith("degraded") and "unreachable" in tier.degraded
    assert tier.counters.read_errors == 1
    # while it is down: writes are dropped at once (never block, never raise), lookups skip Redis
    kv = tensors_like(LAYOUT.kv(64))
    tier.submit_kv(keys[0], kv)
    await tier.drain()
    assert tier.counters.drops + tier.counters.write_errors >= 1
    assert not (await tier.lookup(keys)).hit
    redis_server.start()  # an empty Redis (no persistence), as a restarted pod without a volume
    await asyncio.sleep(tier.options.retry_after_s)
    hit = await tier.lookup(keys)
    assert not hit.hit and hit.reason == "absent" and tier.degraded is None
    kv, states = await store(tier, keys, tensors_like, states_at=(2,))
    assert_hit(await tier.lookup(keys), keys, kv, states, 2)


async def test_a_tier_started_without_redis_says_so_and_recovers_with_no_request_in_between(
        make_tier, redis_server, namespace, tensors_like):
    redis_server.kill()
    tier = await make_tier()
    assert "unreachable" in tier.degraded  # known at start, before any request
    hit = await tier.lookup(chain_keys(namespace, TOKENS))
    assert not hit.hit and hit.reason.startswith("degraded")
    redis_server.start()
    for _ in range(50):  # the writer probes every retry_after_s (0.2 s here)
        if tier.degraded is None:
            break
        await asyncio.sleep(0.1)
    assert tier.degraded is None
    keys = chain_keys(namespace, TOKENS)
    kv, states = await store(tier, keys, tensors_like, states_at=(0,))
    assert_hit(await tier.lookup(keys), keys, kv, states, 0)


async def test_an_idle_tier_notices_redis_going_away_with_no_request(make_tier, redis_server):
    tier = await make_tier(health_interval_s=0.2)
    assert tier.degraded is None
    redis_server.kill()
    for _ in range(50):  # the idle writer PINGs every health_interval_s (0.2 s here)
        if tier.degraded is not None:
            break
        await asyncio.sleep(0.1)
    assert tier.degraded is not None and "unreachable" in tier.degraded
    assert tier.counters.queries == 0  # no lookup found it out: the health check did
    redis_server.start()
    for _ in range(50):
        if tier.degraded is None:
            break
        await asyncio.sleep(0.1)
    assert tier.degraded is None


async def test_a_hung_redis_times_out_within_the_lookup_bound_and_recovers(make_tier, redis_server, namespace,
                                                                         tensors_like):
    tier = await make_tier(lookup_timeout_s=0.2)
    keys = chain_keys(namespace, TOKENS)
    kv, states = await store(tier, keys, tensors_like, states_at=(3,))
    redis_server.pause()
    try:
        started = time.monotonic()
        hit = await tier.lookup(keys)
        assert time.monotonic() - started < 1.0
        assert not hit.hit and "timed out" in tier.degraded
    finally:
        redis_server.resume()
    await asyncio.sleep(tier.options.retry_after_s)
    assert_hit(await tier.lookup(keys), keys, kv, states, 3)
    assert tier.degraded is None


async def test_redis_at_maxmemory_with_noeviction_refuses_writes_and_still_serves_what_it_has(
        make_tier, redis_server, namespace, tensors_like):
    tier = await make_tier()
    keys = chain_keys(namespace, TOKENS)
    kv, states = await store(tier, keys, tensors_like, states_at=(1,))
    with redis_server.admin() as r:
        r.config_set("maxmemory", r.info("memory")["used_memory"])  # full now
    for key in keys:
        assert tier.submit_state(key, tensors_like(LAYOUT.state()))
    await tier.drain()
    assert tier.counters.write_errors == len(keys) and "maxmemory" in tier.degraded
    assert_hit(await tier.lookup(keys), keys, kv, states, 1)


async def test_redis_evicting_under_allkeys_lru_gives_only_verified_hits_or_misses(make_tier, redis_server, namespace,
                                                                                  tensors_like):
    with redis_server.admin() as r:
        r.config_set("maxmemory", r.info("memory")["used_memory"] + 512 * 2**10)
        r.config_set("maxmemory-policy", "allkeys-lru")
        r.config_set("maxmemory-samples", 10)
    tier = await make_tier()

    async def write_prompts(first: int, count: int):
        out = []
        for p in range(first, first + count):
            keys = chain_keys(namespace, [p * 1000 + i for i in range(128)])
            out.append((keys, *await store(tier, keys, tensors_like, states_at=(1,))))
        return out
    old = await write_prompts(0, 40)  # 40 prompts x ~32 KiB (2 KV blocks, 1 state; 11 parts): 2.5x what fits
    await asyncio.sleep(1.1)          # Redis's LRU clock ticks once a second: the next ones are younger
    recent = await write_prompts(40, 3)
    assert redis_server.admin().info("stats")["evicted_keys"] > 0
    outcomes = []
    for keys, kv, states in old + recent:
        hit = await tier.lookup(keys)
        if hit.hit:
            assert_hit(hit, keys, kv, states, 1)
        else:
            assert hit.reason in ("absent", "missing_part")
        outcomes.append(hit.hit)
    assert not all(outcomes[:40]) and all(outcomes[40:])  # LRU evicted old entries, the recent ones hit


async def test_a_full_write_queue_drops_and_counts_without_blocking(make_tier, namespace, tensors_like):
    tier = await make_tier(queue_entries=2)
    keys = chain_keys(namespace, TOKENS)
    accepted = [tier.submit_kv(k, tensors_like(LAYOUT.kv(64))) for k in keys]  # no await: the writer has not run
    assert accepted == [True, True, False, False] and tier.counters.drops == 2
    await tier.drain()
    assert tier.counters.values_written == 2
    byte_bound = await make_tier(queue_bytes=1)
    assert not byte_bound.submit_kv(keys[0], tensors_like(LAYOUT.kv(64))) and byte_bound.counters.drops == 1


async def test_every_key_has_a_ttl_and_a_hit_refreshes_it(make_tier, redis_server, namespace, tensors_like):
    tier = await make_tier(ttl_seconds=1000)
    keys = chain_keys(namespace, TOKENS)
    await store(tier, keys, tensors_like, states_at=(2,))
    with redis_server.admin() as r:
        stored = r.keys(f"{namespace.redis_prefix}:*")
        assert stored and all(0 < r.ttl(k) <= 1000 for k in stored)
        for k in stored:
            r.expire(k, 10)
    assert (await tier.lookup(keys)).hit
    await tier.drain()
    with redis_server.admin() as r:  # block 3 was not needed (no state at or after it); all the rest was used
        unused = keys[3].hex.encode()
        assert all(r.ttl(k) > 900 for k in stored if unused not in k)
        assert all(r.ttl(k) <= 10 for k in stored if unused in k)


async def test_bad_input_is_a_clear_error_not_a_silent_write(make_tier, namespace, tensors_like):
    tier = await make_tier()
    keys = chain_keys(namespace, TOKENS)
    with pytest.raises(ValueError, match="layout"):
        tier.submit_kv(keys[0], tensors_like(LAYOUT.kv(32)))
    with pytest.raises(ValueError, match="rediss"):
        RedisTierOptions("redis://127.0.0.1:1/0", ssl_ca_certs="/tmp/ca.pem")
    with pytest.raises(ValueError, match="redis://"):
        RedisTierOptions("http://127.0.0.1:1")


async def test_a_password_or_acl_user_comes_from_the_url(make_tier, redis_server, namespace, tensors_like):
    with redis_server.admin() as r:
        r.acl_setuser("cacheuser", enabled=True, passwords=["+s3cret"], keys=["*"], commands=["+@all"])
    good = await make_tier(url=f"redis://cacheuser:s3cret@127.0.0.1:{redis_server.port}/0")
    keys = chain_keys(namespace, TOKENS)
    kv, states = await store(good, keys, tensors_like, states_at=(0,))
    assert_hit(await good.lookup(keys), keys, kv, states, 0)
    bad = await make_tier(url=f"redis://cacheuser:wrong@127.0.0.1:{redis_server.port}/0")
    hit = await bad.lookup(keys)
    assert not hit.hit and bad.degraded is not None
    redis_server.admin().acl_deluser("cacheuser")


async def test_rediss_with_a_ca_and_a_client_certificate_reaches_a_tls_redis(make_tier, tls_redis_server, namespace,
                                                                           tensors_like):
    tls = tls_redis_server.tls
    tier = await make_tier(url=tls_redis_server.url, ssl_ca_certs=str(tls.ca_cert), ssl_certfile=str(tls.client_cert),
                           ssl_keyfile=str(tls.client_key))
    keys = chain_keys(namespace, TOKENS)
    kv, states = await store(tier, keys, tensors_like, states_at=(2,))
    assert_hit(await tier.lookup(keys), keys, kv, states, 2)
    assert tier.degraded is None
    # without the CA the server is not trusted; without a client certificate the server refuses us (with an
    # alert or by resetting the connection, depending on timing)
    for options, says in ((dict(ssl_certfile=str(tls.client_cert), ssl_keyfile=str(tls.client_key)), "certificate"),
                          (dict(ssl_ca_certs=str(tls.ca_cert)), "unreachable")):
        untrusted = await make_tier(url=tls_redis_server.url, lookup_timeout_s=5, **options)  # time to fail the handshake
        hit = await untrusted.lookup(keys)
        assert not hit.hit and says in untrusted.degraded.lower()
