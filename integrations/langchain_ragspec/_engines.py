"""Engines shared by the LangChain classes, and the streaming helpers they use.

An Engine is loaded on first use and shared by every ChatRagSpec / RagSpecLLM with the same
model, dtype, device and index home (constructing a LangChain object loads nothing). Every call
on an engine runs on one thread of its own (ragspec.engine.thread), the one it was loaded on.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from ragspec import Engine, Generation, Piece, TextStream
from ragspec.engine.request import GenerationRequest
from ragspec.engine.thread import EngineThread

_ENGINES: dict[tuple, Engine] = {}
_ENGINES_LOCK = threading.Lock()
_THREADS: weakref.WeakKeyDictionary[Engine, EngineThread] = weakref.WeakKeyDictionary()


def shared_engine(model: str, dtype: str | None, device: str | None, index_home: str | None) -> Engine:
    """The process-wide Engine for these settings, loaded on first use, on its own engine thread
    (ragspec.engine.thread: stepping a model in a thread other than the loading one ran slower)."""
    key = (model, dtype, device, index_home)
    with _ENGINES_LOCK:  # one load per key, even when several threads ask at once
        if key not in _ENGINES:
            thread = EngineThread()
            engine = thread.call(lambda: Engine(model, dtype=dtype, device=device, index_home=index_home))
            _THREADS[engine] = thread
            _ENGINES[key] = engine
        return _ENGINES[key]


def engine_thread(engine: Engine) -> EngineThread:
    """The thread every call on `engine` runs on: the one it was loaded on for shared engines; a
    thread of its own for an Engine the user passed in."""
    with _ENGINES_LOCK:
        if engine not in _THREADS:
            _THREADS[engine] = EngineThread()
        return _THREADS[engine]


@dataclass
class Outcome:
    """How a streamed request ended: its Generation (None until it has ended)."""

    result: Generation | None = None


def _check_timeout(start: float, timeout: float | None) -> None:
    if timeout is not None and time.monotonic() - start > timeout:
        raise TimeoutError(f"ragspec generation took longer than timeout={timeout} s")


def _close(stream: TextStream, outcome: Outcome) -> None:
    stream.close()  # ends the request now if it was still running
    outcome.result = stream.result


def timed_pieces(engine: Engine, request: GenerationRequest, timeout: float | None,
                 outcome: Outcome) -> Iterator[Piece]:
    """The request's pieces, each decoding step run on the engine's thread; the request is closed
    however the iteration ends, and TimeoutError is raised once more than `timeout` seconds have
    passed (checked after each step)."""
    thread = engine_thread(engine)
    start = time.monotonic()
    stream = thread.call(engine.stream, request)
    pieces = stream.pieces()
    try:
        while (piece := thread.call(next, pieces, None)) is not None:
            yield piece
            _check_timeout(start, timeout)
    finally:
        thread.call(_close, stream, outcome)


async def async_pieces(get_engine: Callable[[], Engine], request: GenerationRequest, timeout: float | None,
                       outcome: Outcome) -> AsyncIterator[Piece]:
    """`timed_pieces` for asyncio: loading the engine, opening the stream and every decoding step
    run on the engine's thread while the event loop awaits them, so it never waits for a forward
    pass; concurrent requests interleave step by step. Cancelling or closing this iterator closes
    the stream after the step in progress, which hands the target to the next request."""
    engine = await asyncio.to_thread(get_engine)  # may load the model (on its own engine thread)
    thread = engine_thread(engine)
    start = time.monotonic()
    stream = await thread.run(engine.stream, request)
    pieces = stream.pieces()
    try:
        while (piece := await thread.run(next, pieces, None)) is not None:
            yield piece
            _check_timeout(start, timeout)
    finally:
        await asyncio.shield(thread.run(_close, stream, outcome))
