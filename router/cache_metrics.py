"""The prefix cache's Prometheus series, read from its counters when Prometheus scrapes (nothing is
counted twice: the local tier's books and the Redis tier's counters are the source).

    nextserve_router_prefix_cache_queries_total{tier}      admissions looked up (local), lookups sent (redis)
    nextserve_router_prefix_cache_hits_total{tier}         of those, how many restored a prefix
    nextserve_router_prefix_cache_hit_tokens_total{tier}   prompt tokens restored
    nextserve_router_prefix_cache_bytes_total{tier,direction}  bytes read from / written to Redis
    nextserve_router_prefix_cache_errors_total{tier,kind}  read, write, drop, verification_<reason>
    nextserve_router_prefix_cache_degraded{tier}           1 while the tier is not working
    nextserve_router_prefix_cache_blocks / _snapshots      what the local tier holds now
"""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .metrics import PREFIX

NAME = PREFIX + "prefix_cache_"


class PrefixCacheCollector:
    def __init__(self, blocks, redis_cache=None):
        """blocks: the engine's CachingBlockManager; redis_cache: its RedisCache, or None."""
        self.blocks, self.redis_cache = blocks, redis_cache

    def collect(self):
        local = self.blocks.stats
        queries = CounterMetricFamily(NAME + "queries", "Prefix cache lookups", labels=["tier"])
        hits = CounterMetricFamily(NAME + "hits", "Prefix cache lookups that restored a prefix", labels=["tier"])
        tokens = CounterMetricFamily(NAME + "hit_tokens", "Prompt tokens restored from the prefix cache",
                                     labels=["tier"])
        queries.add_metric(["local"], local.queries)
        hits.add_metric(["local"], local.hits)
        tokens.add_metric(["local"], local.hit_tokens)
        degraded = GaugeMetricFamily(NAME + "degraded", "1 while a prefix cache tier is not working", labels=["tier"])
        degraded.add_metric(["local"], 0)
        families = [queries, hits, tokens, degraded]
        if self.redis_cache is not None:
            c = self.redis_cache.tier.counters
            queries.add_metric(["redis"], c.queries)
            hits.add_metric(["redis"], c.hits)
            tokens.add_metric(["redis"], c.hit_tokens)
            degraded.add_metric(["redis"], 1 if self.redis_cache.degraded else 0)
            moved = CounterMetricFamily(NAME + "bytes", "Bytes moved to and from Redis", labels=["tier", "direction"])
            moved.add_metric(["redis", "read"], c.bytes_read)
            moved.add_metric(["redis", "written"], c.bytes_written)
            errors = CounterMetricFamily(NAME + "errors", "Prefix cache failures, all served as misses",
                                         labels=["tier", "kind"])
            errors.add_metric(["redis", "read"], c.read_errors)
            errors.add_metric(["redis", "write"], c.write_errors)
            errors.add_metric(["redis", "drop"], c.drops)
            for reason, n in sorted(c.verification_failures.items()):
                errors.add_metric(["redis", f"verification_{reason}"], n)
            families += [moved, errors]
        held = GaugeMetricFamily(NAME + "blocks", "KV blocks the local prefix cache can find by content")
        held.add_metric([], self.blocks.num_cached_blocks)
        snapshots = GaugeMetricFamily(NAME + "snapshots", "DeltaNet state snapshots the local prefix cache holds")
        snapshots.add_metric([], self.blocks.num_snapshots)
        yield from families + [held, snapshots]
