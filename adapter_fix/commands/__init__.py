"""One file per command, each a thin layer over the engine: `run` does a command's work (the
CLI parses the flags before and renders the result after)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adapter_fix.progress import ModuleProgress

ProgressBar = Callable[[int], "ModuleProgress"]
"""Makes the progress bar of a run over this many modules (the CLI's, on stderr)."""
