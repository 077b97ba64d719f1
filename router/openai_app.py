"""The OpenAI-compatible HTTP API as one ASGI app: models, completions, chat, responses, health probes;
generation requests traced and counted as gRPC ones are (router/http_telemetry.py)."""
from __future__ import annotations

from fastapi import FastAPI, Request

from .http_telemetry import HttpTelemetryMiddleware
from .openai_api import OpenAIFrontend, ServedModel
from .openai_errors import APIError, unavailable
from .openai_responses import ResponsesEndpoint


def build_app(served: ServedModel) -> FastAPI:
    """The ASGI app; every error leaves as OpenAI's error shape."""
    frontend = OpenAIFrontend(served)
    responses = ResponsesEndpoint(frontend)
    app = FastAPI(title="nextserve", summary="OpenAI-compatible API of a nextserve router",
                  docs_url=None, redoc_url=None)
    # Inside Starlette's outermost error middleware, so it sees the status of every answer, 500s included.
    app.add_middleware(HttpTelemetryMiddleware, telemetry=served.engine.telemetry)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):  # a bug: still OpenAI's shape, and logged by Starlette
        return APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error").response()

    @app.exception_handler(404)
    async def not_found(request: Request, e):
        return APIError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def wrong_method(request: Request, e):
        return APIError(405, f"{request.method} is not allowed on {request.url.path}",
                        code="method_not_allowed").response()

    @app.get("/health")
    async def health():
        # alive whatever the cache does: a degraded cache slows the router, it does not stop it
        tiers, reason = served.engine.cache_status()
        return {"status": "alive", "cache": {"tiers": tiers, "degraded": reason is not None, "reason": reason or ""}}

    @app.get("/ready")
    async def ready():
        pool = served.engine.pool
        if served.drain is not None and not served.drain.admitting:
            raise unavailable(served.drain.reason)
        if not pool.healthy:
            raise unavailable("not serving: " + "; ".join(pool.down_shards()))
        return {"status": "ready"}

    def model_card() -> dict:
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "nextserve",
                "max_model_len": served.context_limit}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        frontend.check_model(model)
        return model_card()

    app.post("/v1/completions")(frontend.completions)
    app.post("/v1/chat/completions")(frontend.chat_completions)
    app.post("/v1/responses")(responses.create)
    app.get("/v1/responses/{response_id}")(responses.retrieve)
    app.delete("/v1/responses/{response_id}")(responses.delete)
    return app
