"""Stop strings over streamed text: emit text as soon as it cannot be the start of a stop string."""
from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""  # text withheld because it might begin a stop string
        self._hold = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, delta: str, final: bool = False) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string matched). After a match the text ends right before it."""
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return text[:min(hits)], True
        if final or self._hold == 0:
            self._held = ""
            return text, False
        keep = self._longest_partial(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def _longest_partial(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        for n in range(min(self._hold, len(text)), 0, -1):
            suffix = text[-n:]
            if any(s.startswith(suffix) for s in self.stops):
                return n
        return 0
