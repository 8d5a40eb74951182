"""Python's cyclic garbage collector, paused while the engine builds many small objects.

A plan of 100,000 cells, or a scan of as many cell records, allocates hundreds of thousands of
objects that are never garbage: each allocation burst triggers collections that walk every live
object again, which was close to half of planning and scanning (5.1 s to 3 s for 100,048 cells,
each in a fresh process). None of these objects form reference cycles, so reference counting
frees them all the same.
"""

from __future__ import annotations

import functools
import gc
import threading
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_lock = threading.Lock()
_paused = 0  # calls in progress, in any thread (the resume scan runs beside the planning)
_reenable = False  # whether the collector was on when the first of them began


def gc_paused(func: F) -> F:
    """Run `func` with the cyclic collector off; it goes back on when the last such call ends
    (unless it was off before the first began)."""
    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        global _paused, _reenable
        with _lock:
            if _paused == 0:
                _reenable = gc.isenabled()
                gc.disable()
            _paused += 1
        try:
            return func(*args, **kwargs)
        finally:
            with _lock:
                _paused -= 1
                if _paused == 0 and _reenable:
                    gc.enable()
    return run  # type: ignore[return-value]
