"""The streaming repair: module by module, two weights in memory at a time.

For each LoRA module, in adapter order: read its base and aligned weights
(only those two tensors), form the displacement, find the safety subspace,
solve in factored form, keep the small results, and release the large
tensors before the next module. Peak memory is a small multiple of the
largest module; depth does not matter. Safe LoRA must see every module's
similarity before it selects, so it keeps only the small per-module
candidates (`m x r`), never a weight.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from adapter_fix import __version__
from adapter_fix.errors import IncompatibleModelsError, InvalidAdapterError, OutputError
from adapter_fix.io.adapter import (
    LoraAdapter,
    LoraModule,
    assemble_factors,
    lora_scaling,
    read_factors,
    write_adapter,
)
from adapter_fix.io.checkpoint import DTYPES, FLOAT_WEIGHT_DTYPES, Checkpoint, TensorInfo
from adapter_fix.io.keymap import StoredWeight, module_weight, read_rows
from adapter_fix.io.writer import check_output_target
from adapter_fix.math.solve import (
    Decomposition,
    FactoredUpdate,
    UpdateMetrics,
    as_factored,
    csulora,
    decompose,
    project,
    safelora_candidate,
    safelora_select,
    to_lora_factors,
    update_metrics,
)
from adapter_fix.math.subspace import Subspace, frobenius_norm, module_seed, safety_subspace

METHODS = ("csulora", "project", "safelora", "none")
REPORT_NAME = "repair_report.json"
REPORT_SCHEMA = "adapter-fix/repair-report"
REPORT_VERSION = 1


@dataclass(frozen=True)
class RepairOptions:
    """Every choice a repair makes, built once from the CLI and passed down whole."""

    method: str = "csulora"
    energy: float = 0.9
    max_rank: int = 128
    rank: int | None = None
    strength: float = 1.0
    output_rank: str = "keep"
    safelora_select: str = "number"
    safelora_layers: int = 10
    safelora_threshold: float = 0.5
    seed: int = 0
    device: str = "cpu"

    def parameters(self) -> dict[str, Any]:
        """The options that shape the result, for provenance (no device: it does not)."""
        parameters = asdict(self)
        parameters.pop("device")
        return parameters


@dataclass
class ModuleResult:
    """What the repair did to one module (METHOD.md §6)."""

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
    lora_bias: str | None = None  # lora_B's bias key: carried unchanged (not part of B A)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}


@dataclass
class Timings:
    read_s: float = 0.0
    subspace_s: float = 0.0
    solve_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0


@dataclass
class RepairResult:
    """Everything a run reports: per module, totals, timings, provenance."""

    options: RepairOptions
    inputs: dict[str, str]
    modules: list[ModuleResult]
    timings: Timings
    output: str | None = None

    def totals(self) -> dict[str, Any]:
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

    def to_json(self) -> dict[str, Any]:
        """The versioned `repair_report.json` document."""
        return {
            "schema": REPORT_SCHEMA,
            "version": REPORT_VERSION,
            "tool": {"name": "adapter-fix", "version": __version__},
            "inputs": self.inputs,
            "parameters": self.options.parameters(),
            "output": self.output,
            "modules": [m.to_json() for m in self.modules],
            "totals": self.totals(),
            "timings": asdict(self.timings),
        }


@dataclass(frozen=True)
class _SafeLoraChoice:
    """What Safe LoRA would write for a module if the global selection picks it."""

    projected_b: torch.Tensor
    report: ModuleResult


@dataclass
class _Outcome:
    """A module's report row and, when it changes, its new factors (PEFT orientation)."""

    report: ModuleResult
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    safelora: _SafeLoraChoice | None = None


class _Clock:
    """Adds the time spent in each phase to `timings`; total runs from construction."""

    def __init__(self) -> None:
        self.timings = Timings()
        self.started = time.perf_counter()
        self.running: dict[str, float] = {}

    @contextlib.contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        self.running[phase] = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - self.running.pop(phase)
            setattr(self.timings, phase, getattr(self.timings, phase) + elapsed)

    def now(self) -> Timings:
        """The timings so far, phases still running included."""
        now = time.perf_counter()
        timings = replace(self.timings, total_s=now - self.started)
        for phase, since in self.running.items():
            setattr(timings, phase, getattr(timings, phase) + now - since)
        return timings


def check_outputs(
    out: Path | None, reports: Sequence[Path], inputs: Sequence[Path], *, force: bool
) -> None:
    """Before any work: refuse outputs that overlap an input, or an OUT that may not be replaced."""
    if out is not None:
        check_output_target(out.resolve(), force=force)
    for path in [*([out] if out is not None else []), *reports]:
        check_output_path(path, inputs)


def check_output_path(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output (OUT, a report) that is or holds an input, or lies in an input folder."""
    out = out.resolve()
    for path in inputs:
        path = path.resolve()
        if out.is_relative_to(path) or path.is_relative_to(out):
            raise OutputError(
                f"this output would overlap the input {path}; adapter-fix never writes inside "
                "or over an input. Choose another path.",
                path=out,
            )


def repair(
    base: Checkpoint,
    aligned: Checkpoint,
    adapter: LoraAdapter,
    options: RepairOptions,
    *,
    out: Path | None = None,
    force: bool = False,
    on_module: Callable[[ModuleResult, int], None] | None = None,
) -> RepairResult:
    """Repair `adapter` module by module and, unless the method is `none`, write it to `out`.

    `on_module(result, weights_read)` is called after each module (progress).
    """
    if adapter.unsupported:
        feature, why = next(iter(adapter.unsupported.items()))
        raise InvalidAdapterError(
            f"the adapter uses {feature}: {why}. adapter-fix cannot repair it yet; "
            "`adapter-fix inspect` still reports it.",
            path=adapter.config_path,
            key=feature,
        )
    _check_ranks(adapter)
    clock = _Clock()
    # Every key, shape and dtype is checked from headers before any weight is read: fail fast.
    weight_keys = [_weight_keys(base, aligned, module) for module in adapter.modules]
    outcomes = []
    for module, keys in zip(adapter.modules, weight_keys, strict=True):
        outcome = _repair_module(base, aligned, adapter, module, keys, options, clock)
        outcomes.append(outcome)
        if on_module is not None:
            on_module(outcome.report, len(base.reads) + len(aligned.reads))
    if options.method == "safelora":
        _select_safelora(outcomes, options)
    inputs = {
        "base": base.source.identity,
        "aligned": aligned.source.identity,
        "adapter": adapter.source.identity,
        "adapter_sha256": _sha256(adapter.weights_path),
    }
    result = RepairResult(options, inputs, [o.report for o in outcomes], clock.timings)
    if options.method != "none" and out is not None:
        result.output = str(out.resolve())
        with clock.measure("write_s"):
            _write(adapter, outcomes, result, out, force, clock)
    result.timings = clock.now()
    return result


def _check_ranks(adapter: LoraAdapter) -> None:
    for module in adapter.modules:
        if module.rank != module.configured_rank:
            patterns = adapter.config.get("rank_pattern") or {}
            raise InvalidAdapterError(
                f"module {module.name!r} has rank {module.rank} but the config gives it "
                f"r={module.configured_rank} (rank_pattern: {patterns}); PEFT could not load "
                "it either.",
                path=adapter.config_path,
                key=module.key_a,
            )


def _weight_keys(
    base: Checkpoint, aligned: Checkpoint, module: LoraModule
) -> tuple[StoredWeight, StoredWeight]:
    """`module`'s weight as BASE and ALIGNED store it, with shapes checked (headers only)."""
    base_weight, aligned_weight = module_weight(base, module), module_weight(aligned, module)
    base_info, aligned_info = base_weight.parts[0], aligned_weight.parts[0]
    base_key, aligned_key = base_weight.key, aligned_weight.key
    if base_info.file == aligned_info.file:
        raise IncompatibleModelsError(
            "BASE and ALIGNED are the same file, so the alignment displacement is zero. "
            "BASE is the pretrained model, ALIGNED the chat model the adapter was trained on.",
            path=base_info.file,
            key=base_key,
        )
    for info in (*base_weight.parts, *aligned_weight.parts):
        _check_weight_dtype(info)
    if base_weight.shape != aligned_weight.shape:
        raise IncompatibleModelsError(
            f"BASE has shape {list(base_weight.shape)} but ALIGNED has "
            f"{list(aligned_weight.shape)} for this weight: they are not the same architecture.",
            path=aligned_info.file,
            key=aligned_key,
        )
    needed = module.shape[::-1] if base_weight.transposed else module.shape
    if base_weight.shape != needed:
        hint = (
            " The stored weight is the transpose: set fan_in_fan_out in the adapter config?"
            if base_weight.shape == needed[::-1] and module.kind != "expert"
            else ""
        )
        raise IncompatibleModelsError(
            f"the weight has shape {list(base_weight.shape)} but adapter module {module.name!r} "
            f"({module.kind}) needs {list(needed)}.{hint}",
            path=base_info.file,
            key=base_key,
        )
    return base_weight, aligned_weight


def _check_weight_dtype(info: TensorInfo) -> None:
    if info.dtype not in FLOAT_WEIGHT_DTYPES:
        raise IncompatibleModelsError(
            f"the weight is {info.dtype}, not a float16/bfloat16/float32/float64 weight: "
            "quantized checkpoints (int8, FP8 with scales) must be dequantized first.",
            path=info.file,
            key=info.key,
        )


def _read_displacement(
    base: Checkpoint,
    aligned: Checkpoint,
    module: LoraModule,
    keys: tuple[StoredWeight, StoredWeight],
) -> tuple[torch.Tensor, float, float]:
    """`D = W_a - W_b` (float32, `dW` orientation), `||W_a||_F` and `||D||_F`.

    Both weights stream in cache-sized row blocks straight into `D`, and the
    norms are taken block by block while the block is hot: the read costs what
    reading the bytes costs. NaN or Inf in either weight makes a norm
    non-finite; only then are the weights read whole, to name the one at fault.
    """
    base_weight, aligned_weight = keys
    displacement = torch.empty(aligned_weight.shape, dtype=torch.float32)
    aligned_squares = displacement_squares = 0.0
    for rows, block in read_rows(aligned, aligned_weight):
        target = displacement[rows]
        target.copy_(block)
        aligned_squares += frobenius_norm(target) ** 2
    for rows, block in read_rows(base, base_weight):
        target = displacement[rows]
        target.sub_(block)
        displacement_squares += frobenius_norm(target) ** 2
    if not (math.isfinite(aligned_squares) and math.isfinite(displacement_squares)):
        for checkpoint, weight in ((aligned, aligned_weight), (base, base_weight)):
            for key in weight.keys:
                checkpoint.read(key)  # raises NonFiniteError naming file and key
    if base_weight.transposed:
        displacement = displacement.T
    return displacement, math.sqrt(aligned_squares), math.sqrt(displacement_squares)


def _repair_module(
    base: Checkpoint,
    aligned: Checkpoint,
    adapter: LoraAdapter,
    module: LoraModule,
    keys: tuple[StoredWeight, StoredWeight],
    options: RepairOptions,
    clock: _Clock,
) -> _Outcome:
    report = ModuleResult(module.name, module.kind, module.shape, module.rank, module.scaling)
    report.lora_bias = module.bias_key
    dtype = DTYPES[module.dtype]  # metrics describe what is written: factors in this dtype
    with clock.measure("read_s"):
        displacement, aligned_norm, displacement_norm = _read_displacement(
            base, aligned, module, keys
        )
        lora_b, lora_a = read_factors(adapter, module)
    with clock.measure("subspace_s"):
        subspace = safety_subspace(
            displacement.to(options.device),
            energy=options.energy,
            max_rank=options.max_rank,
            rank=options.rank,
            seed=module_seed(options.seed, module.name),
            reference_norm=aligned_norm,
            displacement_norm=displacement_norm,
        )
        if options.device != "cpu":
            subspace = replace(
                subspace,
                left=subspace.left.cpu(),
                right=subspace.right.cpu(),
                singular_values=subspace.singular_values.cpu(),
            )
    report.subspace_rank = subspace.rank
    report.captured_energy = subspace.captured_energy
    report.subspace_method = subspace.method
    report.displacement_norm = subspace.displacement_norm
    with clock.measure("solve_s"):
        candidate = None
        if options.method == "safelora" and subspace.has_signal:
            candidate = safelora_candidate(lora_b, lora_a, displacement)
        del displacement
        decomposition = decompose(lora_b, lora_a, module.scaling, subspace)
        original = FactoredUpdate(decomposition.lora_b, decomposition.lora_a, module.scaling)
        report.update_norm = decomposition.update_norm
        report.rho_before = _rho(decomposition)
        report.rho_after = dict(report.rho_before)
        report.repaired_norm = decomposition.update_norm
        report.output_rank = module.rank
        if not subspace.has_signal:
            report.reason = f"no safety signal: {subspace.no_signal_reason}"
            return _Outcome(report)
        if decomposition.update_norm == 0.0:
            report.reason = "the update is zero"
            return _Outcome(report)
        if options.method == "none":
            report.action = "analysed"
            return _Outcome(report)
        if candidate is not None:
            projected_b = candidate.projected_b.to(dtype)
            projected = as_factored(projected_b, lora_a, module.scaling)
            selected = replace(report, action="repaired", safelora_similarity=candidate.similarity)
            _fill_metrics(selected, original, projected, subspace)
            report.safelora_similarity = candidate.similarity
            report.reason = f"Safe LoRA similarity {candidate.similarity:.5f}, not selected"
            return _Outcome(report, safelora=_SafeLoraChoice(projected_b, selected))
        if options.method == "project":
            solution = project(decomposition)
        else:
            solution, a_partial, a_off = csulora(decomposition, options.strength)
            report.attenuation = {"partial": a_partial, "off": a_off}
            if a_partial == a_off == 1.0:
                report.reason = "attenuation is 1 (strength 0): the update is kept as it is"
                return _Outcome(report)
        factors = to_lora_factors(
            solution,
            rank=module.rank if options.output_rank == "keep" else None,
            output_scaling=lambda rank: lora_scaling(module.alpha, rank, adapter.use_rslora),
        )
        written = as_factored(
            factors.lora_b.to(dtype),
            factors.lora_a.to(dtype),
            lora_scaling(module.alpha, factors.rank, adapter.use_rslora),
        )
        report.action = "repaired"
        report.output_rank = factors.rank
        report.truncation_residual = factors.truncation_residual
        _fill_metrics(report, original, written, subspace)
        # Kept until the write: in the adapter's dtype, so memory does not grow with depth.
        new_b, new_a = factors.lora_b.to(dtype), factors.lora_a.to(dtype)
        if module.factors_transposed:
            new_b, new_a = new_a.T, new_b.T
        return _Outcome(report, lora_a=new_a, lora_b=new_b)


def _rho(shares: Decomposition | UpdateMetrics) -> dict[str, float]:
    return {"full": shares.rho_full, "partial": shares.rho_partial, "off": shares.rho_off}


def _fill_metrics(
    report: ModuleResult, original: FactoredUpdate, repaired: FactoredUpdate, subspace: Subspace
) -> None:
    metrics = update_metrics(original, repaired, subspace)
    report.repaired_norm = metrics.norm
    report.relative_change = metrics.relative_change
    report.cosine = metrics.cosine
    report.rho_after = _rho(metrics)


def _select_safelora(outcomes: list[_Outcome], options: RepairOptions) -> None:
    """Safe LoRA's global selection; selected modules get `B <- C B`, `A` unchanged."""
    similarities = {
        o.report.name: o.safelora.report.safelora_similarity
        for o in outcomes
        if o.safelora is not None and o.safelora.report.safelora_similarity is not None
    }
    chosen = safelora_select(
        similarities,
        select=options.safelora_select,
        number=options.safelora_layers,
        threshold=options.safelora_threshold,
    )
    for outcome in outcomes:
        if outcome.safelora is None or outcome.report.name not in chosen:
            continue
        projected_b, selected = outcome.safelora.projected_b, outcome.safelora.report
        outcome.report = selected
        outcome.report.reason = f"Safe LoRA similarity {selected.safelora_similarity:.5f}, selected"
        outcome.lora_b, outcome.lora_a = projected_b, None
        if outcome.report.kind == "embedding":
            outcome.lora_b, outcome.lora_a = None, projected_b.T


def _write(
    adapter: LoraAdapter,
    outcomes: list[_Outcome],
    result: RepairResult,
    out: Path,
    force: bool,
    clock: _Clock,
) -> None:
    """Write OUT: the new factors, exact-rank patterns, provenance metadata, the report."""
    replacements, ranks = assemble_factors(
        adapter, {o.report.name: (o.lora_a, o.lora_b, o.report.output_rank) for o in outcomes}
    )
    metadata = {
        **adapter.weights.header(adapter.weights_path.name).metadata,
        "adapter_fix.version": __version__,
        "adapter_fix.method": result.options.method,
        "adapter_fix.parameters": json.dumps(result.options.parameters(), sort_keys=True),
        "adapter_fix.adapter_sha256": result.inputs["adapter_sha256"],
        "adapter_fix.base": result.inputs["base"],
        "adapter_fix.aligned": result.inputs["aligned"],
    }

    def report() -> str:
        result.timings = clock.now()
        return json.dumps(result.to_json(), indent=2) + "\n"

    write_adapter(
        adapter,
        out,
        replacements=replacements,
        ranks=ranks,
        metadata=metadata,
        extra_files={REPORT_NAME: report},
        force=force,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
