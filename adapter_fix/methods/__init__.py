"""Repair methods, one file each, behind `methods.base.Method`; registered here by name.

`gate` (methods/gate.py) is the exception: it calibrates on prompts with the model running,
so it has no per-module `solve` and `commands.repair.repair_gated` runs it.
"""

from __future__ import annotations

from adapter_fix.methods.base import Method
from adapter_fix.methods.csulora import CsuLora
from adapter_fix.methods.none import AnalyseOnly
from adapter_fix.methods.project import Project
from adapter_fix.methods.safelora import SafeLora

REGISTRY: dict[str, type[Method]] = {
    method.name: method for method in (CsuLora, Project, SafeLora, AnalyseOnly)
}
# Methods that run ALIGNED on calibration prompts instead of the module stream (methods/gate.py).
CALIBRATED = ("gate",)
METHODS = (*REGISTRY, *CALIBRATED)
