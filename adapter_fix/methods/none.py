"""`--method none`: analyse and report each module against its subspace; write nothing."""

from __future__ import annotations

from adapter_fix.engine import SUBSPACE
from adapter_fix.methods.base import Method, Outcome, PreparedModule


class AnalyseOnly(Method):
    name = "none"
    needs = frozenset({SUBSPACE})
    writes = False

    def solve(self, prepared: PreparedModule) -> Outcome:
        prepared.report.action = "analysed"
        return Outcome(prepared.report)
