"""Safe LoRA (Hsu et al., NeurIPS 2024), as its public reference computes it (METHOD.md §5).

Per module `B~ = C B` with `C = D D^T / ||D||_F`, and the similarity of
`B~ A` with `B A`; then a global selection of the least similar modules,
which get `B <- B~` (`A` unchanged). It needs the displacement only, so the
stream runs no SVD for it; its F/H/O shares are reported only when a
subspace is at hand anyway (a basis). With a basis there is no `D`: `C` is
then approximated by `U_k S_k^2 U_k^T / ||D||_F` (README, "Safe LoRA with a
basis").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from adapter_fix.engine import DISPLACEMENT, REDUCED
from adapter_fix.math.solve import (
    as_factored,
    safelora_candidate,
    safelora_candidate_from_subspace,
    safelora_select,
)
from adapter_fix.methods.base import Method, Outcome, PreparedModule, fill_metrics
from adapter_fix.results import ModuleResult


@dataclass(frozen=True)
class _Choice:
    """What Safe LoRA writes for a module if the global selection picks it."""

    projected_b: torch.Tensor
    report: ModuleResult


class SafeLora(Method):
    name = "safelora"
    needs = frozenset({DISPLACEMENT, REDUCED})

    def solve(self, prepared: PreparedModule) -> Outcome:
        data, report = prepared.data, prepared.report
        if data.lora_b is None or data.lora_a is None:
            raise ValueError(f"{report.name}: Safe LoRA needs the module's factors")
        if data.displacement is not None:
            candidate = safelora_candidate(
                data.lora_b,
                data.lora_a,
                data.displacement,
                displacement_norm=data.displacement_norm,
                reduced=data.reduced,
            )
        elif data.subspace is not None:
            candidate = safelora_candidate_from_subspace(data.lora_b, data.lora_a, data.subspace)
        else:
            raise ValueError(f"{report.name}: Safe LoRA needs the displacement or a subspace")
        projected_b = candidate.projected_b.to(prepared.dtype)
        projected = as_factored(projected_b, data.lora_a, prepared.module.scaling)
        selected = replace(report, action="repaired", safelora_similarity=candidate.similarity)
        fill_metrics(selected, prepared.original, projected, data.subspace)
        report.safelora_similarity = candidate.similarity
        report.reason = f"Safe LoRA similarity {candidate.similarity:.5f}, not selected"
        return Outcome(report, pending=_Choice(projected_b, selected))

    def finish(self, outcomes: list[Outcome]) -> None:
        """The global selection; selected modules get `B <- C B`, `A` unchanged."""
        choices = {o.report.name: o.pending for o in outcomes if isinstance(o.pending, _Choice)}
        chosen = safelora_select(
            {name: choice.report.safelora_similarity for name, choice in choices.items()},
            select=self.options.safelora_select,
            number=self.options.safelora_layers,
            threshold=self.options.safelora_threshold,
        )
        for outcome in outcomes:
            if outcome.report.name not in chosen:
                continue
            choice = choices[outcome.report.name]
            outcome.report = choice.report
            outcome.report.reason = (
                f"Safe LoRA similarity {choice.report.safelora_similarity:.5f}, selected"
            )
            if outcome.report.kind == "embedding":
                outcome.lora_b, outcome.lora_a = None, choice.projected_b.T
            else:
                outcome.lora_b, outcome.lora_a = choice.projected_b, None
