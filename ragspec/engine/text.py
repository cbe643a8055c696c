"""Incremental detokenisation with stop strings matched as text, across token boundaries."""

from __future__ import annotations

from collections.abc import Sequence

_INCOMPLETE = "\ufffd"  # what decode gives for a UTF-8 sequence cut mid-character


class TextAssembler:
    """Feed generated token ids; get back the text that is safe to show so far.

    Text that might be the start of a stop string, or half a UTF-8 character, is held back
    until the next tokens settle it.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.text = ""  # full text so far (cut at a stop string once one is found)
        self.emitted = 0  # characters of `text` already returned
        self.stopped = False

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the newly safe text. Sets `stopped` when a stop string appears."""
        self.token_ids.extend(token_ids)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = self._first_stop(self.text)
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._emit(len(self.text))
        safe = len(self.text) - self._held_back(self.text)
        return self._emit(safe)

    def finish(self) -> str:
        """Everything not yet returned (the stream is over, nothing more can complete it)."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        """Length of the tail that may still grow into a stop string or a whole character."""
        hold = 1 if text.endswith(_INCOMPLETE) else 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if s.startswith(text[-k:]):
                    hold = max(hold, k)
                    break
        return hold
