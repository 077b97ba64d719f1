"""The shared cache tier in Redis: one pipelined lookup per prompt, asynchronous bounded writes.

Every router replica reads and writes the same immutable values, so they share prefixes without
coordinating. Redis is an accelerator, never a dependency: whatever goes wrong there (down, slow,
flushed, restarted, full, evicting, returning foreign or damaged bytes) turns into a miss or a dropped
write, counted and reported as `degraded`, never an exception to the engine and never a wrong value.
The tier recovers by itself: after a connection failure it skips Redis for `retry_after_s`, then
tries again on the next lookup or write.

Must be used from one asyncio loop (the engine's): `submit_*` never blocks nor awaits.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import torch
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import codec
from .codec import MissReason, Unusable
from .counters import CacheCounters
from .keys import BLOCK_TOKENS, BlockKey, CacheNamespace
from .layout import KV, STATE, ModelLayout

log = logging.getLogger("nextserve.cache")


@dataclass(frozen=True, slots=True)
class RedisTierOptions:
    url: str                                   # redis://[user:password@]host:port/db or rediss://... (TLS)
    ttl_seconds: float = 24 * 3600             # every key expires; a hit refreshes the keys it used
    lookup_timeout_s: float = 0.1              # the one round trip that reads a prompt's headers
    fetch_timeout_s: float = 5.0               # reading the payloads of the chosen prefix
    write_timeout_s: float = 5.0               # one value's transaction
    connect_timeout_s: float = 0.5
    retry_after_s: float = 1.0                 # after a connection failure, skip Redis this long
    health_interval_s: float = 5.0             # an idle tier PINGs this often, so health is news even without traffic
    queue_bytes: int = 1 << 30                 # pending writes, at most this many tensor bytes ...
    queue_entries: int = 4096                  # ... and this many values; beyond that writes are dropped
    inline_bytes: int = 64 * 2**10             # payloads up to this size live in the head itself
    part_bytes: int = codec.DEFAULT_PART_BYTES  # larger payloads are split into parts of this size
    max_attempts: int = 3                      # candidate prefixes tried when a deeper one fails verification
    ssl_ca_certs: str | None = None            # rediss only: CA bundle to verify the server with
    ssl_certfile: str | None = None            # rediss only: client certificate (mutual TLS)
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str = "required"            # rediss only: "required", "optional" or "none"
    ssl_check_hostname: bool = True

    def __post_init__(self):
        scheme = urlsplit(self.url).scheme
        if scheme not in ("redis", "rediss"):
            raise ValueError(f"cache URL {self.url!r}: expected redis://host:port or rediss://host:port (TLS)")
        tls_options = (self.ssl_ca_certs, self.ssl_certfile, self.ssl_keyfile)
        if scheme == "redis" and any(o is not None for o in tls_options):
            raise ValueError(f"cache URL {self.url!r}: TLS options need a rediss:// URL")
        if self.ssl_cert_reqs not in ("required", "optional", "none"):
            raise ValueError(f"ssl_cert_reqs must be required, optional or none, got {self.ssl_cert_reqs!r}")
        if not self.ttl_seconds >= 0.001:
            raise ValueError(f"ttl_seconds must be >= 0.001, got {self.ttl_seconds}")
        for name in ("queue_bytes", "queue_entries", "inline_bytes", "part_bytes", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lookup_timeout_s", "fetch_timeout_s", "write_timeout_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {self.retry_after_s}")
        if not self.health_interval_s > 0:
            raise ValueError(f"health_interval_s must be > 0, got {self.health_interval_s}")

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.ttl_seconds * 1000))

    def client(self) -> aioredis.Redis:
        tls = {}
        if urlsplit(self.url).scheme == "rediss":
            tls = dict(ssl_ca_certs=self.ssl_ca_certs, ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile,
                       ssl_cert_reqs=self.ssl_cert_reqs, ssl_check_hostname=self.ssl_check_hostname)
        # No client-side retries: a failure is answered by serving without the cache, not by waiting.
        return aioredis.Redis.from_url(self.url, socket_timeout=max(self.fetch_timeout_s, self.write_timeout_s),
                                       socket_connect_timeout=self.connect_timeout_s,
                                       retry=Retry(NoBackoff(), 0), **tls)


@dataclass(frozen=True, slots=True)
class Lookup:
    """What a lookup restored: tokens [0, position) as KV blocks (one per chain key, in order) and the
    state snapshot at `position`. position 0 is a miss; `reason` says why it did not go deeper."""
    position: int
    kv_blocks: tuple[dict[str, torch.Tensor], ...] = ()
    state: dict[str, torch.Tensor] | None = None
    reason: str | None = None

    @property
    def hit(self) -> bool:
        return self.position > 0


@dataclass(slots=True)
class _Write:
    kind: str
    key: BlockKey | None
    tensors: dict[str, torch.Tensor] | None  # None: a touch (refresh the TTL of `touch`)
    nbytes: int
    touch: tuple[str, ...] = ()


class RedisTier:
    def __init__(self, options: RedisTierOptions, namespace: CacheNamespace, layout: ModelLayout | None = None,
                 *, clock=time.monotonic):
        self.options, self.namespace, self.layout, self._clock = options, namespace, layout, clock
        self.counters = CacheCounters()
        self._client: aioredis.Redis | None = None
        self._queue: deque[_Write] = deque()
        self._queued_bytes = 0
        self._queued_keys: set[str] = set()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer: asyncio.Task | None = None
        self._problems: dict[str, str] = {}  # "unreachable", "read" or "write" -> why
        self._down_until = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the client, check Redis once (bounded: `degraded` tells the result) and start the
        background writer, on the running loop. Never fails on Redis."""
        self._client = self.options.client()
        await self.probe()
        self._writer = asyncio.create_task(self._write_loop(), name="cache-writer")

    async def close(self, drain_timeout_s: float = 5.0) -> None:
        """Write what is queued (bounded by `drain_timeout_s`, the rest is dropped and counted), then stop."""
        try:
            await asyncio.wait_for(self.drain(), drain_timeout_s)
        except asyncio.TimeoutError:
            pass
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        self.counters.drops += sum(w.tensors is not None for w in self._queue)
        self._queue.clear()
        if self._client is not None:
            await self._client.aclose()

    async def drain(self) -> None:
        """Wait until every queued write has been sent (or dropped)."""
        await self._idle.wait()

    # -- health --------------------------------------------------------------------------------------

    @property
    def degraded(self) -> str | None:
        """Why the tier is not fully working (None when it is): lookups miss or writes are lost."""
        return next(iter(self._problems.values()), None)

    async def probe(self) -> bool:
        """One bounded PING. While Redis is unreachable the writer runs it every `retry_after_s`, so the
        tier recovers (and `degraded` clears) by itself even when no request comes; while it works, every
        `health_interval_s` of idleness, so a Redis that went away is reported before a request finds out."""
        try:
            await asyncio.wait_for(self._client.ping(), self.options.connect_timeout_s + self.options.lookup_timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self._failed("read", e)
            return False
        if self._problems.pop("unreachable", None) is not None:
            log.info("prefix cache: Redis is reachable again")
        self._down_until = 0.0
        return True

    def _failed(self, side: str, error: BaseException) -> None:
        if isinstance(error, (RedisConnectionError, RedisTimeoutError, asyncio.TimeoutError, OSError)):
            what = "timed out" if isinstance(error, (RedisTimeoutError, asyncio.TimeoutError)) else "unreachable"
            kind, problem = "unreachable", f"Redis {what} on {side} ({type(error).__name__}: {error}); serving without it"
            self._down_until = self._clock() + self.options.retry_after_s
        elif "OOM" in str(error):
            kind, problem = "write", (f"Redis refuses writes: maxmemory reached ({error}); set maxmemory-policy "
                                      f"allkeys-lru so that it evicts old entries instead")
        else:
            kind, problem = side, f"Redis {side} failed ({type(error).__name__}: {error})"
        if self._problems.get(kind) != problem:
            log.warning("prefix cache degraded: %s", problem)
        self._problems[kind] = problem
        if kind == "unreachable":
            self._wake.set()  # a writer idle without a timeout must start probing, or it never recovers

    def _succeeded(self, side: str) -> None:
        self._problems.pop("unreachable", None)
        self._problems.pop(side, None)

    def _down(self) -> bool:
        return self._clock() < self._down_until

    # -- writes --------------------------------------------------------------------------------------

    def submit_kv(self, key: BlockKey, tensors: dict[str, torch.Tensor]) -> bool:
        """Queue the KV block ending at key.position (CPU tensors the caller no longer changes).
        False when dropped (queue full, Redis known down, or already queued)."""
        return self._submit(KV, key, tensors)

    def submit_state(self, key: BlockKey, tensors: dict[str, torch.Tensor]) -> bool:
        """Queue the state snapshot after key.position tokens. Submit the prefix's KV blocks first: writes
        land in order, so a reader never finds a state before the blocks it needs."""
        return self._submit(STATE, key, tensors)

    def _submit(self, kind: str, key: BlockKey, tensors: dict[str, torch.Tensor]) -> bool:
        for name, t in tensors.items():
            if t.device.type != "cpu":
                raise ValueError(f"cache {kind} tensor {name!r} is on {t.device}: copy it to the CPU first")
        if self.layout is not None:
            expected = self.layout.expected(kind, key.num_tokens)
            if (problem := codec.layout_mismatch(codec.specs_of(tensors), expected)) is not None:
                raise ValueError(f"cache {kind} value at position {key.position}: {problem}")
        rkey = codec.value_key(self.namespace, kind, key)
        if rkey in self._queued_keys:
            return False
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if (self._down() or len(self._queue) >= self.options.queue_entries
                or self._queued_bytes + nbytes > self.options.queue_bytes):
            self.counters.drops += 1
            return False
        self._enqueue(_Write(kind, key, tensors, nbytes))
        self._queued_keys.add(rkey)
        return True

    def _enqueue(self, write: _Write) -> None:
        self._queue.append(write)
        self._queued_bytes += write.nbytes
        self._idle.clear()
        self._wake.set()

    async def _write_loop(self) -> None:
        while True:
            if "unreachable" in self._problems:
                try:
                    await asyncio.wait_for(self._wake.wait(), max(self.options.retry_after_s, 0.05))
                except asyncio.TimeoutError:
                    await self.probe()
                    continue
            else:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.options.health_interval_s)
                except asyncio.TimeoutError:
                    await self.probe()
                    continue
            self._wake.clear()
            while self._queue:
                write = self._queue[0]
                try:
                    await self._write_one(write)
                except Exception:  # a bug here must not stop every later write (nor hang drain)
                    self.counters.write_errors += 1
                    log.exception("prefix cache: writing a %s value failed", write.kind)
                finally:
                    self._queue.popleft()
                    self._queued_bytes -= write.nbytes
                    if write.tensors is not None:
                        self._queued_keys.discard(codec.value_key(self.namespace, write.kind, write.key))
            self._idle.set()

    async def _write_one(self, write: _Write) -> None:
        if self._down():
            self.counters.drops += write.tensors is not None
            return
        ttl = self.options.ttl_ms
        pipe = self._client.pipeline(transaction=write.tensors is not None)
        if write.tensors is None:
            for k in write.touch:
                pipe.pexpire(k, ttl)
        else:
            expected = None if self.layout is None else self.layout.expected(write.kind, write.key.num_tokens)
            value = await asyncio.to_thread(self._encode, write, expected)
            # Parts before the head, in one MULTI: a reader sees all of a value or none of it.
            for part_key, part in value.parts:
                pipe.set(part_key, part, px=ttl)
            pipe.set(value.redis_key, value.head, px=ttl)
        try:
            await asyncio.wait_for(pipe.execute(), self.options.write_timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            if write.tensors is not None:
                self.counters.write_errors += 1
            self._failed("write", e)
            return
        self._succeeded("write" if write.tensors is not None else "touch")  # a TTL refresh proves no room
        if write.tensors is not None:
            self.counters.values_written += 1
            self.counters.bytes_written += value.nbytes

    def _encode(self, write: _Write, expected) -> codec.EncodedValue:
        return codec.encode(self.namespace, write.kind, write.key, write.tensors, expected=expected,
                            inline_bytes=self.options.inline_bytes, part_bytes=self.options.part_bytes)

    # -- lookups -------------------------------------------------------------------------------------

    async def lookup(self, keys: list[BlockKey]) -> Lookup:
        """The deepest prefix of the chain `keys` (from chain_keys, in order) with every KV block up to it
        and its state snapshot present and verified. Never raises; a miss says why."""
        self.counters.queries += 1
        try:
            return await self._lookup(keys)
        except Exception as e:  # the cache only ever accelerates: a bug here is a logged miss, not a failed request
            self.counters.read_errors += 1
            log.exception("prefix cache: lookup failed")
            return Lookup(0, reason=f"internal error: {type(e).__name__}: {e}")

    async def _lookup(self, keys: list[BlockKey]) -> Lookup:
        if not keys:
            return Lookup(0, reason="no cacheable block in the prompt")
        if self._client is None:
            return Lookup(0, reason="the cache tier is not started")
        if self._down():
            return Lookup(0, reason=f"degraded: {self.degraded}")
        kv_keys = [codec.value_key(self.namespace, KV, k) for k in keys]
        state_keys = [codec.value_key(self.namespace, STATE, k) for k in keys]
        # The one round trip of a lookup: every head of the chain (small: payloads above inline_bytes are parts).
        heads = await self._read([("get", k) for k in kv_keys + state_keys], self.options.lookup_timeout_s)
        if heads is None:
            return Lookup(0, reason=f"degraded: {self.degraded}")
        kv_headers, reason = [], None
        for key, raw in zip(keys, heads[:len(keys)]):
            header = self._header(raw, KV, key)
            if not isinstance(header, codec.ValueHeader):
                reason = header
                break
            kv_headers.append(header)
        state_headers = {}
        for i, (key, raw) in enumerate(zip(keys[:len(kv_headers)], heads[len(keys):])):
            header = self._header(raw, STATE, key)
            if isinstance(header, codec.ValueHeader):
                state_headers[i] = header
            elif header != MissReason.ABSENT:
                reason = reason or header
        decoded_kv: dict[int, dict[str, torch.Tensor]] = {}
        candidates = sorted(state_headers, reverse=True)
        for _ in range(self.options.max_attempts):
            candidates = [c for c in candidates if c < len(kv_headers)]
            if not candidates:
                break
            best = candidates.pop(0)
            # (chain index, header) of what this candidate needs and has not decoded yet, its state last
            wanted = [(i, kv_headers[i]) for i in range(best + 1) if i not in decoded_kv] + [(best, state_headers[best])]
            used_heads = kv_keys[:best + 1] + [state_keys[best]]
            part_keys = [p for _, h in wanted for p in h.parts]
            parts: list = []
            if part_keys:
                ttl = self.options.ttl_ms
                fetched = await self._read([("getex", k, ttl) for k in part_keys] + [("pexpire", k, ttl) for k in used_heads],
                                           self.options.fetch_timeout_s)
                if fetched is None:
                    return Lookup(0, reason=f"degraded: {self.degraded}")
                parts = fetched[:len(part_keys)]
            else:
                self._touch(used_heads)
            outcome = await asyncio.to_thread(self._decode, wanted, parts, decoded_kv)
            if isinstance(outcome, tuple):  # (chain index, kind, refusal) of the value that failed
                index, kind, refusal = outcome
                self._refused(refusal)
                reason = refusal.reason.value
                if kind == KV:
                    kv_headers = kv_headers[:index]
                continue
            self.counters.hits += 1
            self.counters.hit_tokens += keys[best].position
            return Lookup(keys[best].position, tuple(decoded_kv[i] for i in range(best + 1)), outcome, reason)
        return Lookup(0, reason=reason or MissReason.ABSENT.value)

    def _header(self, raw, kind: str, key: BlockKey) -> codec.ValueHeader | MissReason:
        try:
            return codec.read_header(raw, self.namespace, kind, key)
        except Unusable as e:
            self._refused(e)
            return e.reason

    def _refused(self, error: Unusable) -> None:
        if error.reason != MissReason.ABSENT:
            self.counters.verification_failures[error.reason.value] += 1
            log.warning("prefix cache: refused a value: %s", error)

    def _decode(self, wanted, parts, decoded_kv):
        """Decode `wanted` ((chain index, header) pairs, the state last) from `parts` in order, keeping
        KV blocks in decoded_kv (on a worker thread: it only reads the tier). The state's tensors, or
        (index, kind, Unusable) of the first refusal."""
        offset = 0
        for index, header in wanted:
            own = parts[offset:offset + len(header.parts)]
            offset += len(header.parts)
            expected = None if self.layout is None else self.layout.expected(
                header.kind, header.position - index * BLOCK_TOKENS)
            try:
                tensors = codec.decode(header, own, expected=expected)
            except Unusable as e:
                return index, header.kind, e
            if header.kind == STATE:
                return tensors
            decoded_kv[index] = tensors
        raise AssertionError("the state header comes last")

    async def _read(self, commands: list[tuple], timeout: float) -> list | None:
        pipe = self._client.pipeline(transaction=False)
        for name, *args in commands:
            if name == "getex":
                pipe.getex(args[0], px=args[1])
            else:
                getattr(pipe, name)(*args)
        try:
            results = await asyncio.wait_for(pipe.execute(raise_on_error=False), timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self.counters.read_errors += 1
            self._failed("read", e)
            return None
        # A key of ours holding another type (a hash, a list) is a damaged value, not a broken Redis:
        # as empty bytes it fails verification (malformed / truncated) like any other damage.
        results = [b"" if isinstance(r, ResponseError) and str(r).startswith("WRONGTYPE") else r for r in results]
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            self.counters.read_errors += 1
            self._failed("read", errors[0])
            return None
        self._succeeded("read")
        self.counters.bytes_read += sum(len(r) for r in results if isinstance(r, bytes))
        return results

    def _touch(self, keys: list[str]) -> None:
        """Refresh the TTL of the keys a hit used, off the request's path (dropped when the queue is full)."""
        if len(self._queue) < self.options.queue_entries:
            self._enqueue(_Write(KV, None, None, 0, tuple(keys)))
