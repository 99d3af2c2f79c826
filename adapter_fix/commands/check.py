"""`adapter-fix check`: a CI gate on what an adapter does to the alignment, from its factors.

Per module and in total, over the module stream (BASE + ALIGNED, or a basis):

- the energy shares rho_F / rho_H / rho_O of `dW` against the safety subspace
  (METHOD.md §2);
- the alignment reversal `u = -<dW, D>_F / ||D||_F^2`: how much of the
  alignment displacement the update undoes (1: all of it; 0: none; below 0:
  it reinforces it). From a basis there is no `D`: `u` is then taken against
  `D_k = U_k S_k V_k^T`, `-tr(U_k^T dW V_k S_k) / sum(S_k^2)`, and the
  captured energy of `D_k` is reported beside it.

Totals weigh modules by their energy: `rho_O = sum ||O_m||^2 / sum ||dW_m||^2`,
`u = -sum <dW_m, D_m> / sum ||D_m||^2`. The check fails when a total, or a
module, exceeds its threshold. Nothing is written but reports.

From BASE ALIGNED ADAPTER, and when the `eval` extra is installed, the
behavioural probe (evaluate/probe.py) runs ALIGNED with the adapter on a few
dozen harmful prompts, teacher-forced: the mean drop of the refusal margin
and the share of prompts whose preferred start flips, each with a threshold.
The weight-space measures do not see what an adapter does to refusals when
it erodes them without reversing the alignment displacement (benign
fine-tuning, or a task mixed with compliance); the probe does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapter_fix.commands import ProgressBar
from adapter_fix.engine import (
    DISPLACEMENT,
    SUBSPACE,
    ModuleData,
    SubspaceSource,
    Target,
    map_modules,
    one_thread,
    subspace_source,
)
from adapter_fix.errors import SourceNotFoundError, UsageError
from adapter_fix.io.adapter import LoraAdapter, load_adapter
from adapter_fix.io.outputs import OutputSet
from adapter_fix.io.sources import HubOptions, Source, local_paths
from adapter_fix.math.solve import alignment_reversal, basis_reversal
from adapter_fix.math.subspace import Subspace
from adapter_fix.methods.base import Outcome, PreparedModule, check_outcomes, prepare
from adapter_fix.options import CheckOptions, ProbeOptions
from adapter_fix.report.formats import report_text
from adapter_fix.results import CheckResult, Clock, ModuleResult


def check(
    source: SubspaceSource,
    adapter: LoraAdapter,
    options: CheckOptions,
    *,
    on_module: Callable[[ModuleResult, int], None] | None = None,
) -> CheckResult:
    """Measure every module of `adapter` against `source` and apply the thresholds."""
    clock = Clock()
    exact = source.provides_displacement
    needs = frozenset({SUBSPACE, DISPLACEMENT}) if exact else frozenset({SUBSPACE})

    def measure(data: ModuleData) -> _Measured:
        with clock.measure("solve_s"):
            return _measure(data, options)

    rows: list[ModuleResult] = []
    update_energy = off_energy = inner = displacement_energy = captured = 0.0
    failures: list[str] = []
    # Summed in module order on this thread, so the totals are the same bytes for any workers.
    for measured in map_modules(
        [Target.of(module) for module in adapter.modules],
        source,
        needs,
        options.subspace,
        clock,
        measure,
        adapter=adapter,
        workers=options.workers,
    ):
        row = measured.row
        captured += row.captured_energy * row.displacement_norm**2
        if measured.reference is not None:
            inner -= (row.reversal or 0.0) * measured.reference
            displacement_energy += measured.reference
        update_energy += row.update_norm**2
        off_energy += row.rho_before.get("off", 0.0) * row.update_norm**2
        failures.extend(measured.failures)
        rows.append(row)
        if on_module is not None:
            on_module(row, source.weights_read())
    check_outcomes(adapter, [Outcome(row) for row in rows])
    total_reversal = -inner / displacement_energy if displacement_energy > 0 else 0.0
    total_off = off_energy / update_energy if update_energy > 0 else 0.0
    norms = sum(row.displacement_norm**2 for row in rows)
    if total_reversal > options.max_reversal:
        failures.insert(
            0, f"total reversal {total_reversal:.4f} > --max-reversal {options.max_reversal:g}"
        )
    if total_off > options.max_off_energy:
        failures.insert(
            0,
            f"total off-subspace energy {total_off:.4f} > --max-off-energy "
            f"{options.max_off_energy:g}",
        )
    return CheckResult(
        options,
        {**source.inputs, "adapter": adapter.source.identity},
        rows,
        clock.now(),
        reversal_against="D" if exact else "D_k",
        total_reversal=total_reversal,
        total_off_energy=total_off,
        total_captured_energy=captured / norms if norms > 0 else 0.0,
        failures=failures,
    )


@dataclass
class _Measured:
    """One module's row, the reference energy of its reversal (None: not measured), and the
    per-module thresholds it failed."""

    row: ModuleResult
    reference: float | None
    failures: list[str]


def _measure(data: ModuleData, options: CheckOptions) -> _Measured:
    """One module's row: shares, reversal, per-module verdict (runs on a stream worker)."""
    prepared = prepare(data)
    row = prepared.report
    reference = None
    if data.no_signal is not None:
        row.reason = f"no safety signal: {data.no_signal}"
    elif row.update_norm > 0:
        row.reversal, reference = _reversal(data.displacement, data.subspace, prepared)
    return _Measured(row, reference, _module_failures(row, options))


def _reversal(
    displacement: torch.Tensor | None, subspace: Subspace | None, prepared: PreparedModule
) -> tuple[float, float]:
    """`(u, ||D||^2)` against `D` when the stream has it, else `(u_k, sum S_k^2)` against `D_k`."""
    if displacement is not None:
        norm = prepared.data.displacement_norm
        return alignment_reversal(prepared.original, displacement, displacement_norm=norm), norm**2
    if subspace is None:
        raise ValueError(f"{prepared.module.name}: the reversal needs D or a subspace")
    with one_thread():
        return basis_reversal(prepared.original, subspace), float(
            subspace.singular_values.square().sum()
        )


def _module_failures(row: ModuleResult, options: CheckOptions) -> list[str]:
    """Mark the row pass/fail against the per-module thresholds; the reasons it failed."""
    reasons = []
    if row.reversal is not None and row.reversal > options.max_module_reversal:
        reasons.append(f"reversal {row.reversal:.4f} > {options.max_module_reversal:g}")
    off = row.rho_before.get("off")
    if off is not None and off > options.max_module_off_energy:
        reasons.append(f"off-subspace energy {off:.4f} > {options.max_module_off_energy:g}")
    row.action = "fail" if reasons else "pass"
    if reasons:
        row.reason = "; ".join(reasons)
    return [f"{row.name}: {reason}" for reason in reasons]


def run(
    sources: list[Source],
    options: CheckOptions,
    probe: ProbeOptions,
    hub: HubOptions,
    *,
    reports: Sequence[Path] = (),
    force: bool = False,
    no_probe: bool = False,
    progress: ProgressBar,
) -> CheckResult:
    """`adapter-fix check`: measure the adapter (`sources[-1]`) against a basis or BASE and
    ALIGNED, run the behavioural probe where it can, and write the reports."""
    outputs = OutputSet(reports=reports, inputs=local_paths(sources), force=force)
    outputs.check()
    lora = load_adapter(sources[-1])
    subspaces = subspace_source(sources[:-1])
    with progress(len(lora.modules)) as bar:
        result = check(subspaces, lora, options, on_module=bar.advance)
    if no_probe:
        result.probe = probe_skipped("--no-probe")
    elif len(sources) == 2:
        result.probe = probe_skipped("the probe runs ALIGNED: give BASE ALIGNED ADAPTER")
    elif not eval_extra_installed():
        result.probe = probe_skipped("the eval extra is not installed (transformers, peft)")
    else:
        from adapter_fix.commands.eval import quiet_transformers

        quiet_transformers()
        result.probe, failures = behaviour_probe(
            sources[1],
            lora,
            probe,
            device=options.subspace.device,
            hub=hub,
            required=probe.harmful is not None,
        )
        result.failures[:0] = failures  # behaviour first: it is what the gate is for
    with outputs:
        for path in outputs.reports:
            outputs.write_report(path, report_text("check", result, path))
    return result


def probe_skipped(reason: str) -> dict[str, Any]:
    """The probe's report entry when it did not run."""
    return {"skipped": reason}


def behaviour_probe(
    aligned: Source,
    adapter: LoraAdapter,
    options: ProbeOptions,
    *,
    device: str,
    hub: HubOptions,
    required: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """Run the probe (evaluate/probe.py) on ALIGNED with `adapter`; its report entry and the
    thresholds it exceeds. Needs the eval extra (callers check `eval_extra_installed`).

    When ALIGNED cannot be run (weights without a config or tokenizer) the probe is skipped
    and says why, unless `required` (the user asked for it): then the error stands.
    """
    from adapter_fix.evaluate.generate import encode_prompts, pad_id, stop_ids
    from adapter_fix.evaluate.judges import make_judge, refusals_by_prompt_ids
    from adapter_fix.evaluate.model import attach_adapters, load_model
    from adapter_fix.evaluate.probe import refusal_probe, spread
    from adapter_fix.evaluate.prompts import prompt_set

    prompts = prompt_set(options.harmful, "harmful", field=options.field, hub=hub)
    judge = make_judge(phrases=options.refusal_patterns)
    try:
        loaded = load_model(aligned, device, options.dtype)
    except (SourceNotFoundError, UsageError) as error:
        if required:
            raise
        return probe_skipped(f"ALIGNED cannot be run: {error}"), []
    except ValueError as error:
        # transformers has no causal LM class for this config (an encoder-decoder, a
        # vision-language model): the weight-space measures still apply.
        reason = f"ALIGNED is not a causal LM transformers can run ({str(error)[:160]})"
        if required:
            raise UsageError(f"the probe cannot run: {reason}.", path=aligned.identity) from None
        return probe_skipped(reason), []
    attach_adapters(loaded, [adapter.source])
    tokenizer = loaded.tokenizer
    texts = spread(prompts.texts, options.prompts)
    encoded_texts = {
        tuple(ids): text
        for ids, text in zip(encode_prompts(tokenizer, texts, options.system), texts, strict=True)
        if ids
    }
    encoded = [list(ids) for ids in encoded_texts]
    if not encoded:
        return probe_skipped("ALIGNED's tokenizer encodes every prompt to nothing"), []
    result = refusal_probe(
        loaded.model,
        encoded,
        judge_refusals=refusals_by_prompt_ids(judge, encoded_texts),
        decode=lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True)).strip(),
        pad=pad_id(tokenizer),
        stops=stop_ids(loaded.model, tokenizer),
        batch_size=options.batch_size,
    )
    entry = {
        "prompts": result.prompts,
        "origin": prompts.origin,
        "refused_by_aligned": result.refused_by_aligned,
        "margin_drop": result.margin_drop,
        "flips": result.flips,
        "flip_share": result.flip_share,
        "max_margin_drop": options.max_margin_drop,
        "max_flip_share": options.max_flip_share,
        "seconds": result.seconds,
        "margins": {"aligned": result.margins_aligned, "adapted": result.margins_adapted},
    }
    failures = []
    if result.refused_by_aligned == 0:
        entry["skipped"] = (
            "ALIGNED refuses none of the probe's prompts under this judge: nothing to measure "
            "(check --harmful and --refusal-patterns)"
        )
        return entry, failures
    if result.margin_drop > options.max_margin_drop:
        failures.append(
            f"probe: refusal margin drop {result.margin_drop:.2f} nats > --max-margin-drop "
            f"{options.max_margin_drop:g}"
        )
    if result.flip_share > options.max_flip_share:
        failures.append(
            f"probe: {result.flip_share:.0%} of prompts flip to another start > "
            f"--max-flip-share {options.max_flip_share:g}"
        )
    return entry, failures


def eval_extra_installed() -> bool:
    """Whether transformers and peft (the eval extra) can be imported."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("transformers", "peft"))
