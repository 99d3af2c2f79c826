"""What every repair method shares: its options, its interface, and the per-module prelude.

A method declares what it `needs` from the module stream (the safety
subspace, the displacement, `D^T B` taken while the displacement is read),
solves one module at a time, and may
`finish` with a global step over every module (Safe LoRA's selection). A new
method is one file here plus one line in `methods/__init__.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from adapter_fix.engine import ModuleData, one_thread
from adapter_fix.errors import NonFiniteError
from adapter_fix.io.adapter import LoraAdapter, LoraModule
from adapter_fix.io.checkpoint import DTYPES, is_finite
from adapter_fix.io.lora_keys import lora_scaling
from adapter_fix.math.solve import (
    Decomposition,
    FactoredUpdate,
    UpdateMetrics,
    as_factored,
    compare_updates,
    decompose,
    factored_norm,
    to_lora_factors,
    update_metrics,
)
from adapter_fix.math.subspace import Subspace
from adapter_fix.options import RepairOptions
from adapter_fix.results import ModuleResult


@dataclass
class Outcome:
    """A module's report row and, when it changes, its new factors (PEFT orientation)."""

    report: ModuleResult
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    pending: Any = None
    """Method-private state kept for `finish` (small: never a weight)."""


@dataclass
class PreparedModule:
    """A module ready for a method: its report row so far and its update, factored."""

    data: ModuleData
    module: LoraModule
    report: ModuleResult
    original: FactoredUpdate
    """`dW = s B A`, float64 factors."""
    decomposition: Decomposition | None
    """F/H/O against the subspace, when there is one."""
    dtype: torch.dtype
    """The adapter's dtype: metrics describe the factors as written, rounded to it."""

    @property
    def parts(self) -> Decomposition:
        """The decomposition; methods that need the subspace always have one."""
        if self.decomposition is None:
            raise ValueError(f"{self.module.name}: this method needs the safety subspace")
        return self.decomposition


class Method(ABC):
    """One repair method. Subclasses set `name`, `needs`, and implement `solve`."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]]
    writes: ClassVar[bool] = True
    """Whether the method writes an adapter (`none` only analyses)."""

    def __init__(self, options: RepairOptions, adapter: LoraAdapter) -> None:
        self.options = options
        self.adapter = adapter

    def run(self, data: ModuleData) -> Outcome:
        """The shared prelude (report row, no-signal and zero-update cases), then `solve`."""
        prepared = prepare(data)
        report = prepared.report
        if data.no_signal is not None:
            report.reason = f"no safety signal: {data.no_signal}"
            return Outcome(report)
        if report.update_norm == 0.0:
            report.reason = "the update is zero"
            return Outcome(report)
        return self.solve(prepared)

    @abstractmethod
    def solve(self, prepared: PreparedModule) -> Outcome:
        """Repair one module that has a signal and a nonzero update."""

    def finish(self, outcomes: list[Outcome]) -> None:
        """A global step once every module is solved (default: none)."""
        del outcomes


def prepare(data: ModuleData) -> PreparedModule:
    """The module's report row with what is known before any method acts."""
    with one_thread():
        return _prepare(data)


def _prepare(data: ModuleData) -> PreparedModule:
    module = data.target.module
    if module is None or data.lora_b is None or data.lora_a is None:
        raise ValueError(f"{data.target.name}: a method needs the module's LoRA factors")
    report = ModuleResult(module.name, module.kind, module.shape, module.rank, module.scaling)
    report.lora_bias = module.bias_key
    report.displacement_norm = data.displacement_norm
    report.output_rank = module.rank
    subspace = data.subspace
    decomposition = None
    if subspace is not None:
        report.subspace_rank = subspace.rank
        report.captured_energy = subspace.captured_energy
        report.subspace_method = subspace.method
        decomposition = decompose(data.lora_b, data.lora_a, module.scaling, subspace)
        original = FactoredUpdate(decomposition.lora_b, decomposition.lora_a, module.scaling)
        report.rho_before = rho(decomposition)
        report.rho_after = dict(report.rho_before)
    else:
        original = as_factored(data.lora_b, data.lora_a, module.scaling)
    report.update_norm = factored_norm(original)
    report.repaired_norm = report.update_norm
    report.note = data.note
    return PreparedModule(data, module, report, original, decomposition, DTYPES[module.dtype])


def rho(shares: Decomposition | UpdateMetrics) -> dict[str, float]:
    return {"full": shares.rho_full, "partial": shares.rho_partial, "off": shares.rho_off}


def fill_metrics(
    report: ModuleResult,
    original: FactoredUpdate,
    repaired: FactoredUpdate,
    subspace: Subspace | None,
) -> None:
    """Norm, relative change, cosine, and (with a subspace) F/H/O shares of the repaired update."""
    with one_thread():
        _fill_metrics(report, original, repaired, subspace)


def _fill_metrics(
    report: ModuleResult,
    original: FactoredUpdate,
    repaired: FactoredUpdate,
    subspace: Subspace | None,
) -> None:
    if subspace is None:
        comparison = compare_updates(original, repaired)
        report.rho_after = {}
    else:
        comparison = update_metrics(original, repaired, subspace)
        report.rho_after = rho(comparison)
    report.repaired_norm = comparison.norm
    report.relative_change = comparison.relative_change
    report.cosine = comparison.cosine


def refactor(
    prepared: PreparedModule, solution: FactoredUpdate, options: RepairOptions, use_rslora: bool
) -> Outcome:
    """Write `solution` back as LoRA factors (METHOD.md §4) in the adapter's dtype and layout."""
    module, report = prepared.module, prepared.report
    with one_thread():
        factors = to_lora_factors(
            solution,
            rank=module.rank if options.output_rank == "keep" else None,
            output_scaling=lambda rank: lora_scaling(module.alpha, rank, use_rslora),
        )
    # Kept until the write in the adapter's dtype, so memory does not grow with depth.
    new_b, new_a = factors.lora_b.to(prepared.dtype), factors.lora_a.to(prepared.dtype)
    written = as_factored(new_b, new_a, lora_scaling(module.alpha, factors.rank, use_rslora))
    report.action = "repaired"
    report.output_rank = factors.rank
    report.truncation_residual = factors.truncation_residual
    fill_metrics(report, prepared.original, written, prepared.data.subspace)
    return Outcome(report, *peft_orientation(module, new_b, new_a))


def check_outcomes(adapter: LoraAdapter, outcomes: list[Outcome]) -> None:
    """Refuse to report or write what was computed when it holds NaN or Inf (new factors, or
    a number in a module's row): finite inputs can still overflow in the arithmetic.
    `check` passes its rows as outcomes without factors."""
    for outcome in outcomes:
        report = outcome.report
        bad = [
            name
            for name, factor in (("lora_A", outcome.lora_a), ("lora_B", outcome.lora_b))
            if factor is not None and not is_finite(factor)
        ] + report.non_finite()
        if bad:
            keys = [m.key_b for m in adapter.modules if m.name == report.name]
            raise NonFiniteError(
                f"module {report.name!r}: NaN or Inf computed ({', '.join(bad)}) from finite "
                "inputs, an overflow; nothing is written or reported. The adapter's factors or "
                "the weights are far beyond a trained model's; check the adapter with "
                "`adapter-fix inspect`.",
                path=adapter.weights_path,
                key=keys[0] if keys else None,
            )


def peft_orientation(
    module: LoraModule, lora_b: torch.Tensor, lora_a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(lora_A, lora_B)` as the adapter stores them (embeddings hold the transposes)."""
    if module.factors_transposed:
        return lora_b.T, lora_a.T
    return lora_a, lora_b
