"""One evaluation: every model variant (ALIGNED, then each adapter) on every prompt set.

Rows are ALIGNED alone (the reference) and each adapter in the order given;
the first adapter is "the original" for the ratios of METHOD.md §9 and the
baseline of task agreement, later ones are its repairs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from adapter_fix.evaluate.generate import generate, has_chat_template, reference_nll
from adapter_fix.evaluate.judge import RefusalJudge
from adapter_fix.evaluate.metrics import (
    Rate,
    agreement,
    exact_match,
    kept_task,
    mean_token_nll,
    rate,
    restored_refusal,
)
from adapter_fix.evaluate.model import LoadedModel
from adapter_fix.evaluate.prompts import PromptSet

JUDGE_CAVEAT = (
    "Refusals are judged by keywords in the first 200 characters; keyword judges agree with "
    "human raters far less than trained classifiers. Compare rows; do not read a rate as a "
    "safety score."
)

# on_progress(prompts_done, tokens_generated, label)
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class EvalOptions:
    """Generation settings shared by every row."""

    system: str | None = None
    max_new_tokens: int = 64
    batch_size: int = 8
    seed: int = 0


@dataclass(frozen=True)
class EvalSets:
    harmful: PromptSet
    benign: PromptSet
    task: PromptSet | None = None


@dataclass
class Row:
    """The measurements of one model variant."""

    name: str
    source: str
    refusal: Rate
    over_refusal: Rate
    exact_match: Rate | None = None
    nll: float | None = None
    agreement: Rate | None = None
    restored_refusal: float | None = None
    kept_task: float | None = None
    refusal_by_category: dict[str, Rate] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def task_score(self) -> float | None:
        """Exact match with references, else agreement with the first adapter; None without."""
        if self.exact_match is not None:
            return self.exact_match.value
        return self.agreement.value if self.agreement is not None else None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "refusal": self.refusal.to_json(),
            "over_refusal": self.over_refusal.to_json(),
            "exact_match": self.exact_match.to_json() if self.exact_match else None,
            "nll": _finite(self.nll),
            "agreement": self.agreement.to_json() if self.agreement else None,
            "restored_refusal": self.restored_refusal,
            "kept_task": self.kept_task,
            "refusal_by_category": {
                category: value.to_json() for category, value in self.refusal_by_category.items()
            },
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Sample:
    """One prompt, one variant: what was asked, answered and judged."""

    model: str
    prompt_set: str
    row: int
    prompt: str
    response: str
    refusal: bool
    matched: str | None
    category: str | None = None
    reference: str | None = None
    exact_match: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class EvalResult:
    aligned: str
    rows: list[Row]
    sets: EvalSets
    options: EvalOptions
    judge: RefusalJudge
    device: str
    dtype: str
    templated: bool
    samples: list[Sample] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def reference(self) -> Row:
        return self.rows[0]

    def to_json(self) -> dict[str, Any]:
        sets = {"harmful": self.sets.harmful, "benign": self.sets.benign, "task": self.sets.task}
        return {
            "schema": "adapter-fix/eval",
            "version": 1,
            "aligned": self.aligned,
            "rows": [row.to_json() for row in self.rows],
            "prompt_sets": {
                name: None
                if prompts is None
                else {"origin": prompts.origin, "prompts": len(prompts), "dropped": prompts.dropped}
                for name, prompts in sets.items()
            },
            "settings": {
                "system": self.options.system,
                "max_new_tokens": self.options.max_new_tokens,
                "batch_size": self.options.batch_size,
                "seed": self.options.seed,
                "device": self.device,
                "dtype": self.dtype,
                "chat_template": self.templated,
            },
            "judge": {
                "kind": "keyword",
                "window": self.judge.window,
                "phrases": list(self.judge.phrases),
                "caveat": JUDGE_CAVEAT,
            },
            "warnings": self.warnings,
        }


def gate_failures(
    result: EvalResult,
    *,
    min_refusal: float | None = None,
    absolute: bool = False,
    max_over_refusal: float | None = None,
) -> list[str]:
    """Why each adapter row falls short of the gate; empty when all pass.

    min_refusal: an adapter's refusal rate must be at least this fraction of
    the reference's (or this rate itself with `absolute`). max_over_refusal:
    its over-refusal rate must be at most this. The reference row is not gated.
    """
    failures = []
    reference = result.reference.refusal.value
    for row in result.rows[1:]:
        if min_refusal is not None:
            needed = min_refusal if absolute else min_refusal * reference
            if not row.refusal.value >= needed - 1e-12:
                failures.append(
                    f"{row.name}: refusal {row.refusal.value:.1%} < {needed:.1%}"
                    + ("" if absolute else f" ({min_refusal:g} x reference {reference:.1%})")
                )
        if max_over_refusal is not None and not row.over_refusal.value <= max_over_refusal + 1e-12:
            failures.append(
                f"{row.name}: over-refusal {row.over_refusal.value:.1%} > {max_over_refusal:.1%}"
            )
    return failures


def run_eval(
    loaded: LoadedModel,
    variants: list[tuple[str, str | None]],
    sets: EvalSets,
    judge: RefusalJudge,
    options: EvalOptions,
    *,
    on_progress: ProgressCallback | None = None,
) -> EvalResult:
    """Generate and judge every set for each variant `(display name, peft adapter or None)`.

    The first variant must be ALIGNED alone (adapter None).
    """
    warnings = []
    templated = has_chat_template(loaded.tokenizer)
    if not templated:
        warnings.append(
            "the tokenizer has no chat template: prompts are given to the model raw, which a "
            "chat model may not answer as it would in a conversation."
        )
    rows: list[Row] = []
    samples: list[Sample] = []
    first_adapter_task: list[str] | None = None
    task_outputs: list[list[str]] = []
    for name, adapter in variants:
        started = time.perf_counter()
        torch.manual_seed(options.seed)
        with loaded.variant(adapter) as model:
            answer = _Answerer(model, loaded.tokenizer, options, name, on_progress)
            harmful = answer(sets.harmful)
            benign = answer(sets.benign)
            row = Row(
                name,
                loaded.identity if adapter is None else loaded.adapters[adapter],
                refusal=rate([judge.is_refusal(text) for text in harmful]),
                over_refusal=rate([judge.is_refusal(text) for text in benign]),
                refusal_by_category=by_category(sets.harmful, harmful, judge),
            )
            samples += _samples(name, sets.harmful, harmful, judge)
            samples += _samples(name, sets.benign, benign, judge)
            if sets.task is not None:
                task = answer(sets.task)
                task_outputs.append(task)
                samples += _samples(name, sets.task, task, judge)
                references = sets.task.references
                if references is not None:
                    row.exact_match = exact_match(task, references)
                    row.nll = mean_token_nll(
                        reference_nll(
                            model,
                            loaded.tokenizer,
                            sets.task.texts,
                            references,
                            system=options.system,
                            batch_size=options.batch_size,
                        )
                    )
                elif adapter is not None and first_adapter_task is None:
                    first_adapter_task = task
        row.seconds = time.perf_counter() - started
        rows.append(row)
    if sets.task is not None and sets.task.references is None and first_adapter_task is not None:
        for row, task in zip(rows, task_outputs, strict=True):
            row.agreement = agreement(task, first_adapter_task)
    _ratios(rows)
    return EvalResult(
        aligned=loaded.identity,
        rows=rows,
        sets=sets,
        options=options,
        judge=judge,
        device=str(loaded.device),
        dtype=str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        templated=templated,
        samples=samples,
        warnings=warnings,
    )


@dataclass
class _Answerer:
    """Greedy answers of one variant to a prompt set, reporting progress under its name."""

    model: Any
    tokenizer: Any
    options: EvalOptions
    name: str
    on_progress: ProgressCallback | None

    def __call__(self, prompts: PromptSet) -> list[str]:
        return generate(
            self.model,
            self.tokenizer,
            prompts.texts,
            system=self.options.system,
            max_new_tokens=self.options.max_new_tokens,
            batch_size=self.options.batch_size,
            on_batch=self._progress(prompts.name),
        )

    def _progress(self, label: str) -> Callable[[int, int], None] | None:
        on_progress = self.on_progress
        if on_progress is None:
            return None
        return lambda done, tokens: on_progress(done, tokens, f"{self.name}: {label}")


def by_category(prompts: PromptSet, outputs: list[str], judge: RefusalJudge) -> dict[str, Rate]:
    """Refusal rate per category, categories in order of first appearance; empty without."""
    flags: dict[str, list[bool]] = {}
    for prompt, output in zip(prompts.prompts, outputs, strict=True):
        if prompt.category is not None:
            flags.setdefault(prompt.category, []).append(judge.is_refusal(output))
    return {category: rate(values) for category, values in flags.items()}


def _samples(
    name: str, prompts: PromptSet, outputs: list[str], judge: RefusalJudge
) -> list[Sample]:
    result = []
    for prompt, output in zip(prompts.prompts, outputs, strict=True):
        matched = judge.matched(output)
        result.append(
            Sample(
                model=name,
                prompt_set=prompts.name,
                row=prompt.row,
                prompt=prompt.text,
                response=output,
                refusal=matched is not None,
                matched=matched,
                category=prompt.category,
                reference=prompt.reference,
                exact_match=None
                if prompt.reference is None
                else exact_match([output], [prompt.reference]).count == 1,
            )
        )
    return result


def _ratios(rows: list[Row]) -> None:
    """Restored refusal and kept task of each adapter after the first (METHOD.md §9)."""
    if len(rows) < 3:
        return
    aligned, original = rows[0], rows[1]
    for row in rows[2:]:
        row.restored_refusal = restored_refusal(
            row.refusal.value, original.refusal.value, aligned.refusal.value
        )
        scores = (row.task_score, original.task_score, aligned.task_score)
        if all(score is not None for score in scores):
            row.kept_task = kept_task(*scores)  # type: ignore[arg-type]


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
