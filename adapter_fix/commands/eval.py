"""`adapter-fix eval`: ALIGNED and each adapter on harmful, benign and task prompts.

Everything that can fail fast (the eval extra, prompt files, the phrase
file, judge models, output paths) is checked before the model is loaded;
reports and the samples file are written together at the end through
`io.outputs.OutputSet`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from adapter_fix.errors import UsageError
from adapter_fix.evaluate.judges import Judge, make_judges
from adapter_fix.evaluate.model import (
    attach_adapters,
    check_placement,
    load_model,
    require_eval_extra,
)
from adapter_fix.evaluate.prompts import PromptSet, load_prompt_set, prompt_set
from adapter_fix.evaluate.runner import (
    EvalOptions,
    EvalResult,
    EvalSets,
    ProgressCallback,
    run_eval,
)
from adapter_fix.evaluate.split import split_prompts
from adapter_fix.io.locate import open_source
from adapter_fix.io.outputs import OutputSet
from adapter_fix.io.sources import HubOptions, Source
from adapter_fix.options import EvalInputs

if TYPE_CHECKING:
    from adapter_fix.progress import GenerationProgress
from adapter_fix.report.eval import samples_jsonl
from adapter_fix.report.formats import report_text


def display_names(aligned: str, adapters: Sequence[str]) -> list[str]:
    """Short row names: 'aligned', then each adapter's folder or repo name, made unique."""
    names = ["aligned"]
    for spec in adapters:
        base = Path(spec.split("@")[0].rstrip("/")).name or spec
        name, number = base, 2
        while name in names:
            name, number = f"{base}#{number}", number + 1
        names.append(name)
    return names


def _prompt_set(
    spec: str | None, role: Literal["harmful", "benign"], inputs: EvalInputs, hub: HubOptions
) -> PromptSet:
    """The file given for `role`, else the shipped set; calibration prompts left out; --limit."""
    prompts = prompt_set(spec, role, field=inputs.field, hub=hub)
    return held_out(prompts, inputs).limited(inputs.limit)


def held_out(prompts: PromptSet, inputs: EvalInputs) -> PromptSet:
    """Without the share a gated repair calibrated on (same share and seed), when asked."""
    if inputs.skip_calibration_share is None:
        return prompts
    rest = split_prompts(prompts, inputs.skip_calibration_share, inputs.split_seed)[1]
    if not rest.prompts:
        raise UsageError(
            f"every prompt (of {len(prompts)}) falls in the calibration share "
            f"{inputs.skip_calibration_share:g}: nothing is left to report on. Lower "
            "--skip-calibration-share, or give eval prompt files of its own.",
            path=prompts.origin,
        )
    return rest


@dataclass
class Prepared:
    sources: list[Source]
    sets: EvalSets
    judges: list[Judge]
    outputs: OutputSet


def prepare(inputs: EvalInputs, hub: HubOptions, batch_size: int = 8) -> Prepared:
    """Open every input, read prompts and phrases, check every output, then load the judges
    (judge models batch `batch_size` answers); ALIGNED is not loaded yet."""
    require_eval_extra()
    check_placement(inputs.device, inputs.device_map)
    quiet_transformers()
    sources = [open_source(spec, hub) for spec in (inputs.aligned, *inputs.adapters)]
    sets = EvalSets(
        harmful=_prompt_set(inputs.harmful, "harmful", inputs, hub),
        benign=_prompt_set(inputs.benign, "benign", inputs, hub),
        task=None
        if inputs.task is None
        else held_out(
            load_prompt_set(inputs.task, "task", field=inputs.field, hub=hub), inputs
        ).limited(inputs.limit),
    )
    local = [path for source in sources for path in source.local_paths]
    local += [
        Path(spec)
        for spec in (inputs.harmful, inputs.benign, inputs.task, inputs.refusal_patterns)
        if spec is not None and Path(spec).exists()
    ]
    local += [Path(spec) for spec in inputs.judges if Path(spec).exists()]
    samples = [inputs.samples] if inputs.samples is not None else []
    outputs = OutputSet(reports=[*inputs.reports, *samples], inputs=local, force=inputs.force)
    outputs.check()
    judges = make_judges(
        inputs.judges,
        phrases=inputs.refusal_patterns,
        label=inputs.judge_label,
        device=inputs.device,
        dtype=inputs.dtype,
        batch_size=batch_size,
        hub=hub,
    )
    return Prepared(sources, sets, judges, outputs)


def evaluate(
    inputs: EvalInputs,
    options: EvalOptions,
    hub: HubOptions,
    *,
    progress: Callable[[int], ProgressCallback] | None = None,
) -> tuple[EvalResult, OutputSet]:
    """Load ALIGNED once, attach every adapter, run every row; the outputs, checked, are
    left to write. `progress(total prompts)` gives the callback that follows generation."""
    prepared = prepare(inputs, hub, options.batch_size)
    sources, sets, judges = prepared.sources, prepared.sets, prepared.judges
    loaded = load_model(
        sources[0], device=inputs.device, dtype=inputs.dtype, device_map=inputs.device_map
    )
    adapter_names = attach_adapters(loaded, sources[1:])
    names = display_names(inputs.aligned, inputs.adapters)
    variants: list[tuple[str, str | None]] = [(names[0], None)]
    variants += list(zip(names[1:], adapter_names, strict=True))
    per_row = len(sets.harmful) + len(sets.benign) + (len(sets.task) if sets.task else 0)
    callback = None if progress is None else progress(per_row * len(variants))
    result = run_eval(loaded, variants, sets, judges, options, on_progress=callback)
    return result, prepared.outputs


def run(
    inputs: EvalInputs,
    options: EvalOptions,
    hub: HubOptions,
    *,
    progress: Callable[[int], GenerationProgress],
) -> EvalResult:
    """`adapter-fix eval`: every row measured (`progress(total prompts)` makes the bar,
    closed before the reports and samples are written), then the outputs written."""
    with contextlib.ExitStack() as stack:

        def advance(total: int) -> ProgressCallback:
            return stack.enter_context(progress(total)).advance

        result, files = evaluate(inputs, options, hub, progress=advance)
    write_outputs(result, inputs, files)
    return result


def write_outputs(result: EvalResult, inputs: EvalInputs, outputs: OutputSet) -> None:
    """Reports (format by extension) and the samples file, committed together."""
    with outputs:
        for path in inputs.reports:
            outputs.write_report(path, report_text("eval", result, path))
        if inputs.samples is not None:
            outputs.write_report(inputs.samples, samples_jsonl(result))


def quiet_transformers() -> None:
    """transformers' own progress bars and advice would interleave with ours on stderr."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
