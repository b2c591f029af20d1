"""Progress on stderr for CLI work that may take a while.

`with progress("reading tierq.db"):` shows a spinner with the elapsed time if
the work lasts longer than `delay` seconds, on a terminal only, and erases it
when done, so stdout (a table, CSV, JSON) stays clean for pipes.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

__all__ = ["progress"]

_FRAMES = "|/-\\"


@contextmanager
def progress(label: str, *, delay: float = 0.3, stream: TextIO | None = None,
             force: bool = False) -> Iterator[None]:
    out = sys.stderr if stream is None else stream
    if not (force or out.isatty()):
        yield
        return
    done = threading.Event()
    shown = False

    def spin() -> None:
        nonlocal shown
        t0 = time.monotonic()
        if done.wait(delay):
            return
        i = 0
        while not done.is_set():
            out.write(f"\r{_FRAMES[i % 4]} {label} ({time.monotonic() - t0:.1f}s)")
            out.flush()
            shown = True
            i += 1
            done.wait(0.1)

    thread = threading.Thread(target=spin, name="tierq-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if shown:
            out.write("\r\033[K")
            out.flush()
