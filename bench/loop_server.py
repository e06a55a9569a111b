"""``python -m bench.loop_server serve …``: ``ussycode`` with every event-loop callback timed (for bench_loop).

The same timing as the tests' slow-callback check: each ``asyncio.Handle`` the loop runs is measured; callbacks
over 5 ms are appended as JSON lines ``{"t", "ms", "what"}`` to ``$BENCH_LOOP_STALLS`` (a file the benchmark
reads per phase). Nothing else differs from ``ussycode serve``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time

RECORD_OVER = 0.005


def install(path: str) -> None:
    original = asyncio.events.Handle._run
    out = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    lock = threading.Lock()

    def timed(handle: asyncio.Handle) -> None:
        started = time.perf_counter()
        try:
            original(handle)
        finally:
            took = time.perf_counter() - started
            if took > RECORD_OVER:
                callback = getattr(handle, "_callback", None)
                task = getattr(callback, "__self__", None)
                what = task.get_name() if isinstance(task, asyncio.Task) else repr(callback)[:120]
                with lock:
                    out.write(json.dumps({"t": time.time(), "ms": round(took * 1000, 2), "what": what}) + "\n")

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]


if __name__ == "__main__":
    install(os.environ["BENCH_LOOP_STALLS"])
    from ussycode.cli import main

    sys.exit(main(sys.argv[1:]))
