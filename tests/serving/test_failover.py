"""Killing a worker mid-stream (SIGKILL, like a crashed pod): prompt UNAVAILABLE, replica takeover, recovery."""
import time

import grpc
import pytest

from nextserve.client import Client, ServingError

FAIL_WITHIN_SECONDS = 10.0


def test_killed_worker_fails_the_stream_promptly_and_serving_resumes_after_restart(
        helpers, tmp_path, tiny_checkpoint, in_process_workers, worker_processes, routers, reference):
    plan = helpers.contiguous_plan(tiny_checkpoint, 2)
    plan_file = helpers.write_plan(tmp_path, plan)
    doomed = worker_processes(tiny_checkpoint, plan_file, 1).wait_ready()
    router = routers(plan, {0: in_process_workers(2).addresses[0], 1: [doomed.address]})
    address = f"127.0.0.1:{router.port}"
    with Client(address, timeout=60) as client:
        stream = client.generate_stream([1, 2, 3], max_tokens=3000, temperature=0, ignore_eos=True)
        received = len(next(stream).token_ids) + len(next(stream).token_ids)
        doomed.kill()
        killed_at = time.monotonic()
        with pytest.raises(ServingError) as error:
            for chunk in stream:
                received += len(chunk.token_ids)
        assert time.monotonic() - killed_at < FAIL_WITHIN_SECONDS
        assert error.value.code == grpc.StatusCode.UNAVAILABLE and "shard 1" in error.value.details
        assert received < 3000

        helpers.wait_serving(address, timeout=FAIL_WITHIN_SECONDS, want_serving=False)
        with pytest.raises(ServingError) as error:
            client.generate([4, 5], max_tokens=2)
        assert error.value.code == grpc.StatusCode.UNAVAILABLE and "shard 1" in error.value.details

        worker_processes(tiny_checkpoint, plan_file, 1, port=doomed.port).wait_ready()
        helpers.wait_serving(address, timeout=30)
        got = client.generate([4, 5, 6], max_tokens=5, temperature=0, ignore_eos=True)
        assert got.token_ids == reference([4, 5, 6], 5, ignore_eos=True)[0]


def test_a_replica_takes_over_and_the_stream_completes_correctly(
        helpers, tmp_path, tiny_checkpoint, in_process_workers, worker_processes, routers, reference):
    plan = helpers.contiguous_plan(tiny_checkpoint, 2)
    plan_file = helpers.write_plan(tmp_path, plan)
    primary = worker_processes(tiny_checkpoint, plan_file, 1)
    replica = worker_processes(tiny_checkpoint, plan_file, 1)
    primary.wait_ready(), replica.wait_ready()
    router = routers(plan, {0: in_process_workers(2).addresses[0], 1: [primary.address, replica.address]})
    prompt, n = [9, 8, 7, 6], 120
    with Client(f"127.0.0.1:{router.port}", timeout=60) as client:
        tokens = []
        for chunk in client.generate_stream(prompt, max_tokens=n, temperature=0, ignore_eos=True):
            tokens.extend(chunk.token_ids)
            if len(tokens) == 2:
                primary.kill()  # both replicas carry shard 1 while up: the dead one's rows move to the other
        assert tokens == reference(prompt, n, ignore_eos=True)[0]
        by_address = {c.address: c for c in router.pool.connections}
        assert not by_address[primary.address].healthy and by_address[replica.address].healthy
        assert client.health()
