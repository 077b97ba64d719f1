"""The client's span of a Generate call, and the W3C trace context that makes the router's spans its children.

With a tracer (the caller's `opentelemetry.trace.Tracer`), each Generate gets a CLIENT span under the
caller's current span. Without one, the caller's current span context, if any, is still passed on,
so a traced application gets the router's spans in its trace either way.
"""
from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from nextserve.proto.v1 import serving_pb2
from nextserve.telemetry import attributes as attr
from nextserve.telemetry.tracing import grpc_metadata

from .messages import Completion

_REQUEST_ATTRIBUTES = (("max_tokens", attr.REQUEST_MAX_TOKENS), ("temperature", attr.REQUEST_TEMPERATURE),
                       ("top_p", attr.REQUEST_TOP_P), ("top_k", attr.REQUEST_TOP_K), ("seed", attr.REQUEST_SEED),
                       ("presence_penalty", attr.REQUEST_PRESENCE_PENALTY),
                       ("frequency_penalty", attr.REQUEST_FREQUENCY_PENALTY))


class GenerateSpan:
    def __init__(self, tracer: trace.Tracer | None, request: serving_pb2.GenerateRequest):
        self.span = None
        if tracer is None:
            self.metadata = grpc_metadata()
            return
        sampling = request.sampling
        attributes = {attr.OPERATION_NAME: attr.OPERATION_TEXT_COMPLETION,
                      **{key: getattr(sampling, name) for name, key in _REQUEST_ATTRIBUTES if sampling.HasField(name)}}
        if request.session_id:
            attributes[attr.SESSION_ID] = request.session_id
        self.span = tracer.start_span(attr.OPERATION_TEXT_COMPLETION, kind=SpanKind.CLIENT, attributes=attributes)
        self.metadata = grpc_metadata(trace.set_span_in_context(self.span))

    def end(self, completion: Completion, error: BaseException | None) -> None:
        if self.span is None:
            return
        if completion.request_id:
            self.span.set_attribute(attr.RESPONSE_ID, completion.request_id)
        if completion.finish_reason is not None:
            self.span.set_attributes({attr.RESPONSE_FINISH_REASONS: [completion.finish_reason],
                                      attr.USAGE_INPUT_TOKENS: completion.prompt_tokens,
                                      attr.USAGE_OUTPUT_TOKENS: completion.completion_tokens})
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, str(error)))
        self.span.end()
