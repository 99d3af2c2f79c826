"""`adapter-fix repair`: the module stream, one method per module, then the adapter written.

The stream (adapter_fix/engine.py) reads each module's factors and its
base/aligned weights (or its stored basis), one module ahead; the method
(adapter_fix/methods/) solves it on the stream's worker, `--workers` modules
at once; only the small new factors are kept until the write. Peak memory is a small multiple of the
largest module whatever the depth. Safe LoRA must see every module's
similarity before it selects, so it keeps only small per-module candidates
(`m x r`), never a weight.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapter_fix import __version__
from adapter_fix.commands import ProgressBar
from adapter_fix.commands.inspect import factor_warnings
from adapter_fix.engine import ModuleData, SubspaceSource, Target, map_modules, subspace_source
from adapter_fix.errors import InvalidAdapterError, UsageError
from adapter_fix.evaluate.generate import encode_prompts, pad_id, reference_ids, stop_ids
from adapter_fix.evaluate.judges import Judge, refusals_by_prompt_ids
from adapter_fix.evaluate.model import attach_adapters, available_memory, batch_fits, load_model
from adapter_fix.evaluate.prompts import PromptSet, Role, load_prompt_set, prompt_set
from adapter_fix.evaluate.split import split_prompts
from adapter_fix.io.adapter import LoraAdapter, load_adapter
from adapter_fix.io.adapter_writer import assemble_factors, write_adapter
from adapter_fix.io.checkpoint import DTYPES
from adapter_fix.io.outputs import OutputSet
from adapter_fix.io.sources import HubOptions, Source, local_paths
from adapter_fix.methods import method_class
from adapter_fix.methods.base import Outcome, check_outcomes
from adapter_fix.methods.gate import (
    Calibration,
    GatedModel,
    GateOptions,
    GateOutcome,
    Round,
    check_memory,
    descent_settings,
    gate_repair,
    gate_results,
    gateable,
)
from adapter_fix.options import RepairOptions
from adapter_fix.report.formats import report_text
from adapter_fix.results import Clock, ModuleResult, RepairResult

if TYPE_CHECKING:
    from rich.console import Console

REPORT_NAME = "repair_report.json"


def check_repairable(adapter: LoraAdapter) -> None:
    """Refuse adapters PEFT could not load or that use a feature the repair cannot handle."""
    if adapter.unsupported:
        feature, why = next(iter(adapter.unsupported.items()))
        raise InvalidAdapterError(
            f"the adapter uses {feature}: {why}. adapter-fix cannot repair it yet; "
            "`adapter-fix inspect` still reports it.",
            path=adapter.config_path,
            key=feature,
        )
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


def repair(
    source: SubspaceSource,
    adapter: LoraAdapter,
    options: RepairOptions,
    *,
    out: Path | None = None,
    force: bool = False,
    on_module: Callable[[ModuleResult, int], None] | None = None,
    read_ahead: bool = True,
) -> RepairResult:
    """Repair `adapter` module by module and, unless the method is `none`, write it to `out`.

    `source` gives the displacements and subspaces (BASE + ALIGNED, or a basis).
    `on_module(result, weights_read)` is called after each module (progress).
    """
    check_repairable(adapter)
    clock = Clock()
    method = method_class(options.method)(options, adapter)

    def solve(data: ModuleData) -> Outcome:
        with clock.measure("solve_s"):
            return method.run(data)

    outcomes = []
    for outcome in map_modules(
        [Target.of(module) for module in adapter.modules],
        source,
        method.needs,
        options.subspace,
        clock,
        solve,
        adapter=adapter,
        read_ahead=read_ahead,
        workers=options.workers,
    ):
        outcomes.append(outcome)
        if on_module is not None:
            on_module(outcome.report, source.weights_read())
    with clock.measure("solve_s"):
        method.finish(outcomes)
    inputs = {
        **source.inputs,
        "adapter": adapter.source.identity,
        "adapter_sha256": _sha256(adapter.weights_path),
    }
    result = RepairResult(options, inputs, [o.report for o in outcomes], clock.timings)
    return _finish(result, adapter, outcomes, out if method.writes else None, force, clock)


def _finish(
    result: RepairResult,
    adapter: LoraAdapter,
    outcomes: list[Outcome],
    out: Path | None,
    force: bool,
    clock: Clock,
) -> RepairResult:
    """Write OUT when there is one, and close the timings."""
    check_outcomes(adapter, outcomes)
    if out is not None:
        result.output = str(out.resolve())
        with clock.measure("write_s"):
            _write(adapter, outcomes, result, out, force, clock)
    result.timings = clock.now()
    return result


def _write(
    adapter: LoraAdapter,
    outcomes: list[Outcome],
    result: RepairResult,
    out: Path,
    force: bool,
    clock: Clock,
) -> None:
    """Write OUT: the new factors, exact-rank patterns, provenance metadata, the report."""
    replacements, ranks = assemble_factors(
        adapter, {o.report.name: (o.lora_a, o.lora_b, o.report.output_rank) for o in outcomes}
    )
    metadata = {
        **adapter.weights.header(adapter.weights_path.name).metadata,
        "adapter_fix.version": __version__,
        "adapter_fix.method": result.options.method,
        "adapter_fix.parameters": json.dumps(result.parameters(), sort_keys=True),
        "adapter_fix.adapter_sha256": result.inputs["adapter_sha256"],
    }
    for name in ("base", "aligned", "basis"):
        if name in result.inputs:
            metadata[f"adapter_fix.{name}"] = result.inputs[name]

    def report() -> str:
        result.timings = clock.now()
        return json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n"

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


@dataclass
class RepairRun:
    """What `run` did: the result, the report files it wrote, the adapter's own warnings."""

    result: RepairResult
    reports: list[Path]
    warnings: list[str]


def run(
    sources: list[Source],
    options: RepairOptions,
    gate: dict[str, Any],
    hub: HubOptions,
    *,
    out: Path | None,
    reports: Sequence[Path] = (),
    force: bool = False,
    progress: ProgressBar,
    console: Console | None = None,
) -> RepairRun:
    """`adapter-fix repair`: the adapter (`sources[-1]`) repaired against a basis or BASE and
    ALIGNED (`--method gate`: by `commands.gate`, its rounds printed on `console`), written
    to `out` with the reports."""
    outputs = OutputSet(
        folder=out if options.method != "none" else None,
        reports=reports,
        inputs=local_paths(sources),
        force=force,
        folder_files=(REPORT_NAME,),
    )
    outputs.check()
    lora = load_adapter(sources[-1])
    with outputs:
        if options.method == "gate":
            from adapter_fix.commands.gate import repair_with_gates

            result = repair_with_gates(
                sources, lora, options, gate, hub, outputs.folder, force, console
            )
        else:
            with progress(len(lora.modules)) as bar:
                result = repair(
                    subspace_source(sources[:-1]),
                    lora,
                    options,
                    out=outputs.folder,
                    force=force,
                    on_module=bar.advance,
                )
        for path in outputs.reports:
            outputs.write_report(path, report_text("repair", result, path))
    return RepairRun(result, outputs.reports, factor_warnings(lora))


@dataclass(frozen=True)
class CalibrationSets:
    """The prompts the gated repair calibrates on (already split from what `eval` reports on)."""

    harmful: PromptSet
    benign: PromptSet
    task: PromptSet | None = None
    system: str | None = None
    share: dict[str, float] | None = None
    """Per role, the share of its prompt set calibrated on (picked by hashing with the seed)."""
    harmful_limit: int | None = None
    """At most this many harmful prompts of the share are used (the first in the split's
    order); the rest are neither calibrated on nor reported by `eval`."""
    task_limit: int | None = None
    """Likewise for the task prompts (or the benign ones, without a task set)."""


def calibration_sets(
    *,
    harmful: str | None,
    benign: str | None,
    task: str | None,
    field: str | None,
    system: str | None,
    share: float | None,
    seed: int,
    hub: HubOptions,
    harmful_limit: int | None = None,
    task_limit: int | None = None,
) -> CalibrationSets:
    """The calibration part of each prompt set (the shipped sets where none is given).

    `split_prompts` picks it by hashing each prompt with `seed`, so `eval`
    with the same share and seed reports on exactly the prompts left out.
    Without a `share`: all of a file the user gives (a calibration set), half
    of a shipped set (the other half is `eval --skip-calibration-share 0.5`'s).
    """
    shares: dict[str, float] = {}

    def part(prompts: PromptSet, role: Role, given: bool) -> PromptSet:
        shares[role] = share if share is not None else (1.0 if given else 0.5)
        calibration, _held_out = split_prompts(prompts, shares[role], seed)
        if not calibration.prompts:
            raise UsageError(
                f"no {role} prompt falls in the calibration share {shares[role]:g} (of "
                f"{len(prompts)}): raise --calibration-share or give more prompts.",
                path=prompts.origin,
            )
        return calibration

    task_set = (
        part(load_prompt_set(task, "task", field=field, hub=hub), "task", True)
        if task is not None
        else None
    )
    if task_set is not None and task_set.references is None:
        missing = next(p for p in task_set.prompts if p.reference is None)
        raise UsageError(
            f"the task prompts need a `reference` answer on every row (row {missing.row} has "
            "none): the gated repair measures the task against them. Without references, "
            "leave --task out (the task term is then the KL to the adapter's own outputs).",
            path=task_set.origin,
        )
    return CalibrationSets(
        harmful=part(
            prompt_set(harmful, "harmful", field=field, hub=hub), "harmful", bool(harmful)
        ),
        benign=part(prompt_set(benign, "benign", field=field, hub=hub), "benign", bool(benign)),
        task=task_set,
        system=system,
        share=shares,
        harmful_limit=harmful_limit,
        task_limit=task_limit,
    )


def _first(prompts: PromptSet, limit: int | None) -> PromptSet:
    """The first `limit` prompts of a set (all without a limit)."""
    if limit is None or len(prompts) <= limit:
        return prompts
    return replace(prompts, prompts=prompts.prompts[:limit])


def repair_gated(
    aligned: Source,
    adapter: LoraAdapter,
    options: RepairOptions,
    gate_options: GateOptions,
    calibration: CalibrationSets,
    judge: Judge,
    *,
    out: Path | None,
    force: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    inputs: dict[str, str] | None = None,
    on_round: Callable[[Round], None] | None = None,
) -> RepairResult:
    """The gated repair (METHOD.md §8.4): ALIGNED runs once with the adapter; gates are chosen
    by attribution and measurement on the calibration prompts; the gated adapter is written."""
    check_repairable(adapter)
    if not gateable(adapter):
        raise UsageError(
            "the adapter has no LoRA linear layer to gate (embedding LoRA and "
            "target_parameters are not gated): use a subspace method (--method csulora).",
            path=adapter.config_path,
        )
    clock = Clock()
    with clock.measure("read_s"):
        loaded = load_model(aligned, device, dtype)
        attach_adapters(loaded, [adapter.source])
    tokenizer = loaded.tokenizer
    system = calibration.system
    calibration = replace(
        calibration,
        harmful=_first(calibration.harmful, calibration.harmful_limit),
        benign=_first(calibration.benign, calibration.task_limit),
        task=_first(calibration.task, calibration.task_limit) if calibration.task else None,
    )
    task = calibration.task
    references = task.references if task is not None else None
    stops = stop_ids(loaded.model, tokenizer)
    data = Calibration(
        harmful=encode_prompts(tokenizer, calibration.harmful.texts, system),
        benign=encode_prompts(tokenizer, calibration.benign.texts, system),
        task=encode_prompts(tokenizer, task.texts, system) if references else [],
        # A reference ends where the answer ends: the end-of-sequence token is part of it.
        task_references=[reference_ids(tokenizer, r, stops) for r in references or []],
    )
    check_memory(loaded.model, data, gate_options, available_memory(loaded.device))
    texts = {  # the judge reads the prompts asked: harmful ones, and benign ones (descent)
        tuple(ids): text
        for encoded, given in (
            (data.harmful, calibration.harmful),
            (data.benign, calibration.benign),
        )
        for ids, text in zip(encoded, given.texts, strict=True)
    }
    with clock.measure("solve_s"), batch_fits(gate_options.batch_size, loaded.device):
        gated = GatedModel(
            loaded.model,
            gateable(adapter),
            gate_options.unit,
            saved_dtypes={module.name: DTYPES[module.dtype] for module in adapter.modules},
        )
        outcome = gate_repair(
            gated,
            data,
            gate_options,
            judge_refusals=refusals_by_prompt_ids(judge, texts),
            decode=lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True)).strip(),
            pad_id=pad_id(tokenizer),
            stop_ids=stops,
            on_round=on_round,
        )
        outcomes = gate_results(adapter, gated, outcome)
    result = RepairResult(
        options,
        {
            **(inputs or {}),
            "aligned": aligned.identity,
            "adapter": adapter.source.identity,
            "adapter_sha256": _sha256(adapter.weights_path),
        },
        [o.report for o in outcomes],
        clock.timings,
        calibration=_calibration_report(calibration, gate_options, outcome, judge),
    )
    return _finish(result, adapter, outcomes, out, force, clock)


def _calibration_report(
    calibration: CalibrationSets, options: GateOptions, outcome: GateOutcome, judge: Judge
) -> dict[str, Any]:
    task = calibration.task
    return {
        # `search`: what ran; `search_requested`: what reached the run, `auto` where the run
        # chose (the CLI resolves auto itself when --task is missing or a search's own
        # setting is given).
        "options": {
            **asdict(options),
            "search": outcome.search,
            "search_requested": options.search,
        },
        "share": calibration.share,
        "prompts": {
            "harmful": len(calibration.harmful),
            "benign": len(calibration.benign),
            "task": len(task) if task is not None and task.references else 0,
        },
        "origins": {
            "harmful": calibration.harmful.origin,
            "benign": calibration.benign.origin,
            "task": task.origin if task is not None else None,
        },
        "task_objective": outcome.task_objective,
        "task_set_missing": task is None or not task.references,
        "aligned_refusal_rate": outcome.aligned_refusal_rate,
        "refused_by_aligned": outcome.refused_by_aligned,
        "original_refusal_rate": outcome.original_refusal_rate,
        "refusal_rate": outcome.refusal_rate,
        "task_loss": {
            "adapter": outcome.task_loss_adapter,
            "without_update": outcome.task_loss_without_update,
            "first_order_budget": outcome.task_budget,
        },
        "task_score": {
            "adapter": outcome.task_score_adapter,
            "without_update": outcome.task_score_without_update,
            "kept": outcome.task_kept,
        },
        "descent": (
            {
                **descent_settings(options),
                "separated_layers": outcome.separated_layers,
                "benign_answers_kept": outcome.benign_answers_kept,
            }
            if outcome.search == "descent"
            else None
        ),
        "target_refusal_rate": options.target_refusal,
        "target_met": outcome.target_met,
        "stop_reason": outcome.stop_reason,
        "rounds": [
            {**asdict(round_), "share_of_time": round_.seconds / max(outcome.seconds, 1e-9)}
            for round_ in outcome.rounds
        ],
        "seconds": outcome.seconds,
        "setup_seconds": outcome.setup_seconds,
        "judge": {"name": judge.name, **judge.describe()},
    }
