"""asyncio client for a nextserve router; the same calls as `Client`, awaited."""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextserve.proto.v1 import serving_pb2, serving_pb2_grpc

from .messages import Chunk, Completion, ServingError, channel_options, generate_request
from .tracing import GenerateSpan


class AsyncClient:
    def __init__(self, target: str, timeout: float = 60.0, retries: int = 3, tracer=None):
        self.timeout = timeout
        self.tracer = tracer  # an opentelemetry Tracer: Generate calls get a client span (see tracing.py)
        self._channel = grpc.aio.insecure_channel(target, options=channel_options(retries))
        self._serving = serving_pb2_grpc.ServingStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def generate_stream(self, prompt: str | list[int], *, timeout: float | None = None,
                              completion: Completion | None = None, **sampling) -> AsyncIterator[Chunk]:
        completion = completion if completion is not None else Completion()
        request = generate_request(prompt, **sampling)
        span = GenerateSpan(self.tracer, request)
        call = self._serving.Generate(request, timeout=timeout or self.timeout, metadata=span.metadata)
        error = None
        try:
            async for response in call:
                yield completion.add(response)
        except grpc.RpcError as e:
            error = ServingError.wrap(e)
            raise error from None
        finally:
            call.cancel()
            span.end(completion, error)

    async def generate(self, prompt: str | list[int], *, timeout: float | None = None, **sampling) -> Completion:
        completion = Completion()
        async for _ in self.generate_stream(prompt, timeout=timeout, completion=completion, **sampling):
            pass
        return completion

    async def tokenize(self, text: str, *, timeout: float | None = None) -> list[int]:
        response = await self._call(self._serving.Tokenize, serving_pb2.TokenizeRequest(text=text), timeout)
        return list(response.token_ids)

    async def model_info(self, *, timeout: float | None = None) -> serving_pb2.ModelInfoResponse:
        return await self._call(self._serving.ModelInfo, serving_pb2.ModelInfoRequest(), timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> bool:
        response = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return response.status == health_pb2.HealthCheckResponse.SERVING

    async def _call(self, method, request, timeout):
        try:
            return await method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise ServingError.wrap(e) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
