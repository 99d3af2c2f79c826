"""Refusal judges behind one protocol (`base.Judge`), built by `make_judge` from a spec:

    keyword           the keyword judge (keyword.py), the default; no model, no torch
    MODEL             a folder or Hub id: a sequence-classification model (classifier.py)
                      or a causal LM with a chat template, driven as a guard (guard.py)

A new judge is one class with `name`, `question`, `judge(prompts, answers)`
and `describe()`, and one line in `make_judge`. Callers judge through
`judge_answers`, which strips thinking blocks and rules on empty answers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from adapter_fix.errors import UsageError
from adapter_fix.evaluate.judges.base import (
    EMPTY,
    Judge,
    Question,
    Verdict,
    judge_answers,
    refusals_by_prompt_ids,
    unfinished_thinking,
    visible_answer,
)
from adapter_fix.evaluate.judges.keyword import DEFAULT_REFUSAL_PHRASES, KeywordJudge

if TYPE_CHECKING:
    from adapter_fix.io.sources import HubOptions

KEYWORD = "keyword"

__all__ = [
    "DEFAULT_REFUSAL_PHRASES",
    "EMPTY",
    "KEYWORD",
    "Judge",
    "KeywordJudge",
    "Question",
    "Verdict",
    "judge_answers",
    "make_judge",
    "make_judges",
    "refusals_by_prompt_ids",
    "unfinished_thinking",
    "visible_answer",
]


def make_judge(
    spec: str = KEYWORD,
    *,
    phrases: Path | None = None,
    label: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 8,
    hub: HubOptions | None = None,
) -> Judge:
    """The judge `spec` names: "keyword" (phrases from `phrases`, else the default list),
    or a model folder / Hub id, loaded on `device` (see the package docstring).

    label: for a classifier, the label that means refusal or unsafe (`classifier.pick_label`);
    other judges have no labels and ignore it.
    Raises UsageError for a model that is neither a classifier nor a guard model.
    """
    if spec == KEYWORD:
        return KeywordJudge() if phrases is None else KeywordJudge.from_file(phrases)
    from adapter_fix.evaluate.judges.classifier import ClassifierJudge
    from adapter_fix.evaluate.judges.guard import GuardJudge
    from adapter_fix.evaluate.model import model_folder, require_eval_extra, resolve_device
    from adapter_fix.io.locate import open_source

    require_eval_extra()
    source = open_source(spec, hub)
    target = resolve_device(device)
    folder = model_folder(source, "judge")
    architectures = _architectures(folder / "config.json")
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return ClassifierJudge.load(
            source, folder, label=label, device=target, dtype=dtype, batch_size=batch_size
        )
    if any(name.endswith("ForCausalLM") for name in architectures):
        return GuardJudge.load(source, folder, device=target, dtype=dtype, batch_size=batch_size)
    raise UsageError(
        f"a judge model must be a sequence-classification model or a guard model (a causal "
        f"LM with a chat template); config.json names {architectures or 'no architectures'}.",
        path=source.identity,
        key="architectures",
    )


def make_judges(
    specs: Sequence[str],
    *,
    phrases: Path | None = None,
    label: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 8,
    hub: HubOptions | None = None,
) -> list[Judge]:
    """One judge per spec, in order (the first decides the rates); keyword when none.

    `phrases` (--refusal-patterns) needs the keyword judge among them, `label`
    a classifier; a spec given twice is refused.
    """
    specs = list(specs) or [KEYWORD]
    twice = next((spec for spec in specs if specs.count(spec) > 1), None)
    if twice is not None:
        raise UsageError(f"--judge {twice} is given twice.")
    if phrases is not None and KEYWORD not in specs:
        raise UsageError(
            "--refusal-patterns sets the keyword judge's phrases, and --judge leaves it out: "
            "add --judge keyword.",
            path=phrases,
        )
    judges = [
        make_judge(
            spec,
            phrases=phrases,
            label=label,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            hub=hub,
        )
        for spec in specs
    ]
    if label is not None and not any(judge.describe()["kind"] == "classifier" for judge in judges):
        raise UsageError("--judge-label names a classifier's label, and no --judge is one.")
    names = [judge.name for judge in judges]
    same = next((name for name in names if names.count(name) > 1), None)
    if same is not None:
        raise UsageError(f"two --judge name the same model, {same}: give it once.")
    return judges


def _architectures(config: Path) -> list[str]:
    try:
        document = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # ValueError: bad JSON or UTF-8
        why = "nested too deeply" if isinstance(error, RecursionError) else error
        raise UsageError(f"cannot read the judge's config ({why}).", path=config) from None
    names = document.get("architectures") if isinstance(document, dict) else None
    return [str(name) for name in names] if isinstance(names, list) else []
