"""Incremental detokenisation with stop strings matched as text, across token boundaries.

The rule, the same whatever number of tokens a step commits (so speculative decoding returns
exactly what plain decoding returns): tokens are taken one at a time; the request stops at the
first token after which the settled text contains a stop string, that token kept in `token_ids`
and the text cut where the stop string begins.

Settled text is the part of the decoded text that later tokens cannot change: the text without
its trailing run of U+FFFD (the bytes of a character still being decoded). The stream shows
settled text minus any tail that may still begin a stop string, so what it shows is always a
prefix of the final text. Tokenizers with byte fallback (SentencePiece, Llama) decode a run of
byte tokens together, and a character completed inside a run turns back into U+FFFDs if the run
ends mid-character: for those, text decoded from a trailing run of byte tokens is not shown
until a whole token ends the run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ragspec.errors import ConfigError

_INCOMPLETE = "\ufffd"  # what decode gives for a UTF-8 sequence cut mid-character
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback token


def stop_strings(stop: str | Sequence[str] | None) -> list[str]:
    """The stop strings of a `stop` argument: one string is one stop string (not its letters)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    try:
        stops = list(stop)
    except TypeError:
        raise ConfigError(f"stop must be a string or a list of strings, got {stop!r}") from None
    wrong = [s for s in stops if not isinstance(s, str)]
    if wrong:
        raise ConfigError(f"stop strings must be strings, got {wrong[0]!r}")
    return stops


def settled(text: str) -> str:
    """`text` without its trailing U+FFFD run: the part that the next bytes cannot change."""
    return text.rstrip(_INCOMPLETE)


class TextAssembler:
    """Feed generated token ids; get back the text that is safe to show so far.

    Text that might be the start of a stop string, or half a UTF-8 character, is held back
    until the next tokens settle it.
    """

    def __init__(self, tokenizer, stop: str | Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop_strings(stop) if s]
        self.token_ids: list[int] = []
        self.text = ""  # full text so far (cut at a stop string once one is found)
        self.emitted = 0  # characters of `text` already returned
        self.stopped = False
        self._is_byte_token: dict[int, bool] = {}

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the newly safe text. When a stop string completes, sets `stopped`
        and keeps the tokens up to the one that completed it: with stop strings, the tokens are
        taken one at a time, exactly as plain decoding takes them."""
        if not self.stop or len(token_ids) <= 1:
            return self._push(token_ids)
        pieces = []
        for token in token_ids:
            pieces.append(self._push([token]))
            if self.stopped:
                break
        return "".join(pieces)

    def finish(self) -> str:
        """Everything not yet returned (the stream is over: a trailing U+FFFD is now final, and
        a stop string that ends in one is cut like any other)."""
        cut = None if self.stopped else self._first_stop(self.text)
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
        return self._emit(len(self.text))

    def _push(self, token_ids: Sequence[int]) -> str:
        self.token_ids.extend(token_ids)
        self.text = self._decode(self.token_ids)
        cut = self._first_stop(settled(self.text))
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._emit(len(self.text))
        shown = self._shown()
        return self._emit(len(shown) - self._held_back(shown))

    def _decode(self, token_ids: Sequence[int]) -> str:
        # no clean-up of spaces: it rewrites earlier text (" ." -> "."), so prefixes would not last
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _shown(self) -> str:
        """The settled text, before any trailing run of byte-fallback tokens."""
        run = 0
        while run < len(self.token_ids) and self._byte_token(self.token_ids[-1 - run]):
            run += 1
        return settled(self._decode(self.token_ids[:-run]) if run else self.text)

    def _byte_token(self, token: int) -> bool:
        if token not in self._is_byte_token:
            piece = self.tokenizer.convert_ids_to_tokens(int(token))
            self._is_byte_token[token] = isinstance(piece, str) and _BYTE_TOKEN.fullmatch(piece) is not None
        return self._is_byte_token[token]

    def _emit(self, end: int) -> str:
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece

    def _first_stop(self, text: str) -> int | None:
        """Where the earliest stop string in `text` begins (the shown text holds none whole)."""
        found = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        """Length of the tail of settled `text` that may still grow into a stop string."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if s.startswith(text[-k:]):
                    hold = k
                    break
        return hold
