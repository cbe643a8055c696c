"""Running a request off the event loop: the engine's blocking work (set-up, each decoding step,
the end) goes to the server's one engine thread, one call at a time per request; the loop only
awaits them.

Closing a Feed (a client gone, an error) closes its TextStream in a worker: the request ends at
once as "cancelled", its cache goes back to the engine's prefix pool and the engine stays usable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio

from ragspec.engine.request import GenerationRequest, Piece
from ragspec.engine.thread import EngineThread
from ragspec.server.config import ServerConfig


@dataclass
class LoadPolicy:
    """Counts requests in flight and decides, at admission, whether a request speculates."""

    config: ServerConfig
    engine_thread: EngineThread = field(default_factory=EngineThread)  # built the engine: see EngineThread
    in_flight: int = 0
    limiter: anyio.CapacityLimiter = field(init=False)  # bounds the calls waiting for the engine thread

    def __post_init__(self) -> None:
        self.limiter = anyio.CapacityLimiter(self.config.max_in_flight)

    async def run(self, function, *args):
        """`function(*args)` on the engine thread, in arrival order, at most max_in_flight waiting."""
        async with self.limiter:
            return await self.engine_thread.run(function, *args)

    def admit(self, request: GenerationRequest) -> GenerationRequest:
        self.in_flight += 1
        threshold = self.config.spec_max_in_flight
        if threshold is not None and self.in_flight > threshold and request.speculative is None:
            return GenerationRequest.of(request, speculative=False)
        return request

    def release(self) -> None:
        self.in_flight -= 1


class Feed:
    """A request's Pieces as an async iterator; `close()` ends it (idempotent)."""

    def __init__(self, stream, request: GenerationRequest, policy: LoadPolicy, started: float):
        self.stream = stream
        self.request = request
        self._pieces = stream.pieces()
        self._policy = policy
        self.started = started  # when the server received the request (perf_counter)
        self.first_token_s: float | None = None
        self.closed = False
        self.finished = False  # the server has counted it

    @classmethod
    async def open(cls, engine, request: GenerationRequest, policy: LoadPolicy, started: float) -> "Feed":
        """Set the request up (tokenising, retrieval) on the engine thread; library errors
        propagate. `started`: when the server received it (time.perf_counter())."""
        stream = await policy.run(engine.stream, request)
        return cls(stream, request, policy, started)

    def __aiter__(self) -> "Feed":
        return self

    async def __anext__(self) -> Piece:
        if self.closed:
            raise StopAsyncIteration
        piece = await self._policy.run(_next_piece, self._pieces)
        if piece is None:
            self.closed = True
            raise StopAsyncIteration
        if self.first_token_s is None and piece.text:
            self.first_token_s = time.perf_counter() - self.started
        return piece

    async def close(self) -> None:
        """End the request now; shielded, so a cancelled caller still frees the engine's work."""
        if self.closed and self.stream.result is not None:
            return
        self.closed = True
        with anyio.CancelScope(shield=True):
            await self._policy.run(self.stream.close)

    @property
    def result(self):
        return self.stream.result


def _next_piece(pieces) -> Piece | None:
    return next(pieces, None)


class SourceSegments:
    """Splits each piece's text into the texts of its tokens, each with the source that drafted it,
    for the web page's colours. A piece's text can lag its tokens (a held-back stop-string start,
    half a character): tokens wait until their text is shown; text that does not line up with
    single-token decodes (a character split over tokens) becomes one segment of the first
    waiting token's source."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._waiting: list[tuple[str, str]] = []

    def push(self, piece: Piece) -> list[tuple[str, str]]:
        decoded = [self._tokenizer.decode([t]) for t in piece.token_ids]
        self._waiting.extend(zip(decoded, piece.sources))
        segments, text = [], piece.text
        while text:
            while self._waiting and not self._waiting[0][0]:
                self._waiting.pop(0)
            if self._waiting and text.startswith(self._waiting[0][0]):
                token_text, source = self._waiting.pop(0)
                segments.append((token_text, source))
                text = text[len(token_text):]
                continue
            source = self._waiting[0][1] if self._waiting else "target"
            segments.append((text, source))
            self._waiting.clear()
            break
        return segments
