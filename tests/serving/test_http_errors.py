"""Bad requests, a full queue, shards down and disconnecting clients over the HTTP API.

Every bad request gets the status docs/http-api.md documents and an error in OpenAI's shape that
names the problem, and the server goes on serving.
"""
import json
import shutil
import socket
import time

import httpx2
import openai
import pytest

GOOD = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 1, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
CONTEXT_LIMIT = 4096  # the tiny preset's max_position_embeddings


def _with(base: dict, **changes) -> dict:
    body = dict(base)
    for key, value in changes.items():
        if value is ...:
            body.pop(key)
        else:
            body[key] = value
    return body


# (id, path, body or raw bytes, content type, status, param, words the message must contain)
BAD_REQUESTS = [
    ("invalid_json", "/v1/completions", b'{"model": "tiny", "prompt": [1,', "application/json", 400, None, "not valid JSON"),
    ("body_not_an_object", "/v1/completions", b"[1, 2]", "application/json", 400, None, "JSON object"),
    ("wrong_content_type", "/v1/completions", b"prompt=hello", "application/x-www-form-urlencoded", 415, None,
     "Content-Type: application/json"),
    ("unknown_field", "/v1/completions", _with(GOOD, best_of=2), None, 400, "best_of", "Unrecognized request argument"),
    ("wrong_type", "/v1/completions", _with(GOOD, max_tokens="ten"), None, 400, "max_tokens", "max_tokens"),
    ("temperature_out_of_range", "/v1/completions", _with(GOOD, temperature=3.5), None, 400, "temperature",
     "less than or equal to 2"),
    ("top_p_zero", "/v1/completions", _with(GOOD, top_p=0), None, 400, "top_p", "greater than 0"),
    ("penalty_out_of_range", "/v1/completions", _with(GOOD, presence_penalty=-3), None, 400, "presence_penalty",
     "greater than or equal to -2"),
    ("max_tokens_zero", "/v1/completions", _with(GOOD, max_tokens=0), None, 400, "max_tokens", "greater than or equal to 1"),
    ("missing_prompt", "/v1/completions", _with(GOOD, prompt=...), None, 400, "prompt", "Missing required parameter"),
    ("empty_prompt", "/v1/completions", _with(GOOD, prompt=[]), None, 400, "prompt", "empty"),
    ("token_id_out_of_range", "/v1/completions", _with(GOOD, prompt=[1, 10**6]), None, 400, "prompt", "out of range"),
    ("over_the_context_limit", "/v1/completions", _with(GOOD, prompt=[5] * CONTEXT_LIMIT), None, 400, "prompt",
     "context limit"),
    ("unknown_model", "/v1/completions", _with(GOOD, model="gpt-4o"), None, 404, "model", "does not exist"),
    ("n_zero", "/v1/completions", _with(GOOD, n=0), None, 400, "n", "greater than or equal to 1"),
    ("completion_logprobs", "/v1/completions", _with(GOOD, logprobs=1), None, 400, "logprobs", "log-probabilities"),
    ("empty_stop_string", "/v1/completions", _with(GOOD, stop=[""]), None, 400, "stop", "must not be empty"),
    ("stop_token_out_of_range", "/v1/completions", _with(GOOD, stop_token_ids=[10**6]), None, 400, "stop_token_ids",
     "out of range"),
    ("seed_out_of_range", "/v1/completions", _with(GOOD, seed=-1), None, 400, "seed", "greater than or equal to 0"),
    ("stream_not_a_bool", "/v1/completions", _with(GOOD, stream="yes"), None, 400, "stream", "boolean"),
    ("empty_messages", "/v1/chat/completions", _with(CHAT, messages=[]), None, 400, "messages", "at least 1"),
    ("unknown_role", "/v1/chat/completions", _with(CHAT, messages=[{"role": "wizard", "content": "hi"}]), None, 400,
     "messages.0.role", "unknown role 'wizard'"),
    ("content_not_text", "/v1/chat/completions", _with(CHAT, messages=[{"role": "user", "content": 42}]), None, 400,
     "messages.0.content", "content"),
    ("message_missing_content", "/v1/chat/completions", _with(CHAT, messages=[{"role": "user"}]), None, 400,
     "messages.0.content", "Missing required parameter"),
    ("chat_logprobs", "/v1/chat/completions", _with(CHAT, logprobs=True), None, 400, "logprobs", "log-probabilities"),
    ("chat_tools", "/v1/chat/completions", _with(CHAT, tools=[]), None, 400, "tools", "Unrecognized request argument"),
    ("chat_over_the_context_limit", "/v1/chat/completions",
     _with(CHAT, messages=[{"role": "user", "content": "a " * CONTEXT_LIMIT}]), None, 400, "messages", "context limit"),
    ("both_max_tokens", "/v1/chat/completions", _with(CHAT, max_completion_tokens=2), None, 400, "max_completion_tokens",
     "not both"),
    ("bad_previous_response_id", "/v1/responses", {"model": "tiny", "input": "hi", "previous_response_id": "resp_nope"},
     None, 400, "previous_response_id", "not found"),
    ("responses_empty_input", "/v1/responses", {"model": "tiny", "input": []}, None, 400, "input", "at least 1"),
    ("responses_unknown_field", "/v1/responses", {"model": "tiny", "input": "hi", "tools": []}, None, 400, "tools",
     "Unrecognized request argument"),
]


@pytest.fixture(scope="module")
def base_url(http_router):
    return f"http://127.0.0.1:{http_router.http.port}"


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_its_status_and_a_named_error_and_the_server_keeps_serving(base_url, case):
    _, path, body, content_type, status, param, words = case
    with httpx2.Client(base_url=base_url, timeout=60) as client:
        if isinstance(body, bytes):
            r = client.post(path, content=body, headers={"Content-Type": content_type})
        else:
            r = client.post(path, json=body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and words in error["message"], error
        assert error["type"] == "invalid_request_error"
        ok = client.post("/v1/completions", json=GOOD)
        assert ok.status_code == 200 and len(ok.json()["choices"][0]["token_ids"]) == 1


def test_unknown_endpoint_and_model_are_404_in_openai_shape(base_url):
    r = httpx2.get(f"{base_url}/v1/engines")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]
    r = httpx2.get(f"{base_url}/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_the_openai_client_raises_the_matching_errors(base_url):
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.completions.create(model="nope", prompt=[1], max_tokens=1)
        with pytest.raises(openai.BadRequestError, match="temperature"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=9)


def _wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_client_disconnecting_mid_stream_frees_its_sequence(http_router, base_url):
    engine = http_router.engine
    assert _wait_for(lambda: engine.num_active == 0)
    body = _with(GOOD, max_tokens=3000, ignore_eos=True, stream=True)
    with httpx2.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert engine.num_active == 1
    # the connection is closed: the router notices and aborts the sequence long before 3000 tokens
    assert _wait_for(lambda: engine.num_active == 0, timeout=20)


def test_a_client_disconnecting_before_a_non_streamed_answer_frees_its_sequence(http_router, base_url):
    engine = http_router.engine
    assert _wait_for(lambda: engine.num_active == 0)
    host, port = "127.0.0.1", http_router.http.port
    payload = httpx2.Request("POST", f"{base_url}/v1/completions",
                             json=_with(GOOD, max_tokens=3000, ignore_eos=True)).read()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        assert _wait_for(lambda: engine.num_active == 1, timeout=20)
    assert _wait_for(lambda: engine.num_active == 0, timeout=20)


def test_a_full_queue_is_429_with_retry_after_and_withdraws_every_choice(helpers, in_process_workers, routers,
                                                                         tiny_checkpoint):
    router = routers(helpers.contiguous_plan(tiny_checkpoint, 2), in_process_workers(2).addresses, http_port=0,
                     max_queue=1, served_model_name="tiny")
    url = f"http://127.0.0.1:{router.http.port}/v1/completions"
    r = httpx2.post(url, json=_with(GOOD, n=2), timeout=60)  # room for one choice, not two
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["code"] == "queue_full" and "capacity" in r.json()["error"]["message"]
    assert router.engine.num_active == 0 and not router.engine.scheduler.has_work()  # the first choice withdrawn
    assert httpx2.post(url, json=GOOD, timeout=60).status_code == 200


def test_shards_down_is_503_and_not_ready(helpers, in_process_workers, routers, tiny_checkpoint):
    nobody = f"127.0.0.1:{helpers.free_port()}"
    router = routers(helpers.contiguous_plan(tiny_checkpoint, 2), {0: in_process_workers(2).addresses[0], 1: [nobody]},
                     http_port=0, served_model_name="tiny")
    base = f"http://127.0.0.1:{router.http.port}"
    assert httpx2.get(f"{base}/health").status_code == 200  # alive, but cannot serve
    ready = httpx2.get(f"{base}/ready")
    assert ready.status_code == 503 and "shard 1" in ready.json()["error"]["message"]
    r = httpx2.post(f"{base}/v1/completions", json=GOOD, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "shards_unavailable"
    assert "shard 1" in r.json()["error"]["message"]


def test_a_checkpoint_without_tokenizer_serves_token_id_prompts(helpers, in_process_workers, routers, tiny_checkpoint,
                                                                tmp_path, reference):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_checkpoint, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    router = routers(helpers.contiguous_plan(tiny_checkpoint, 2), in_process_workers(2).addresses, checkpoint=bare,
                     http_port=0, served_model_name="tiny")
    base = f"http://127.0.0.1:{router.http.port}"
    r = httpx2.post(f"{base}/v1/completions", json=_with(GOOD, max_tokens=5, ignore_eos=True), timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["token_ids"] == reference([1, 2, 3], 5, ignore_eos=True)[0] and choice["text"] == ""
    for path, body, param in [("/v1/completions", _with(GOOD, prompt="hello"), "prompt"),
                              ("/v1/chat/completions", CHAT, "messages"),
                              ("/v1/completions", _with(GOOD, stop=["x"]), "stop")]:
        r = httpx2.post(f"{base}{path}", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_tokenizer"
        assert r.json()["error"]["param"] == param and "tokenizer.json" in r.json()["error"]["message"]
    # and over gRPC
    from nextserve.client import Client, ServingError
    with Client(f"127.0.0.1:{router.port}", timeout=60) as client:
        assert client.generate([1, 2, 3], max_tokens=5, temperature=0, ignore_eos=True).token_ids == choice["token_ids"]
        with pytest.raises(ServingError, match="token_ids"):
            client.generate("hello", max_tokens=2)


def test_a_shard_dying_mid_stream_ends_the_stream_with_an_error_event(helpers, tmp_path, tiny_checkpoint,
                                                                       in_process_workers, worker_processes, routers):
    plan = helpers.contiguous_plan(tiny_checkpoint, 2)
    doomed = worker_processes(tiny_checkpoint, helpers.write_plan(tmp_path, plan), 1).wait_ready()
    router = routers(plan, {0: in_process_workers(2).addresses[0], 1: [doomed.address]}, http_port=0,
                     served_model_name="tiny")
    body = _with(GOOD, max_tokens=3000, ignore_eos=True, stream=True)
    with httpx2.stream("POST", f"http://127.0.0.1:{router.http.port}/v1/completions", json=body, timeout=60) as r:
        events = (e for e in r.iter_lines() if e)
        assert next(events).startswith("data: {") and next(events).startswith("data: {")
        doomed.kill()
        rest = list(events)
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["code"] == "shards_unavailable" and "shard 1" in error["message"]
    assert len(rest) < 3000
    assert _wait_for(lambda: router.engine.num_active == 0)
