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
from dataclasses import dataclass
from pathlib import Path

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
    def __init__(self, directory, port: int, tls: "TLSFiles | None" = None):
        """With `tls`, the server speaks TLS only and requires client certificates (mutual TLS)."""
        self.directory, self.port, self.tls = directory, port, tls
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: `make test` installs it (apt-get install redis-server)")
        ports = ["--port", str(self.port)] if self.tls is None else [
            "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.server_cert),
            "--tls-key-file", str(self.tls.server_key), "--tls-ca-cert-file", str(self.tls.ca_cert),
            "--tls-auth-clients", "yes"]
        self.process = subprocess.Popen(
            [binary, *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
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
        if self.tls is not None:
            kwargs = dict(ssl=True, ssl_ca_certs=str(self.tls.ca_cert), ssl_certfile=str(self.tls.client_cert),
                          ssl_keyfile=str(self.tls.client_key), **kwargs)
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, directory: Path) -> "TLSFiles":
        """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (openssl CLI)."""
        def run(*args):
            subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=nextserve-test-ca")
        (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        for name in ("server", "client"):
            run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=nextserve-test-{name}")
            run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "1", "-extfile", "san.ext")
        return cls(*(directory / f for f in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"), free_port()).start()
    yield server
    server.kill()  # SIGKILL ends a paused (SIGSTOP) server too


@pytest.fixture(scope="module")
def tls_redis_server(tmp_path_factory):
    """A TLS-only redis-server that requires client certificates, and the files to reach it."""
    directory = tmp_path_factory.mktemp("redis-tls")
    server = RedisServer(directory, free_port(), tls=TLSFiles.make(directory)).start()
    yield server
    server.kill()


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
