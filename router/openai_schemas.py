"""Request bodies of the OpenAI-compatible HTTP API, validated by pydantic.

Unknown fields are rejected (`extra="forbid"`), as OpenAI rejects them: a parameter that would be
silently ignored gives wrong answers. Fields nextserve cannot honour yet (logprobs) are declared so
that the error can say why, instead of "unknown field".
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

NonNegInt = Annotated[StrictInt, Field(ge=0)]
Seed = Annotated[StrictInt, Field(ge=0, le=2**64 - 1)]  # as gRPC's uint64 seed
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class SamplingFields(_Body):
    """The sampling parameters chat and text completions share."""
    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: NonNegInt | None = None                       # extension (as vLLM): 0 = all tokens
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None  # extension (as vLLM)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=16)] | None = None
    stop_token_ids: list[NonNegInt] | None = None         # extension (as vLLM)
    ignore_eos: StrictBool = False                        # extension (as vLLM)
    speculative_tokens: Annotated[StrictInt, Field(ge=0, le=4)] | None = None  # extension: MTP drafts, 0 = off
    n: Annotated[StrictInt, Field(ge=1, le=128)] = 1  # choices, each its own sequence (OpenAI allows up to 128)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(SamplingFields):
    # a text, a list of token ids, or a one-element list of either
    prompt: StrictStr | list[StrictInt] | Annotated[list[StrictStr | list[StrictInt]], Field(min_length=1)]
    logprobs: NonNegInt | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: StrictStr  # checked against the template's roles with a clear message, not by pydantic
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: NonNegInt | None = None


class InputText(_Body):
    type: Literal["input_text", "output_text"]
    text: StrictStr


class InputMessage(_Body):
    type: Literal["message"] = "message"
    role: StrictStr
    content: StrictStr | Annotated[list[InputText], Field(min_length=1)]


class ResponsesRequest(_Body):
    model: StrictStr
    input: StrictStr | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: StrictStr | None = None
    previous_response_id: StrictStr | None = None
    max_output_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: Seed | None = None  # extension: OpenAI's Responses API has no seed
    store: StrictBool = True
    stream: StrictBool = False
