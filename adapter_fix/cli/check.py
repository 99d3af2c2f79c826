"""`adapter-fix check`: its flags, the behavioural probe's among them; the work is
commands/check.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from adapter_fix.cli.inputs import (
    check_device,
    open_inputs,
)
from adapter_fix.cli.main import (
    EXIT_CODES_HELP,
    F,
    main,
    module_bars,
    reports_errors,
    stderr_console,
)
from adapter_fix.cli.options import (
    FiniteFloat,
    apply,
    basis_option,
    check_report_formats,
    hub_options,
    hub_settings,
    subspace_options,
    subspace_settings,
    workers_option,
)
from adapter_fix.errors import GateFailedError
from adapter_fix.options import MODEL_DTYPES, CheckOptions, ProbeOptions

DEFAULTS = CheckOptions()
PROBE = ProbeOptions()

PROBE_SETTINGS = (
    "harmful",
    "field",
    "system",
    "refusal_patterns",
    "probe_prompts",
    "batch_size",
    "dtype",
    "max_margin_drop",
    "max_flip_share",
)


def probe_options(command: F) -> F:
    """`check`'s behavioural probe: prompts, judge, batching, thresholds."""
    options = [
        click.option(
            "--no-probe",
            is_flag=True,
            help="Skip the behavioural probe (weight-space measures only).",
        ),
        click.option(
            "--harmful",
            metavar="FILE",
            help="[probe] Harmful prompts (.txt/.jsonl/.json/.csv, or "
            "hf://datasets/org/name/file); default: the shipped set.",
        ),
        click.option("--field", help="[probe] Prompt column of --harmful, when not known."),
        click.option("--system", help="[probe] System prompt for every conversation."),
        click.option(
            "--refusal-patterns",
            type=click.Path(path_type=Path),
            help="[probe] Refusal phrases, one a line, replacing the default list: only "
            "prompts ALIGNED refuses under them are probed.",
        ),
        click.option(
            "--probe-prompts",
            type=click.IntRange(min=1),
            default=PROBE.prompts,
            show_default=True,
            help="[probe] At most this many prompts, evenly spread over the file.",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=PROBE.batch_size,
            show_default=True,
            help="[probe] Prompts per forward pass (memory is one batch's).",
        ),
        click.option(
            "--dtype",
            type=click.Choice(MODEL_DTYPES),
            default=PROBE.dtype,
            show_default=True,
            help="[probe] The model's dtype: auto is float32 on CPU, the checkpoint's on GPU.",
        ),
        click.option(
            "--max-margin-drop",
            type=FiniteFloat(),
            default=PROBE.max_margin_drop,
            show_default=True,
            help="[probe] Fail when the mean refusal margin drops by more than this (nats).",
        ),
        click.option(
            "--max-flip-share",
            type=FiniteFloat(min=0, max=1),
            default=PROBE.max_flip_share,
            show_default=True,
            help="[probe] Fail when more than this share of prompts flip from ALIGNED's "
            "refusal start to another (1: never).",
        ),
    ]
    return apply(options, command)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("inputs", nargs=-1, metavar="(BASE ALIGNED | --basis BASIS) ADAPTER")
@basis_option
@subspace_options(DEFAULTS.subspace)
@workers_option
@click.option(
    "--max-reversal",
    type=FiniteFloat(),
    default=DEFAULTS.max_reversal,
    show_default=True,
    help="Fail when the total alignment reversal u exceeds this.",
)
@click.option(
    "--max-module-reversal",
    type=FiniteFloat(),
    default=DEFAULTS.max_module_reversal,
    show_default=True,
    help="Fail when one module's reversal u exceeds this.",
)
@click.option(
    "--max-off-energy",
    type=FiniteFloat(min=0, max=1),
    default=DEFAULTS.max_off_energy,
    show_default=True,
    help="Fail when the total off-subspace energy share rho_O exceeds this (1: never).",
)
@click.option(
    "--max-module-off-energy",
    type=FiniteFloat(min=0, max=1),
    default=DEFAULTS.max_module_off_energy,
    show_default=True,
    help="Fail when one module's rho_O exceeds this (1: never).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report to stdout.")
@click.option(
    "--report",
    "reports",
    type=click.Path(path_type=Path),
    multiple=True,
    help="Also write the report here: .json or .md by extension (repeatable). "
    "An existing file is replaced only with --force.",
)
@click.option("--force", is_flag=True, help="Replace existing --report files.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table.")
@probe_options
@hub_options
@reports_errors
def check(
    inputs: tuple[str, ...],
    basis: str | None,
    no_probe: bool,
    as_json: bool,
    reports: tuple[Path, ...],
    force: bool,
    quiet: bool,
    revision: str | None,
    cache_dir: Path | None,
    offline: bool,
    endpoint: str | None,
    **settings: Any,
) -> None:
    """Gate ADAPTER in CI: how much of the alignment it undoes; exit 12 past a threshold.

    Measures per module and in total, from the LoRA factors alone (never a
    dense update): the alignment reversal u = -<dW, D> / ||D||^2 and the energy
    shares rho F/H/O against the safety subspace. With --basis, only the basis
    and the adapter are read (seconds for an 8B adapter). From BASE ALIGNED
    ADAPTER, with the eval extra installed, a behavioural probe also runs
    ALIGNED with the adapter on harmful prompts (teacher-forced, a few
    seconds on a small model): the drop of the refusal margin, exit 12 past
    --max-margin-drop. The table goes to stderr, --json to stdout; with
    GITHUB_STEP_SUMMARY set, the Markdown report is appended to it.
    `adapter-fix eval` is the ground truth; check is a screen.

    \b
    Examples:
      adapter-fix check --basis org/chat-basis ./my-lora --report check.md
      adapter-fix check BASE ALIGNED ./my-lora --json | jq '.check.probe.margin_drop'
    """
    import json

    from adapter_fix.commands.check import eval_extra_installed, run
    from adapter_fix.report.check import check_markdown, render_check
    from adapter_fix.report.table import render_notes, render_warnings

    check_device(settings["device"])
    check_report_formats("check", reports)
    probe = {name: settings.pop(name) for name in PROBE_SETTINGS}
    probe["prompts"] = probe.pop("probe_prompts")
    probe_settings = ProbeOptions(**probe)
    if basis is not None and probe["harmful"] is not None:
        raise click.UsageError("--harmful is a setting of the probe, which needs BASE ALIGNED")
    options = CheckOptions(subspace=subspace_settings(settings), **settings)
    hub = hub_settings(revision, cache_dir, offline, endpoint)
    sources = open_inputs(inputs, basis, hub)
    console = stderr_console()
    if not no_probe and basis is None and eval_extra_installed():
        from adapter_fix.evaluate.model import dtype_warnings

        render_warnings(dtype_warnings(options.subspace.device, probe_settings.dtype), console)
    result = run(
        sources,
        options,
        probe_settings,
        hub,
        reports=reports,
        force=force,
        no_probe=no_probe,
        progress=module_bars(console, quiet, "check"),
    )
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with Path(summary).open("a") as handle:
            handle.write(check_markdown(result))
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, allow_nan=False))
    if not quiet:
        render_check(result, console)
    render_notes(result.modules, console)
    if not result.passed:
        raise GateFailedError(
            f"{len(result.failures)} threshold(s) exceeded: {result.failures[0]}"
            + (" (and more, see above)" if len(result.failures) > 1 else ""),
            path=sources[-1].identity,
        )
