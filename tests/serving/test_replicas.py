"""Replicas of a shard share its tokens (none stands by), and the results stay those of one worker per shard."""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from nextserve.client import Client
from nextserve.router.shards import ShardUnavailable

PROMPTS = [[9, 8, 7, 6], list(range(30, 47))]
MAX_TOKENS = 10


def test_both_replicas_of_each_shard_compute_and_the_tokens_are_unchanged(helpers, servers, tiny_checkpoint, routers,
                                                                         reference):
    plan = helpers.contiguous_plan(tiny_checkpoint, 2)
    workers = helpers.InProcessWorkers(servers, tiny_checkpoint, plan, replicas=2)
    try:
        router = routers(plan, workers.addresses)
        with Client(f"127.0.0.1:{router.port}", timeout=60) as client, ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = [pool.submit(client.generate, p, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
                       for p in PROMPTS]
            results = [f.result(timeout=120) for f in futures]
        served = {address: workers.services[address].requests_served for address in workers.services}
    finally:
        workers.stop()
    for prompt, got in zip(PROMPTS, results):
        assert got.token_ids == reference(prompt, MAX_TOKENS, ignore_eos=True)[0]
    for shard, (first, second) in workers.addresses.items():
        # every layer dispatch gives each replica a chunk of the shard's rows (a lone token alternates)
        assert served[first] > 0 and served[second] > 0, (shard, served)
        assert 0.5 <= served[first] / served[second] <= 2.0, (shard, served)


def test_a_request_a_healthy_worker_rejects_fails_at_once_and_is_not_resent(helpers, servers, tiny_checkpoint,
                                                                            routers):
    plan = helpers.contiguous_plan(tiny_checkpoint, 1)
    workers = helpers.InProcessWorkers(servers, tiny_checkpoint, plan, replicas=2)
    try:
        router = routers(plan, workers.addresses)
        hidden, ids, weights = torch.zeros(4, 64), torch.zeros(4, 3, dtype=torch.long), torch.ones(4, 3) / 3
        layer = ThreadPoolExecutor(1).submit(router.pool.dispatch, 99, hidden, ids, weights).result(timeout=30)
        with pytest.raises(ShardUnavailable, match="rejected a request: layer 99 is not an MoE layer"):
            layer.result()
        assert all(c.healthy for c in router.pool.connections)
    finally:
        workers.stop()
