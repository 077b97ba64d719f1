"""Speculative decoding in the router: the MTP head's experts on the workers, greedy output equal to
the in-process model's, acceptance in the gRPC usage and in the metrics."""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from nextserve.client import Client
from nextserve.model import Qwen3NextForCausalLM, SamplingParams, generate

PROMPTS = [[5, 6, 7, 1, 2], [3, 1, 4, 1, 5, 2, 6] * 10, [4], [1, 2, 3, 4, 5, 6, 7] * 2]
MAX_TOKENS = [20, 12, 24, 16]


def test_workers_serve_the_mtp_heads_experts(small_vocab_workers, small_vocab_checkpoint):
    plan, workers = small_vocab_workers
    from nextserve.model.checkpoint import load_config
    mtp_layer = load_config(small_vocab_checkpoint).num_hidden_layers
    for service in workers.services.values():
        assert mtp_layer in service.experts.layers


@pytest.mark.parametrize("k", [1, 3])
def test_router_speculative_greedy_equals_the_in_process_model(k, small_vocab_workers, routers, small_vocab_checkpoint):
    plan, workers = small_vocab_workers
    router = routers(plan, workers.addresses, checkpoint=small_vocab_checkpoint, max_batch_tokens=24,
                     speculative_tokens=k, speculative_adaptive=False)
    with Client(f"127.0.0.1:{router.port}", timeout=60) as client, ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(client.generate, p, max_tokens=n, temperature=0, ignore_eos=True)
                   for p, n in zip(PROMPTS, MAX_TOKENS)]
        results = [f.result(timeout=120) for f in futures]
        metrics = router.engine.telemetry.metrics
    model = Qwen3NextForCausalLM.from_pretrained(small_vocab_checkpoint, dtype=torch.float32)
    for prompt, n, got in zip(PROMPTS, MAX_TOKENS, results):
        expected = generate(model, [prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]
        assert got.token_ids == expected.output_ids
        assert got.completion_tokens == n and got.draft_tokens > 0
        assert 0 <= got.accepted_draft_tokens <= got.draft_tokens
    assert any(r.accepted_draft_tokens > 0 for r in results)
    drafted = sum(r.draft_tokens for r in results)
    assert metrics.draft_tokens._value.get() == drafted
    assert metrics.accepted_draft_tokens._value.get() == sum(r.accepted_draft_tokens for r in results)


def test_http_usage_reports_accepted_and_rejected_drafts(small_vocab_workers, routers, small_vocab_checkpoint):
    import openai

    plan, workers = small_vocab_workers
    router = routers(plan, workers.addresses, checkpoint=small_vocab_checkpoint, speculative_tokens=2,
                     speculative_adaptive=False, http_port=0, served_model_name="small")
    with openai.OpenAI(base_url=f"http://127.0.0.1:{router.http.port}/v1", api_key="unused", max_retries=0,
                       timeout=120) as oai:
        done = oai.completions.create(model="small", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    details = done.usage.completion_tokens_details
    assert done.usage.completion_tokens == 12
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens > 0
    assert details.accepted_prediction_tokens >= 0 and details.rejected_prediction_tokens >= 0


def test_a_request_turns_speculation_off_or_is_refused_where_it_is_off(small_vocab_workers, routers,
                                                                       small_vocab_checkpoint):
    import grpc

    from nextserve.client import ServingError

    plan, workers = small_vocab_workers
    spec = routers(plan, workers.addresses, checkpoint=small_vocab_checkpoint, speculative_tokens=2,
                   speculative_adaptive=False)
    plain = routers(plan, workers.addresses, checkpoint=small_vocab_checkpoint)
    with Client(f"127.0.0.1:{spec.port}", timeout=60) as client:
        off = client.generate(PROMPTS[0], max_tokens=8, temperature=0, ignore_eos=True, speculative_tokens=0)
        on = client.generate(PROMPTS[0], max_tokens=8, temperature=0, ignore_eos=True)
    assert off.token_ids == on.token_ids and off.draft_tokens == 0 < on.draft_tokens
    with Client(f"127.0.0.1:{plain.port}", timeout=60) as client:
        with pytest.raises(ServingError) as refused:
            client.generate(PROMPTS[0], max_tokens=8, speculative_tokens=2)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "without speculative decoding" in refused.value.details
