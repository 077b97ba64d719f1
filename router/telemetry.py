"""What the router records about requests and steps: Prometheus metrics always, spans when traced.

The engine, the gRPC service and the shard pool call a handful of hooks here; everything else
(timestamps, span building, label values) stays in this file so their code stays about serving.

Spans (docs/observability.md has the reasoning): one SERVER span per request (child of the
caller's span when the call carries W3C trace context) with `queue`, `prefill` and `decode`
child spans; one `step` span per forward pass that serves at least one traced request, with the
per-shard dispatch time of the whole step as attributes, never a span per layer. A step serving
several traced requests is the child of the oldest one's request span and links to the others.
Its context travels with each layer's expert requests, so the workers' forward spans hang off it.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry

from nextserve.model.sampling import SamplingParams
from nextserve.telemetry import attributes as attr
from nextserve.telemetry.tracing import Tracing, context_from_grpc_metadata, extract, inject

from .metrics import RouterMetrics, http_status_label


@dataclass(slots=True, eq=False)
class RequestRecord:
    """One Generate call as telemetry sees it; times are time.monotonic() seconds."""
    arrival: float
    arrival_ns: int  # wall clock, for span timestamps
    span: trace.Span | None = None  # None: not traced
    seq_id: int | None = None
    num_prompt: int = 0
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    end: float | None = None

    def wall_ns(self, t: float) -> int:
        return self.arrival_ns + int((t - self.arrival) * 1e9)


@dataclass(slots=True, eq=False)
class StepRecord:
    start: float
    span: trace.Span | None = None
    # shard -> [seconds summed over layers, slowest layer, token rows]
    shards: dict[int, list] = field(default_factory=dict)


class RouterTelemetry:
    def __init__(self, registry: CollectorRegistry, tracing: Tracing | None, model_name: str,
                 moe_layers: list[int], num_experts: int):
        self.registry, self.tracing, self.model_name = registry, tracing, model_name
        self.tracer = tracing.tracer if tracing is not None else None
        self.metrics = RouterMetrics(registry, moe_layers, num_experts)
        self._records: dict[int, RequestRecord] = {}  # seq_id -> record, while the sequence runs
        self._step: StepRecord | None = None
        self._pool = None

    # -- wiring (once) --------------------------------------------------------------------------------

    def attach(self, scheduler, pool) -> None:
        """Read queue lengths from `scheduler` at scrape time; time every shard reply of `pool`."""
        self.metrics.watch_queue(lambda: len(scheduler.running), lambda: len(scheduler.waiting))
        self.metrics.watch_memory(scheduler.blocks)
        self._pool = pool
        for shard in {c.shard for c in pool.connections}:  # the error series exist before the first error
            self.metrics.shard_dispatch_errors.labels(str(shard))
        pool.on_reply = self.shard_replied
        pool.on_dispatch = self.metrics.expert_tokens.add

    def shutdown(self) -> None:
        if self.tracing is not None:
            self.tracing.shutdown()

    # -- requests (the gRPC service, event loop) ------------------------------------------------------

    def request_started(self, request, metadata) -> RequestRecord:
        return self._start(attr.OPERATION_TEXT_COMPLETION, context_from_grpc_metadata(metadata), request.session_id)

    def http_request_started(self, operation: str, headers: Mapping[str, str]) -> RequestRecord:
        """An HTTP generation request arrived (router/http_telemetry.py); `headers` may carry W3C context."""
        return self._start(operation, extract(headers), "")

    def _start(self, operation: str, parent, session_id: str) -> RequestRecord:
        record = RequestRecord(time.monotonic(), time.time_ns())
        if self.tracer is not None:
            span = self.tracer.start_span(
                f"{operation} {self.model_name}", context=parent, kind=SpanKind.SERVER, start_time=record.arrival_ns,
                attributes={attr.OPERATION_NAME: operation, attr.REQUEST_MODEL: self.model_name})
            if span.is_recording():
                if session_id:
                    span.set_attribute(attr.SESSION_ID, session_id)
                record.span = span
        return record

    def request_admitted(self, record: RequestRecord, seq_id: int, request_id: str | None, num_prompt: int,
                         params: SamplingParams, stop: list[str]) -> None:
        """A sequence of the request was queued. An HTTP request with `n` choices admits one per choice;
        each counts its prompt (each is prefilled) and the span keeps the last choice's parameters."""
        record.seq_id, record.num_prompt = seq_id, num_prompt
        self._records[seq_id] = record
        self.metrics.prompt_tokens.inc(num_prompt)
        if record.span is not None:
            record.span.set_attributes({
                **({attr.RESPONSE_ID: request_id} if request_id else {}), attr.USAGE_INPUT_TOKENS: num_prompt,
                attr.REQUEST_MAX_TOKENS: params.max_tokens, attr.REQUEST_TEMPERATURE: params.temperature,
                attr.REQUEST_TOP_P: params.top_p, attr.REQUEST_TOP_K: params.top_k,
                attr.REQUEST_PRESENCE_PENALTY: params.presence_penalty,
                attr.REQUEST_FREQUENCY_PENALTY: params.frequency_penalty,
                **({attr.REQUEST_SEED: params.seed} if params.seed is not None else {}),
                **({attr.REQUEST_STOP_SEQUENCES: stop} if stop else {})})

    def request_finished(self, record: RequestRecord, seq, code: grpc.StatusCode, message: str = "") -> None:
        """Once per Generate call, any outcome. `seq` is the engine's Sequence (None: never admitted)."""
        self.metrics.responses.labels(code.name).inc()
        seqs = [seq] if seq is not None else []
        reasons = self._end_sequences(record, seqs, lambda s: _finish_reason(s.finish_reason, code))
        span = record.span
        if span is None:
            return
        span.set_attribute(attr.RPC_GRPC_STATUS_CODE, code.value[0])
        error = None if code == grpc.StatusCode.OK else (f"{code.name}: {message}" if message else code.name)
        self._end_request_span(record, seqs, reasons, error)

    def http_request_finished(self, record: RequestRecord, seqs: list, endpoint: str, status: int) -> None:
        """Once per HTTP generation request, any outcome; `seqs` are the sequences it admitted (one per
        choice), `status` the HTTP status it answered with (499 when the client went away first)."""
        self.metrics.http_responses.labels(endpoint, http_status_label(status)).inc()
        reasons = self._end_sequences(record, seqs, lambda s: _http_finish_reason(s.finish_reason, status))
        span = record.span
        if span is None:
            return
        span.set_attribute(attr.HTTP_RESPONSE_STATUS_CODE, status)
        # OpenTelemetry's HTTP conventions: on a SERVER span only a 5xx is an error (a 4xx is the caller's).
        self._end_request_span(record, seqs, reasons, f"HTTP {status}" if status >= 500 else None)

    def _end_sequences(self, record: RequestRecord, seqs: list, reason_of) -> list[str]:
        end = time.monotonic()
        record.end = end
        reasons = []
        for seq in seqs:
            self._records.pop(seq.seq_id, None)
            reasons.append(reason_of(seq))
            self.metrics.requests.labels(reasons[-1]).inc()
        if seqs:
            self.metrics.request_duration.observe(end - record.arrival)
            if record.first_scheduled is None:  # never ran: it waited until it ended
                self.metrics.queue_time.observe(end - record.arrival)
        return reasons

    def _end_request_span(self, record: RequestRecord, seqs: list, reasons: list[str], error: str | None) -> None:
        span = record.span
        if seqs:
            span.set_attributes({attr.USAGE_OUTPUT_TOKENS: sum(len(s.output_ids) for s in seqs),
                                 attr.RESPONSE_FINISH_REASONS: reasons})
            self._phase_spans(record, record.end)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=record.wall_ns(record.end))

    def _phase_spans(self, record: RequestRecord, end: float) -> None:
        context = trace.set_span_in_context(record.span)
        phases = [("queue", record.arrival, record.first_scheduled or end)]
        if record.first_scheduled is not None:
            phases.append(("prefill", record.first_scheduled, record.first_token or end))
        if record.first_token is not None:
            phases.append(("decode", record.first_token, end))
        for name, start, stop in phases:
            self.tracer.start_span(name, context=context, start_time=record.wall_ns(start)).end(
                end_time=record.wall_ns(stop))

    # -- steps (the engine loop; shard replies arrive on the same loop while the step runs) ------------

    def step_started(self, batch) -> StepRecord:
        now = time.monotonic()
        step = StepRecord(now)
        traced = []
        for seq in batch.seqs:
            record = self._records.get(seq.seq_id)
            if record is None:
                continue
            if record.first_scheduled is None:
                record.first_scheduled = now
                self.metrics.queue_time.observe(now - record.arrival)
            if record.span is not None:
                traced.append(record.span.get_span_context())
        if traced:
            step.span = self.tracer.start_span(
                "step", context=trace.set_span_in_context(trace.NonRecordingSpan(traced[0])),
                links=[Link(c) for c in traced[1:]], attributes={
                    attr.STEP_SEQUENCES: len(batch.seqs), attr.STEP_TOKENS: sum(batch.num_new_tokens),
                    attr.STEP_PREFILL_TOKENS: sum(n for s, n in zip(batch.seqs, batch.num_new_tokens)
                                                  if s.is_prefilling)})
            carrier: dict[str, str] = {}
            inject(trace.set_span_in_context(step.span), carrier)
            self._pool.trace_context = carrier
        self._step = step
        return step

    def step_finished(self, step: StepRecord, sampled: Mapping[int, list[int]] | None, error: str | None = None) -> None:
        """`sampled`: seq_id -> tokens of the pass (None when it failed)."""
        now = time.monotonic()
        self._step = None
        self.metrics.step_duration.observe(now - step.start)
        for seq_id in sampled or ():
            record = self._records.get(seq_id)
            if record is None:
                continue
            if record.first_token is None:
                record.first_token = now
                self.metrics.time_to_first_token.observe(now - record.arrival)
            else:
                self.metrics.inter_token_latency.observe(now - record.last_token)
            record.last_token = now
        if sampled:
            self.metrics.generation_tokens.inc(sum(len(tokens) for tokens in sampled.values()))
        if step.span is not None:
            self._pool.trace_context = {}
            self._end_step_span(step, error)

    def speculation(self, drafted: int, accepted: int) -> None:
        """A step verified `drafted` drafts and accepted `accepted` of them."""
        if drafted:
            self.metrics.draft_tokens.inc(drafted)
            self.metrics.accepted_draft_tokens.inc(accepted)

    def _end_step_span(self, step: StepRecord, error: str | None) -> None:
        span = step.span
        for shard, (seconds, slowest, rows) in step.shards.items():
            span.set_attributes({attr.shard_dispatch_seconds(shard): seconds,
                                 attr.shard_max_layer_seconds(shard): slowest, attr.shard_tokens(shard): rows})
        if step.shards:
            span.set_attribute(attr.STEP_SLOWEST_SHARD, max(step.shards, key=lambda s: step.shards[s][0]))
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    def shard_replied(self, shard: int, request, seconds: float, failed: bool) -> None:
        """ShardPool hook, on the event loop: one MoE layer request to `shard` came back (or failed)."""
        label = str(shard)
        if failed:
            self.metrics.shard_dispatch_errors.labels(label).inc()
        else:
            self.metrics.shard_dispatch.labels(label).observe(seconds)
        step = self._step
        if step is not None and step.span is not None:
            totals = step.shards.setdefault(shard, [0.0, 0.0, 0])
            totals[0] += seconds
            totals[1] = max(totals[1], seconds)
            totals[2] += request.hidden.shape[0] if request.hidden.shape else 0


def _finish_reason(engine_reason: str | None, code: grpc.StatusCode) -> str:
    if code == grpc.StatusCode.OK:
        # The engine calls a stop-string match an abort (the service stopped it); the client saw "stop".
        return engine_reason if engine_reason in ("stop", "length") else "stop"
    if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
        return "abort"  # the caller went away
    return "error"


def _http_finish_reason(engine_reason: str | None, status: int) -> str:
    if status == 200:
        return engine_reason if engine_reason in ("stop", "length") else "stop"  # a stop string, as above
    return "abort" if status == 499 else "error"


def moe_layers(config) -> list[int]:
    return [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]

