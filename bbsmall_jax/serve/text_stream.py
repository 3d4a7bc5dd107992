"""A reply's text as its tokens arrive: only what later tokens cannot change is released.

Decoding joins BPE pieces (`@@`) and cleans up spaces before punctuation and around apostrophes ("don ' t"
-> "don't"), so the end of the text may still change. Every clean-up touches only the last word and the
space before it, so the text up to that space is final; with stop strings, their length less one more
is held back, and the text ends at the first one. Joined, the released pieces are a prefix of the whole
reply's text (the rest follows when the reply ends).
"""

from __future__ import annotations

from typing import Callable, Sequence


class TextStream:
    """Push token ids in order; each push returns the newly final text (often empty)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode, self.stops = decode, tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = ""  # the text released so far
        self.stopped = False  # a stop string was reached: nothing more is released

    def push(self, token: int) -> str:
        self.tokens.append(token)
        if self.stopped:
            return ""
        text = self.decode(self.tokens)
        final = text[:max(text.rfind(" "), 0)]  # up to the space before the last word
        cuts = [final.find(s) for s in self.stops if s in final]
        if cuts:
            final, self.stopped = final[:min(cuts)], True
        else:
            final = final[:max(len(final) - self.hold, 0)]
        if len(final) <= len(self.sent) or not final.startswith(self.sent):
            return ""
        delta, self.sent = final[len(self.sent):], final
        return delta

    def rest(self, whole: str) -> str:
        """What is left to send of the reply's whole text (cut at its stop string, as the reply is)."""
        return whole[len(self.sent):] if whole.startswith(self.sent) else ""
