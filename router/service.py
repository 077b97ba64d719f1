"""The client-facing gRPC service: Generate (streaming, optionally on a session), Tokenize, ModelInfo."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from nextserve.model.config import Qwen3NextConfig
from nextserve.model.sampling import SamplingParams
from nextserve.model.tokenizer import TextTokenizer
from nextserve.proto.v1 import serving_pb2, serving_pb2_grpc

from .engine import Engine, RequestStream
from .cache.sessions import SessionStore
from .generation import decode_stream
from .grpc_sessions import GrpcSessions, SessionError, SessionTurn
from .requests import NoTokenizer, check_request
from .acceptance import check_speculation
from .scheduler import QueueFull, RequestTooLarge
from .shards import ShardUnavailable

log = logging.getLogger("nextserve.router")

_FINISH = {"stop": serving_pb2.FINISH_REASON_STOP, "length": serving_pb2.FINISH_REASON_LENGTH}


def sampling_params(msg: serving_pb2.SamplingParams) -> SamplingParams:
    """Proto -> model SamplingParams; unset optional fields keep the model's defaults. Raises ValueError."""
    kwargs = {name: getattr(msg, name) for name in
              ("temperature", "top_k", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
               "seed", "max_tokens", "speculative_tokens") if msg.HasField(name)}
    return SamplingParams(**kwargs, stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos)


class ServingService(serving_pb2_grpc.ServingServicer):
    def __init__(self, engine: Engine, config: Qwen3NextConfig, tokenizer: TextTokenizer | None, fingerprint: str,
                 sessions: SessionStore):
        self.engine, self.config, self.tokenizer, self.fingerprint = engine, config, tokenizer, fingerprint
        self.sessions = GrpcSessions(sessions)

    async def Generate(self, request: serving_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        telemetry = self.engine.telemetry
        if telemetry is None:
            async for response in self._generate(request, context, None):
                yield response
            return
        record = telemetry.request_started(request, context.invocation_metadata())
        seqs: list = []  # the engine's Sequence, once admitted

        def admitted(stream: RequestStream, request_id: str, num_prompt: int, params, stop: list[str]) -> None:
            seqs.append(stream.seq)
            telemetry.request_admitted(record, stream.seq.seq_id, request_id, num_prompt, params, stop)

        code = grpc.StatusCode.OK
        try:
            async for response in self._generate(request, context, admitted):
                yield response
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            code = context.code() or grpc.StatusCode.UNKNOWN  # context.abort() set it
            raise
        finally:
            telemetry.request_finished(record, seqs[0] if seqs else None, code, context.details() or "")

    async def _generate(self, request, context, on_admitted):
        try:
            new_ids = self._prompt_ids(request)
            params = sampling_params(request.sampling)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            session = await self.sessions.begin(request.session_id, request.append_to_session)
        except SessionError as e:
            await context.abort(e.code, str(e))
        try:
            prompt_ids = session.prompt(new_ids) if session is not None else new_ids
            async for response in self._run(request, context, on_admitted, prompt_ids, params, session):
                yield response
        finally:
            if session is not None:  # a turn that did not commit (failed, cancelled) leaves the session as it was
                await session.release()

    async def _run(self, request, context, on_admitted, prompt_ids: list[int], params: SamplingParams,
                   session: SessionTurn | None):
        try:
            check_request(prompt_ids, params.stop_token_ids, list(request.sampling.stop), self.config.vocab_size,
                          self.config.max_position_embeddings, has_tokenizer=self.tokenizer is not None)
            check_speculation(params.speculative_tokens, self.engine.runner.speculative is not None)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            stream = self.engine.submit(prompt_ids, params)
        except RequestTooLarge as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except QueueFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the router is at capacity: {e}")
        except ShardUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        request_id = request.request_id or uuid.uuid4().hex
        if on_admitted is not None:
            on_admitted(stream, request_id, len(prompt_ids), params, list(request.sampling.stop))
        try:
            async for response in self._responses(stream, request, request_id, prompt_ids, context, session):
                yield response
            failure = stream.failure
            if failure is not None:
                code = grpc.StatusCode.UNAVAILABLE if failure.unavailable else grpc.StatusCode.INTERNAL
                await context.abort(code, failure.message)
        finally:
            # Normal end, client cancel, deadline, or an abort above: the sequence is freed either way.
            self.engine.abort(stream)

    async def _responses(self, stream: RequestStream, request, request_id: str, prompt_ids: list[int], context,
                         session: SessionTurn | None):
        output: list[int] = []
        first = True
        async for delta in decode_stream(self.engine, stream, self.tokenizer, list(request.sampling.stop)):
            output.extend(delta.token_ids)
            response = serving_pb2.GenerateResponse(request_id=request_id, token_ids=delta.token_ids, text=delta.text)
            if first:
                response.session_id = request.session_id
                first = False
            if delta.finish_reason is not None:
                if session is not None:  # stored before the client sees the end, so it can continue at once
                    try:
                        await session.commit([*prompt_ids, *output])
                    except SessionError as e:
                        await context.abort(e.code, f"{e}; this turn's output was not stored in the session")
                response.finish_reason = _FINISH[delta.finish_reason]
                response.usage.prompt_tokens = len(prompt_ids)
                response.usage.cached_tokens = stream.seq.num_cached
                response.usage.completion_tokens = len(output)
                response.usage.draft_tokens = stream.seq.num_draft_tokens
                response.usage.accepted_draft_tokens = stream.seq.num_accepted_tokens
                t = response.timings
                t.queue_seconds = (stream.first_scheduled or stream.arrival) - stream.arrival
                t.first_token_seconds = (stream.first_token or stream.arrival) - stream.arrival
                t.total_seconds = (stream.end or time.monotonic()) - stream.arrival
                yield response
                return
            if response.token_ids or response.text:
                yield response

    def _prompt_ids(self, request) -> list[int]:
        which = request.WhichOneof("prompt")
        if which == "text":
            if self.tokenizer is None:
                raise NoTokenizer("this checkpoint has no tokenizer.json: send the prompt as token_ids")
            return self.tokenizer.encode(request.text)
        if which == "token_ids":
            return list(request.token_ids.ids)
        raise ValueError("the request has no prompt: set text or token_ids")

    async def Tokenize(self, request, context):
        if self.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this checkpoint has no tokenizer.json")
        return serving_pb2.TokenizeResponse(token_ids=self.tokenizer.encode(request.text))

    async def ModelInfo(self, request, context):
        c = self.config
        tiers, reason = self.engine.cache_status()
        return serving_pb2.ModelInfoResponse(
            architecture="Qwen3NextForCausalLM", fingerprint=self.fingerprint, vocab_size=c.vocab_size,
            context_limit=c.max_position_embeddings,
            eos_token_id=self.engine.eos_token_id if self.engine.eos_token_id is not None else -1,
            num_layers=c.num_hidden_layers, num_experts=c.num_experts, experts_per_token=c.num_experts_per_tok,
            shards=[serving_pb2.ShardStatus(shard=conn.shard, address=conn.address, healthy=conn.healthy)
                    for conn in self.engine.pool.connections],
            cache=serving_pb2.CacheStatus(tiers=tiers, degraded=reason is not None, reason=reason or ""))
