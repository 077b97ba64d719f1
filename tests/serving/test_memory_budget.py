"""The router under a KV cache budget: requests that never fit are refused alone, and preemption
(recompute) keeps every other request's tokens exactly what they are without memory pressure."""
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from nextserve.client import Client, ServingError
from nextserve.router.cache_budget import block_bytes, slot_bytes


def budget_for(config, num_blocks: int, num_slots: int) -> str:
    """--kv-cache-memory bytes that size the pools to exactly these counts (float32 tiny model)."""
    return str(num_blocks * block_bytes(config, "float32") + num_slots * slot_bytes(config, "float32"))


@pytest.fixture(scope="module")
def config(tiny_checkpoint):
    from nextserve.model.checkpoint import load_config
    return load_config(tiny_checkpoint)


def test_a_prompt_larger_than_the_whole_cache_is_invalid_argument_while_others_complete(
        helpers, in_process_workers, routers, reference, tiny_checkpoint, config):
    router = routers(helpers.contiguous_plan(tiny_checkpoint, 2), in_process_workers(2).addresses,
                     max_running_requests=3, kv_cache_memory=budget_for(config, 4, 3))
    blocks = router.engine.scheduler.blocks
    assert (blocks.num_blocks, blocks.num_slots) == (4, 3)  # 256 tokens
    prompts = [[5, 6, 7, 8, 9], list(range(20, 61))]
    with Client(f"127.0.0.1:{router.port}", timeout=60) as client, ThreadPoolExecutor(3) as pool:
        running = [pool.submit(client.generate, p, max_tokens=6, temperature=0, ignore_eos=True) for p in prompts]
        with pytest.raises(ServingError) as error:
            client.generate(list(range(1, 301)), max_tokens=4)
        results = [f.result(timeout=120) for f in running]
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "303 tokens" in error.value.details and "holds 256 tokens" in error.value.details
    for prompt, got in zip(prompts, results):
        assert got.token_ids == reference(prompt, 6, ignore_eos=True)[0]
    blocks.check()
    assert blocks.num_free_blocks == 4 and blocks.num_free_slots == 3


def test_preemption_mid_decode_yields_the_tokens_of_a_run_without_it(
        helpers, in_process_workers, routers, reference, tiny_checkpoint, config):
    # 3 blocks (192 tokens) for 4 requests that each grow past one block: decodes must preempt
    router = routers(helpers.contiguous_plan(tiny_checkpoint, 2), in_process_workers(2).addresses,
                     max_running_requests=4, kv_cache_memory=budget_for(config, 3, 4), max_batch_tokens=32)
    prompts = [list(range(10 + 7 * i, 50 + 7 * i)) for i in range(4)]
    with Client(f"127.0.0.1:{router.port}", timeout=120) as client, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client.generate, p, max_tokens=40, temperature=0, ignore_eos=True) for p in prompts]
        results = [f.result(timeout=300) for f in futures]
    assert router.engine.scheduler.num_preemptions > 0
    for prompt, got in zip(prompts, results):
        assert got.token_ids == reference(prompt, 40, ignore_eos=True)[0]
    router.engine.scheduler.blocks.check()
