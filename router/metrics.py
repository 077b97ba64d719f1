"""The router's Prometheus series (names, units and labels are documented in docs/observability.md).

Label values are bounded: finish reasons and gRPC codes are fixed sets, HTTP statuses are folded
into a fixed set (`http_status_label`), `endpoint` is one of the generation routes, `shard` is a
plan shard index, and the per-expert token counts are one series per (MoE layer, expert) of the model.
The prefix cache's series are router/cache_metrics.py.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

PREFIX = "nextserve_router_"

# Request-level latencies: from tens of milliseconds (a short prompt on a GPU) to minutes (a long
# prompt queued behind others on CPU).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Per-token and per-layer latencies are one to three orders of magnitude shorter.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DISPATCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)

FINISH_REASONS = ("stop", "length", "abort", "error")

# The statuses the HTTP API answers with (docs/http-api.md); anything else is counted by its class.
HTTP_STATUSES = (200, 400, 404, 405, 415, 422, 429, 499, 500, 503)


def http_status_label(status: int) -> str:
    """The `status` label of an HTTP response: the code itself when it is one the API uses, else its
    class ("4xx", "5xx"), so a stray code cannot add series."""
    return str(status) if status in HTTP_STATUSES else f"{status // 100}xx"


class ExpertTokenCounts:
    """Tokens routed to each expert of each MoE layer, counted in one [layers, experts] tensor.

    The dispatch path only adds a bincount (no per-series Python object is touched per token);
    the series are built when Prometheus scrapes."""

    def __init__(self, moe_layers: list[int], num_experts: int):
        self.moe_layers = moe_layers
        self._row = {layer: i for i, layer in enumerate(moe_layers)}
        self._counts = torch.zeros(len(moe_layers), num_experts, dtype=torch.int64)
        self._lock = threading.Lock()

    def add(self, layer: int, expert_ids: torch.Tensor) -> None:
        row = self._row.get(layer)
        if row is None:
            return  # not an MoE layer: the workers reject the dispatch, and there is no series for it
        ids = expert_ids.reshape(-1).to("cpu", torch.int64)
        counts = torch.bincount(ids[ids >= 0], minlength=self._counts.shape[1])
        with self._lock:
            self._counts[row] += counts

    def collect(self):
        with self._lock:
            counts = self._counts.clone()
        family = CounterMetricFamily(PREFIX + "expert_tokens", "Token slots routed to each expert (top-k slots, "
                                     "so each token counts once per expert it picked)", labels=["layer", "expert"])
        for row, layer in enumerate(self.moe_layers):
            for expert, value in enumerate(counts[row].tolist()):
                family.add_metric([str(layer), str(expert)], value)
        yield family


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, moe_layers: list[int], num_experts: int):
        self.registry = registry
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Arrival of a request to its first generated token",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between two consecutive tokens of a request",
            buckets=TOKEN_BUCKETS, registry=registry)
        self.request_duration = Histogram(
            PREFIX + "request_duration_seconds", "Arrival of a request to its end (any outcome)",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_time = Histogram(
            PREFIX + "queue_time_seconds", "Arrival of a request to its first forward pass",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.step_duration = Histogram(
            PREFIX + "step_duration_seconds", "One forward pass of the running batch, expert dispatch included",
            buckets=TOKEN_BUCKETS, registry=registry)
        self.requests = Counter(PREFIX + "requests", "Requests ended, by finish reason", ["finish_reason"],
                                registry=registry)
        self.responses = Counter(PREFIX + "responses", "Generate calls ended, by gRPC status code", ["code"],
                                 registry=registry)
        self.http_responses = Counter(
            PREFIX + "http_responses", "HTTP generation requests ended, by route and HTTP status (499: the client "
            "went away)", ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of admitted requests",
                                     registry=registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", registry=registry)
        # Speculative decoding: accepted / draft is the acceptance rate (rate() of both over a window).
        self.draft_tokens = Counter(PREFIX + "spec_decode_draft_tokens", "MTP draft tokens the model verified",
                                    registry=registry)
        self.accepted_draft_tokens = Counter(PREFIX + "spec_decode_accepted_tokens",
                                             "MTP draft tokens the model accepted", registry=registry)
        self.running = Gauge(PREFIX + "running_sequences", "Sequences in the running batch", registry=registry)
        self.waiting = Gauge(PREFIX + "waiting_sequences", "Sequences queued, not yet admitted", registry=registry)
        self.kv_blocks_used = Gauge(PREFIX + "kv_blocks_used", "Attention K/V blocks held by sequences",
                                    registry=registry)
        self.kv_blocks_total = Gauge(PREFIX + "kv_blocks_total", "Attention K/V blocks in the pool", registry=registry)
        self.state_slots_used = Gauge(PREFIX + "state_slots_used", "DeltaNet state slots held by sequences",
                                      registry=registry)
        self.state_slots_total = Gauge(PREFIX + "state_slots_total", "DeltaNet state slots in the pool",
                                       registry=registry)
        self.shard_dispatch = Histogram(
            PREFIX + "shard_dispatch_seconds", "One MoE layer's round trip to one expert shard (send, compute, "
            "receive)", ["shard"], buckets=DISPATCH_BUCKETS, registry=registry)
        self.shard_dispatch_errors = Counter(
            PREFIX + "shard_dispatch_errors", "MoE layer requests to a shard that failed (down, timeout, rejected)",
            ["shard"], registry=registry)
        self.expert_tokens = ExpertTokenCounts(moe_layers, num_experts)
        registry.register(self.expert_tokens)
        for reason in FINISH_REASONS:  # every series exists from the start, so rate() sees its first increase
            self.requests.labels(reason)

    def watch_queue(self, running: Callable[[], int], waiting: Callable[[], int]) -> None:
        """Read the scheduler's queue lengths at scrape time: nothing to update on the hot path."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)

    def watch_memory(self, blocks) -> None:
        """Read the block manager's free lists at scrape time (a BlockManager: `num_blocks`,
        `num_free_blocks`, `num_slots`, `num_free_slots`); the engine's loop pays nothing."""
        self.kv_blocks_total.set_function(lambda: blocks.num_blocks)
        self.kv_blocks_used.set_function(lambda: blocks.num_blocks - blocks.num_free_blocks)
        self.state_slots_total.set_function(lambda: blocks.num_slots)
        self.state_slots_used.set_function(lambda: blocks.num_slots - blocks.num_free_slots)
