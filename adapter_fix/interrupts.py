"""SIGTERM handled like Ctrl-C: the run unwinds through its cleanup code and exits 143.

A `kill` (or a CI job's timeout, or `docker stop`) sends SIGTERM, whose
default action ends the process at once and would leave temporary output
folders behind. Raising an exception instead lets every `finally` and
context manager remove what it staged, exactly as on Ctrl-C.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; a KeyboardInterrupt, so code that cleans up on Ctrl-C does here too."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # A second SIGTERM must not cut the cleanup of the first one short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
