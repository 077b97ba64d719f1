"""Telemetry for the HTTP API's generation routes: the same request span and metrics a gRPC
Generate call gets (router/telemetry.py), recorded by an ASGI middleware around the app.

The middleware sees the whole exchange, so it learns what the endpoint code cannot: the status the
client was answered with (also when an error handler built the response), when the last byte of a
stream left, and whether the client hung up first (counted as 499). The endpoints only report the
sequences they admit, through `admitted()`, which finds the request's record in a context variable
the middleware set (Starlette runs the endpoint and its streaming body in copies of that context).
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

from nextserve.telemetry import attributes as attr

from .telemetry import RequestRecord, RouterTelemetry

# route -> GenAI operation name; only these are generations (model listing and probes are not requests)
GENERATION_ROUTES = {"/v1/completions": attr.OPERATION_TEXT_COMPLETION,
                     "/v1/chat/completions": attr.OPERATION_CHAT, "/v1/responses": attr.OPERATION_CHAT}
CLIENT_CLOSED = 499  # nginx's code for "the client closed the connection before the answer"


@dataclass(slots=True, eq=False)
class _Exchange:
    record: RequestRecord
    telemetry: RouterTelemetry
    seqs: list = field(default_factory=list)


_CURRENT: contextvars.ContextVar[_Exchange | None] = contextvars.ContextVar("nextserve_http_exchange", default=None)


def admitted(stream, num_prompt: int, params, stop: list[str]) -> None:
    """The endpoint queued `stream` (one choice) for the request being served; no-op outside one."""
    exchange = _CURRENT.get()
    if exchange is None:
        return
    exchange.seqs.append(stream.seq)
    exchange.telemetry.request_admitted(exchange.record, stream.seq.seq_id, None, num_prompt, params, stop)


class HttpTelemetryMiddleware:
    """ASGI middleware: one request record per POST to a generation route, ended with its status."""

    def __init__(self, app, telemetry: RouterTelemetry | None):
        self.app, self.telemetry = app, telemetry

    async def __call__(self, scope, receive, send):
        route = scope.get("path") if scope["type"] == "http" and scope.get("method") == "POST" else None
        if self.telemetry is None or route not in GENERATION_ROUTES:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        exchange = _Exchange(self.telemetry.http_request_started(GENERATION_ROUTES[route], headers), self.telemetry)
        status, done, hung_up = 500, False, False  # 500 until a response starts: an exception escaped

        async def watch_receive():
            nonlocal hung_up
            message = await receive()
            if message["type"] == "http.disconnect" and not done:
                hung_up = True
            return message

        async def watch_send(message):
            nonlocal status, done
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True
            await send(message)

        token = _CURRENT.set(exchange)
        try:
            await self.app(scope, watch_receive, watch_send)
        except OSError:
            hung_up = not done  # the socket went away under a stream
            raise
        finally:
            _CURRENT.reset(token)
            self.telemetry.http_request_finished(exchange.record, exchange.seqs, route,
                                                 CLIENT_CLOSED if hung_up and not done else status)
