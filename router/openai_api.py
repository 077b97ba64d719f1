"""The OpenAI-compatible HTTP API's completions and chat completions, and what other endpoints share.

Mapped onto the same `Engine` as the gRPC service, with the same request checks
(`generation.check_request`) and the same detokenizing and stop strings (`generation.decode_stream`),
so a greedy request gets the same tokens over HTTP as over gRPC. Endpoints and limits are described
in docs/http-api.md.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from nextserve.model.chat_template import ROLES, ChatTemplate, ChatTemplateError
from nextserve.model.config import Qwen3NextConfig
from nextserve.model.sampling import SamplingParams
from nextserve.model.tokenizer import TextTokenizer

from .cache.sessions import SessionStore
from .engine import Engine, RequestStream
from . import http_telemetry
from .generation import Delta, decode_stream
from .openai_errors import APIError, bad_param, parse_body, queue_full, unavailable
from .openai_schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from .drain import Drain
from .requests import NoTokenizer, check_request
from .acceptance import check_speculation
from .scheduler import QueueFull, RequestTooLarge
from .shards import ShardUnavailable

NO_LOGPROBS = "logprobs are not supported: the engine does not return token log-probabilities yet"


@dataclass
class ServedModel:
    """What the HTTP API serves: the engine and everything it needs to turn text into token ids."""
    name: str
    engine: Engine
    config: Qwen3NextConfig
    tokenizer: TextTokenizer | None
    chat_template: ChatTemplate | None
    chat_stop_ids: tuple[int, ...]   # the ids that end an assistant turn (generation_config.json's eos ids)
    sessions: SessionStore
    created: int = 0                 # unix time the router started (the "created" of /v1/models)
    drain: Drain | None = None       # the router's shutdown state: no new generations once it drains

    @property
    def context_limit(self) -> int:
        return self.config.max_position_embeddings


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse(obj) -> bytes:
    """One server-sent event carrying `obj` as JSON (or the literal [DONE])."""
    return b"data: " + (obj if isinstance(obj, bytes) else _json(obj).encode()) + b"\n\n"


SSE_DONE = sse(b"[DONE]")


def cached_tokens(streams: list[RequestStream]) -> int:
    """Prompt tokens the prefix cache served: the choices share one prompt, the fewest restored counts."""
    return min((s.seq.num_cached for s in streams), default=0)


def usage(num_prompt: int, num_output: int, streams: list[RequestStream] = ()) -> dict:
    out = {"prompt_tokens": num_prompt, "completion_tokens": num_output, "total_tokens": num_prompt + num_output,
           "prompt_tokens_details": {"cached_tokens": cached_tokens(streams)}}
    drafted = sum(s.seq.num_draft_tokens for s in streams)
    if drafted:  # speculative decoding: the drafts the model accepted and rejected, in OpenAI's names
        accepted = sum(s.seq.num_accepted_tokens for s in streams)
        out["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                            "rejected_prediction_tokens": drafted - accepted}
    return out


class OpenAIFrontend:
    def __init__(self, served: ServedModel):
        self.served = served

    # -- request -> engine --------------------------------------------------------------------------

    def check_model(self, model: str) -> None:
        if model != self.served.name:
            raise APIError(404, f"The model {model!r} does not exist; this server serves {self.served.name!r}",
                           param="model", code="model_not_found")

    def need_tokenizer(self, param: str) -> TextTokenizer:
        if self.served.tokenizer is None:
            raise bad_param(param, "this checkpoint has no tokenizer.json, so text cannot be encoded: send the "
                                   "prompt as a list of token ids to /v1/completions", code="no_tokenizer")
        return self.served.tokenizer

    def encode(self, text: str, param: str) -> list[int]:
        return self.need_tokenizer(param).encode(text)

    def render_chat(self, messages: list[dict], param: str = "messages") -> list[int]:
        """Token ids of the conversation under the checkpoint's chat template, ready for the answer."""
        for i, m in enumerate(messages):
            if m["role"] not in ROLES:
                raise bad_param(f"{param}.{i}.role", f"unknown role {m['role']!r}: use one of {', '.join(ROLES)} "
                                                     "(or developer, read as system)")
        self.need_tokenizer(param)
        if self.served.chat_template is None:
            raise bad_param(param, "this checkpoint has no chat template (tokenizer_config.json chat_template or "
                                   "chat_template.jinja): use /v1/completions with a raw prompt",
                            code="no_chat_template")
        try:
            text = self.served.chat_template.render(messages, add_generation_prompt=True)
        except ChatTemplateError as e:
            raise bad_param(param, str(e)) from None
        return self.encode(text, param)

    def sampling(self, body: SamplingFields, max_tokens: int | None, num_prompt: int,
                 extra_stop_ids: tuple[int, ...] = ()) -> tuple[list[SamplingParams], list[str]]:
        """One SamplingParams per choice (`n`), and the stop strings."""
        if max_tokens is None:  # as vLLM: up to the context limit
            max_tokens = max(1, self.served.context_limit - num_prompt)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(s == "" for s in stops):
            raise bad_param("stop", "stop strings must not be empty")
        defaults = SamplingParams()
        try:
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=_or(body.temperature, defaults.temperature), top_p=_or(body.top_p, defaults.top_p),
                top_k=_or(body.top_k, defaults.top_k),
                repetition_penalty=_or(body.repetition_penalty, defaults.repetition_penalty),
                presence_penalty=_or(body.presence_penalty, defaults.presence_penalty),
                frequency_penalty=_or(body.frequency_penalty, defaults.frequency_penalty),
                seed=body.seed, ignore_eos=body.ignore_eos, speculative_tokens=body.speculative_tokens,
                stop_token_ids=tuple(dict.fromkeys([*(body.stop_token_ids or []), *extra_stop_ids])))
        except ValueError as e:
            raise bad_param(str(e).split(" ")[0], str(e)) from None
        try:
            check_speculation(params.speculative_tokens, self.served.engine.runner.speculative is not None)
        except ValueError as e:
            raise bad_param("speculative_tokens", str(e)) from None
        # Choice i draws from seed + i: one seed reproduces the whole request, and the choices differ.
        return [params if i == 0 or params.seed is None else replace(params, seed=(params.seed + i) % 2**64)
                for i in range(body.n)], stops

    def submit(self, prompt_ids: list[int], params: SamplingParams, stops: list[str], param: str) -> RequestStream:
        served = self.served
        try:
            check_request(prompt_ids, params.stop_token_ids, stops, served.config.vocab_size, served.context_limit,
                          has_tokenizer=served.tokenizer is not None)
        except ValueError as e:
            if len(prompt_ids) >= served.context_limit:
                raise bad_param(param, f"{e}: shorten the prompt", code="context_length_exceeded") from None
            which = "stop_token_ids" if "stop token" in str(e) else "stop" if "stop string" in str(e) else param
            raise bad_param(which, str(e), code="no_tokenizer" if isinstance(e, NoTokenizer) else "invalid_value") \
                from None
        if served.drain is not None and not served.drain.admitting:
            raise unavailable(served.drain.reason)
        try:
            stream = served.engine.submit(prompt_ids, params)
        except RequestTooLarge as e:
            raise bad_param(param, str(e), code="context_length_exceeded") from None
        except QueueFull as e:
            raise queue_full(str(e)) from None
        except ShardUnavailable as e:
            raise unavailable(str(e)) from None
        http_telemetry.admitted(stream, len(prompt_ids), params, stops)
        return stream

    def submit_choices(self, prompt_ids: list[int], choices: list[SamplingParams], stops: list[str],
                       param: str) -> list[RequestStream]:
        """One sequence per choice; all or none (a choice that cannot be queued withdraws the others)."""
        streams: list[RequestStream] = []
        try:
            for params in choices:
                streams.append(self.submit(prompt_ids, params, stops, param))
        except BaseException:
            for stream in streams:
                self.served.engine.abort(stream)
            raise
        return streams

    async def generate_choices(self, streams: list[RequestStream], stops: list[str]) -> list[Generation]:
        """Every choice to its end; the first failure (or a cancellation) stops and frees them all."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.generate(stream, stops)) for stream in streams]
        except* APIError as errors:
            raise errors.exceptions[0] from None
        return [task.result() for task in tasks]

    async def merged_deltas(self, streams: list[RequestStream], stops: list[str]) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, delta) as any choice produces them; closing it frees every sequence."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: RequestStream):
            try:
                async for delta in self.stream_deltas(stream, stops):
                    queue.put_nowait((index, delta))
            finally:
                queue.put_nowait((index, None))

        tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
        try:
            running = len(tasks)
            while running:
                index, delta = await queue.get()
                if delta is None:
                    running -= 1
                else:
                    yield index, delta
        finally:
            for task in tasks:
                task.cancel()

    def failure(self, stream: RequestStream) -> APIError | None:
        f = stream.failure
        if f is None:
            return None
        return unavailable(f.message) if f.unavailable else APIError(500, f.message, code="internal_error")

    async def generate(self, stream: RequestStream, stops: list[str]) -> Generation:
        """Run a submitted request to its end; frees the sequence however it ends (also on cancellation)."""
        ids: list[int] = []
        parts: list[str] = []
        reason = None
        try:
            async for delta in decode_stream(self.served.engine, stream, self.served.tokenizer, stops,
                                             skip_special_tokens=True):
                ids.extend(delta.token_ids)
                parts.append(delta.text)
                reason = delta.finish_reason
        finally:
            self.served.engine.abort(stream)
        error = self.failure(stream)
        if error is not None:
            raise error
        return Generation(ids, "".join(parts), reason)

    async def stream_deltas(self, stream: RequestStream, stops: list[str]) -> AsyncIterator:
        try:
            async for delta in decode_stream(self.served.engine, stream, self.served.tokenizer, stops,
                                             skip_special_tokens=True):
                yield delta
        finally:
            self.served.engine.abort(stream)

    # -- endpoints ----------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        body: CompletionRequest = await parse_body(request, CompletionRequest)
        self.check_model(body.model)
        if body.logprobs is not None:
            raise bad_param("logprobs", NO_LOGPROBS)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise bad_param("prompt", f"{len(prompt)} prompts in one request are not supported: send one "
                                          "prompt (a string or a list of token ids) per request")
            prompt = prompt[0]
        prompt_ids = list(prompt) if isinstance(prompt, list) else self.encode(prompt, "prompt")
        choices, stops = self.sampling(body, body.max_tokens, len(prompt_ids))
        streams = self.submit_choices(prompt_ids, choices, stops, "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.served.name}

        def choice(index: int, text: str, ids: list[int], reason: str | None) -> dict:
            return {"index": index, "text": text, "token_ids": ids, "logprobs": None, "finish_reason": reason}

        if body.stream:
            return self._sse(streams, stops, body, head, len(prompt_ids),
                             lambda i, d: {**head, "choices": [choice(i, d.text, d.token_ids, d.finish_reason)]})
        results = await self.until_disconnect(request, self.generate_choices(streams, stops))
        return JSONResponse({**head, "choices": [choice(i, r.text, r.token_ids, r.finish_reason)
                                                 for i, r in enumerate(results)],
                             "usage": usage(len(prompt_ids), sum(len(r.token_ids) for r in results), streams)})

    async def chat_completions(self, request: Request) -> Response:
        body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
        self.check_model(body.model)
        if body.logprobs or body.top_logprobs is not None:
            raise bad_param("logprobs" if body.logprobs else "top_logprobs", NO_LOGPROBS)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise bad_param("max_completion_tokens", "give max_completion_tokens or max_tokens, not both")
        # `name` goes to the template as transformers passes it (ChatML has no place for it and leaves it out)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": text_of(m.content),
                     **({"name": m.name} if m.name is not None else {})} for m in body.messages]
        prompt_ids = self.render_chat(messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        eos = self.served.engine.eos_token_id
        turn_ends = tuple(t for t in self.served.chat_stop_ids if not (body.ignore_eos and t == eos))
        choices, stops = self.sampling(body, max_tokens, len(prompt_ids), turn_ends)
        streams = self.submit_choices(prompt_ids, choices, stops, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if body.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.served.name}

            def first(index: int) -> dict:
                return {**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]}

            def chunk(index: int, d: Delta) -> dict:
                delta = {"content": d.text} if d.text or d.finish_reason is None else {}
                return {**head, "choices": [{"index": index, "delta": delta, "token_ids": d.token_ids,
                                             "logprobs": None, "finish_reason": d.finish_reason}]}

            return self._sse(streams, stops, body, head, len(prompt_ids), chunk, first=first)
        results = await self.until_disconnect(request, self.generate_choices(streams, stops))
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": self.served.name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": r.text}, "token_ids": r.token_ids,
                         "logprobs": None, "finish_reason": r.finish_reason} for i, r in enumerate(results)],
            "usage": usage(len(prompt_ids), sum(len(r.token_ids) for r in results), streams)})

    # -- transport helpers --------------------------------------------------------------------------

    def _sse(self, streams: list[RequestStream], stops: list[str], body: SamplingFields, head: dict,
             num_prompt: int, chunk, first=None) -> StreamingResponse:
        """The choices' deltas as server-sent events: `chunk(index, delta)` (and `first(index)`) build them."""
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def with_usage(obj: dict) -> dict:
            return {**obj, "usage": None} if include_usage else obj  # as OpenAI: null until the last chunk

        async def events():
            # Starlette closes this generator when the client disconnects; merged_deltas then frees the sequences.
            num_output = 0
            pending: list[list[int]] = [[] for _ in streams]  # per choice: ids whose text is still held back
            if first is not None:
                for index in range(len(streams)):
                    yield sse(with_usage(first(index)))
            async for index, delta in self.merged_deltas(streams, stops):
                num_output += len(delta.token_ids)
                pending[index].extend(delta.token_ids)
                if delta.text or delta.finish_reason is not None:
                    yield sse(with_usage(chunk(index, Delta(pending[index], delta.text, delta.finish_reason))))
                    pending[index] = []
            error = next((e for e in map(self.failure, streams) if e is not None), None)
            if error is not None:
                yield sse(error.body())
            elif include_usage:
                yield sse({**head, "choices": [], "usage": usage(num_prompt, num_output, streams)})
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def until_disconnect(self, request: Request, work):
        """Await `work`, cancelling it if the client disconnects first (its `finally` frees the sequence)."""
        task = asyncio.ensure_future(work)

        async def disconnected():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
        if task.cancelled():  # nobody is listening any more; the status only shows in logs
            raise APIError(499, "the client disconnected", code="client_closed_request")
        return task.result()


def _or(value, default):
    return default if value is None else value


def text_of(content) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)
