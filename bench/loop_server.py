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
import traceback

RECORD_OVER = 0.005


def install(path: str) -> None:
    original = asyncio.events.Handle._run
    out = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    lock = threading.Lock()

    running: dict[str, object] = {"since": None, "where": None, "thread": None}

    def timed(handle: asyncio.Handle) -> None:
        running["thread"], running["where"] = threading.get_ident(), None
        cpu = time.thread_time()
        running["since"] = started = time.perf_counter()
        try:
            original(handle)
        finally:
            running["since"] = None
            took, cpu = time.perf_counter() - started, time.thread_time() - cpu
            if took > RECORD_OVER:
                callback = getattr(handle, "_callback", None)
                task = getattr(callback, "__self__", None)
                what = task.get_name() if isinstance(task, asyncio.Task) else repr(callback)[:120]
                rec = {"t": time.time(), "ms": round(took * 1000, 2), "cpu_ms": round(cpu * 1000, 2), "what": what,
                       "where": running["where"] or ""}
                with lock:
                    out.write(json.dumps(rec) + "\n")

    def watchdog() -> None:
        while True:
            time.sleep(0.004)
            since = running["since"]
            if isinstance(since, float) and running["where"] is None and time.perf_counter() - since > 0.01:
                frame = sys._current_frames().get(running["thread"])  # type: ignore[arg-type]
                running["where"] = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
                                               for f in reversed(traceback.extract_stack(frame)[-7:]))

    threading.Thread(target=watchdog, name="loop-watchdog", daemon=True).start()

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]


if __name__ == "__main__":
    install(os.environ["BENCH_LOOP_STALLS"])
    from ussycode.cli import main

    sys.exit(main(sys.argv[1:]))
