"""CSULoRA: the closest safe update, `X* = F + a_H H + a_O O` (METHOD.md §3-§4)."""

from __future__ import annotations

from adapter_fix.engine import SUBSPACE
from adapter_fix.math.solve import csulora
from adapter_fix.methods.base import Method, Outcome, PreparedModule, refactor


class CsuLora(Method):
    name = "csulora"
    needs = frozenset({SUBSPACE})

    def solve(self, prepared: PreparedModule) -> Outcome:
        solution, a_partial, a_off = csulora(prepared.parts, self.options.strength)
        prepared.report.attenuation = {"partial": a_partial, "off": a_off}
        if a_partial == a_off == 1.0:
            prepared.report.reason = "attenuation is 1 (strength 0): the update is kept as it is"
            return Outcome(prepared.report)
        return refactor(prepared, solution, self.options, self.adapter.use_rslora)
