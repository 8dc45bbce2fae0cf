"""Incremental detokenization: output token ids to the text a client may be sent so far."""

from __future__ import annotations

from engine.frontend.tokenizer import Tokenizer


class TextStream:
    """Output ids to text as they arrive, cut at the first stop sequence.

    `add` returns only text that is final: a trailing undecodable byte sequence (U+FFFD
    until the rest of the character arrives) and any tail that could begin a stop
    sequence are held back. The whole output is decoded each time, so the pieces always
    add up to `decode(output_ids)` (cut at the stop), the same text as a non-streamed reply.
    """

    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids)
        cut = self._find_stop(text)
        if cut is not None:
            self.stopped = True
            self.text = text[:cut]
            return self.flush()
        self.text = text
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        end -= self._stop_prefix(text[self.sent : end])
        delta = text[self.sent : end]
        self.sent = end
        return delta

    def flush(self) -> str:
        delta = self.text[self.sent :]
        self.sent = max(self.sent, len(self.text))
        return delta

    def _find_stop(self, text: str) -> int | None:
        if not self.stop:
            return None
        start = max(0, self.sent - max(len(s) for s in self.stop))
        hits = [i for s in self.stop if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _stop_prefix(self, tail: str) -> int:
        """Length of the longest end of `tail` that a stop sequence starts with."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(tail)), longest, -1):
                if tail.endswith(s[:k]):
                    longest = k
                    break
        return longest
