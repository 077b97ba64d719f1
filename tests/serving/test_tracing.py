"""OpenTelemetry across processes: a client, a router and two workers exporting OTLP/gRPC to a receiver
the test runs (the collector's TraceService from opentelemetry-proto); and tracing off by default."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from nextserve.client import Client

NEXTSERVE = [sys.executable, "-m", "nextserve.cli.main"]
SPAN_KIND_SERVER, SPAN_KIND_CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind


# -- the receiver -----------------------------------------------------------------------------------

def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def _attributes(key_values) -> dict:
    return {kv.key: _value(kv.value) for kv in key_values}


@dataclass
class ReceivedSpan:
    service: str
    resource: dict
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    links: list[tuple[str, str]]  # (trace id, span id)
    attributes: dict
    kind: int


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it."""

    def __init__(self):
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.endpoint = f"http://127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def Export(self, request, context):
        spans = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                spans += [ReceivedSpan(resource.get("service.name", ""), resource, s.name, s.trace_id.hex(),
                                       s.span_id.hex(), s.parent_span_id.hex(),
                                       [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                                       _attributes(s.attributes), s.kind)
                          for s in scope_spans.spans]
        with self._lock:
            self._spans.extend(spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, done, timeout: float = 60.0) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout
        while not done(self.spans):
            if time.monotonic() > deadline:
                raise TimeoutError(f"spans missing after {timeout} s; got {sorted({(s.service, s.name) for s in self.spans})}")
            time.sleep(0.1)
        return self.spans


@pytest.fixture
def receiver():
    r = OtlpReceiver()
    yield r
    r.server.stop(0)


# -- processes ----------------------------------------------------------------------------------------

@pytest.fixture
def spawn(tmp_path):
    started: list[tuple[subprocess.Popen, object]] = []

    def run(name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "wb")
        process = subprocess.Popen([*NEXTSERVE, *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "OMP_NUM_THREADS": "1", **env})
        started.append((process, log))
        return process

    yield run
    for process, log in started:
        if process.poll() is None:
            process.terminate()
    for process, log in started:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def _logs(tmp_path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("*.log")))


def test_one_request_is_one_trace_across_client_router_and_both_workers(helpers, receiver, spawn, tiny_checkpoint,
                                                                         tmp_path):
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    plan_file = helpers.write_plan(tmp_path, helpers.contiguous_plan(tiny_checkpoint, 2))
    common = ["--checkpoint", str(tiny_checkpoint), "--plan", str(plan_file), "--host", "127.0.0.1",
              "--dtype", "float32", "--device", "cpu"]
    fast_export = {"OTEL_BSP_SCHEDULE_DELAY": "100"}  # milliseconds between batches (default 5 s)
    # the workers are configured by the standard variables alone, the router by its flag
    worker_env = {**fast_export, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                  "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test"}
    workers = {}
    for shard in (0, 1):
        port = helpers.free_port()
        spawn(f"worker-{shard}", ["worker", *common, "--shard", str(shard), "--port", str(port)], worker_env)
        workers[shard] = f"127.0.0.1:{port}"
    try:
        for address in workers.values():
            helpers.wait_serving(address)
        router_port = helpers.free_port()
        spawn("router", ["router", *common, "--port", str(router_port), "--otlp-endpoint", receiver.endpoint,
                         "--trace-sample-ratio", "1", *[f"--worker={s}={a}" for s, a in workers.items()]], fast_export)
        helpers.wait_serving(f"127.0.0.1:{router_port}")
    except TimeoutError:
        pytest.fail(f"the deployment did not come up:\n{_logs(tmp_path)}")

    provider = TracerProvider(resource=Resource.create({"service.name": "test-client"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint)))
    with Client(f"127.0.0.1:{router_port}", tracer=provider.get_tracer("test")) as client:
        completion = client.generate([5, 6, 7], max_tokens=3, temperature=0.7, top_p=0.9, seed=7, ignore_eos=True,
                                     session_id="s-1")
    provider.shutdown()
    assert completion.completion_tokens == 3

    def complete(spans):
        names = {(s.service, s.name) for s in spans}
        shards = {s.resource.get("nextserve.shard") for s in spans if s.service == "nextserve-worker"}
        return {("test-client", "text_completion"), ("nextserve-router", "decode"),
                ("nextserve-router", "text_completion tiny")} <= names and shards == {0, 1}

    spans = receiver.wait_for(complete)
    time.sleep(0.5)  # the last steps' worker spans may be one export batch behind
    spans = receiver.spans

    assert len({s.trace_id for s in spans}) == 1, "every span belongs to the request's one trace"
    assert {s.service for s in spans} == {"test-client", "nextserve-router", "nextserve-worker"}
    by_id = {s.span_id: s for s in spans}
    [client_span] = [s for s in spans if s.service == "test-client"]
    [request] = [s for s in spans if s.name == "text_completion tiny"]
    steps = [s for s in spans if s.name == "step"]
    forwards = [s for s in spans if s.name == "expert_forward"]

    assert client_span.kind == SPAN_KIND_CLIENT and client_span.parent_id == ""
    assert request.kind == SPAN_KIND_SERVER and request.parent_id == client_span.span_id
    assert {s.name for s in spans if s.parent_id == request.span_id} == {"queue", "prefill", "decode", "step"}
    # the prompt but its last token (the prefix cache snapshots the state there, where the same prompt
    # will look), the last prompt token's pass samples the first token, then two decodes
    assert len(steps) == 4 and all(s.parent_id == request.span_id for s in steps)
    assert forwards and all(by_id[f.parent_id].name == "step" for f in forwards)
    assert {f.resource["nextserve.shard"] for f in forwards} == {0, 1}
    assert all(f.resource["deployment.environment"] == "test" for f in forwards)  # OTEL_RESOURCE_ATTRIBUTES

    expected_request = {
        "gen_ai.operation.name": "text_completion", "gen_ai.request.model": "tiny", "gen_ai.request.max_tokens": 3,
        "gen_ai.request.temperature": pytest.approx(0.7), "gen_ai.request.top_p": pytest.approx(0.9),
        "gen_ai.request.seed": 7, "gen_ai.usage.input_tokens": 3, "gen_ai.usage.output_tokens": 3,
        "gen_ai.response.finish_reasons": ["length"], "gen_ai.response.id": completion.request_id,
        "nextserve.session_id": "s-1", "rpc.grpc.status_code": 0}
    assert {k: request.attributes.get(k) for k in expected_request} == expected_request
    assert client_span.attributes["gen_ai.usage.output_tokens"] == 3
    assert client_span.attributes["gen_ai.response.id"] == completion.request_id
    assert [s.attributes["nextserve.step.prefill_tokens"] for s in steps[:2]] == [2, 1]
    for step in steps:
        children = [f for f in forwards if f.parent_id == step.span_id]
        for shard in {f.resource["nextserve.shard"] for f in children}:
            assert step.attributes[f"nextserve.shard.{shard}.dispatch_seconds"] > 0
            assert step.attributes[f"nextserve.shard.{shard}.tokens"] >= 1
        assert step.attributes["nextserve.step.slowest_shard"] in (0, 1)
    for f in forwards:
        assert f.attributes["nextserve.layer"] >= 0 and f.attributes["nextserve.tokens"] >= 1
        assert 1 <= f.attributes["nextserve.experts_hit"] <= f.attributes["nextserve.tokens"] * 10


def _export_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("OtelBatch")]


@pytest.mark.parametrize("env", [{}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "ENDPOINT", "OTEL_SDK_DISABLED": "true"}],
                         ids=["default", "sdk-disabled"])
def test_tracing_off_exports_nothing_and_builds_no_span(helpers, receiver, servers, routers, tiny_checkpoint,
                                                       monkeypatch, env):
    import opentelemetry.sdk.trace as sdk_trace
    from opentelemetry.trace import span as api_span

    from nextserve.worker.server import build_service, serve

    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value.replace("ENDPOINT", receiver.endpoint))
    made = []
    for cls in (sdk_trace.Span, api_span.NonRecordingSpan):
        original = cls.__init__
        monkeypatch.setattr(cls, "__init__", lambda self, *a, _original=original, **k: made.append(self) or
                            _original(self, *a, **k))
    assert _export_threads() == []

    plan = helpers.contiguous_plan(tiny_checkpoint, 2)
    addresses, grpc_servers = {}, []
    for shard in plan.shard_indices:
        service = build_service(tiny_checkpoint, plan, shard, "float32", "cpu")
        assert service.telemetry.tracer is None
        server, port = servers.run(serve(service, "127.0.0.1", 0))
        grpc_servers.append(server)
        addresses[shard] = [f"127.0.0.1:{port}"]
    try:
        router = routers(plan, addresses)
        assert router.engine.telemetry.tracer is None
        with Client(f"127.0.0.1:{router.port}") as client:
            assert client.generate([5, 6, 7], max_tokens=3, temperature=0, ignore_eos=True).completion_tokens == 3
        registry = router.engine.telemetry.registry
        assert registry.get_sample_value("nextserve_router_generation_tokens_total") == 3  # metrics still count
    finally:
        for server in grpc_servers:
            servers.run(server.stop(0))
    time.sleep(0.5)
    assert made == [] and _export_threads() == [] and receiver.spans == []


def test_overlapping_requests_share_steps_by_links_and_failures_are_recorded(helpers, receiver, in_process_workers,
                                                                              routers, tiny_checkpoint, monkeypatch):
    from nextserve.client import ServingError

    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    router = routers(helpers.contiguous_plan(tiny_checkpoint, 2), in_process_workers(2).addresses,
                     otlp_endpoint=receiver.endpoint, trace_sample_ratio=1.0)
    late = {}
    with Client(f"127.0.0.1:{router.port}") as client:
        def send_late():
            late["completion"] = client.generate([40, 41], max_tokens=3, temperature=0, ignore_eos=True)

        first = []
        thread = None
        for chunk in client.generate_stream([7, 8, 9], max_tokens=12, temperature=0, ignore_eos=True):
            first.extend(chunk.token_ids)
            if len(first) == 2:  # decoding: the second request joins the running batch
                thread = threading.Thread(target=send_late)
                thread.start()
        thread.join(60)
        with pytest.raises(ServingError) as error:
            client.generate([5, 6], max_tokens=2, temperature=-1.0)
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        stream = client.generate_stream([5, 6, 7], max_tokens=50, temperature=0, ignore_eos=True)
        next(stream)
        stream.close()  # the caller goes away mid-generation

    def complete(spans):
        return sum(s.name == "text_completion tiny" for s in spans) == 4
    spans = receiver.wait_for(complete)
    requests = [s for s in spans if s.name == "text_completion tiny"]
    ok = [r for r in requests if r.attributes.get("gen_ai.usage.output_tokens") in (12, 3)]
    assert len(ok) == 2 and len({r.trace_id for r in ok}) == 2  # one trace per request
    long, short = sorted(ok, key=lambda r: -r.attributes["gen_ai.usage.output_tokens"])
    steps = [s for s in spans if s.name == "step"]
    shared = [s for s in steps if s.parent_id == long.span_id and (short.trace_id, short.span_id) in s.links]
    assert shared, "a step serving both requests is the older one's child and links to the other"
    assert all(s.attributes["nextserve.step.sequences"] == 2 for s in shared)
    assert len([s for s in steps if s.parent_id == long.span_id]) == 13  # 12 tokens + the prefix cache's cut

    [invalid] = [r for r in requests if r.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    assert "gen_ai.usage.output_tokens" not in invalid.attributes  # never admitted
    [cancelled] = [r for r in requests if r.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]]
    assert cancelled.attributes["gen_ai.response.finish_reasons"] == ["abort"]

    registry = router.engine.telemetry.registry
    sample = registry.get_sample_value
    assert sample("nextserve_router_responses_total", {"code": "INVALID_ARGUMENT"}) == 1
    assert sample("nextserve_router_responses_total", {"code": "CANCELLED"}) == 1
    assert sample("nextserve_router_responses_total", {"code": "OK"}) == 2
    assert sample("nextserve_router_requests_total", {"finish_reason": "length"}) == 2
    assert sample("nextserve_router_requests_total", {"finish_reason": "abort"}) == 1
    assert sample("nextserve_router_time_to_first_token_seconds_count") == 3
