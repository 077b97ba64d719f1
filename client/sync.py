"""Blocking client for a nextserve router."""
from __future__ import annotations

from collections.abc import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextserve.proto.v1 import serving_pb2, serving_pb2_grpc

from .messages import Chunk, Completion, ServingError, channel_options, generate_request
from .tracing import GenerateSpan


class Client:
    """`Client("host:port")`. Every call takes `timeout` seconds (default: the client's); Tokenize,
    ModelInfo and health checks are retried on UNAVAILABLE, Generate never is."""

    def __init__(self, target: str, timeout: float = 60.0, retries: int = 3, tracer=None):
        self.timeout = timeout
        self.tracer = tracer  # an opentelemetry Tracer: Generate calls get a client span (see tracing.py)
        self._channel = grpc.insecure_channel(target, options=channel_options(retries))
        self._serving = serving_pb2_grpc.ServingStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate_stream(self, prompt: str | list[int], *, timeout: float | None = None,
                        completion: Completion | None = None, **sampling) -> Iterator[Chunk]:
        """Yield chunks as the router streams them; pass `completion` to also accumulate the result.
        Closing the iterator early cancels the request on the router."""
        completion = completion if completion is not None else Completion()
        request = generate_request(prompt, **sampling)
        span = GenerateSpan(self.tracer, request)
        call = self._serving.Generate(request, timeout=timeout or self.timeout, metadata=span.metadata)
        error = None
        try:
            for response in call:
                yield completion.add(response)
        except grpc.RpcError as e:
            error = ServingError.wrap(e)
            raise error from None
        finally:
            call.cancel()  # no-op after a normal end; frees the sequence when the caller stops early
            span.end(completion, error)

    def generate(self, prompt: str | list[int], *, timeout: float | None = None, **sampling) -> Completion:
        completion = Completion()
        for _ in self.generate_stream(prompt, timeout=timeout, completion=completion, **sampling):
            pass
        return completion

    def tokenize(self, text: str, *, timeout: float | None = None) -> list[int]:
        return list(self._call(self._serving.Tokenize, serving_pb2.TokenizeRequest(text=text), timeout).token_ids)

    def model_info(self, *, timeout: float | None = None) -> serving_pb2.ModelInfoResponse:
        return self._call(self._serving.ModelInfo, serving_pb2.ModelInfoRequest(), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> bool:
        """True when the router reports SERVING (every expert reachable)."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def _call(self, method, request, timeout):
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise ServingError.wrap(e) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
