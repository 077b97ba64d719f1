"""The OTEL_* settings nextserve honours (and the ones it refuses clearly), W3C context through gRPC
metadata and the expert stream's messages, and the per-expert token counts."""
import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.trace import set_span_in_context

from nextserve.proto.v1 import experts_pb2
from nextserve.router.metrics import ExpertTokenCounts
from nextserve.telemetry.tracing import (context_from_grpc_metadata, extract, grpc_metadata, inject, make_sampler,
                                         tracing_enabled)

ENDPOINT = "http://collector:4317"


@pytest.mark.parametrize("env, enabled", [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ENDPOINT}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, True),
], ids=["nothing-set", "endpoint", "traces-endpoint", "sdk-disabled", "exporter-none", "grpc"])
def test_tracing_is_on_only_with_an_endpoint_and_not_disabled(env, enabled):
    assert tracing_enabled(None, env) is enabled
    assert tracing_enabled(ENDPOINT, env) is (enabled or env == {})  # the flag is an endpoint too


@pytest.mark.parametrize("env, message", [
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "grpc"),
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "otlp"),
    ({"OTEL_TRACES_SAMPLER": "sometimes"}, "parentbased_traceidratio"),
])
def test_settings_it_cannot_honour_are_refused_by_name(env, message):
    with pytest.raises(ValueError, match=message) as error:
        tracing_enabled(ENDPOINT, env)
    assert next(iter(env)) in str(error.value)


def test_sampler_follows_the_flag_then_the_standard_variables():
    assert make_sampler(0.25, {"OTEL_TRACES_SAMPLER": "always_off"}).get_description() == \
        sampling.ParentBased(sampling.TraceIdRatioBased(0.25)).get_description()
    assert make_sampler(None, {}).get_description() == sampling.ParentBased(sampling.ALWAYS_ON).get_description()
    assert make_sampler(None, {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}
                        ).get_description() == sampling.TraceIdRatioBased(0.5).get_description()
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER_ARG"):
        make_sampler(None, {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_sampler(1.5, {})


def test_w3c_context_survives_grpc_metadata_and_the_expert_request_map():
    span = TracerProvider().get_tracer("t").start_span("parent")
    expected = span.get_span_context()

    metadata = grpc_metadata(set_span_in_context(span))
    assert [k for k, _ in metadata] == ["traceparent"]
    got = context_from_grpc_metadata([("user-agent", "grpc"), *metadata])
    assert _span_context(got).trace_id == expected.trace_id and _span_context(got).span_id == expected.span_id

    request = experts_pb2.ExpertRequest(layer=3)
    inject(set_span_in_context(span), request.trace_context)
    decoded = experts_pb2.ExpertRequest.FromString(request.SerializeToString())
    assert _span_context(extract(decoded.trace_context)).span_id == expected.span_id

    assert grpc_metadata() == ()  # no current span: nothing is sent
    assert extract(experts_pb2.ExpertRequest().trace_context) is None
    assert context_from_grpc_metadata([("traceparent", "00-garbage")]) is None


def test_expert_token_counts_add_every_routed_slot_and_skip_the_unrouted():
    counts = ExpertTokenCounts(moe_layers=[0, 2], num_experts=4)
    counts.add(2, torch.tensor([[0, 3], [3, -1]]))
    counts.add(2, torch.tensor([[3, 1]]))
    [family] = counts.collect()
    values = {(s.labels["layer"], s.labels["expert"]): s.value for s in family.samples if s.name.endswith("_total")}
    assert values[("2", "3")] == 3 and values[("2", "0")] == 1 and values[("2", "1")] == 1
    assert values[("2", "2")] == 0 and sum(v for (layer, _), v in values.items() if layer == "0") == 0
    assert len(values) == 8  # one series per (MoE layer, expert), bounded by the model


def _span_context(context):
    from opentelemetry.trace import get_current_span
    return get_current_span(context).get_span_context()


def test_every_series_the_dashboard_reads_is_one_router_or_worker_exports():
    import json
    import pathlib
    import re

    from prometheus_client import CollectorRegistry

    from nextserve.router.metrics import RouterMetrics
    from nextserve.worker.telemetry import WorkerTelemetry

    router, worker = CollectorRegistry(), CollectorRegistry()
    metrics = RouterMetrics(router, moe_layers=[0, 1], num_experts=4)
    for labelled in (metrics.shard_dispatch, metrics.shard_dispatch_errors, metrics.responses):
        labelled.labels("0")
    metrics.http_responses.labels("/v1/completions", "200")
    WorkerTelemetry(worker, None, shard=0)
    exported = {sample.name for registry in (router, worker) for family in registry.collect()
                for sample in family.samples}
    dashboard = json.loads((pathlib.Path(__file__).parents[1] / "charts/nextserve/dashboards/nextserve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    read = {name for e in exprs for name in re.findall(r"\bnextserve_[a-z_]+", e)}
    assert len(read) >= 19 and read <= exported, sorted(read - exported)
