"""Repair methods, one file each, behind `methods.base.Method`; registered here by name."""

from __future__ import annotations

from adapter_fix.methods.base import Method
from adapter_fix.methods.csulora import CsuLora
from adapter_fix.methods.none import AnalyseOnly
from adapter_fix.methods.project import Project
from adapter_fix.methods.safelora import SafeLora

REGISTRY: dict[str, type[Method]] = {
    method.name: method for method in (CsuLora, Project, SafeLora, AnalyseOnly)
}
METHODS = tuple(REGISTRY)
