"""Graceful drain: the router's shutdown state, shared by every front end it serves.

On SIGTERM (Kubernetes stopping the pod, after its preStop) the router, in this order:
reports NOT_SERVING for readiness, so the Service stops sending it traffic; refuses new
generations with UNAVAILABLE (a client retries on another router); lets the running ones
finish for up to the grace period; ends what still runs with UNAVAILABLE; exits. Liveness
stays SERVING throughout: a draining router is not wedged.

A front end asks `drain.admitting` before it starts a generation; the gRPC server does so
through `RefuseWhileDraining`, an HTTP front end can ask the same object.
"""
from __future__ import annotations

import grpc

GENERATE_METHOD = "/nextserve.v1.Serving/Generate"


class Drain:
    """Whether the router still takes new generations, and why not when it does not."""

    def __init__(self) -> None:
        self._reason: str | None = None

    @property
    def admitting(self) -> bool:
        return self._reason is None

    @property
    def reason(self) -> str:
        return self._reason or ""

    def begin(self, grace_seconds: float) -> None:
        self._reason = (f"the router is shutting down (draining for up to {grace_seconds:g} s): "
                        f"send new requests to another router")


class RefuseWhileDraining(grpc.aio.ServerInterceptor):
    """Answers new Generate calls with UNAVAILABLE once the drain has begun; other calls pass."""

    def __init__(self, drain: Drain, methods: tuple[str, ...] = (GENERATE_METHOD,)) -> None:
        self._drain, self._methods = drain, frozenset(methods)

        async def refuse(request, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._drain.reason)

        self._refusal = grpc.unary_stream_rpc_method_handler(refuse)

    async def intercept_service(self, continuation, handler_call_details):
        if not self._drain.admitting and handler_call_details.method in self._methods:
            return self._refusal
        return await continuation(handler_call_details)
