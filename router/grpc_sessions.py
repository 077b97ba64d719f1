"""`session_id` on a Generate request: the router keeps each session's token history in the session store.

A turn holds its session from before admission until it ends (the store's lease): a second
concurrent turn gets ABORTED, so two turns never interleave one history. The history is stored when
the turn finishes, before its last message is sent, so that the client can continue at once; a turn
that fails or is cancelled stores nothing and the session stays as it was.

`append_to_session` sends only the new turn; without it the prompt is the whole conversation (which
the prefix cache's content addressing matches anyway) and replaces the stored history. Appending to a
session with no record is refused (NOT_FOUND), never served from an empty history: after an expiry,
a FLUSHALL or a Redis restart the client must re-send the conversation.
"""
from __future__ import annotations

import grpc

from .cache.sessions import (SessionBusy, SessionRecord, SessionStore, SessionStoreUnavailable, Turn,
                             check_session_id)


class SessionError(Exception):
    """A session request that cannot be served, with the gRPC status to answer it with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _mapped(e: Exception) -> SessionError:
    if isinstance(e, SessionBusy):
        return SessionError(grpc.StatusCode.ABORTED, str(e))
    if isinstance(e, SessionStoreUnavailable):
        return SessionError(grpc.StatusCode.UNAVAILABLE, f"{e}; a session cannot be continued without its stored "
                                                         f"history (requests without session_id are still served)")
    raise e


class SessionTurn:
    """One held turn: `prompt(new_ids)` is what the model sees, `commit(token_ids)` stores the history."""

    def __init__(self, store: SessionStore, turn: Turn, append: bool):
        self.store, self.turn, self.append = store, turn, append

    def prompt(self, new_ids: list[int]) -> list[int]:
        return [*self.turn.record.token_ids, *new_ids] if self.append else list(new_ids)

    async def commit(self, token_ids: list[int]) -> None:
        """Raises SessionError when the store is unreachable or the lease was lost (nothing stored)."""
        previous = self.turn.record
        record = SessionRecord(self.turn.session_id, tuple(token_ids),
                               metadata=previous.metadata if previous is not None else {})
        try:
            await self.store.commit(self.turn, record)
        except (SessionBusy, SessionStoreUnavailable) as e:
            raise _mapped(e) from None

    async def release(self) -> None:
        if not self.turn.done:
            await self.store.release(self.turn)


class GrpcSessions:
    def __init__(self, store: SessionStore):
        self.store = store

    async def begin(self, session_id: str, append: bool) -> SessionTurn | None:
        """None for a stateless request. Raises SessionError (INVALID_ARGUMENT, ABORTED, UNAVAILABLE, NOT_FOUND)."""
        if not session_id:
            if append:
                raise SessionError(grpc.StatusCode.INVALID_ARGUMENT, "append_to_session needs a session_id")
            return None
        try:
            check_session_id(session_id)
        except ValueError as e:
            raise SessionError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        try:
            turn = await self.store.begin(session_id)
        except (SessionBusy, SessionStoreUnavailable) as e:
            raise _mapped(e) from None
        held = SessionTurn(self.store, turn, append)
        if append and turn.record is None:
            await held.release()
            raise SessionError(grpc.StatusCode.NOT_FOUND,
                               f"session {session_id} has no stored history to append to (never started, expired "
                               f"after its TTL, or lost by the session store): send the whole conversation as the "
                               f"prompt without append_to_session")
        return held
