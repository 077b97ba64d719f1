"""The engine's Redis tier: what the local prefix cache misses is looked up in Redis, what it takes is
stored there (router/cache/redis_tier.py does the storage; this is the engine's side of it).

- Lookup, before a request is queued: when Redis could hold a deeper prefix of the prompt than the
  local tier does, one bounded `RedisTier.lookup`. A deeper verified hit travels with the sequence to
  its admission, where the scheduler gives it fresh blocks and the runner writes the KV blocks into
  them and the state into its slot (router/snapshots.py `restore_remote`). Anything else is a miss: the request is
  computed from scratch. Never raises on Redis.
- Store, after each step, on the event loop: every state snapshot the local tier took in the step
  (prompt ends, intervals, request ends) goes to Redis with the KV blocks of its prefix that this
  router has not sent yet (KV first: the tier writes in order). The tier's writes are asynchronous and
  bounded; the CPU copies are the only work on the loop.
"""
from __future__ import annotations

import time
from collections import OrderedDict

import torch

from nextserve.model.state import CachePools, LinearAttentionState

from .cache.keys import BlockKey
from .cache.layout import NEXT_TOKEN, ModelLayout
from .cache.redis_tier import Lookup, RedisTier
from .prefix_cache import CachingBlockManager

SENT_KEYS = 1 << 16  # KV block keys remembered as sent (least recently used forgotten: sent again, harmless)
# A KV block is sent again after this long: Redis may have lost it (FLUSHALL, eviction) without telling,
# and a chain with a hole ends every longer prefix before it. After a Redis error everything is resent.
RESEND_AFTER_S = 60.0


class RedisCache:
    def __init__(self, tier: RedisTier, blocks: CachingBlockManager, pools: CachePools, layout: ModelLayout):
        self.tier, self.blocks, self.pools, self.layout = tier, blocks, pools, layout
        self._sent: OrderedDict[str, float] = OrderedDict()  # key hex -> when sent
        self._errors_seen = 0

    @property
    def degraded(self) -> str | None:
        return self.tier.degraded

    # -- lookup ----------------------------------------------------------------------------------

    async def lookup(self, prompt_ids: list[int]) -> Lookup | None:
        """A verified Redis hit deeper than what the local tier holds for the prompt's tokens but its
        last, or None."""
        token_ids = prompt_ids[:-1]
        keys = self.blocks.keys(token_ids)
        if not keys:
            return None
        local = self.blocks.lookup(keys, token_ids, prompt_ids[-1])
        if local is not None and local.position == keys[-1].position:
            return None  # nothing deeper to find
        hit = await self.tier.lookup(keys)
        if not hit.hit or (local is not None and hit.position <= local.position):
            return None
        if self.layout.with_mtp and int(hit.kv_blocks[-1][NEXT_TOKEN]) != prompt_ids[hit.position]:
            return None  # its last MTP row was computed for another next token (router/prefix_cache.py)
        return hit

    # -- store -----------------------------------------------------------------------------------

    def store(self, snapshots: list[tuple[list[BlockKey], list[LinearAttentionState | None]]]) -> None:
        """Send each (chain keys up to p, state at p) to Redis: the KV blocks not sent yet, then the state."""
        errors = self.tier.counters.read_errors + self.tier.counters.write_errors
        if errors != self._errors_seen:  # Redis was down or refused writes: it may have lost anything
            self._errors_seen = errors
            self._sent.clear()
        now = time.monotonic()
        for keys, state in snapshots:
            for key in keys:
                sent = self._sent.get(key.hex)
                if sent is not None and now - sent < RESEND_AFTER_S:
                    self._sent.move_to_end(key.hex)
                    continue
                block = self.blocks.cached_block(key.hex)
                if block is None:
                    break  # evicted already: Redis would hold a chain with a hole; stop here
                if not self.tier.submit_kv(key, self._kv_tensors(key.hex, *block)):
                    break
                self._sent[key.hex] = now
                self._sent.move_to_end(key.hex)
                if len(self._sent) > SENT_KEYS:
                    self._sent.popitem(last=False)
            else:
                self.tier.submit_state(keys[-1], self._state_tensors(state))

    def _kv_tensors(self, key_hex: str, block: int, rows: int) -> dict[str, torch.Tensor]:
        tensors = {}
        for i in self.layout.attention_layers:
            k, v = self.pools.kv[i]
            tensors[f"layers.{i}.key"] = k[block, :rows].to("cpu", copy=True)
            tensors[f"layers.{i}.value"] = v[block, :rows].to("cpu", copy=True)
        if self.layout.with_mtp:
            tensors[NEXT_TOKEN] = torch.tensor([self.blocks.next_token(key_hex)], dtype=torch.int64)
        return tensors

    def _state_tensors(self, state: list[LinearAttentionState | None]) -> dict[str, torch.Tensor]:
        tensors = {}
        for i in self.layout.linear_layers:
            tensors[f"layers.{i}.conv"] = state[i].conv.to("cpu", copy=True)
            tensors[f"layers.{i}.recurrent"] = state[i].recurrent.to("cpu", copy=True)
        return tensors
