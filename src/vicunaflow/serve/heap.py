"""The server's Python heap: frozen once the server is warm, and its garbage collections counted.

Why: while Python's cyclic collector runs, every thread of the process waits, the engine's loop too, so
each running stream's next token waits with it. A loaded server holds ~400,000 objects (torch,
transformers, FastAPI, the engine) that live until it exits, and a full collection walks all of them:
193 ms on the 2-core development machine, 202-244 ms measured through /health on an H200 host (7B,
32 streams: in two of three runs one full collection landed in the scenario, and the 32-stream rate fell
from ~4,550 to 3,978 tokens/s, a first token waited 393 ms at the median). `freeze` moves everything
alive after warm-up to the collector's permanent generation (gc.freeze), so a later full collection walks
only what requests created since (on the 2-core machine: 193 ms before, under 1 ms after, with nothing
new). vLLM freezes its heap after start-up for the same reason. `GCPauses` records each collection's
length for /health and bench/bench_serve.py.
"""

from __future__ import annotations

import gc
import time


def freeze() -> None:
    """Collect once, then exempt every object alive now from later collections.

    Only for objects that live as long as the process (a server's models and app): a reference cycle
    among frozen objects is never freed."""
    gc.collect()
    gc.freeze()


class GCPauses:
    """A gc.callbacks hook: collections per generation, their total and longest time."""

    def __init__(self):
        self.collections = [0, 0, 0]
        self.pause_s = 0.0
        self.max_pause_s = 0.0
        self._started: float | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            pause = time.perf_counter() - self._started
            self._started = None
            self.collections[info["generation"]] += 1
            self.pause_s += pause
            self.max_pause_s = max(self.max_pause_s, pause)

    def __enter__(self) -> GCPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)

    def snapshot(self) -> dict:
        return {
            "collections": list(self.collections),
            "pause_s": round(self.pause_s, 6),
            "max_pause_s": round(self.max_pause_s, 6),
            "frozen_objects": gc.get_freeze_count(),
        }
