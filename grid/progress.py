"""Progress of long work on stderr: cells and examples done, throughput and time left."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("clfgrid")


class Progress:
    """Counts cells and examples; logs a line when a cell ends and at most every `every` seconds.
    Units of the grid run in several driver threads: every count is taken under one lock."""

    def __init__(self, total_cells: int, every: float = 10.0):
        self.total_cells = total_cells
        self.cells = 0
        self.examples_total = 0
        self.examples = 0
        self.every = every
        self.start = time.perf_counter()
        self.last = 0.0
        self.lock = threading.Lock()

    def add_examples(self, n: int) -> None:
        with self.lock:
            self.examples_total += n

    def examples_done(self, n: int) -> None:
        with self.lock:
            self.examples += n
            if time.perf_counter() - self.last >= self.every:
                self._log()

    def cell_done(self, cell: Any, record: dict[str, Any]) -> None:
        metrics = record.get("metrics") or {}
        headline = {k: round(v, 4) for k, v in metrics.items()
                    if isinstance(v, (int, float)) and k.count("/") <= 1 and not k.endswith(("_low", "_high"))}
        shown = ", ".join(f"{k}={v}" for k, v in list(headline.items())[:4])
        with self.lock:
            self.cells += 1
            log.info("[%d/%d] %s %s %s", self.cells, self.total_cells, record["status"], cell.label(), shown)
            self._log()

    def _log(self) -> None:  # callers hold the lock
        self.last = time.perf_counter()
        elapsed = self.last - self.start
        rate = self.examples / elapsed if elapsed > 0 else 0.0
        left = self.examples_total - self.examples
        eta = f"{left / rate:.0f}s" if rate > 0 and left > 0 else "-"
        log.info("progress: cells %d/%d, examples %d/%d, %.1f examples/s, time left (inference) %s",
                 self.cells, self.total_cells, self.examples, self.examples_total, rate, eta)

    def close(self) -> None:
        with self.lock:
            self._log()
