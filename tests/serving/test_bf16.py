"""Serving in bf16: hidden states travel in bf16, partials come back in fp32, and the router + workers
compute what the in-process model computes in bf16; a worker in another dtype is refused."""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from nextserve.client import Client
from nextserve.router.shards import FingerprintMismatch

PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 61)), [100]]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def bf16_model(tiny_checkpoint):
    from nextserve.model import Qwen3NextForCausalLM
    return Qwen3NextForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)


def test_router_and_two_bf16_worker_processes_equal_the_in_process_bf16_model(
        helpers, tmp_path, tiny_checkpoint, worker_processes, routers, bf16_model, close):
    from nextserve.model import SamplingParams, generate

    plan = helpers.contiguous_plan(tiny_checkpoint, 2)
    plan_file = helpers.write_plan(tmp_path, plan)
    workers = [worker_processes(tiny_checkpoint, plan_file, s, dtype="bfloat16") for s in plan.shard_indices]
    router = routers(plan, {w.shard: [w.wait_ready().address] for w in workers}, dtype="bfloat16")

    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 84, 59, 4]])
    dense = router.engine.runner.model
    remote = ThreadPoolExecutor(1).submit(dense, ids).result(timeout=60)  # off the loop, as the router runs it
    local = bf16_model(ids)
    # Two fp32 partials added in shard order vs one fp32 sum: equal up to fp32 rounding before the one
    # bf16 rounding, so at most a bf16 ulp here and there (the conftest rule with one bf16 rounding);
    # bf16-rounded partials (what the wire carried before) miss it by a wide margin.
    close(remote, local, reduction=bf16_model.config.num_experts_per_tok, dtype=torch.bfloat16, what="logits")

    with Client(f"127.0.0.1:{router.port}", timeout=60) as client:
        for prompt in PROMPTS:
            got = client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
            expected = generate(bf16_model, [prompt], params, eos_token_id=0)[0].output_ids
            assert got.token_ids == expected


def test_hidden_states_travel_in_bf16_and_partial_sums_return_in_fp32(helpers, in_process_workers, servers,
                                                                     tiny_checkpoint, routers, bf16_model, close):
    from nextserve.kernels import ops
    from nextserve.proto.v1 import experts_pb2

    plan = helpers.contiguous_plan(tiny_checkpoint, 2)
    workers = helpers.InProcessWorkers(servers, tiny_checkpoint, plan, dtype="bfloat16")
    try:
        router = routers(plan, workers.addresses, dtype="bfloat16")
        config = bf16_model.config
        g = torch.Generator().manual_seed(3)
        hidden = torch.randn(6, config.hidden_size, generator=g).bfloat16()
        weights, ids = ops.moe_route(torch.randn(6, config.num_experts, generator=g), config.num_experts_per_tok)
        layer = ThreadPoolExecutor(1).submit(router.pool.dispatch, 1, hidden, ids, weights).result(timeout=60)
        assert len(layer.requests) == 2
        assert {m.hidden.dtype for _, m in layer.requests} == {experts_pb2.DTYPE_BFLOAT16}
        routed = layer.result()  # a worker answering in another dtype than fp32 would raise ShardUnavailable
    finally:
        workers.stop()
    expected = bf16_model.model.layers[1].mlp.experts(hidden, ids, weights)  # all experts local: one fp32 sum
    assert routed.dtype == expected.dtype == torch.float32
    # two fp32 partials vs one fp32 sum over k slots: fp32 rounding of k terms at the output's scale
    close(routed, expected, reduction=config.num_experts_per_tok, what="routed sum")
    assert not torch.equal(routed, routed.bfloat16().float())  # not bf16 values dressed up as fp32


def test_a_worker_in_another_dtype_is_refused_naming_both(helpers, servers, tiny_checkpoint, routers):
    plan = helpers.contiguous_plan(tiny_checkpoint, 1)
    workers = helpers.InProcessWorkers(servers, tiny_checkpoint, plan, dtype="bfloat16")
    try:
        with pytest.raises(FingerprintMismatch) as error:
            routers(plan, workers.addresses, dtype="float32")
    finally:
        workers.stop()
    message = str(error.value)
    assert "computes in bfloat16" in message and "router serves float32" in message and "--dtype" in message


def test_a_worker_rejects_hidden_states_in_another_dtype(tiny_checkpoint):
    from nextserve.worker.shard import ShardExperts

    shard = ShardExperts.load(tiny_checkpoint, [0, 1, 2], dtype="bfloat16")
    hidden = torch.randn(2, shard.config.hidden_size)
    ids, weights = torch.tensor([[0, 1, 2]] * 2), torch.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match="arrive in torch.float32, but this worker computes in torch.bfloat16"):
        shard.forward(0, hidden, ids, weights)
    out = shard.forward(0, hidden.bfloat16(), ids, weights)
    assert out.dtype == torch.float32 and out.shape == hidden.shape  # the partial sum, unrounded
