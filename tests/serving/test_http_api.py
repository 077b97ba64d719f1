"""The OpenAI-compatible HTTP API through the official `openai` client, against a router + 2 workers.

Greedy outputs are checked against the gRPC API of the same router (itself checked against the
in-process model in test_router.py): the same prompt gives the same tokens whichever API it came through.
"""
import json
import subprocess

import httpx2
import openai
import pytest

from nextserve.client import Client
from nextserve.model.chat_template import load_chat_template
from nextserve.model.tokenizer import load_tokenizer

@pytest.fixture(scope="module")
def deployment(http_router):
    return http_router


@pytest.fixture(scope="module")
def base_url(deployment):
    return f"http://127.0.0.1:{deployment.http.port}"


@pytest.fixture(scope="module")
def oai(base_url):
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(deployment):
    with Client(f"127.0.0.1:{deployment.port}", timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def chat_prompt_ids(tiny_checkpoint, tokenizer):
    template = load_chat_template(tiny_checkpoint)
    return lambda messages: tokenizer.encode(template.render(messages, add_generation_prompt=True))


def chat_stop_ids(tokenizer):
    return [tokenizer.eos_token_id, tokenizer.encode("<|im_end|>")[0]]


def test_models_list_names_the_served_model(oai, base_url):
    models = oai.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert oai.models.retrieve("tiny").id == "tiny"
    assert httpx2.get(f"{base_url}/health").json() == {
        "status": "alive", "cache": {"tiers": "local", "degraded": False, "reason": ""}}
    assert httpx2.get(f"{base_url}/ready").status_code == 200


def test_text_completion_equals_grpc_with_the_right_usage(oai, grpc_client, tokenizer):
    prompt = [5, 6, 7, 8, 9]
    got = oai.completions.create(model="tiny", prompt=prompt, max_tokens=7, temperature=0,
                                 extra_body={"ignore_eos": True})
    want = grpc_client.generate(prompt, max_tokens=7, temperature=0, ignore_eos=True)
    choice = got.choices[0]
    assert choice.model_extra["token_ids"] == want.token_ids and len(want.token_ids) == 7
    assert choice.text == tokenizer.decode(want.token_ids, skip_special_tokens=True)
    assert choice.finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (5, 7, 12)
    assert got.usage.prompt_tokens_details.cached_tokens == 0
    # a text prompt is encoded as gRPC encodes it
    text = oai.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0, seed=1)
    want = grpc_client.generate("Once upon a time", max_tokens=5, temperature=0)
    assert text.choices[0].model_extra["token_ids"] == want.token_ids
    assert text.usage.prompt_tokens == len(grpc_client.tokenize("Once upon a time"))


def test_sampled_completion_is_reproducible_by_seed_and_matches_grpc(oai, grpc_client):
    kwargs = dict(max_tokens=6, temperature=0.9, top_p=0.95, seed=1234)
    a = oai.completions.create(model="tiny", prompt=[40, 41, 42], extra_body={"top_k": 50, "ignore_eos": True},
                               **kwargs)
    want = grpc_client.generate([40, 41, 42], top_k=50, ignore_eos=True, **kwargs)
    assert a.choices[0].model_extra["token_ids"] == want.token_ids


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about the sea."}]


def test_chat_completion_with_and_without_streaming_equals_grpc_on_the_template(oai, grpc_client, tokenizer,
                                                                               chat_prompt_ids):
    prompt_ids = chat_prompt_ids(MESSAGES)
    want = grpc_client.generate(prompt_ids, max_tokens=12, temperature=0, stop_token_ids=chat_stop_ids(tokenizer))
    got = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=12, temperature=0)
    choice = got.choices[0]
    assert choice.model_extra["token_ids"] == want.token_ids
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(want.token_ids, skip_special_tokens=True)
    assert choice.finish_reason == want.finish_reason
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(prompt_ids), len(want.token_ids))

    chunks = list(oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)


def test_the_template_stop_token_ends_the_turn(oai, grpc_client, tokenizer, chat_prompt_ids):
    """Pick a conversation whose greedy answer reaches <|im_end|> (the random model emits it sometimes):
    the HTTP answer stops there, finish_reason "stop", and the text leaves the token out."""
    im_end = tokenizer.encode("<|im_end|>")[0]
    for k in range(40):
        messages = [{"role": "user", "content": f"Question number {k}?"}]
        want = grpc_client.generate(chat_prompt_ids(messages), max_tokens=48, temperature=0, ignore_eos=True)
        if im_end in want.token_ids:
            break
    else:
        pytest.fail("no probe conversation reached <|im_end|>; widen the probe")
    got = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=48, temperature=0)
    cut = want.token_ids.index(im_end) + 1
    eos = tokenizer.eos_token_id
    if eos in want.token_ids[:cut]:
        cut = want.token_ids.index(eos) + 1
    assert got.choices[0].model_extra["token_ids"] == want.token_ids[:cut]
    assert got.choices[0].finish_reason == "stop"
    assert "<|im_end|>" not in got.choices[0].message.content


def test_stop_string_cuts_the_text(oai):
    request = dict(model="tiny", prompt=[7, 8, 9], max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    plain = oai.completions.create(**request).choices[0].text
    stop = plain[3:6]
    assert len(stop) == 3
    got = oai.completions.create(**request, stop=[stop, "never appears \u2063"])
    assert got.choices[0].text == plain[:plain.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def _expected_sse(chunks: list[dict]) -> bytes:
    return b"".join(b"data: " + json.dumps(c, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
                    for c in chunks) + b"data: [DONE]\n\n"


STREAM_BODY = {"model": "tiny", "prompt": [11, 12, 13], "max_tokens": 5, "temperature": 0, "ignore_eos": True,
               "stream": True, "stream_options": {"include_usage": True}}


def test_sse_framing_byte_for_byte(base_url, grpc_client, tokenizer):
    want = grpc_client.generate([11, 12, 13], max_tokens=5, temperature=0, ignore_eos=True)
    with httpx2.stream("POST", f"{base_url}/v1/completions", json=STREAM_BODY, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_raw())
    first = json.loads(raw.split(b"\n\n")[0][len(b"data: "):])  # id and created are the server's to choose
    head = {"id": first["id"], "created": first["created"]}
    assert head["id"].startswith("cmpl-")
    # rebuild every event from the tokens gRPC produced: the bytes must be exactly these. A chunk goes out
    # when there is text to send, carrying the ids since the last one; the finish comes in a chunk of its own.
    def chunk(text, ids, finish_reason):
        return {"id": head["id"], "object": "text_completion", "created": head["created"], "model": "tiny",
                "choices": [{"index": 0, "text": text, "token_ids": ids, "logprobs": None,
                             "finish_reason": finish_reason}], "usage": None}

    chunks, pending = [], []
    detok = tokenizer.incremental_detokenizer(skip_special_tokens=True)
    for n, token in enumerate(want.token_ids, 1):
        pending.append(token)
        text = detok.step(want.token_ids[:n])
        if text:
            chunks.append(chunk(text, pending, None))
            pending = []
    chunks.append(chunk(detok.flush(), pending, "length"))
    chunks.append({"id": head["id"], "object": "text_completion", "created": head["created"], "model": "tiny",
                   "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8,
                                            # the gRPC call above left the prompt's first 2 tokens cached
                                            "prompt_tokens_details": {"cached_tokens": 2}}})
    assert raw == _expected_sse(chunks)


def test_curl_streams_the_same_events(base_url):
    done = subprocess.run(["curl", "-sS", "-N", "-H", "Content-Type: application/json", "-d", json.dumps(STREAM_BODY),
                           f"{base_url}/v1/completions"], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with httpx2.stream("POST", f"{base_url}/v1/completions", json=STREAM_BODY, timeout=120) as r:
        raw = b"".join(r.iter_raw())

    def normalise(stream: bytes) -> list:
        events = stream.split(b"\n\n")
        assert events[-2:] == [b"data: [DONE]", b""]
        parsed = [json.loads(e[len(b"data: "):]) for e in events[:-2]]
        for p in parsed:
            p.pop("id"), p.pop("created")
        return parsed

    assert normalise(done.stdout) == normalise(raw)


def test_responses_multi_turn_by_previous_response_id_equals_the_full_history(deployment, oai, servers, tokenizer,
                                                                              chat_prompt_ids):
    sessions = deployment.http.served.sessions
    first = oai.responses.create(model="tiny", input="Hello there", instructions="Be brief.", max_output_tokens=6,
                                 temperature=0)
    assert first.id.startswith("resp_") and first.output_text is not None
    turn1 = servers.run(sessions.get(first.id)).token_ids
    prompt1 = chat_prompt_ids([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    assert list(turn1[:len(prompt1)]) == prompt1 and first.usage.input_tokens == len(prompt1)
    assert first.usage.output_tokens == len(turn1) - len(prompt1)

    second = oai.responses.create(model="tiny", previous_response_id=first.id, input="And then?", max_output_tokens=6,
                                  temperature=0)
    turn2 = servers.run(sessions.get(second.id)).token_ids
    # the full history: turn 1's tokens, the end of its assistant turn (ChatML: "<|im_end|>\n", less an
    # <|im_end|> the model already produced), then the new user turn
    close = tokenizer.encode("\n") if turn1[-1] == tokenizer.encode("<|im_end|>")[0] else tokenizer.encode("<|im_end|>\n")
    history = [*turn1, *close, *chat_prompt_ids([{"role": "user", "content": "And then?"}])]
    assert list(turn2[:len(history)]) == history and second.usage.input_tokens == len(history)
    full = oai.completions.create(model="tiny", prompt=history, max_tokens=6, temperature=0,
                                  extra_body={"stop_token_ids": chat_stop_ids(tokenizer)})
    assert full.choices[0].model_extra["token_ids"] == list(turn2[len(history):])
    assert second.output_text == full.choices[0].text
    assert second.previous_response_id == first.id
    assert oai.responses.retrieve(second.id).output_text == second.output_text


def test_responses_store_false_is_not_kept(oai):
    gone = oai.responses.create(model="tiny", input="x", max_output_tokens=2, temperature=0, store=False)
    with pytest.raises(openai.BadRequestError, match="not found"):
        oai.responses.create(model="tiny", input="y", previous_response_id=gone.id, max_output_tokens=2)


def test_n_choices_are_each_what_grpc_gives_for_seed_plus_index(oai, grpc_client, tokenizer, chat_prompt_ids):
    prompt = [21, 22, 23]
    got = oai.completions.create(model="tiny", prompt=prompt, n=3, max_tokens=5, temperature=1.0, seed=77,
                                 extra_body={"ignore_eos": True})
    want = [grpc_client.generate(prompt, max_tokens=5, temperature=1.0, seed=77 + i, ignore_eos=True).token_ids
            for i in range(3)]
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.model_extra["token_ids"] for c in got.choices] == want
    assert len({tuple(w) for w in want}) > 1  # the choices differ
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (3, 15)

    chunks = list(oai.chat.completions.create(model="tiny", messages=MESSAGES, n=2, max_tokens=6, temperature=1.0,
                                              seed=5, stream=True, stream_options={"include_usage": True}))
    texts, ids = ["", ""], [[], []]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            ids[choice.index] += choice.model_extra.get("token_ids") or []
    prompt_ids = chat_prompt_ids(MESSAGES)
    for i in range(2):
        want = grpc_client.generate(prompt_ids, max_tokens=6, temperature=1.0, seed=5 + i,
                                    stop_token_ids=chat_stop_ids(tokenizer)).token_ids
        assert ids[i] == want and texts[i] == tokenizer.decode(want, skip_special_tokens=True)
    assert chunks[-1].usage.completion_tokens == len(ids[0]) + len(ids[1])


def test_streamed_responses_give_the_events_and_text_of_the_plain_call_and_can_be_continued(oai):
    request = dict(model="tiny", input="Tell me a story", max_output_tokens=8, temperature=0)
    plain = oai.responses.create(**request)
    events = list(oai.responses.create(**request, stream=True))
    kinds = [e.type for e in events]
    final = "response.completed" if plain.status == "completed" else "response.incomplete"
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          final]
    assert set(kinds[4:-4]) <= {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response
    assert deltas == plain.output_text == done.output_text and done.usage.output_tokens == plain.usage.output_tokens
    follow_up = oai.responses.create(model="tiny", previous_response_id=done.id, input="More", max_output_tokens=2)
    assert follow_up.usage.input_tokens > done.usage.input_tokens + done.usage.output_tokens
