"""A real redis-server per test module, on a free loopback port, that tests may kill, pause and restart.

It runs without persistence (`--save '' --appendonly no`), so a restart comes back empty, as a Redis
pod without a volume does. Every wait is bounded; the finalizer kills the process.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import redis
import torch

from nextserve.router.cache.keys import CacheNamespace

STARTUP_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, directory, port: int):
        self.directory, self.port = directory, port
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: `make test` installs it (apt-get install redis-server)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--loglevel", "warning", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                with self.admin() as r:
                    r.ping()
                return self
            except redis.RedisError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, like a crashed pod."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung or overloaded Redis)."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def admin(self, **kwargs) -> redis.Redis:
        """A plain client for the test's own hand edits (SETRANGE, DEL, FLUSHALL, CONFIG SET)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"), free_port()).start()
    yield server
    server.kill()  # SIGKILL ends a paused (SIGSTOP) server too


@pytest.fixture
def redis_url(redis_server) -> str:
    """The module's server, running, empty and at default memory settings for each test."""
    if not redis_server.running:
        redis_server.start()
    with redis_server.admin() as r:
        r.flushall()
        r.config_set("maxmemory", 0)
        r.config_set("maxmemory-policy", "noeviction")
    return redis_server.url


@pytest.fixture
def namespace() -> CacheNamespace:
    return CacheNamespace(os.urandom(8).hex(), "bfloat16")


@pytest.fixture
def tensors_like():
    """Fresh random tensors with the given (dtype, shape) specs; bfloat16 and float32 as the model stores them."""
    def make(specs: dict) -> dict[str, torch.Tensor]:
        out = {}
        for name, (dtype, shape) in specs.items():
            out[name] = torch.randn(shape, dtype=torch.float32).to(getattr(torch, dtype))
        return out
    return make
