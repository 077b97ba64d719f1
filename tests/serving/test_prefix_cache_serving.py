"""The prefix cache through the router's APIs: `cached_tokens` in every response's usage (gRPC and the
OpenAI HTTP API) says how many prompt tokens came from the cache, and a cached answer is the cold one."""
import openai
import pytest

from nextserve.client import Client


@pytest.fixture(scope="module")
def deployment(http_router):
    return http_router


@pytest.fixture(scope="module")
def oai(deployment):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{deployment.http.port}/v1", api_key="unused", max_retries=0,
                       timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(deployment):
    with Client(f"127.0.0.1:{deployment.port}", timeout=120) as client:
        yield client


def test_a_60_token_prompt_served_twice_hits_the_second_time(grpc_client, reference):
    prompt = [(7 * i + 3) % 400 + 20 for i in range(60)]
    first = grpc_client.generate(prompt, max_tokens=5, temperature=0, ignore_eos=True)
    second = grpc_client.generate(prompt, max_tokens=5, temperature=0, ignore_eos=True)
    assert (first.prompt_tokens, first.cached_tokens) == (60, 0)
    assert (second.prompt_tokens, second.cached_tokens) == (60, 59)  # all but the token that gives the logits
    assert second.token_ids == first.token_ids == reference(prompt, 5, ignore_eos=True)[0]


def test_a_conversation_continued_over_http_reports_its_cached_history(oai, grpc_client, reference):
    prompt = [(11 * i + 5) % 400 + 20 for i in range(90)]
    first = oai.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    history = prompt + first.choices[0].model_extra["token_ids"]
    turn = history + [30, 31, 32]
    stream = oai.completions.create(model="tiny", prompt=turn, max_tokens=4, temperature=0, stream=True,
                                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(history) - 1
    got = [t for c in chunks[:-1] for choice in c.choices for t in choice.model_extra["token_ids"]]
    assert got == reference(turn, 4, ignore_eos=True)[0]
    # the same turn over gRPC: cached to its last token now, and the same answer
    again = grpc_client.generate(turn, max_tokens=4, temperature=0, ignore_eos=True)
    assert again.cached_tokens == len(turn) - 1 and again.token_ids == got


def test_a_responses_turn_continued_by_previous_response_id_reports_its_cached_history(oai):
    first = oai.responses.create(model="tiny", input="Tell me about the sea and the ships upon it, at length.",
                                 max_output_tokens=8, temperature=0)
    assert first.usage.input_tokens_details.cached_tokens == 0
    second = oai.responses.create(model="tiny", input="And the harbour?", previous_response_id=first.id,
                                  max_output_tokens=4, temperature=0)
    # the new turn starts with the first turn's prompt and answer: served from the cache
    assert 0 < second.usage.input_tokens_details.cached_tokens < second.usage.input_tokens
