"""Fixtures shared by every test package.

redis-server: a real one per test module, on a free loopback port, that tests may kill, pause and
restart. It runs without persistence (`--save '' --appendonly no`), so a restart comes back empty, as a
Redis pod without a volume does. Every wait is bounded; the finalizer kills the process.
"""
from __future__ import annotations

import math
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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A `tiny` preset checkpoint (seed 0, float32, single file), made once per test session.
    Treat it as read-only: copy it before modifying anything."""
    from nextserve.model.make_checkpoint import make_checkpoint

    out = tmp_path_factory.mktemp("checkpoints") / "tiny"
    make_checkpoint(out, "tiny", seed=0, progress=False)
    return out


SMALL_VOCAB = 8


@pytest.fixture(scope="session")
def small_vocab_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint cut to an 8-token vocabulary (the first rows of its embedding and LM head),
    without a tokenizer: random drafts over 8 tokens are right often enough that speculative decoding
    accepts some and rejects others, and a distribution over 8 tokens is cheap to estimate."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("checkpoints") / "small-vocab"
    out.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(tiny_checkpoint / name, out / name)
    config = json.loads((out / "config.json").read_text())
    config["vocab_size"] = SMALL_VOCAB
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(tiny_checkpoint / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = tensors[name][:SMALL_VOCAB].contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# --- numeric tolerances ----------------------------------------------------------------------
# Two correct computations of the same value differ by rounding alone: by the storage dtype's
# epsilon each time a result is rounded to it, and by the accumulator's epsilon times the number of
# terms summed (BLAS paths, summation orders and thread counts change which rounding happens, not how
# much). So a tolerance is derived from what is compared, relative to the reference's own scale:
#
#   max-abs:      |a - e| <= SLACK * (roundings * eps(dtype) + reduction * eps(acc)) * max|e|
#   relative RMS: rms(a - e) / rms(e) <= SLACK * (roundings * eps(dtype) + sqrt(reduction) * eps(acc))
#
# `reduction` is the number of terms accumulated along the longest chain that produced a value (add the
# lengths of chained reductions: a SwiGLU FFN of width I over hidden H is H + I); `roundings` is how many
# times a value is rounded to `dtype` along that chain. The max-abs bound is the worst case of n
# roundings in a row; the RMS bound is the random-walk growth that RMS errors follow. A real bug (a wrong
# sign, a missing gate, a shifted position) moves values by a fraction of their scale: orders of
# magnitude beyond either bound.
SLACK = 2.0


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def rounding_tolerance(dtype: torch.dtype, *, reduction: int = 1, roundings: int = 1,
                       accumulate: torch.dtype = torch.float32, rms: bool = False) -> float:
    """The relative tolerance of the rule above (relative to the reference's scale)."""
    acc = accumulate if _eps(accumulate) < _eps(dtype) else dtype
    growth = math.sqrt(reduction) if rms else reduction
    return SLACK * (roundings * _eps(dtype) + growth * _eps(acc))


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """Of two dtypes, the one with the larger epsilon: a float64 reference does not tighten the bound."""
    return a if _eps(a) >= _eps(b) else b


def _check_same_shape_and_finite(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, *, reduction: int,
                              dtype: torch.dtype | None = None, roundings: int = 1, what: str = "value") -> None:
    """Max-abs comparison with the tolerance derived from `dtype` (default: the coarser of the two), the
    reduction length and the reference's scale (max |expected|)."""
    _check_same_shape_and_finite(actual, expected, what)
    dtype = dtype or _coarser(actual.dtype, expected.dtype)
    scale = expected.detach().double().abs().max().item() if expected.numel() else 0.0
    atol = rounding_tolerance(dtype, reduction=reduction, roundings=roundings) * max(scale, torch.finfo(dtype).tiny)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=atol,
                               msg=lambda m: f"{what} (scale {scale:.3g}, reduction {reduction}, {dtype}): {m}")


def relative_rms_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """RMS of the difference relative to the RMS of the reference (flash-linear-attention's measure)."""
    expected, actual = expected.double(), actual.double()
    return ((expected - actual).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp_min(1e-300)).item()


def assert_rms_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, *, reduction: int,
                                  dtype: torch.dtype | None = None, roundings: int = 1, what: str = "value") -> None:
    """Relative-RMS comparison with the random-walk tolerance of the rule above."""
    _check_same_shape_and_finite(actual, expected, what)
    dtype = dtype or _coarser(actual.dtype, expected.dtype)
    tol = rounding_tolerance(dtype, reduction=reduction, roundings=roundings, rms=True)
    err = relative_rms_error(expected, actual)
    assert err <= tol, f"{what}: relative RMS error {err:.3g} > {tol:.3g} (reduction {reduction}, {dtype})"


@pytest.fixture
def close():
    """`close(actual, expected, reduction=N)`: see `assert_close_to_reference`."""
    return assert_close_to_reference


@pytest.fixture
def rms_close():
    """`rms_close(actual, expected, reduction=N)`: see `assert_rms_close_to_reference`."""
    return assert_rms_close_to_reference


def logit_chain(config, num_tokens: int) -> int:
    """The longest accumulation behind a logit of the model (nextserve's or transformers' config) over
    `num_tokens` positions: per decoder layer two norms over the hidden size, the mixer (projections in
    and out, plus attention over the keys or the delta rule's recurrence over the tokens and its chunk),
    the MoE block (router softmax, the expert FFN, the sum of the k + 1 experts), then the final norm and
    the LM head."""
    H = config.hidden_size
    attention = H + config.head_dim + config.head_dim + num_tokens + config.num_attention_heads * config.head_dim
    deltanet = (H + config.linear_conv_kernel_dim + num_tokens + 2 * config.linear_key_head_dim + 2 * 64
                + config.linear_num_value_heads * config.linear_value_head_dim)
    moe = (H + config.num_experts + H + max(config.moe_intermediate_size, config.shared_expert_intermediate_size)
           + config.num_experts_per_tok + 1)
    per_layer = 2 * H + max(attention, deltanet) + moe
    return config.num_hidden_layers * per_layer + 2 * H


@pytest.fixture
def logits_close():
    """`logits_close(actual, expected, config, num_tokens)`: logits of two runs of the same model
    within the rounding of `logit_chain`, relative to the logit scale."""
    def check(actual, expected, config, num_tokens, *, dtype=None, what="logits"):
        assert_close_to_reference(actual, expected, reduction=logit_chain(config, num_tokens), dtype=dtype, what=what)
    return check


@pytest.fixture
def model_chain():
    """`model_chain(config, num_tokens)`: see `logit_chain`."""
    return logit_chain


REDIS_STARTUP_TIMEOUT = 10.0


def free_redis_port() -> int:
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
        deadline = time.monotonic() + REDIS_STARTUP_TIMEOUT
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
    server = RedisServer(tmp_path_factory.mktemp("redis"), free_redis_port()).start()
    yield server
    server.kill()  # SIGKILL ends a paused (SIGSTOP) server too


@pytest.fixture(scope="module")
def tls_redis_server(tmp_path_factory):
    """A TLS-only redis-server that requires client certificates, and the files to reach it."""
    directory = tmp_path_factory.mktemp("redis-tls")
    server = RedisServer(directory, free_redis_port(), tls=TLSFiles.make(directory)).start()
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
