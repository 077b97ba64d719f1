"""`/v1/responses`: chat turns that continue a stored conversation by `previous_response_id`.

The next turn's prompt is the stored token history (prompt and output of every earlier turn, as the
model saw them), the template's end-of-turn tokens the output did not already end with, and the
new input rendered by the chat template: the same tokens as sending the whole history at once.
"""
from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse

from nextserve.model.sampling import SamplingParams

from .openai_api import OpenAIFrontend, text_of
from .openai_errors import APIError, bad_param, parse_body
from .openai_schemas import ResponsesRequest
from .sessions import StoredResponse

_SENTINEL = "\u2063nextserve-end-of-turn\u2063"  # a content no real turn has, to find what follows one


class ResponsesEndpoint:
    def __init__(self, frontend: OpenAIFrontend):
        self.frontend, self.served = frontend, frontend.served

    def turn_close(self, history: tuple[int, ...]) -> list[int]:
        """Token ids that close the assistant turn ending `history` (for ChatML "<|im_end|>\\n"), less
        those the model already produced (a turn that stopped on <|im_end|> needs only the newline)."""
        template = self.served.chat_template
        text = template.render([{"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL}],
                               add_generation_prompt=False)
        close = self.served.tokenizer.encode(text[text.index(_SENTINEL) + len(_SENTINEL):])
        for k in range(min(len(close), len(history)), 0, -1):
            if list(history[-k:]) == close[:k]:
                return close[k:]
        return close

    async def create(self, request: Request):
        f, served = self.frontend, self.served
        body: ResponsesRequest = await parse_body(request, ResponsesRequest)
        f.check_model(body.model)
        if body.stream:
            raise bad_param("stream", "streaming is not supported on /v1/responses yet: use /v1/chat/completions "
                                      "with stream=true, or call /v1/responses without it")
        history: tuple[int, ...] = ()
        if body.previous_response_id is not None:
            previous = await served.sessions.get(body.previous_response_id)
            if previous is None:
                raise bad_param("previous_response_id", f"Previous response with id {body.previous_response_id!r} "
                                "not found: it never existed, was stored with store=false, or has expired",
                                code="previous_response_not_found")
            history = previous.token_ids
        items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else [
            {"role": m.role, "content": text_of(m.content)} for m in body.input]
        messages = ([{"role": "system", "content": body.instructions}] if body.instructions is not None else []) + [
            {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in items]
        new_ids = f.render_chat(messages, param="input")
        prompt_ids = [*history, *self.turn_close(history), *new_ids] if history else new_ids
        max_tokens = body.max_output_tokens or max(1, served.context_limit - len(prompt_ids))
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                                    top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
                                    stop_token_ids=served.chat_stop_ids)
        except ValueError as e:
            raise bad_param(str(e).split(" ")[0], str(e)) from None
        stream = f.submit(prompt_ids, params, [], "input")
        result = await f.until_disconnect(request, f.generate(stream, []))

        response_id = f"resp_{uuid.uuid4().hex}"
        complete = result.finish_reason == "stop"
        response = {
            "id": response_id, "object": "response", "created_at": int(time.time()),
            "status": "completed" if complete else "incomplete",
            "incomplete_details": None if complete else {"reason": "max_output_tokens"},
            "error": None, "model": served.name, "instructions": body.instructions,
            "previous_response_id": body.previous_response_id, "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "store": body.store,
            "parallel_tool_calls": False, "tool_choice": "none", "tools": [], "text": {"format": {"type": "text"}},
            "output": [{"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": result.text, "annotations": []}]}],
            "usage": {"input_tokens": len(prompt_ids), "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": len(result.token_ids), "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": len(prompt_ids) + len(result.token_ids)},
        }
        if body.store:
            await served.sessions.put(StoredResponse(response_id, (*prompt_ids, *result.token_ids), served.name,
                                                     result.finish_reason, response))
        return JSONResponse(response)

    async def retrieve(self, response_id: str):
        stored = await self.served.sessions.get(response_id)
        if stored is None:
            raise APIError(404, f"No response with id {response_id!r} (never stored, or expired)",
                           param="response_id", code="response_not_found")
        return stored.body

    async def delete(self, response_id: str):
        if not await self.served.sessions.delete(response_id):
            raise APIError(404, f"No response with id {response_id!r}", param="response_id",
                           code="response_not_found")
        return {"id": response_id, "object": "response", "deleted": True}
