"""Repair methods, one file each, behind `methods.base.Method`; registered here by name.

The registry names each method's class in `methods/<name>.py`; the class is imported when a
repair runs (it needs torch), so the CLI reads the names without it. A new method is one file
plus one line in `STREAM_METHODS`.

`gate` (methods/gate.py) is the exception: it calibrates on prompts with the model running,
so it has no per-module `solve` and `commands.gate.repair_with_gates` runs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adapter_fix.methods.base import Method

STREAM_METHODS = {
    "csulora": "CsuLora",
    "project": "Project",
    "safelora": "SafeLora",
    "none": "AnalyseOnly",
}
"""Methods over the module stream: name (and file, methods/<name>.py) -> class."""
# Methods that run ALIGNED on calibration prompts instead of the module stream (methods/gate.py).
CALIBRATED = ("gate",)
METHODS = (*STREAM_METHODS, *CALIBRATED)


def method_class(name: str) -> type[Method]:
    """The class of the stream method `name` (imports its file, and torch)."""
    module = importlib.import_module(f"{__name__}.{name}")
    method: type[Method] = getattr(module, STREAM_METHODS[name])
    return method


def registry() -> dict[str, type[Method]]:
    """Every stream method's class, by name."""
    return {name: method_class(name) for name in STREAM_METHODS}
