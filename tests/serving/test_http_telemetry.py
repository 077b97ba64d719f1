"""HTTP API requests get the request span and the metrics a gRPC Generate call gets, and the
KV-block / state-slot gauges follow the sequences that hold memory (router + 2 in-process workers,
the official `openai` client over loopback)."""
import openai
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from nextserve.kernels.paging import BLOCK_SIZE
from nextserve.router.block_manager import blocks_for


@pytest.fixture(scope="module")
def oai(http_router):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{http_router.http.port}/v1", api_key="unused", max_retries=0,
                       timeout=120) as client:
        yield client


@pytest.fixture
def spans(http_router):
    """The router's spans, in memory, for one test (the router is shared: its tracer is put back after)."""
    telemetry = http_router.engine.telemetry
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    saved, telemetry.tracer = telemetry.tracer, provider.get_tracer("test")
    yield exporter
    telemetry.tracer = saved
    provider.shutdown()


def sample(router, name: str, labels: dict | None = None, **more) -> float:
    value = router.engine.telemetry.registry.get_sample_value(name, {**(labels or {}), **more})
    return 0.0 if value is None else value


def test_kv_block_and_state_slot_gauges_follow_a_running_request(http_router, oai):
    total = sample(http_router, "nextserve_router_kv_blocks_total")
    assert total == http_router.engine.scheduler.blocks.num_blocks > 0
    assert sample(http_router, "nextserve_router_state_slots_total") == http_router.engine.scheduler.blocks.num_slots
    assert sample(http_router, "nextserve_router_kv_blocks_used") == 0
    assert sample(http_router, "nextserve_router_state_slots_used") == 0
    hung_up = sample(http_router, "nextserve_router_http_responses_total", endpoint="/v1/completions", status="499")
    aborted = sample(http_router, "nextserve_router_requests_total", finish_reason="abort")
    prompt = list(range(5, 5 + BLOCK_SIZE + 3))  # more than one block
    stream = oai.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0, stream=True,
                                    extra_body={"ignore_eos": True})
    try:
        next(iter(stream))  # the first token is out: the sequence holds its prompt's blocks and a slot
        used = sample(http_router, "nextserve_router_kv_blocks_used")
        assert blocks_for(len(prompt)) <= used <= blocks_for(len(prompt) + 40)
        assert sample(http_router, "nextserve_router_state_slots_used") == 1
    finally:
        stream.close()
    _wait(lambda: sample(http_router, "nextserve_router_kv_blocks_used") == 0)
    assert sample(http_router, "nextserve_router_state_slots_used") == 0
    # the client closed the stream before its end: counted as 499, and the sequence as aborted
    _wait(lambda: sample(http_router, "nextserve_router_http_responses_total", endpoint="/v1/completions",
                         status="499") == hung_up + 1)
    assert sample(http_router, "nextserve_router_requests_total", finish_reason="abort") == aborted + 1


def test_an_http_completion_is_one_request_span_with_its_steps_and_counts_in_the_metrics(http_router, oai, spans):
    # a pass still running for an earlier test's aborted stream would count its token after `before`
    _wait(lambda: http_router.engine.idle)
    before = {name: sample(http_router, name, labels) for name, labels in COUNTED}
    prompt = [5, 6, 7, 8]
    completion = oai.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert completion.choices[0].finish_reason == "length"
    # the request ends when its last byte has left, which may be just after the client has read it
    _wait(lambda: sample(http_router, *COUNTED[0]) > before[COUNTED[0][0]])
    after = {name: sample(http_router, name, labels) for name, labels in COUNTED}
    moved = {name: after[name] - before[name] for name in after}
    assert moved == {"nextserve_router_http_responses_total": 1, "nextserve_router_requests_total": 1,
                     "nextserve_router_prompt_tokens_total": len(prompt),
                     "nextserve_router_generation_tokens_total": 3,
                     "nextserve_router_time_to_first_token_seconds_count": 1,
                     "nextserve_router_request_duration_seconds_count": 1}

    finished = spans.get_finished_spans()
    [request] = [s for s in finished if s.kind == SpanKind.SERVER]
    assert request.name == "text_completion tiny"
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["gen_ai.usage.input_tokens"] == len(prompt)
    assert request.attributes["gen_ai.usage.output_tokens"] == 3
    assert list(request.attributes["gen_ai.response.finish_reasons"]) == ["length"]
    children = [s for s in finished if s.parent is not None and s.parent.span_id == request.context.span_id]
    assert {"queue", "prefill", "decode"} <= {s.name for s in children}
    # one forward per token, all of this request, and one more: a cold prompt stops one token short for
    # the prefix cache's state snapshot, then feeds its last token
    assert sum(s.name == "step" for s in children) == 4
    assert request.status.status_code != StatusCode.ERROR


def test_http_trace_context_and_error_statuses_reach_span_and_metrics(http_router, oai, spans):
    parent_trace, parent_span = 0x1234_5678_9ABC_DEF0_1234_5678_9ABC_DEF0, 0x1122_3344_5566_7788
    traceparent = f"00-{parent_trace:032x}-{parent_span:016x}-01"
    chunks = list(oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2, temperature=0, stream=True,
                                              extra_headers={"traceparent": traceparent}))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    _wait(lambda: len(spans.get_finished_spans()) > 0 and any(s.kind == SpanKind.SERVER
                                                              for s in spans.get_finished_spans()))
    bad_before = sample(http_router, "nextserve_router_http_responses_total", endpoint="/v1/chat/completions",
                        status="400")
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                    stop=[""])
    _wait(lambda: sample(http_router, "nextserve_router_http_responses_total", endpoint="/v1/chat/completions",
                         status="400") == bad_before + 1)
    assert sample(http_router, "nextserve_router_http_responses_total", endpoint="/v1/chat/completions",
                  status="200") >= 1

    chat, refused = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert chat.name == "chat tiny" and chat.attributes["gen_ai.operation.name"] == "chat"
    assert chat.context.trace_id == parent_trace and chat.parent.span_id == parent_span
    assert 1 <= chat.attributes["gen_ai.usage.output_tokens"] <= 2
    assert refused.attributes["http.response.status_code"] == 400
    assert "gen_ai.usage.input_tokens" not in refused.attributes  # refused before any sequence was queued
    assert refused.status.status_code != StatusCode.ERROR  # a 4xx is the caller's error, not the server's


COUNTED = [("nextserve_router_http_responses_total", {"endpoint": "/v1/completions", "status": "200"}),
           ("nextserve_router_requests_total", {"finish_reason": "length"}),
           ("nextserve_router_prompt_tokens_total", {}), ("nextserve_router_generation_tokens_total", {}),
           ("nextserve_router_time_to_first_token_seconds_count", {}),
           ("nextserve_router_request_duration_seconds_count", {})]


def _wait(predicate, timeout: float = 30.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
