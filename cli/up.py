"""`nextserve up`: a whole deployment on this machine (workers + router as subprocesses), for development."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nextserve.cli.process import CACHE_MEMORY_HELP, add_cache_arguments, add_dtype_flag


def add_parser(sub) -> None:
    p = sub.add_parser(
        "up", help="run workers and a router locally as subprocesses",
        description="Write a contiguous expert plan, start SHARDS x REPLICAS expert workers and a router on this "
                    "machine, wait until they are healthy, print the endpoint, and stop them all on Ctrl-C or SIGTERM.")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="HF-layout checkpoint directory")
    p.add_argument("--shards", required=True, type=int, metavar="N", help="expert shards (must divide the expert count)")
    p.add_argument("--replicas", type=int, default=1, metavar="R", help="workers per shard (default 1)")
    p.add_argument("--port", type=int, default=50051, metavar="P", help="router gRPC port (default 50051)")
    p.add_argument("--http-port", type=int, default=8000, metavar="P",
                   help="router OpenAI-compatible HTTP port (default 8000)")
    p.add_argument("--no-http", action="store_true", help="serve gRPC only")
    add_dtype_flag(p, "model (workers and router)")
    p.add_argument("--kv-cache-memory", default="4GiB", metavar="SIZE", help="the router's " + CACHE_MEMORY_HELP)
    p.add_argument("--speculative-tokens", type=int, default=0, choices=range(0, 5), metavar="K",
                   help="the router drafts up to K (1-4) tokens per step with the MTP head (0, default: off)")
    add_cache_arguments(p)
    p.add_argument("--startup-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long to wait for every process to become healthy (default 300)")
    p.set_defaults(func=run)


class Process:
    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]):
        self.name, self.log_path = name, log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, preexec_fn=_die_with_parent)

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join("    " + line for line in text[-lines:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()

    def wait_stopped(self, timeout: float) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._log.close()


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if `nextserve up` dies, even by SIGKILL, so no process is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(processes: list[tuple[Process, str]], deadline: float) -> None:
    """Poll each process's gRPC health until SERVING; raise RuntimeError naming a process that exits or lags."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    pending = list(processes)
    while pending:
        process, address = pending[0]
        code = process.popen.poll()
        if code is not None:
            raise RuntimeError(f"{process.name} exited with code {code}; last log lines ({process.log_path}):\n"
                               f"{process.tail()}")
        with grpc.insecure_channel(address) as channel:
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
            except grpc.RpcError:
                status = None
        if status == health_pb2.HealthCheckResponse.SERVING:
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process.name} at {address} was not healthy in time; last log lines "
                               f"({process.log_path}):\n{process.tail()}")
        time.sleep(0.2)


def run(args) -> int:
    from nextserve.cli.process import default_device, resolve_dtype
    from nextserve.router.cache_budget import parse_cache_memory
    from nextserve.model.checkpoint import load_config
    from nextserve.worker.plan import ExpertPlan

    try:
        config = load_config(args.checkpoint)
        if args.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
        plan = ExpertPlan.contiguous(config.num_experts, args.shards)
        parse_cache_memory(args.kv_cache_memory)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="nextserve-up-"))
    plan_file = workdir / "plan.json"
    plan_file.write_text(plan.to_json())
    device = default_device()
    dtype = resolve_dtype(args.dtype, device)
    # Share the cores: every process's torch would otherwise start one thread per core and they would
    # spin against each other (a 30x slowdown of the expert round trips measured on 2 cores).
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (args.shards * args.replicas + 1))))
    base = [sys.executable, "-m", "nextserve.cli.main"]
    common = ["--checkpoint", str(args.checkpoint), "--plan", str(plan_file), "--host", "127.0.0.1",
              "--dtype", dtype, "--device", device]

    processes: list[Process] = []

    def on_signal(signum, frame):  # SIGTERM (e.g. from a supervisor) stops everything as Ctrl-C does
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        workers = []
        for shard in range(args.shards):
            for replica in range(args.replicas):
                port = free_port()
                name = f"worker shard {shard} replica {replica}"
                process = Process(name, base + ["worker", *common, "--shard", str(shard), "--port", str(port)],
                                  workdir / f"worker-{shard}-{replica}.log", env)
                processes.append(process)
                workers.append((process, f"127.0.0.1:{port}", shard))
        deadline = time.monotonic() + args.startup_timeout
        print(f"starting {len(workers)} workers (logs in {workdir}) ...", file=sys.stderr)
        wait_healthy([(p, a) for p, a, _ in workers], deadline)
        http = ["--no-http"] if args.no_http else ["--http-port", str(args.http_port)]
        router = Process("router", base + ["router", *common, "--port", str(args.port), *http,
                                           "--kv-cache-memory", args.kv_cache_memory,
                                           "--speculative-tokens", str(args.speculative_tokens),
                                           *(["--cache-url", args.cache_url] if args.cache_url else []),
                                           "--cache-ttl", str(args.cache_ttl),
                                           *[f"--worker={s}={a}" for _, a, s in workers]], workdir / "router.log", env)
        processes.append(router)
        wait_healthy([(router, f"127.0.0.1:{args.port}")], deadline)
        print(f"nextserve is up: router at 127.0.0.1:{args.port} ({args.shards} shards x {args.replicas} replicas)")
        for line in router.log_path.read_text(errors="replace").splitlines():
            if "KV cache" in line:  # the router's pool sizing: how many tokens and sequences it holds
                print(line.split(" INFO ", 1)[-1])
        print(f"try: nextserve generate --router 127.0.0.1:{args.port} --max-tokens 32 \"Hello\"")
        if not args.no_http:
            model = Path(args.checkpoint).resolve().name
            body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32})
            print(f"OpenAI-compatible HTTP API at http://127.0.0.1:{args.http_port}/v1 (model {model!r})")
            print(f"try: curl http://127.0.0.1:{args.http_port}/v1/chat/completions -H 'Content-Type: application/json' "
                  f"-d '{body}'")
        sys.stdout.flush()
        while True:  # until a signal, or until a process dies (then say which)
            for process in processes:
                if process.popen.poll() is not None:
                    raise RuntimeError(f"{process.name} exited with code {process.popen.returncode}; last log "
                                       f"lines ({process.log_path}):\n{process.tail()}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping ...", file=sys.stderr)
        return 0
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for process in processes:
            process.stop()
        for process in processes:
            process.wait_stopped(10.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
