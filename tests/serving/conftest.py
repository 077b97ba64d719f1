"""Real deployments on loopback sockets: expert workers (in-process or as subprocesses) and routers.

In-process servers run on one background asyncio loop (a thread), as they would in their own
process; workers that a test kills are subprocesses, killed with SIGKILL like a crashed pod. Every
wait is bounded and every process and server is stopped by a finalizer.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextserve.worker.plan import ExpertPlan

STARTUP_TIMEOUT = 60.0


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Workers, router and reference share 2 cores: more torch threads than cores spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class BackgroundLoop:
    """An asyncio loop on its own thread; `run(coro)` blocks until the coroutine is done (bounded)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="servers", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = STARTUP_TIMEOUT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def servers():
    loop = BackgroundLoop()
    yield loop
    loop.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, timeout: float = STARTUP_TIMEOUT, want_serving: bool = True) -> None:
    deadline = time.monotonic() + timeout
    want = health_pb2.HealthCheckResponse.SERVING if want_serving else health_pb2.HealthCheckResponse.NOT_SERVING
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == want:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} did not report {'SERVING' if want_serving else 'NOT_SERVING'} "
                                   f"within {timeout} s")
            time.sleep(0.1)


def write_plan(directory: Path, plan: ExpertPlan) -> Path:
    path = directory / f"plan-{plan.fingerprint()}.json"
    path.write_text(plan.to_json())
    return path


class WorkerProcess:
    """`nextserve worker` as a subprocess (cpu, one torch thread; float32 unless told)."""

    def __init__(self, checkpoint: Path, plan_file: Path, shard: int, log_dir: Path, port: int | None = None,
                 dtype: str = "float32"):
        self.checkpoint, self.plan_file, self.shard, self.dtype = checkpoint, plan_file, shard, dtype
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_dir / f"worker-{shard}-{self.port}.log"
        self.popen: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        env = dict(os.environ, OMP_NUM_THREADS="1")
        argv = [sys.executable, "-m", "nextserve.cli.main", "worker", "--checkpoint", str(self.checkpoint),
                "--plan", str(self.plan_file), "--shard", str(self.shard), "--port", str(self.port),
                "--host", "127.0.0.1", "--dtype", self.dtype, "--device", "cpu"]
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        return self

    def wait_ready(self) -> "WorkerProcess":
        try:
            wait_serving(self.address)
        except TimeoutError:
            raise TimeoutError(f"worker shard {self.shard} not ready:\n{self.log_path.read_text()[-3000:]}") from None
        return self

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.popen is not None:
            self._log.close()


@pytest.fixture
def worker_processes(tmp_path):
    """Factory: worker_processes(checkpoint, plan_file, shard, port=None, dtype="float32") -> started
    WorkerProcess (not yet ready)."""
    started: list[WorkerProcess] = []

    def start(checkpoint, plan_file, shard, port=None, dtype="float32"):
        worker = WorkerProcess(checkpoint, plan_file, shard, tmp_path, port, dtype).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


class InProcessWorkers:
    """Expert workers served from the test process (one background loop): `replicas` per plan shard."""

    def __init__(self, servers: BackgroundLoop, checkpoint: Path, plan: ExpertPlan, dtype: str = "float32",
                 replicas: int = 1):
        from nextserve.worker.server import build_service, serve

        self.servers = servers
        self.grpc_servers = []
        self.addresses: dict[int, list[str]] = {}
        self.services: dict[str, object] = {}  # address -> ExpertWorkerService, for its counters
        for shard in plan.shard_indices:
            for _ in range(replicas):
                service = build_service(checkpoint, plan, shard, dtype, "cpu")
                server, port = servers.run(serve(service, "127.0.0.1", 0))
                self.grpc_servers.append(server)
                self.addresses.setdefault(shard, []).append(f"127.0.0.1:{port}")
                self.services[f"127.0.0.1:{port}"] = service

    def stop(self) -> None:
        for server in self.grpc_servers:
            self.servers.run(server.stop(0))


@pytest.fixture(scope="session")
def in_process_workers(servers, tiny_checkpoint):
    """in_process_workers(num_shards) -> InProcessWorkers over a contiguous plan (cached per session)."""
    made: dict[int, InProcessWorkers] = {}

    def get(num_shards: int) -> InProcessWorkers:
        if num_shards not in made:
            made[num_shards] = InProcessWorkers(servers, tiny_checkpoint, contiguous_plan(tiny_checkpoint, num_shards))
        return made[num_shards]

    yield get
    for workers in made.values():
        workers.stop()


@pytest.fixture(scope="module")
def small_vocab_workers(servers, small_vocab_checkpoint):
    """(plan, InProcessWorkers): two shards of the small-vocabulary checkpoint, MTP layer included."""
    plan = contiguous_plan(small_vocab_checkpoint, 2)
    workers = InProcessWorkers(servers, small_vocab_checkpoint, plan)
    yield plan, workers
    workers.stop()


def contiguous_plan(checkpoint: Path, num_shards: int) -> ExpertPlan:
    from nextserve.model.checkpoint import load_config
    return ExpertPlan.contiguous(load_config(checkpoint).num_experts, num_shards)


@pytest.fixture
def routers(servers, tiny_checkpoint):
    """Factory: routers(plan, workers, dtype="float32", **limits) -> a started in-process Router (cpu);
    stopped after the test."""
    from nextserve.router.server import RouterOptions, start_router

    started = []

    def start(plan: ExpertPlan, workers: dict[int, list[str]], checkpoint: Path | None = None, dtype="float32",
              **limits):
        options = RouterOptions(checkpoint=str(checkpoint or tiny_checkpoint), plan=plan, workers=workers,
                                host="127.0.0.1", port=0, dtype=dtype, device="cpu", **limits)
        router = servers.run(start_router(options))
        started.append(router)
        return router

    yield start
    for router in started:
        servers.run(router.stop(0))


@pytest.fixture(scope="session")
def reference_model(tiny_checkpoint):
    from nextserve.model import Qwen3NextForCausalLM
    return Qwen3NextForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="session")
def reference(reference_model, tiny_checkpoint):
    """reference(prompt_ids, max_tokens, **sampling) -> (token ids, finish reason) from the in-process model."""
    from nextserve.model import SamplingParams, generate
    from nextserve.model.tokenizer import load_tokenizer

    eos = load_tokenizer(tiny_checkpoint).eos_token_id

    def run(prompt_ids, max_tokens, **sampling):
        params = SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, **sampling})
        completion = generate(reference_model, [list(prompt_ids)], params, eos)[0]
        return completion.output_ids, completion.finish_reason

    return run


@pytest.fixture(scope="session")
def helpers():
    """This file's helpers for the test modules (importlib mode cannot import conftest by name)."""
    from types import SimpleNamespace
    return SimpleNamespace(contiguous_plan=contiguous_plan, wait_serving=wait_serving, write_plan=write_plan,
                           InProcessWorkers=InProcessWorkers, free_port=free_port)


@pytest.fixture(scope="module")
def http_router(servers, in_process_workers, tiny_checkpoint):
    """A router with its OpenAI-compatible HTTP API on (the model is named "tiny"), over 2 in-process
    workers; one per test module, whose tests must leave it serving."""
    from nextserve.router.server import RouterOptions, start_router

    options = RouterOptions(checkpoint=str(tiny_checkpoint), plan=contiguous_plan(tiny_checkpoint, 2),
                            workers=in_process_workers(2).addresses, host="127.0.0.1", port=0, dtype="float32",
                            device="cpu", http_port=0, served_model_name="tiny")
    router = servers.run(start_router(options))
    yield router
    servers.run(router.stop(0))


@pytest.fixture(scope="module")
def started_routers(servers, in_process_workers, tiny_checkpoint, helpers):
    """start(**options) -> a started in-process Router (extra RouterOptions from `options`) over 2
    workers; start.stop(router) stops one early (a restart), the rest stop at the module's end."""
    from nextserve.router.server import RouterOptions, start_router

    started = []

    def start(**options):
        router = servers.run(start_router(RouterOptions(
            checkpoint=str(tiny_checkpoint), plan=helpers.contiguous_plan(tiny_checkpoint, 2),
            workers=in_process_workers(2).addresses, host="127.0.0.1", port=0, dtype="float32", device="cpu",
            **options)))
        started.append(router)
        return router

    def stop(router):
        started.remove(router)
        servers.run(router.stop(0))

    start.stop = stop
    yield start
    for router in started:
        servers.run(router.stop(0))
