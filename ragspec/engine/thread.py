"""One thread that builds an Engine and runs every call on it.

Why: torch work run in a thread other than the one that loaded the model was ~40-100% slower
here (bf16, Spec-Bench summarization prompts, 128 plain tokens: through the server 7.3-9.0 s a
request with the steps in the loading thread, 11.8-13.0 s in another; through LangChain, sync
`stream` in the loading thread 8.2-11.1 s, `astream` stepping in a thread of its own 13.7-20.7 s).
The cause inside torch/oneDNN is not identified. The engine runs one step at a time under its
lock anyway, so one thread loses no parallelism. `ragspec serve` and the LangChain integration
build their engines with `call` and run every engine call through it (`call`, or `run` from an
event loop).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor


class EngineThread:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragspec-engine",
                                            initializer=self._remember_thread)
        self._thread: threading.Thread | None = None

    def _remember_thread(self) -> None:
        self._thread = threading.current_thread()

    def submit(self, function, *args) -> Future:
        """Queue `function(*args)` on the engine thread (calls run one at a time, in order)."""
        return self._executor.submit(function, *args)

    def call(self, function, *args):
        """Run `function(*args)` on the engine thread and wait for it (at once when already on it)."""
        if threading.current_thread() is self._thread:
            return function(*args)
        return self.submit(function, *args).result()

    async def run(self, function, *args):
        """`call` for asyncio: the event loop awaits `function(*args)` on the engine thread."""
        return await asyncio.wrap_future(self.submit(function, *args))
