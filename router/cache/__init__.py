"""The prefix and DeltaNet-state cache's storage layer, and session records.

What the engine stores is the state of a sequence after p tokens, in two kinds of value under
content keys (see docs/cache.md):

- `keys`: `CacheNamespace(fingerprint, dtype)` and `chain_keys(namespace, token_ids)`, the hash
  chain over 64-token blocks; `BlockKey.position` is where each key ends (64, 128, ...). Torch-free.
- `layout`: `ModelLayout.from_config(config, dtype)`: the tensors of a "state" value (per DeltaNet
  layer i `layers.{i}.conv`, `layers.{i}.recurrent`) and of a "kv" value (per attention layer i
  `layers.{i}.key`, `layers.{i}.value`, [block tokens, Hkv, D]). Torch-free.
- `codec`: `encode` / `read_header` / `decode`: safetensors behind a checksummed header; anything
  failing verification raises `Unusable` with a `MissReason`.
- `redis_tier`: `RedisTier(RedisTierOptions(url), namespace, layout)`, the shared tier (torch, redis).
- `sessions`, `redis_sessions`: `SessionRecord`, `InMemorySessionStore`, `RedisSessionStore` (redis).

How the engine uses the tier (all on its event loop):

    tier = RedisTier(RedisTierOptions("redis://cache:6379/0"), CacheNamespace(fingerprint, "bfloat16"),
                     ModelLayout.from_config(config, "bfloat16"))
    await tier.start()
    keys = chain_keys(tier.namespace, prompt_ids[:-1])   # leave >= 1 token to compute the next logits
    hit = await tier.lookup(keys)                         # never raises; hit.position == 0 is a miss
    if hit.hit:   # copy hit.state into a state slot, hit.kv_blocks[i] into block i of the block table,
        ...       # then prefill prompt_ids[hit.position:]
    # after prefill / at request end, at a 64-aligned position p = keys[j].position:
    for i in range(j + 1): tier.submit_kv(keys[i], kv_block_i_on_cpu)   # returns False when dropped
    tier.submit_state(keys[j], state_at_p_on_cpu)                        # after the blocks it needs
    tier.degraded        # None, or why the cache is not working (for health and ModelInfo)
    tier.counters        # CacheCounters: queries, hits, hit_tokens, bytes, errors, drops, refusals
    await tier.close()

`submit_*` take CPU tensors the caller no longer mutates, with exactly the layout's names and shapes
(ValueError otherwise: a caller bug). They never block: a full queue drops the write and counts it.

Sessions: `begin(session_id)` (SessionBusy -> gRPC ABORTED), `commit(turn, record)`, `release(turn)`;
the Redis store raises SessionStoreUnavailable (gRPC UNAVAILABLE) when Redis is down.
"""
# Only the torch-free parts are imported here, so that the scheduler and block manager can use the keys
# without torch; the tier and the codec are imported from their modules.
from .counters import CacheCounters
from .keys import BLOCK_TOKENS, CACHE_FORMAT_VERSION, BlockKey, CacheNamespace, chain_keys
from .layout import KV, STATE, ModelLayout
from .sessions import (InMemorySessionStore, SessionBusy, SessionRecord, SessionStore, SessionStoreUnavailable, Turn,
                       session_turn)

__all__ = [
    "BLOCK_TOKENS", "CACHE_FORMAT_VERSION", "KV", "STATE", "BlockKey", "CacheCounters", "CacheNamespace",
    "InMemorySessionStore", "ModelLayout", "SessionBusy", "SessionRecord", "SessionStore", "SessionStoreUnavailable",
    "Turn", "chain_keys", "session_turn",
]
