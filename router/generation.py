"""What the gRPC and HTTP front ends share: an engine stream turned into text.

Both front ends validate a request the same way (`requests.check_request`) and read the engine's token
events through the same detokenizer and stop-string matcher (`decode_stream`), so a prompt gets the
same tokens, text and finish reason whichever API it came through.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from nextserve.model.tokenizer import TextTokenizer

from .engine import Engine, Failed, Finished, RequestStream, Tokens
from .stop_strings import StopStringMatcher


@dataclass(frozen=True, slots=True)
class Delta:
    token_ids: list[int]        # tokens new in this delta
    text: str                   # their text ("" without a tokenizer); never a broken UTF-8 character
    finish_reason: str | None   # "stop" or "length" on the last delta, else None


async def decode_stream(engine: Engine, stream: RequestStream, tokenizer: TextTokenizer | None,
                        stop_strings: list[str], skip_special_tokens: bool = False) -> AsyncIterator[Delta]:
    """The stream's deltas, ending with one that has a finish_reason. A stop string ends it early (the
    text stops before the match) and frees the sequence. On a failure it just ends: check `stream.failure`."""
    detok = tokenizer.incremental_detokenizer(skip_special_tokens) if tokenizer is not None else None
    stops = StopStringMatcher(stop_strings)
    output: list[int] = []
    async for event in stream:
        if isinstance(event, Failed):
            return
        if isinstance(event, Tokens):
            output.extend(event.token_ids)
            text, matched = stops.feed(detok.step(output) if detok else "")
            if matched:
                engine.abort(stream)
                yield Delta(event.token_ids, text, "stop")
                return
            yield Delta(event.token_ids, text, None)
        else:
            assert isinstance(event, Finished)
            text, _ = stops.feed(detok.flush() if detok else "", final=True)
            yield Delta([], text, event.reason)
            return
