"""`adapter-fix repair`: its flags, the gated repair's among them; the work is
commands/repair.py (and commands/gate.py for `--method gate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapter_fix.cli.inputs import check_device, open_inputs
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
    prompt_set_options,
    subspace_options,
    subspace_settings,
    workers_option,
)
from adapter_fix.methods import METHODS
from adapter_fix.options import (
    DESCENT_CHECK_EVERY,
    DESCENT_OVER_REFUSAL_SLACK,
    DESCENT_PRESETS,
    DESCENT_STARTS,
    GATE_SEARCHES,
    GATE_UNITS,
    MODEL_DTYPES,
    OUTPUT_RANKS,
    SAFELORA_SELECTS,
    CalibrationOptions,
    GateOptions,
    RepairOptions,
)

DEFAULTS = RepairOptions()
GATE = GateOptions()
CALIBRATION = CalibrationOptions()

GATE_SETTINGS = (
    "harmful",
    "benign",
    "task",
    "field",
    "system",
    "refusal_patterns",
    "calibration_share",
    "calibration_harmful",
    "calibration_task",
    "target_refusal",
    "task_budget",
    "gate_unit",
    "rounds",
    "ig_steps",
    "margin_tokens",
    "min_harm_share",
    "refine",
    "search",
    "descent_steps",
    "descent_start",
    "calibration_tokens",
    "batch_size",
    "dtype",
)
ORDER_SETTINGS = ("rounds", "ig_steps", "margin_tokens", "min_harm_share", "refine")
"""The settings of `--search order` alone."""
DESCENT_SETTINGS = ("descent_steps", "descent_start")
"""The settings of `--search descent` alone: either asks `--search auto` for descent."""


def _flag(setting: str) -> str:
    """The command-line flag of a gate setting: `descent_steps` is `--descent-steps`."""
    return "--" + setting.replace("_", "-")


def gate_options(command: F) -> F:
    """The gated repair's calibration data and settings (`--method gate` only)."""
    options = [
        click.option(
            "--calibration-share",
            type=FiniteFloat(min=0, max=1, min_open=True),
            default=CALIBRATION.share,
            help="[gate] Calibrate on this share of each prompt set, picked by hashing each "
            "prompt with --seed; `eval --skip-calibration-share` with the same share and seed "
            "reports on the rest. Default: every prompt of a file you give (your calibration "
            "set: evaluate on other prompts), half of a shipped set.",
        ),
        click.option(
            "--calibration-harmful",
            type=click.IntRange(min=1),
            default=CALIBRATION.harmful,
            show_default=True,
            help="[gate] At most this many harmful prompts of the share (cost grows with it).",
        ),
        click.option(
            "--calibration-task",
            type=click.IntRange(min=1),
            default=CALIBRATION.task,
            show_default=True,
            help="[gate] At most this many task prompts of the share (benign ones without --task).",
        ),
        click.option(
            "--target-refusal",
            type=FiniteFloat(min=0, max=1, min_open=True),
            default=GATE.target_refusal,
            show_default=True,
            help="[gate] The order search stops once this share of the calibration prompts "
            "ALIGNED refuses are refused again; the descent runs only when the adapter refuses "
            "fewer (it then runs its --descent-steps).",
        ),
        click.option(
            "--task-budget",
            type=FiniteFloat(min=0, max=1),
            default=GATE.task_budget,
            show_default=True,
            help="[gate] Share of the adapter's task skill the repair may give up: no round "
            "leaves less than 1 - this of the calibration task score (measured).",
        ),
        click.option(
            "--gate-unit",
            type=click.Choice(GATE_UNITS),
            default=GATE.unit,
            show_default=True,
            help="[gate] What one gate switches: a module's whole update, or one rank-1 "
            "component of it (finer: keeps more of the task at the same refusal rate).",
        ),
        click.option(
            "--rounds",
            type=click.IntRange(min=1, max=100),
            default=GATE.rounds,
            show_default=True,
            help="[gate] Rounds of attribution, selection and measurement.",
        ),
        click.option(
            "--ig-steps",
            type=click.IntRange(min=1, max=64),
            default=GATE.steps,
            show_default=True,
            help="[gate] Integrated-gradient steps per attribution.",
        ),
        click.option(
            "--margin-tokens",
            type=click.IntRange(min=1),
            default=GATE.margin_tokens,
            show_default=True,
            help="[gate] Tokens of the refusal margin, counted from where ALIGNED's refusal "
            "and the adapted model's answer first differ.",
        ),
        click.option(
            "--min-harm-share",
            type=FiniteFloat(min=0, max=1),
            default=GATE.min_harm_share,
            show_default=True,
            help="[gate] Never switch off a unit whose harm is below this share of the total.",
        ),
        click.option(
            "--refine",
            is_flag=True,
            default=GATE.refine,
            help="[gate] Coarse to fine: once the target is met, give task back inside the "
            "modules switched off, rank-1 component by component, while refusals hold.",
        ),
        click.option(
            "--search",
            type=click.Choice(GATE_SEARCHES),
            default="auto",
            show_default=True,
            help="[gate] descent: gradient steps on every gate at once (see "
            "--descent-start), against a stress-tested task term (needs --task); "
            "order: rounds that switch units off in attribution order, measured by "
            "bisection; auto: descent with --task, order without it or when one of the "
            "order search's settings (--rounds, --ig-steps, --margin-tokens, "
            "--min-harm-share, --refine) is given; --descent-steps or --descent-start "
            "asks for descent. "
            "With --task, auto runs order after all when the adapter's exact match on the "
            "references is no better than ALIGNED's (descent's guard needs that gain).",
        ),
        click.option(
            "--descent-steps",
            type=click.IntRange(min=1, max=1000),
            default=GATE.descent_steps,
            help=f"[gate] Steps of --search descent, measured every {DESCENT_CHECK_EVERY} "
            "and after the last; the checkpoint refusing most within the task budget, and "
            f"over-refusing at most {DESCENT_OVER_REFUSAL_SLACK * 100:g} points more than "
            "ALIGNED on the benign prompts the adapter answers, is kept. [default: "
            + ", ".join(f"{p.steps} from {p.name}" for p in DESCENT_PRESETS.values())
            + "]",
        ),
        click.option(
            "--descent-start",
            type=click.Choice(DESCENT_STARTS),
            default=GATE.descent_start,
            show_default=True,
            help="[gate] Where --search descent starts its gates: aligned (every unit of "
            "the adapter off, ALIGNED itself; units come back as far as the refusal term "
            "allows, never negated) or adapter (every unit on; units may also be negated).",
        ),
        click.option(
            "--calibration-tokens",
            type=click.IntRange(min=1),
            default=GATE.max_new_tokens,
            show_default=True,
            help="[gate] Tokens generated per calibration prompt to judge a refusal.",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=GATE.batch_size,
            show_default=True,
            help="[gate] Prompts per forward pass; memory grows with it (checked before the "
            "first round).",
        ),
        click.option(
            "--dtype",
            type=click.Choice(MODEL_DTYPES),
            default=CALIBRATION.dtype,
            show_default=True,
            help="[gate] The model's dtype: auto is float32 on CPU, the checkpoint's on GPU.",
        ),
    ]
    return prompt_set_options("[gate] ")(apply(options, command))


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("inputs", nargs=-1, metavar="(BASE ALIGNED | --basis BASIS) ADAPTER")
@basis_option
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    help="Folder for the repaired adapter (required unless --method none).",
)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default=DEFAULTS.method,
    show_default=True,
    help="csulora: closed-form penalized minimum change; project: hard projection onto the "
    "safety subspace; safelora: Safe LoRA (Hsu et al. 2024); none: analyse and report only; "
    "gate: switch off the parts of the update that erode refusals, chosen by attribution and "
    "measured on calibration prompts (runs ALIGNED; needs the eval extra).",
)
@click.option(
    "--strength",
    type=FiniteFloat(min=0),
    default=DEFAULTS.strength,
    show_default=True,
    help="CSULoRA penalty lambda: 0 keeps the update, larger pulls it toward the subspace.",
)
@click.option(
    "--output-rank",
    type=click.Choice(OUTPUT_RANKS),
    default=DEFAULTS.output_rank,
    show_default=True,
    help="keep: best rank-r result, same config (drop-in); exact: rank up to 2r via "
    "rank_pattern/alpha_pattern.",
)
@click.option(
    "--safelora-select",
    type=click.Choice(SAFELORA_SELECTS),
    default=DEFAULTS.safelora_select,
    show_default=True,
    help="Safe LoRA selection: the N least similar modules, or all below a threshold.",
)
@click.option(
    "--safelora-layers",
    type=click.IntRange(min=1),
    default=DEFAULTS.safelora_layers,
    show_default=True,
    help="N for --safelora-select number (ties included).",
)
@click.option(
    "--safelora-threshold",
    type=FiniteFloat(),
    default=DEFAULTS.safelora_threshold,
    show_default=True,
    help="Similarity threshold for --safelora-select threshold.",
)
@subspace_options(DEFAULTS.subspace)
@workers_option
@gate_options
@click.option(
    "--report",
    "reports",
    type=click.Path(path_type=Path),
    multiple=True,
    help="Also write the report here: .json, .md or .html by extension (repeatable). "
    "An existing file is replaced only with --force.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing OUT that an earlier adapter-fix run wrote (or an empty folder), "
    "and existing --report files; never an input, never anything else.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table.")
@hub_options
@reports_errors
def repair(
    inputs: tuple[str, ...],
    basis: str | None,
    out: Path | None,
    reports: tuple[Path, ...],
    force: bool,
    quiet: bool,
    revision: str | None,
    cache_dir: Path | None,
    offline: bool,
    endpoint: str | None,
    **settings: Any,
) -> None:
    """Repair ADAPTER toward the safety subspace of ALIGNED - BASE; write it to OUT.

    BASE is the pretrained model, ALIGNED the chat model the adapter was trained
    on, ADAPTER a PEFT LoRA adapter: each a local folder, a .safetensors file
    (BASE, ALIGNED) or a Hub id org/name[@revision]. Weights are streamed one
    module at a time; only the tensors the adapter touches are read. With
    --basis (from `adapter-fix basis`), only the basis and the adapter are read.

    \b
    Examples:
      adapter-fix repair fixtures/llama-base fixtures/llama-aligned fixtures/llama-lora -o fixed
      adapter-fix repair meta-llama/Llama-3.1-8B meta-llama/Llama-3.1-8B-Instruct ./lora \\
          -o ./lora-fixed --report report.md --report report.html
      adapter-fix repair B A ./lora --method none --report analysis.json   # analyse only
      adapter-fix repair --basis org/chat-basis ./lora -o ./lora-fixed
    """
    from adapter_fix.commands.repair import run
    from adapter_fix.report.repair import render_repair
    from adapter_fix.report.table import render_notes, render_warnings

    gate = {name: settings.pop(name) for name in GATE_SETTINGS}
    options = RepairOptions(subspace=subspace_settings(settings), **settings)
    context = click.get_current_context()
    given = [
        name
        for name in GATE_SETTINGS
        if context.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
    ]
    if given and options.method != "gate":
        raise click.UsageError(
            f"{_flag(given[0])} is a setting of --method gate, not of {options.method}"
        )
    if gate["refine"] and gate["gate_unit"] != "module":
        raise click.UsageError(
            "--refine splits the modules switched off into their rank-1 components: it needs "
            "--gate-unit module (component gates are already that fine)"
        )
    order_only = [n for n in ORDER_SETTINGS if n in given]
    asked = gate["search"]
    descent_only = [n for n in DESCENT_SETTINGS if n in given]
    if asked == "auto":  # a descent setting asks for descent, as --rounds for order
        if descent_only:
            gate["search"] = "descent"
        elif gate["task"] is None or order_only:
            gate["search"] = "order"
        # else auto stays: descent, or order where descent's task guard measures no gain
    if gate["search"] == "descent":
        if order_only:
            raise click.UsageError(
                f"{_flag(order_only[0])} is a setting of --search order, not of descent"
            )
        if gate["task"] is None:
            cause = (
                "--search descent"
                if asked == "descent"
                else f"{_flag(descent_only[0])} asks for --search descent, which"
            )
            raise click.UsageError(
                f"{cause} needs --task with reference answers: its task term and the kept "
                "task it measures at each checkpoint come from them"
            )
    elif descent_only:
        raise click.UsageError(f"{_flag(descent_only[0])} is a setting of --search descent")
    if options.method != "none" and out is None:
        raise click.UsageError("-o/--out is required unless --method none")
    check_report_formats("repair", reports)
    check_device(options.subspace.device)
    hub = hub_settings(revision, cache_dir, offline, endpoint)
    if options.method == "gate":
        if basis is not None:
            raise click.UsageError("--method gate runs ALIGNED itself: give BASE ALIGNED ADAPTER")
        sources = open_inputs(inputs, None, hub)
    else:
        sources = open_inputs(inputs, basis, hub)
    console = stderr_console()
    if options.method == "gate":
        from adapter_fix.evaluate.model import dtype_warnings

        render_warnings(
            dtype_warnings(options.subspace.device, gate["dtype"], gradients=True), console
        )
    done = run(
        sources,
        options,
        gate,
        hub,
        out=out,
        reports=reports,
        force=force,
        progress=module_bars(console, quiet, "repair"),
        console=None if quiet else console,
    )
    if not quiet:
        render_repair(done.result, console, reports=done.reports)
    render_warnings(done.warnings, console)
    render_notes(done.result.modules, console)
