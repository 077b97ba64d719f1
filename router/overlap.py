"""Two micro-batches ping-pong over the router's compute (MegaScale-Infer's overlap).

A step's sequences are cut in two micro-batches whose forward passes run on two threads that take
turns: a micro-batch holds the baton while it computes (its dense layers, routing, the shared
expert) and hands it over while its routed tokens are at the workers (`ComputeBaton.away`, around
the wait in `LayerDispatch.result`). So while one micro-batch's tokens are away, the router runs
the other's dense layers instead of idling, and the workers get the other's tokens as soon as it
reaches its next MoE layer. Only one thread computes at a time: the two never compete for cores.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


class ComputeBaton:
    """Who may compute now. Threads that never take it (the usual single micro-batch) are unaffected:
    `away()` is a no-op for them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held = threading.local()
        self._away = 0  # micro-batches whose tokens are at the workers now (changed under the lock)
        self.overlaps = 0  # times a micro-batch started computing while another's tokens were away

    def _take(self, returning: bool = False) -> None:
        self._lock.acquire()
        if returning:
            self._away -= 1
        if self._away:
            self.overlaps += 1
        self._held.value = True

    def _give(self) -> None:
        self._held.value = False
        self._lock.release()

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Around one micro-batch's whole forward pass."""
        self._take()
        try:
            yield
        finally:
            self._give()

    @contextmanager
    def away(self) -> Iterator[None]:
        """Around waiting for the workers: the other micro-batch computes meanwhile."""
        if not getattr(self._held, "value", False):
            yield
            return
        self._away += 1
        self._give()
        try:
            yield
        finally:
            self._take(returning=True)


def cut_in_two(num_new_tokens: Sequence[int]) -> int:
    """Where to cut a step's sequences into two micro-batches of about equal token counts: an index in
    [1, len - 1], or 0 when there are fewer than two sequences (nothing to overlap)."""
    if len(num_new_tokens) < 2:
        return 0
    half, running = sum(num_new_tokens) / 2, 0
    for i, n in enumerate(num_new_tokens[:-1]):
        running += n
        if running >= half:
            return i + 1
    return len(num_new_tokens) - 1


def ping_pong(baton: ComputeBaton, executor: ThreadPoolExecutor, forwards: Sequence[Callable[[], T]]) -> list[T]:
    """Run the micro-batches' forward passes on `executor` (one thread each), taking turns on `baton`;
    results in the order given. An exception in either is raised once both have finished."""
    def run(forward: Callable[[], T]) -> T:
        with baton.holding():
            return forward()

    futures = [executor.submit(run, f) for f in forwards]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]
