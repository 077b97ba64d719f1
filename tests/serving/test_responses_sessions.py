"""The Responses API on the Redis session store, through the official `openai` client: a conversation by
previous_response_id continues across a router restart and equals the whole history sent at once
(greedy); bad ids are clear 400/404s; Redis down is a 503 naming the store, while stateless requests
are served.
"""
import grpc
import openai
import pytest

from nextserve.client import Client
from nextserve.client.messages import ServingError

from nextserve.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def start(started_routers):
    """start(cache_url) -> a started Router with HTTP on (model "tiny"); start.stop(router) stops one
    early, the rest stop at the module's end."""
    def with_http(cache_url):
        return started_routers(http_port=0, served_model_name="tiny", cache_url=cache_url)

    with_http.stop = started_routers.stop
    return with_http


def oai(router) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{router.http.port}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def test_a_conversation_continues_across_a_router_restart_on_redis(servers, start, redis_url, tiny_checkpoint):
    first_router = start(redis_url)
    with oai(first_router) as client:
        first = client.responses.create(model="tiny", input="Hello there", max_output_tokens=6, temperature=0)
    start.stop(first_router)

    second_router = start(redis_url)  # nothing of the first router survives but what Redis holds
    with oai(second_router) as client:
        assert client.responses.retrieve(first.id).output_text == first.output_text
        second = client.responses.create(model="tiny", previous_response_id=first.id, input="And then?",
                                         max_output_tokens=6, temperature=0)
        assert second.previous_response_id == first.id
        turn1 = list(servers.run(second_router.sessions.responses.get(first.id)).token_ids)
        turn2 = list(servers.run(second_router.sessions.responses.get(second.id)).token_ids)
        history = turn2[:second.usage.input_tokens]
        assert history[:len(turn1)] == turn1 and len(history) > len(turn1)  # turn 1, then its close and the new input
        tokenizer = load_tokenizer(tiny_checkpoint)
        stop_ids = [tokenizer.eos_token_id, tokenizer.encode("<|im_end|>")[0]]
        whole = client.completions.create(model="tiny", prompt=history, max_tokens=6, temperature=0,
                                          extra_body={"stop_token_ids": stop_ids})
        assert whole.choices[0].model_extra["token_ids"] == turn2[len(history):]
        assert second.output_text == whole.choices[0].text
    # a gRPC session named like a response is another record: it cannot read or overwrite the response
    with Client(f"127.0.0.1:{second_router.port}", timeout=120, retries=0) as grpc_client:
        with pytest.raises(ServingError) as e:
            grpc_client.generate([1, 2], max_tokens=2, session_id=second.id, append_to_session=True)
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        grpc_client.generate([1, 2], max_tokens=2, session_id=second.id)
    assert list(servers.run(second_router.sessions.responses.get(second.id)).token_ids) == turn2


def test_bad_previous_response_ids_are_clear_client_errors(start, redis_url):
    with oai(start(redis_url)) as client:
        for bad, code in (("resp_never_stored", "previous_response_not_found"), ("has spaces", "invalid_value")):
            with pytest.raises(openai.BadRequestError) as e:
                client.responses.create(model="tiny", previous_response_id=bad, input="hi", max_output_tokens=2)
            assert e.value.body["code"] == code and e.value.body["param"] == "previous_response_id"
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve("resp_never_stored")


def test_redis_down_is_a_503_naming_the_store_and_stateless_requests_are_served(start, redis_server, redis_url):
    with oai(start(redis_url)) as client:
        first = client.responses.create(model="tiny", input="Hi", max_output_tokens=3, temperature=0)
        redis_server.kill()
        try:
            with pytest.raises(openai.InternalServerError) as e:
                client.responses.create(model="tiny", previous_response_id=first.id, input="More", max_output_tokens=2)
            assert e.value.status_code == 503 and e.value.body["code"] == "session_store_unavailable"
            assert "session store unreachable" in e.value.body["message"]
            unstored = client.responses.create(model="tiny", input="Hi", max_output_tokens=3, temperature=0,
                                               store=False)
            assert unstored.output_text == first.output_text
        finally:
            redis_server.start()
