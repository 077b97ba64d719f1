"""Requests and results of the client API, shared by the sync and asyncio clients."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import grpc

from nextserve.proto.v1 import serving_pb2

FINISH_REASONS = {serving_pb2.FINISH_REASON_STOP: "stop", serving_pb2.FINISH_REASON_LENGTH: "length"}

# Native gRPC retries (grpc core replays the call) for the idempotent methods only: Generate is not
# retried, since a replay after tokens were streamed would duplicate them.
_IDEMPOTENT = [{"service": "nextserve.v1.Serving", "method": "Tokenize"},
               {"service": "nextserve.v1.Serving", "method": "ModelInfo"},
               {"service": "grpc.health.v1.Health", "method": "Check"}]


def channel_options(retries: int) -> list[tuple[str, object]]:
    policy = {"methodConfig": [{
        "name": _IDEMPOTENT,
        "retryPolicy": {"maxAttempts": max(2, min(retries + 1, 5)), "initialBackoff": "0.1s", "maxBackoff": "2s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }]}
    options: list[tuple[str, object]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if retries > 0:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(policy))]
    else:
        options.append(("grpc.enable_retries", 0))
    return options


class ServingError(Exception):
    """A failed call: `code` is the gRPC status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, ...)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details

    @classmethod
    def wrap(cls, error: grpc.RpcError) -> "ServingError":
        return cls(error.code(), error.details() or "")


@dataclass(frozen=True)
class Chunk:
    """One streamed step: new token ids and their text; finish_reason on the last one."""
    token_ids: list[int]
    text: str
    finish_reason: str | None = None


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    draft_tokens: int = 0           # speculative decoding: MTP drafts verified and accepted
    accepted_draft_tokens: int = 0
    first_token_seconds: float = 0.0
    total_seconds: float = 0.0
    request_id: str = ""
    session_id: str = ""

    def add(self, response: serving_pb2.GenerateResponse) -> Chunk:
        self.token_ids.extend(response.token_ids)
        self.text += response.text
        self.request_id = self.request_id or response.request_id
        self.session_id = self.session_id or response.session_id
        reason = FINISH_REASONS.get(response.finish_reason)
        if reason is not None:
            self.finish_reason = reason
            u, t = response.usage, response.timings
            self.prompt_tokens, self.cached_tokens, self.completion_tokens = (
                u.prompt_tokens, u.cached_tokens, u.completion_tokens)
            self.draft_tokens, self.accepted_draft_tokens = u.draft_tokens, u.accepted_draft_tokens
            self.first_token_seconds, self.total_seconds = t.first_token_seconds, t.total_seconds
        return Chunk(list(response.token_ids), response.text, reason)


def generate_request(prompt: str | list[int], *, max_tokens: int | None = None, temperature: float | None = None,
                     top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                     presence_penalty: float | None = None, frequency_penalty: float | None = None,
                     seed: int | None = None, stop: list[str] | None = None, stop_token_ids: list[int] | None = None,
                     ignore_eos: bool = False, session_id: str = "", append_to_session: bool = False,
                     request_id: str = "", speculative_tokens: int | None = None) -> serving_pb2.GenerateRequest:
    """None leaves a sampling field unset, so the router applies its default. `session_id` names a
    conversation the router keeps; with `append_to_session` the prompt is only the new turn (the router
    prepends the stored history), without it the prompt is the whole conversation."""
    sampling = serving_pb2.SamplingParams(stop=stop or [], stop_token_ids=stop_token_ids or [], ignore_eos=ignore_eos)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_k", top_k),
                        ("top_p", top_p), ("repetition_penalty", repetition_penalty),
                        ("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty),
                        ("seed", seed), ("speculative_tokens", speculative_tokens)):
        if value is not None:
            setattr(sampling, name, value)
    request = serving_pb2.GenerateRequest(sampling=sampling, session_id=session_id,
                                          append_to_session=append_to_session, request_id=request_id)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(int(t) for t in prompt)
    return request
