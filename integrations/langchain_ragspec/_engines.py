"""Engines shared by the LangChain classes, and the streaming helpers they use.

An Engine is loaded on first use and shared by every ChatRagSpec / RagSpecLLM with the same
model, dtype, device and index home (constructing a LangChain object loads nothing).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from ragspec import Engine, Generation, Piece, TextStream

_ENGINES: dict[tuple, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def shared_engine(model: str, dtype: str | None, device: str | None, index_home: str | None) -> Engine:
    """The process-wide Engine for these settings, loaded on first use."""
    key = (model, dtype, device, index_home)
    with _ENGINES_LOCK:  # one load per key, even when several threads ask at once
        if key not in _ENGINES:
            _ENGINES[key] = Engine(model, dtype=dtype, device=device, index_home=index_home)
        return _ENGINES[key]


@dataclass
class Outcome:
    """How a streamed request ended: its Generation (None until it has ended)."""

    result: Generation | None = None


def timed_pieces(stream: TextStream, timeout: float | None, outcome: Outcome) -> Iterator[Piece]:
    """The stream's pieces; the request is closed however the iteration ends, and TimeoutError
    is raised once more than `timeout` seconds have passed (checked after each step)."""
    start = time.monotonic()
    try:
        with stream:
            for piece in stream.pieces():
                yield piece
                if timeout is not None and time.monotonic() - start > timeout:
                    raise TimeoutError(f"ragspec generation took longer than timeout={timeout} s")
    finally:
        outcome.result = stream.result


async def async_pieces(open_stream: Callable[[], TextStream], timeout: float | None,
                       outcome: Outcome) -> AsyncIterator[Piece]:
    """`timed_pieces` for asyncio: a worker thread opens the stream (the engine may be loading, or
    busy with another request) and runs every decoding step, so the event loop never waits for
    a forward pass. Cancelling or closing this iterator stops the worker after the step it is in
    and closes the stream, which hands the target to the next request."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()

    def post(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening
            cancelled.set()

    def work() -> None:
        pieces = None
        try:
            pieces = timed_pieces(open_stream(), timeout, outcome)
            while not cancelled.is_set():  # checked before each step
                piece = next(pieces, None)
                if piece is None:
                    break
                post(("piece", piece))
            post(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            post(("error", exc))
        finally:
            if pieces is not None:
                pieces.close()  # ends the request now if it was cancelled

    threading.Thread(target=work, name="ragspec-langchain-stream", daemon=True).start()
    try:
        while True:
            kind, value = await queue.get()
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value
    finally:
        cancelled.set()
