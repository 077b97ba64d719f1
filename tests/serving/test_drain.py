"""Graceful drain of a real `nextserve router` process under SIGTERM, and liveness apart from readiness.

The router runs as a subprocess (SIGTERM is what the kubelet sends after the preStop); its
workers are real servers on loopback sockets.
"""
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from nextserve.client import Client, ServingError
from nextserve.proto import health as health_names


class RouterProcess:
    def __init__(self, helpers, checkpoint, plan_file, workers: dict[int, list[str]], log_dir, drain_grace: float):
        self.port = helpers.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_dir / f"router-{self.port}.log"
        argv = [sys.executable, "-m", "nextserve.cli.main", "router", "--checkpoint", str(checkpoint),
                "--plan", str(plan_file), "--port", str(self.port), "--host", "127.0.0.1",
                "--dtype", "float32", "--device", "cpu", "--drain-grace", str(drain_grace)]
        for shard, addresses in workers.items():
            argv += [arg for a in addresses for arg in ("--worker", f"{shard}={a}")]
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=dict(os.environ, OMP_NUM_THREADS="1"))
        deadline = time.monotonic() + 120
        while True:  # until SERVING; fail at once if the process exits
            try:
                helpers.wait_serving(self.address, timeout=1)
                return
            except TimeoutError:
                if self.popen.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"router not ready:\n{self.log()[-3000:]}") from None

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self._log.close()


@pytest.fixture
def router_process(helpers, tmp_path, tiny_checkpoint):
    started = []

    def start(plan, workers, drain_grace):
        router = RouterProcess(helpers, tiny_checkpoint, helpers.write_plan(tmp_path, plan), workers, tmp_path,
                               drain_grace)
        started.append(router)
        return router

    yield start
    for router in started:
        router.stop()


def _until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_sigterm_drains_running_generations_and_refuses_new_ones(
        helpers, tiny_checkpoint, in_process_workers, router_process, reference):
    plan = helpers.contiguous_plan(tiny_checkpoint, 2)
    router = router_process(plan, in_process_workers(2).addresses, drain_grace=60)
    prompts, n = ([3, 1, 4, 1], [2, 7, 1, 8, 2]), 40
    with Client(router.address, timeout=120) as client:
        streams = [client.generate_stream(p, max_tokens=n, temperature=0, ignore_eos=True) for p in prompts]
        tokens = [list(next(s).token_ids) for s in streams]  # both are running on the router

        router.popen.send_signal(signal.SIGTERM)
        # Readiness goes first; liveness stays up: a draining router is not wedged.
        _until(lambda: not client.health(), 10, "readiness NOT_SERVING")
        assert not client.health(health_names.ROUTER_READINESS)
        assert client.health(health_names.LIVENESS)
        with pytest.raises(ServingError) as refused:
            client.generate([5, 6], max_tokens=2)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.details

        # What was running completes, token for token as the in-process model generates it.
        for stream, got in zip(streams, tokens):
            for chunk in stream:
                got.extend(chunk.token_ids)
        for prompt, got in zip(prompts, tokens):
            assert got == reference(prompt, n, ignore_eos=True)[0]
    assert router.popen.wait(30) == 0
    assert "ending" not in router.log()  # nothing was cut


def test_generation_past_the_grace_period_ends_with_unavailable(
        helpers, tiny_checkpoint, in_process_workers, router_process):
    plan = helpers.contiguous_plan(tiny_checkpoint, 2)
    router = router_process(plan, in_process_workers(2).addresses, drain_grace=0.5)
    with Client(router.address, timeout=120) as client:
        stream = client.generate_stream([1, 2, 3], max_tokens=3000, temperature=0, ignore_eos=True)
        received = len(next(stream).token_ids)
        router.popen.send_signal(signal.SIGTERM)
        with pytest.raises(ServingError) as cut:
            for chunk in stream:
                received += len(chunk.token_ids)
        assert cut.value.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in cut.value.details
        assert received < 3000
    assert router.popen.wait(30) == 0
    assert "ending 1 running generations with UNAVAILABLE" in router.log()


def test_liveness_stays_serving_while_a_worker_is_down(
        helpers, tmp_path, tiny_checkpoint, in_process_workers, worker_processes, routers):
    plan = helpers.contiguous_plan(tiny_checkpoint, 2)
    doomed = worker_processes(tiny_checkpoint, helpers.write_plan(tmp_path, plan), 1).wait_ready()
    with Client(doomed.address, timeout=30) as worker:  # workers answer the same probes
        assert worker.health(health_names.LIVENESS) and worker.health(health_names.WORKER_READINESS)
    router = routers(plan, {0: in_process_workers(2).addresses[0], 1: [doomed.address]})
    with Client(f"127.0.0.1:{router.port}", timeout=30) as client:
        assert client.health() and client.health(health_names.LIVENESS)
        doomed.kill()
        _until(lambda: not client.health(health_names.ROUTER_READINESS), 15, "readiness NOT_SERVING")
        assert not client.health()
        assert client.health(health_names.LIVENESS)
