"""What a worker records: Prometheus metrics of its forwards always, a span per traced forward.

A forward is one merged batch of a layer's requests (see batcher.py). It gets a span only when one
of the requests it served carries a router step's trace context; it is then the child of the first
such step and links to the others (several routers' steps merged into one forward).
"""
from __future__ import annotations

import torch
from opentelemetry import trace
from opentelemetry.trace import Link, Status, StatusCode
from prometheus_client import CollectorRegistry, Counter, Histogram

from nextserve.telemetry import attributes as attr
from nextserve.telemetry.tracing import Tracing

PREFIX = "nextserve_worker_"
FORWARD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
MERGE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


class WorkerTelemetry:
    def __init__(self, registry: CollectorRegistry, tracing: Tracing | None, shard: int):
        self.registry, self.tracing, self.shard = registry, tracing, shard
        self.tracer = tracing.tracer if tracing is not None else None
        label = str(shard)
        # Every series carries `shard` so that dashboards can group workers by it (replicas share it).
        self.forward_seconds = Histogram(
            PREFIX + "forward_seconds", "One expert forward (a layer's merged requests) on the compute thread",
            ["shard"], buckets=FORWARD_BUCKETS, registry=registry).labels(label)
        self.tokens = Counter(PREFIX + "tokens", "Token rows run through the experts", ["shard"],
                              registry=registry).labels(label)
        self.forwards = Counter(PREFIX + "forwards", "Expert forwards run", ["shard"], registry=registry).labels(label)
        self.requests = Counter(PREFIX + "requests", "Expert requests answered with an output", ["shard"],
                                registry=registry).labels(label)
        self.request_errors = Counter(PREFIX + "request_errors", "Expert requests answered with an error",
                                      ["shard"], registry=registry).labels(label)
        self.merged = Histogram(PREFIX + "merged_requests", "Requests merged into one forward (batch merge ratio)",
                                ["shard"], buckets=MERGE_BUCKETS, registry=registry).labels(label)

    def shutdown(self) -> None:
        if self.tracing is not None:
            self.tracing.shutdown()

    def forward_done(self, layer: int, contexts: list, expert_ids: torch.Tensor, start_ns: int, end_ns: int,
                     error: Exception | None) -> None:
        """LayerBatcher hook (compute thread): one forward over len(contexts) requests; `contexts` holds each
        request's trace context (None: untraced)."""
        rows = expert_ids.shape[0]
        self.forward_seconds.observe((end_ns - start_ns) / 1e9)
        self.forwards.inc()
        self.merged.observe(len(contexts))
        if error is None:
            self.tokens.inc(rows)
        traced = [c for c in contexts if c is not None] if self.tracer is not None else ()
        if not traced:
            return
        parents = [trace.get_current_span(c).get_span_context() for c in traced]
        span = self.tracer.start_span(
            "expert_forward", context=traced[0], links=[Link(p) for p in parents[1:]], start_time=start_ns,
            attributes={attr.SHARD: self.shard, attr.LAYER: layer, attr.TOKENS: rows,
                        attr.MERGED_REQUESTS: len(contexts),
                        attr.EXPERTS_HIT: int(torch.unique(expert_ids[expert_ids >= 0]).numel())})
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end(end_time=end_ns)
