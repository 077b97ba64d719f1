"""`/v1/responses`: chat turns that continue a stored conversation by `previous_response_id`.

The next turn's prompt is the stored token history (prompt and output of every earlier turn, as the
model saw them), the template's end-of-turn tokens the output did not already end with, and the
new input rendered by the chat template: the same tokens as sending the whole history at once.

Each stored response is a session record (router/session_stores.py: the responses keyspace), under
the response id: `token_ids` is the conversation, `metadata["response"]` the response object.
With --cache-url the store is Redis, so a response can be continued after a router restart and by
any router replica; unreachable, it answers 503 naming the problem.
"""
from __future__ import annotations

import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from nextserve.model.sampling import SamplingParams

from .openai_api import OpenAIFrontend, text_of
from .openai_errors import APIError, bad_param, parse_body, store_unavailable
from .openai_schemas import ResponsesRequest
from .cache.sessions import SessionRecord, SessionStoreUnavailable

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
        history: tuple[int, ...] = ()
        if body.previous_response_id is not None:
            previous = await self._stored(body.previous_response_id, "previous_response_id")
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
        draft = _Draft(body, served.name, prompt_ids, stream)
        if body.stream:
            return StreamingResponse(self._events(draft, stream), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await f.until_disconnect(request, f.generate(stream, []))
        return JSONResponse(await self._finish(draft, result.text, result.token_ids, result.finish_reason))

    async def _finish(self, draft: "_Draft", text: str, output_ids: list[int], finish_reason: str) -> dict:
        """The final response object; stored (unless store=false) before the client sees it, so that it can
        be continued at once."""
        response = draft.response(text, output_ids, finish_reason)
        if draft.body.store:
            record = SessionRecord(response["id"], (*draft.prompt_ids, *output_ids), metadata={"response": response})
            try:
                await self.served.sessions.put(record)
            except SessionStoreUnavailable as e:
                raise store_unavailable(f"the response was generated but could not be stored: {e}") from None
        return response

    async def _stored(self, response_id: str, param: str) -> SessionRecord | None:
        """The stored response's record, None when unknown or expired; a malformed id is a 400 naming `param`."""
        try:
            return await self.served.sessions.get(response_id)
        except ValueError as e:
            raise bad_param(param, f"{param}: {e}") from None
        except SessionStoreUnavailable as e:
            raise store_unavailable(str(e)) from None

    async def _events(self, draft: "_Draft", stream):
        """OpenAI's Responses stream: created, in_progress, the message item and its text part opening,
        output_text deltas, their closing, then completed (or incomplete); an error event on a failure.
        Closing it (the client went away) frees the sequence."""
        seq = iter(range(1 << 62))

        def event(kind: str, **fields) -> bytes:
            data = json.dumps({"type": kind, "sequence_number": next(seq), **fields}, ensure_ascii=False,
                              separators=(",", ":"))
            return f"event: {kind}\ndata: {data}\n\n".encode()

        at = {"item_id": draft.message_id, "output_index": 0, "content_index": 0}
        yield event("response.created", response=draft.in_progress())
        yield event("response.in_progress", response=draft.in_progress())
        yield event("response.output_item.added", output_index=0, item=draft.message([], "in_progress"))
        yield event("response.content_part.added", **at, part=_text_part(""))
        parts, ids, reason = [], [], None
        async for delta in self.frontend.stream_deltas(stream, []):
            ids.extend(delta.token_ids)
            reason = delta.finish_reason
            if delta.text:
                parts.append(delta.text)
                yield event("response.output_text.delta", **at, delta=delta.text, logprobs=[])
        error = self.frontend.failure(stream)
        if error is not None:
            yield event("error", code=error.code, message=error.message, param=None)
            return
        text = "".join(parts)
        yield event("response.output_text.done", **at, text=text, logprobs=[])
        yield event("response.content_part.done", **at, part=_text_part(text))
        yield event("response.output_item.done", output_index=0, item=draft.message([_text_part(text)], "completed"))
        try:
            response = await self._finish(draft, text, ids, reason)
        except APIError as e:  # the store failed: the stream has begun, so the error is an event
            yield event("error", code=e.code, message=e.message, param=None)
            return
        yield event("response.completed" if response["status"] == "completed" else "response.incomplete",
                    response=response)

    async def retrieve(self, response_id: str):
        stored = await self._stored(response_id, "response_id")
        if stored is None:
            raise APIError(404, f"No response with id {response_id!r} (never stored, or expired)",
                           param="response_id", code="response_not_found")
        return stored.metadata["response"]

    async def delete(self, response_id: str):
        try:
            deleted = await self.served.sessions.delete(response_id)
        except ValueError as e:
            raise bad_param("response_id", f"response_id: {e}") from None
        except SessionStoreUnavailable as e:
            raise store_unavailable(str(e)) from None
        if not deleted:
            raise APIError(404, f"No response with id {response_id!r}", param="response_id",
                           code="response_not_found")
        return {"id": response_id, "object": "response", "deleted": True}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": []}


class _Draft:
    """A response being generated: its ids and the request fields it echoes."""

    def __init__(self, body: ResponsesRequest, model: str, prompt_ids: list[int], stream=None):
        self.body, self.model, self.prompt_ids = body, model, prompt_ids
        self.stream = stream  # the engine's RequestStream: how many prompt tokens the prefix cache served
        self.response_id, self.message_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())

    @property
    def num_cached(self) -> int:
        return self.stream.seq.num_cached if self.stream is not None else 0

    def message(self, content: list[dict], status: str) -> dict:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def _common(self) -> dict:
        b = self.body
        return {"id": self.response_id, "object": "response", "created_at": self.created_at, "error": None,
                "model": self.model, "instructions": b.instructions, "previous_response_id": b.previous_response_id,
                "max_output_tokens": b.max_output_tokens, "temperature": b.temperature, "top_p": b.top_p,
                "store": b.store, "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
                "text": {"format": {"type": "text"}}}

    def in_progress(self) -> dict:
        return {**self._common(), "status": "in_progress", "incomplete_details": None, "output": [], "usage": None}

    def response(self, text: str, output_ids: list[int], finish_reason: str) -> dict:
        complete = finish_reason == "stop"
        n_in, n_out = len(self.prompt_ids), len(output_ids)
        return {**self._common(), "status": "completed" if complete else "incomplete",
                "incomplete_details": None if complete else {"reason": "max_output_tokens"},
                "output": [self.message([_text_part(text)], "completed")],
                "usage": {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": self.num_cached}, "output_tokens": n_out,
                          "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": n_in + n_out}}
