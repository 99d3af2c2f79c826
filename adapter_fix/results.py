"""What each command returns: per-module rows, timings, totals, and each command's result.

Every command over the module stream (adapter_fix/engine.py) fills one
`ModuleResult` per module and one `Timings`; `RunResult` adds provenance and
the totals every report shows, and `RepairResult`, `CheckResult` and
`BasisResult` what each command adds; `InspectResult` is inspect's. The
report package renders them; nothing here formats, and nothing here imports
torch or a command.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from adapter_fix import __version__
from adapter_fix.options import BasisOptions, CheckOptions, RepairOptions


@dataclass
class ModuleResult:
    """What a command found or did for one module (METHOD.md §6).

    `rho_before` / `rho_after` are empty when no subspace was computed (Safe
    LoRA from weights runs no SVD); `reversal` is set by `check` only.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    rank: int
    scaling: float
    action: str = "unchanged"
    reason: str | None = None
    subspace_rank: int = 0
    captured_energy: float = 0.0
    subspace_method: str | None = None
    displacement_norm: float = 0.0
    update_norm: float = 0.0
    rho_before: dict[str, float] = field(default_factory=dict)
    rho_after: dict[str, float] = field(default_factory=dict)
    attenuation: dict[str, float] | None = None
    repaired_norm: float = 0.0
    relative_change: float = 0.0
    cosine: float = 1.0
    truncation_residual: float = 0.0
    output_rank: int = 0
    safelora_similarity: float | None = None
    reversal: float | None = None
    note: str | None = None
    """What the source could not give as asked (a basis short of the requested energy)."""
    lora_bias: str | None = None  # lora_B's bias key: carried unchanged (not part of B A)
    gate: list[float] | None = None
    """The gated repair's gate values (one, or one per rank-1 component)."""
    attribution: dict[str, list[float]] | None = None
    """The gated repair's integrated gradients per gate: `margin` (IG of mu), `task` (IG of tau)."""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}

    def non_finite(self) -> list[str]:
        """The fields holding a NaN or Inf (a number, or one inside a dict or list)."""

        def numbers(value: Any) -> list[float]:
            if isinstance(value, dict):
                return [number for item in value.values() for number in numbers(item)]
            if isinstance(value, list | tuple):
                return [number for item in value for number in numbers(item)]
            return [value] if isinstance(value, float) else []

        return [
            name
            for name, value in asdict(self).items()
            if not all(math.isfinite(number) for number in numbers(value))
        ]


@dataclass
class Timings:
    """Seconds per phase, summed over the stream's threads (engine.map_modules): with several
    workers a phase can exceed `total_s`, the wall time. With one worker, reading runs ahead
    beside the other phases: `read_s` is the reading itself, `read_wait_s` the part the
    worker waited for."""

    read_s: float = 0.0
    read_wait_s: float = 0.0
    subspace_s: float = 0.0
    solve_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0


class Clock:
    """Adds the time spent in each phase to `timings` (thread-safe: reads run on a
    background thread); the total runs from construction."""

    def __init__(self) -> None:
        self.timings = Timings()
        self.started = time.perf_counter()
        self._lock = threading.Lock()

    @contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                setattr(self.timings, phase, getattr(self.timings, phase) + elapsed)

    def now(self) -> Timings:
        """The timings so far, with the total up to now."""
        with self._lock:
            return replace(self.timings, total_s=time.perf_counter() - self.started)


class RunResult:
    """Rows, timings and provenance of one run of a command over the module stream.

    Each command's result is a dataclass deriving from this with at least these
    three fields (in the order its own constructor wants them).
    """

    inputs: dict[str, str]
    modules: list[ModuleResult]
    timings: Timings

    def totals(self) -> dict[str, Any]:
        """Counts per action, energy kept `sum ||X||^2 / sum ||dW||^2`, modules changed most."""
        before = sum(m.update_norm**2 for m in self.modules)
        after = sum(m.repaired_norm**2 for m in self.modules)
        counts: dict[str, int] = {}
        for module in self.modules:
            counts[module.action] = counts.get(module.action, 0) + 1
        changed = sorted(self.modules, key=lambda m: m.relative_change, reverse=True)
        return {
            "modules": len(self.modules),
            "actions": counts,
            "energy_kept": after / before if before > 0 else 1.0,
            "changed_most": [
                {"name": m.name, "relative_change": m.relative_change}
                for m in changed[:5]
                if m.relative_change > 0
            ],
        }

    def document(self, schema: str, version: int, parameters: dict[str, Any]) -> dict[str, Any]:
        """The JSON report every command writes: a versioned schema, provenance, rows, totals."""
        return {
            "schema": schema,
            "version": version,
            "tool": {"name": "adapter-fix", "version": __version__},
            "inputs": self.inputs,
            "parameters": parameters,
            "modules": [m.to_json() for m in self.modules],
            "totals": self.totals(),
            "timings": asdict(self.timings),
        }


INSPECT_SCHEMA = "adapter-fix/inspect"
INSPECT_SCHEMA_VERSION = 1
REPAIR_REPORT_SCHEMA = "adapter-fix/repair-report"
REPAIR_REPORT_VERSION = 1
CHECK_REPORT_SCHEMA = "adapter-fix/check-report"
CHECK_REPORT_VERSION = 1
BASIS_REPORT_SCHEMA = "adapter-fix/basis-report"
BASIS_REPORT_VERSION = 1


@dataclass
class RepairResult(RunResult):
    """Everything a repair reports: per module, totals, timings, provenance, the output."""

    options: RepairOptions
    inputs: dict[str, str]
    modules: list[ModuleResult]
    timings: Timings
    output: str | None = None
    calibration: dict[str, Any] | None = None
    """The gated repair's calibration: prompt counts, objectives, every round, the stop."""

    def parameters(self) -> dict[str, Any]:
        """The settings that shaped the result (the gated repair's own, for `gate`)."""
        if self.calibration is None:
            return self.options.parameters()
        return {
            "method": self.options.method,
            "seed": self.options.subspace.seed,
            "calibration_share": self.calibration["share"],
            **self.calibration["options"],
            **({"descent": descent} if (descent := self.calibration.get("descent")) else {}),
            "prompts": self.calibration["origins"],
        }

    def to_json(self) -> dict[str, Any]:
        """The versioned `repair_report.json` document."""
        document = self.document(REPAIR_REPORT_SCHEMA, REPAIR_REPORT_VERSION, self.parameters())
        if self.calibration is not None:
            document["calibration"] = self.calibration
        return {**document, "output": self.output}


@dataclass
class CheckResult(RunResult):
    """Rows, totals and the verdict of one check."""

    options: CheckOptions
    inputs: dict[str, str]
    modules: list[ModuleResult]
    timings: Timings
    reversal_against: str
    """`"D"` (exact, from BASE + ALIGNED) or `"D_k"` (within a basis)."""
    total_reversal: float
    total_off_energy: float
    total_captured_energy: float
    """`sum ||D_k||^2 / sum ||D||^2` over the modules (what the basis reversal sees)."""
    failures: list[str]
    probe: dict[str, Any] | None = None
    """The behavioural probe's figures, or why it did not run (`skipped`)."""

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        document = self.document(
            CHECK_REPORT_SCHEMA, CHECK_REPORT_VERSION, self.options.parameters()
        )
        document["check"] = {
            "passed": self.passed,
            "failures": self.failures,
            "reversal_against": self.reversal_against,
            "total_reversal": self.total_reversal,
            "total_off_energy": self.total_off_energy,
            "total_captured_energy": self.total_captured_energy,
            "probe": self.probe,
        }
        return document


@dataclass
class BasisResult(RunResult):
    options: BasisOptions
    inputs: dict[str, str]
    modules: list[ModuleResult]
    timings: Timings
    output: str | None = None

    def to_json(self) -> dict[str, Any]:
        document = self.document(
            BASIS_REPORT_SCHEMA, BASIS_REPORT_VERSION, self.options.parameters()
        )
        return {**document, "output": self.output}


@dataclass(frozen=True)
class ModuleSummary:
    """One LoRA module as inspect reports it; `update_norm` is `||s B A||_F`."""

    name: str
    kind: str
    shape: tuple[int, int]
    rank: int
    alpha: float
    scaling: float
    dtype: str
    update_norm: float | None  # None when a factor holds NaN or Inf
    effective_rank: float | None
    finite: bool
    """The factors hold no NaN or Inf, and the update `s B A` they make stays within the
    adapter dtype's range (its largest singular value is below the largest finite value)."""
    target: str = ""  # the weight it updates, as the model names it at run time
    expert: int | None = None  # for `target_parameters` LoRA on 3-D expert weights
    num_experts: int = 1
    lora_bias: str | None = None  # lora_B's bias key (`lora_bias=True`)


@dataclass(frozen=True)
class InspectResult:
    summary: dict[str, Any]
    modules: list[ModuleSummary]
    warnings: list[str]

    def to_json(self) -> dict[str, Any]:
        """The versioned JSON document `inspect --json` prints."""
        return {
            "schema": INSPECT_SCHEMA,
            "version": INSPECT_SCHEMA_VERSION,
            "tool": {"name": "adapter-fix", "version": __version__},
            "adapter": self.summary,
            "modules": [{**asdict(module), "shape": list(module.shape)} for module in self.modules],
            "warnings": self.warnings,
        }
