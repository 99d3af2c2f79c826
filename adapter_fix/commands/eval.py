"""`adapter-fix eval`: ALIGNED and each adapter on harmful, benign and task prompts.

Everything that can fail fast (prompt files, the phrase file, output paths,
the eval extra) is checked before the model is loaded.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from adapter_fix.errors import UsageError
from adapter_fix.evaluate.judge import RefusalJudge
from adapter_fix.evaluate.model import attach_adapters, load_model, require_eval_extra
from adapter_fix.evaluate.prompts import PromptSet, default_prompt_set, load_prompt_set
from adapter_fix.evaluate.runner import (
    EvalOptions,
    EvalResult,
    EvalSets,
    ProgressCallback,
    run_eval,
)
from adapter_fix.io.outputs import check_not_an_input
from adapter_fix.io.sources import HubOptions, LocalSource, Source, open_source


@dataclass(frozen=True)
class EvalInputs:
    """What the user asked for, as parsed by the CLI."""

    aligned: str
    adapters: tuple[str, ...]
    harmful: str | None = None
    benign: str | None = None
    task: str | None = None
    field: str | None = None
    refusal_patterns: Path | None = None
    limit: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    outputs: tuple[Path, ...] = ()  # --report and --outputs files


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


def _prompt_set(spec: str | None, role: str, inputs: EvalInputs, hub: HubOptions) -> PromptSet:
    if spec is None:
        if role == "task":
            raise AssertionError("the task set has no default")
        prompts = default_prompt_set(role)  # type: ignore[arg-type]
    else:
        prompts = load_prompt_set(spec, role, field=inputs.field, hub=hub)  # type: ignore[arg-type]
    return prompts.limited(inputs.limit)


def prepare(inputs: EvalInputs, hub: HubOptions) -> tuple[list[Source], EvalSets, RefusalJudge]:
    """Open every input and read prompts and phrases; refuse outputs that overlap an input."""
    require_eval_extra()
    sources = [open_source(spec, hub) for spec in (inputs.aligned, *inputs.adapters)]
    sets = EvalSets(
        harmful=_prompt_set(inputs.harmful, "harmful", inputs, hub),
        benign=_prompt_set(inputs.benign, "benign", inputs, hub),
        task=None if inputs.task is None else _prompt_set(inputs.task, "task", inputs, hub),
    )
    local = [Path(source.identity) for source in sources if isinstance(source, LocalSource)]
    local += [
        Path(spec)
        for spec in (inputs.harmful, inputs.benign, inputs.task, inputs.refusal_patterns)
        if spec is not None and Path(spec).exists()
    ]
    for path in inputs.outputs:
        check_not_an_input(path, local)
    if len(set(inputs.outputs)) != len(inputs.outputs):
        raise UsageError("two outputs (--report, --outputs) name the same file.")
    judge = (
        RefusalJudge()
        if inputs.refusal_patterns is None
        else RefusalJudge.from_file(inputs.refusal_patterns)
    )
    return sources, sets, judge


def evaluate(
    inputs: EvalInputs,
    options: EvalOptions,
    hub: HubOptions,
    *,
    progress: Callable[[int], ProgressCallback] | None = None,
) -> EvalResult:
    """Load ALIGNED once, attach every adapter, run every row. `progress(total prompts)` gives
    the callback that follows generation."""
    sources, sets, judge = prepare(inputs, hub)
    _quiet_transformers()
    loaded = load_model(sources[0], device=inputs.device, dtype=inputs.dtype)
    adapter_names = attach_adapters(loaded, sources[1:])
    names = display_names(inputs.aligned, inputs.adapters)
    variants: list[tuple[str, str | None]] = [(names[0], None)]
    variants += list(zip(names[1:], adapter_names, strict=True))
    per_row = len(sets.harmful) + len(sets.benign) + (len(sets.task) if sets.task else 0)
    callback = None if progress is None else progress(per_row * len(variants))
    return run_eval(loaded, variants, sets, judge, options, on_progress=callback)


def _quiet_transformers() -> None:
    """transformers' own progress bars and advice would interleave with ours on stderr."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
