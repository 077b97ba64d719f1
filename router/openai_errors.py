"""Errors in OpenAI's shape, and request bodies parsed strictly enough to name what is wrong.

Every error is `{"error": {"message", "type", "param", "code"}}` with the HTTP status that says who
should act: 400 a bad parameter (`param` names it), 404 an unknown model or response, 415 a body
that is not JSON, 429 a full queue (with Retry-After), 500 an internal error, 503 expert shards down.
"""
from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

RETRY_AFTER_SECONDS = 1  # the queue drains at the decode rate: a second is long enough to find room


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_param(param: str, message: str, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def queue_full(message: str) -> APIError:
    return APIError(429, f"the router is at capacity: {message}; retry later", code="queue_full",
                    type="rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def unavailable(message: str) -> APIError:
    return APIError(503, message, code="shards_unavailable")


def store_unavailable(message: str) -> APIError:
    """The session store (Redis) is unreachable: a stored response can be neither read nor written."""
    return APIError(503, f"{message}; stored responses are unavailable until it is back (requests without "
                         f"previous_response_id and with store=false are still served)", code="session_store_unavailable")


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The JSON body validated against `model`; raises APIError naming the first problem."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"the body must be JSON sent as Content-Type: application/json, not "
                            f"{content_type or 'no content type'!r}", code="unsupported_media_type")
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


def _validation_error(e: ValidationError) -> APIError:
    errors = e.errors()
    # A union (a string or a list...) reports a type mismatch for every branch the value is not; an error
    # from the branch it is (a list too short, a bad item) says more.
    first = next((err for err in errors if not err["type"].endswith("_type")), errors[0])
    # Unions report one error per branch with the branch's name in loc: keep the field path only.
    loc = [str(p) for p in first["loc"] if isinstance(p, int) or not _is_type_name(p)]
    param = ".".join(loc) or None
    if first["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    if first["type"] == "missing":
        return APIError(400, f"Missing required parameter: {param}", param=param, code="missing_required_parameter")
    shown = json.dumps(first.get("input"), default=str)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return APIError(400, f"Invalid value for {param}: {first['msg']} (got {shown})", param=param,
                    code="invalid_value")


def _is_type_name(part: str) -> bool:
    # pydantic names union branches like "str", "list[int]", "function-after[...]", "constrained-int"
    return any(c in part for c in "[]") or part in {"str", "int", "float", "bool", "list", "dict", "none"}
