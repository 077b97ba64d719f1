"""Router + workers over loopback gRPC against the in-process model, and the API's error statuses."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from nextserve.client import Client, ServingError
from nextserve.router.shards import FingerprintMismatch

PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 61)), [100], list(range(300, 317))]
MAX_TOKENS = [6, 4, 8, 5]


def client_of(router) -> Client:
    return Client(f"127.0.0.1:{router.port}", timeout=60)


@pytest.mark.parametrize("num_shards", [1, 2, 4], ids=["1-worker", "2-workers", "4-workers"])
def test_concurrent_greedy_requests_match_the_in_process_model(helpers, num_shards, in_process_workers, routers, reference,
                                                               tiny_checkpoint):
    workers = in_process_workers(num_shards)
    # a small token budget forces chunked prefill of the longer prompts while the others decode
    router = routers(helpers.contiguous_plan(tiny_checkpoint, num_shards), workers.addresses, max_batch_tokens=16)
    with client_of(router) as client, ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(client.generate, p, max_tokens=n, temperature=0, ignore_eos=True)
                   for p, n in zip(PROMPTS, MAX_TOKENS)]
        results = [f.result(timeout=120) for f in futures]
    for prompt, n, got in zip(PROMPTS, MAX_TOKENS, results):
        expected, reason = reference(prompt, n, ignore_eos=True)
        assert got.token_ids == expected
        assert got.finish_reason == reason == "length"
        assert (got.prompt_tokens, got.completion_tokens) == (len(prompt), n)


@pytest.mark.parametrize("num_shards", [2, 4], ids=["2-workers", "4-workers"])
def test_logits_through_the_workers_match_the_full_model(helpers, num_shards, in_process_workers, routers, reference_model,
                                                         logits_close,
                                                         tiny_checkpoint):
    router = routers(helpers.contiguous_plan(tiny_checkpoint, num_shards), in_process_workers(num_shards).addresses)
    dense = router.engine.runner.model
    assert sum(p.numel() for n, p in dense.named_parameters() if ".experts." in n) == 0  # no expert weights here
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 84, 59, 4]])
    # the forward pass must run off the loop that owns the worker channels, as the router runs it
    remote = ThreadPoolExecutor(1).submit(dense, ids).result(timeout=60)
    logits_close(remote, reference_model(ids), reference_model.config, ids.shape[1])


def test_a_request_arriving_mid_generation_gets_the_tokens_it_gets_alone(helpers, in_process_workers, routers, reference,
                                                                        tiny_checkpoint):
    router = routers(helpers.contiguous_plan(tiny_checkpoint, 2), in_process_workers(2).addresses)
    long_prompt, late_prompt = [7, 7, 8, 9], list(range(40, 52))
    late = {}

    def send_late():
        late["completion"] = client.generate(late_prompt, max_tokens=6, temperature=0, ignore_eos=True)
        late["first_still_running"] = router.engine.num_active >= 1

    with client_of(router) as client:
        first = []
        for chunk in client.generate_stream(long_prompt, max_tokens=200, temperature=0, ignore_eos=True):
            first.extend(chunk.token_ids)
            if len(first) == 3:  # the first request is decoding: now the second arrives
                thread = threading.Thread(target=send_late)
                thread.start()
        thread.join(60)
    assert first == reference(long_prompt, 200, ignore_eos=True)[0]
    assert late["completion"].token_ids == reference(late_prompt, 6, ignore_eos=True)[0]
    assert late["first_still_running"]  # it joined the running batch rather than waiting for the first to end


def test_sampled_generation_is_reproducible_with_a_seed(helpers, in_process_workers, routers, reference, tiny_checkpoint):
    router = routers(helpers.contiguous_plan(tiny_checkpoint, 2), in_process_workers(2).addresses)
    sampling = dict(max_tokens=8, temperature=0.9, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    with client_of(router) as client:
        got = client.generate([11, 12, 13], **sampling)
    assert got.token_ids == reference([11, 12, 13], **sampling)[0]


def test_text_prompts_stream_text_and_stop_strings_end_it(helpers, in_process_workers, routers, tiny_checkpoint):
    from nextserve.model.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(tiny_checkpoint)
    router = routers(helpers.contiguous_plan(tiny_checkpoint, 2), in_process_workers(2).addresses)
    with client_of(router) as client:
        assert client.tokenize("hello world") == tokenizer.encode("hello world")
        full = client.generate("The quick brown fox", max_tokens=12, temperature=0, ignore_eos=True, session_id="s-1")
        assert full.text == tokenizer.decode(full.token_ids) and full.session_id == "s-1"
        stop = full.text[len(full.text) // 2:][:2]
        cut = client.generate("The quick brown fox", max_tokens=12, temperature=0, ignore_eos=True, stop=[stop])
        assert cut.finish_reason == "stop" and stop not in cut.text
        assert full.text.startswith(cut.text) and full.text[len(cut.text):].startswith(stop)
        info = client.model_info()
        assert info.vocab_size == 512 and [s.healthy for s in info.shards] == [True, True]
        assert client.health()


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=[]), "empty"),
    (dict(prompt=[1] * 4096), "context limit"),
    (dict(prompt=[1, 600]), "out of range"),
    (dict(prompt=[1], temperature=-1.0), "temperature"),
    (dict(prompt=[1], top_p=0.0), "top_p"),
    (dict(prompt=[1], max_tokens=0), "max_tokens"),
    (dict(prompt=[1], stop_token_ids=[9999]), "stop token"),
], ids=["empty", "too-long", "token-range", "temperature", "top-p", "max-tokens", "stop-token"])
def test_bad_requests_are_invalid_argument(helpers, kwargs, message, in_process_workers, routers, tiny_checkpoint):
    router = routers(helpers.contiguous_plan(tiny_checkpoint, 1), in_process_workers(1).addresses)
    with client_of(router) as client, pytest.raises(ServingError) as error:
        client.generate(**kwargs)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details


def test_full_queue_is_resource_exhausted_and_cancel_and_deadline_free_the_sequence(helpers, in_process_workers, routers,
                                                                                   tiny_checkpoint):
    router = routers(helpers.contiguous_plan(tiny_checkpoint, 1), in_process_workers(1).addresses,
                     max_running_requests=1, max_queue=1)
    engine = router.engine
    with client_of(router) as client:
        running = client.generate_stream([1, 2, 3], max_tokens=2000, temperature=0, ignore_eos=True)
        next(running)  # admitted and decoding
        waiting = client.generate_stream([4, 5], max_tokens=5, temperature=0, ignore_eos=True, timeout=0.5)
        waiting_error = ThreadPoolExecutor(1).submit(lambda: pytest.raises(ServingError, list, waiting).value)
        _wait_for(lambda: len(engine.scheduler.waiting) == 1)
        with pytest.raises(ServingError) as error:
            client.generate([6], max_tokens=2)
        assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert waiting_error.result(30).code == grpc.StatusCode.DEADLINE_EXCEEDED
        running.close()  # the client walks away
        # no sequence state left behind (freed once the step in flight when the client left is over)
        _wait_for(lambda: engine.num_active == 0 and not engine.scheduler.has_work() and not engine.runner.samplers)
        engine.scheduler.blocks.check()
        assert engine.scheduler.blocks.num_free_slots == engine.scheduler.blocks.num_slots
        assert client.generate([6], max_tokens=2, temperature=0).completion_tokens == 2


def test_router_refuses_a_worker_serving_another_checkpoint(helpers, tmp_path, servers, tiny_checkpoint, routers):
    from nextserve.model.make_checkpoint import make_checkpoint
    from nextserve.worker.fingerprint import checkpoint_fingerprint

    other = tmp_path / "tiny-seed1"
    make_checkpoint(other, "tiny", seed=1, progress=False)
    plan = helpers.contiguous_plan(other, 1)
    workers = helpers.InProcessWorkers(servers, other, plan)
    try:
        with pytest.raises(FingerprintMismatch) as error:
            routers(plan, workers.addresses)
    finally:
        workers.stop()
    assert checkpoint_fingerprint(other) in str(error.value)
    assert checkpoint_fingerprint(tiny_checkpoint) in str(error.value)


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_async_client_streams_tokenizes_and_checks_health(helpers, in_process_workers, routers, reference,
                                                          tiny_checkpoint):
    import asyncio

    from nextserve.client import AsyncClient

    router = routers(helpers.contiguous_plan(tiny_checkpoint, 2), in_process_workers(2).addresses)

    async def use():
        async with AsyncClient(f"127.0.0.1:{router.port}", timeout=60) as client:
            chunks = [c async for c in client.generate_stream([3, 4, 5], max_tokens=4, temperature=0, ignore_eos=True)]
            with pytest.raises(ServingError) as error:
                await client.generate([], max_tokens=1)
            return chunks, await client.tokenize("abc"), await client.health(), error.value.code

    chunks, ids, healthy, code = asyncio.run(use())
    assert [t for c in chunks for t in c.token_ids] == reference([3, 4, 5], 4, ignore_eos=True)[0]
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    assert ids and healthy and code == grpc.StatusCode.INVALID_ARGUMENT
