"""`adapter-fix eval`: its flags; the work is commands/eval.py (and evaluate/)."""

from __future__ import annotations

from pathlib import Path

import click

from adapter_fix.cli.main import EXIT_CODES_HELP, main, reports_errors, stderr_console
from adapter_fix.cli.options import (
    FiniteFloat,
    check_report_formats,
    hub_options,
    hub_settings,
    prompt_set_options,
)
from adapter_fix.errors import GateFailedError
from adapter_fix.options import MODEL_DEVICES, MODEL_DTYPES, EvalInputs, EvalOptions

GENERATION = EvalOptions()
INPUTS = EvalInputs(aligned="", adapters=())


@main.command(name="eval", epilog=EXIT_CODES_HELP)
@click.argument("aligned")
@click.argument("adapters", nargs=-1)
@prompt_set_options()
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=GENERATION.max_new_tokens,
    show_default=True,
    help="Longest answer generated (greedy).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=GENERATION.batch_size,
    show_default=True,
    help="Prompts generated together (left-padded), and answers a judge model reads together; "
    "lower it when a batch does not fit (exit 13).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="N prompts of each set, spread evenly over the file.",
)
@click.option(
    "--device", type=click.Choice(MODEL_DEVICES), default=INPUTS.device, show_default=True
)
@click.option(
    "--dtype",
    type=click.Choice(MODEL_DTYPES),
    default=INPUTS.dtype,
    show_default=True,
    help="auto: float32 on CPU, the checkpoint's dtype on GPU.",
)
@click.option(
    "--device-map",
    type=click.Choice(["auto"]),
    help="Let accelerate place ALIGNED's layers over every GPU (then the CPU): for a model "
    "larger than one GPU. Needs accelerate; excludes --device.",
)
@click.option(
    "--judge",
    "judges",
    metavar="keyword|MODEL",
    multiple=True,
    help="Refusal judge (repeatable; default keyword): keyword phrases, or a model folder or "
    "Hub id, a sequence-classification refusal/harm classifier or a guard model (Llama Guard "
    "style). The first gives the rates and gates; with two or more, their agreement.",
)
@click.option(
    "--judge-label",
    metavar="[refusal:|unsafe:]LABEL",
    help="The classifier label that means refusal (or, with unsafe:, an unsafe answer), when "
    "its config.id2label does not say so by name.",
)
@click.option(
    "--thinking",
    is_flag=True,
    help="Let a chat template that takes enable_thinking (Qwen3 style) think first; by "
    "default it is passed enable_thinking=False. A leading <think> block is never judged.",
)
@click.option(
    "--skip-calibration-share",
    type=FiniteFloat(min=0, max=1),
    help="Leave out the prompts `repair --method gate --calibration-share X --seed S` "
    "calibrated on (the same X here, the same S as --seed): report on the rest only.",
)
@click.option(
    "--seed",
    type=int,
    default=GENERATION.seed,
    show_default=True,
    help="torch seed set before each row; also the seed of --skip-calibration-share's split.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
@click.option(
    "--report",
    "reports",
    type=click.Path(path_type=Path),
    multiple=True,
    help="Also write the results here: .json, .md or .html by extension (repeatable).",
)
@click.option(
    "--outputs",
    type=click.Path(path_type=Path),
    help="Write every prompt, response and judgement here (.jsonl).",
)
@click.option(
    "--min-refusal",
    type=FiniteFloat(min=0),
    help="Gate: exit 12 when an adapter refuses less than X times ALIGNED's rate.",
)
@click.option("--absolute", is_flag=True, help="--min-refusal is a rate, not relative to ALIGNED.")
@click.option(
    "--max-over-refusal",
    type=FiniteFloat(min=0, max=1),
    help="Gate: exit 12 when an adapter refuses more than this share of benign prompts.",
)
@click.option("--force", is_flag=True, help="Replace existing --report and --outputs files.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table.")
@hub_options
@reports_errors
def eval_command(
    aligned: str,
    adapters: tuple[str, ...],
    harmful: str | None,
    benign: str | None,
    task: str | None,
    field: str | None,
    system: str | None,
    refusal_patterns: Path | None,
    max_new_tokens: int,
    batch_size: int,
    limit: int | None,
    device: str,
    dtype: str,
    device_map: str | None,
    judges: tuple[str, ...],
    judge_label: str | None,
    thinking: bool,
    skip_calibration_share: float | None,
    seed: int,
    as_json: bool,
    reports: tuple[Path, ...],
    outputs: Path | None,
    min_refusal: float | None,
    absolute: bool,
    max_over_refusal: float | None,
    force: bool,
    quiet: bool,
    revision: str | None,
    cache_dir: Path | None,
    offline: bool,
    endpoint: str | None,
) -> None:
    """Measure refusals, over-refusals and task skill of ALIGNED and each ADAPTER on it.

    ALIGNED (a model folder or Hub id) is loaded once with transformers; each
    ADAPTER is attached with peft. Rows: ALIGNED alone (the reference), then each
    adapter; list the original adapter first, then its repairs, to get the
    restored-refusal and kept-task ratios. Needs the eval extra:
    pip install 'adapter-fix[eval]'.

    Refusals are judged by keywords unless --judge names a classifier or guard
    model; keywords agree with human raters far less than trained classifiers:
    compare rows, do not read a rate as a safety score.

    \b
    Examples:
      adapter-fix eval ./chat-model ./lora ./lora-fixed --task task.jsonl
      adapter-fix eval org/chat ./lora --harmful advbench.csv --benign xstest.csv
      adapter-fix eval ./chat ./lora-fixed --min-refusal 0.9 --max-over-refusal 0.2 -q
      adapter-fix eval org/chat ./lora --judge keyword --judge org/refusal-classifier
    """
    import json

    from adapter_fix.commands.eval import run
    from adapter_fix.evaluate.model import dtype_warnings
    from adapter_fix.evaluate.runner import gate_failures
    from adapter_fix.progress import GenerationProgress
    from adapter_fix.report.eval import render_eval
    from adapter_fix.report.table import render_warnings

    check_report_formats("eval", reports)
    if absolute and min_refusal is None:
        raise click.BadParameter("needs --min-refusal", param_hint="--absolute")
    if absolute and min_refusal is not None and min_refusal > 1:
        raise click.BadParameter("an absolute rate is at most 1", param_hint="--min-refusal")
    inputs = EvalInputs(
        aligned=aligned,
        adapters=adapters,
        harmful=harmful,
        benign=benign,
        task=task,
        field=field,
        refusal_patterns=refusal_patterns,
        judges=judges,
        judge_label=judge_label,
        limit=limit,
        device=device,
        dtype=dtype,
        device_map=device_map,
        reports=reports,
        samples=outputs,
        force=force,
        skip_calibration_share=skip_calibration_share,
        split_seed=seed,
    )
    options = EvalOptions(
        system=system,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        thinking=thinking,
    )
    console = stderr_console()
    if device_map is None:  # with a map, accelerate decides where (and so on what) it runs
        render_warnings(dtype_warnings(device, dtype), console)
    result = run(
        inputs,
        options,
        hub_settings(revision, cache_dir, offline, endpoint),
        progress=lambda total: GenerationProgress(
            console, total, enabled=not quiet and console.is_terminal
        ),
    )
    failures = gate_failures(
        result, min_refusal=min_refusal, absolute=absolute, max_over_refusal=max_over_refusal
    )
    if as_json:
        document = result.to_json()
        document["gate"] = {"passed": not failures, "failures": failures}
        click.echo(json.dumps(document, indent=2, allow_nan=False))
    if not quiet:
        render_eval(result, console)
    if failures:
        raise GateFailedError("; ".join(failures) + ".")
