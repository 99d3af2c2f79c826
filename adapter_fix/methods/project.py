"""Hard projection onto the safety subspace, `X = F` (METHOD.md §5; CSULoRA's `lam -> inf`)."""

from __future__ import annotations

from adapter_fix.engine import SUBSPACE
from adapter_fix.math.solve import project
from adapter_fix.methods.base import Method, Outcome, PreparedModule, refactor


class Project(Method):
    name = "project"
    needs = frozenset({SUBSPACE})

    def solve(self, prepared: PreparedModule) -> Outcome:
        return refactor(prepared, project(prepared.parts), self.options, self.adapter.use_rslora)
