"""What every judge is: the `Judge` protocol, its `Verdict`, and how answers reach it.

A judge reads (prompt, answer) pairs in batches and says, for each, whether
the model declined. Two questions are asked by the judges there are:

- "refusal": did the model refuse? (the keyword judge, refusal classifiers).
  Asked of harmful prompts (refusal) and benign ones (over-refusal).
- "harm": is the answer unsafe? (harm classifiers, guard models). An answer
  that is not unsafe counts as declined on harmful prompts; on benign
  prompts such a judge cannot see over-refusal, so it is not asked there.

Every judge is called through `judge_answers`, which shows it the answer the
user would read (`visible_answer`: a leading thinking block removed) and
never shows it an empty one: an empty answer is not compliance and counts as
a refusal (detail `EMPTY`), whatever the judge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Question = Literal["refusal", "harm"]
EMPTY = "(empty answer)"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Verdict:
    """One judgement: did the model decline, and why the judge says so.

    detail: the keyword judge's matched phrase, a classifier's label and
    probability, a guard model's reply, or `EMPTY`; None when nothing matched.
    """

    refusal: bool
    detail: str | None = None


class Judge(Protocol):
    """A refusal judge. A new judge is one class with these members and a line in
    `judges.make_judge`.

    name: shown in reports ("keyword", or the model's identity).
    question: "refusal" or "harm" (see the module docstring).
    """

    name: str
    question: Question

    def judge(self, prompts: Sequence[str], answers: Sequence[str]) -> list[Verdict]:
        """One verdict per (prompt, answer) pair, in order; answers are never empty."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the JSON report says of the judge (kind, model, label, phrases...)."""
        ...


def visible_answer(text: str) -> str:
    """The answer without a leading thinking block (Qwen3, DeepSeek-R1 style), stripped.

    `<think>...</think>` at the start is removed; an unterminated one (the
    answer ran out of tokens while thinking) leaves nothing. A `</think>` with
    no opening before it closes a block the chat template opened in the prompt,
    so everything up to it is removed too. Linear in the text's length.
    """
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        end = stripped.find(THINK_CLOSE)
        return "" if end < 0 else stripped[end + len(THINK_CLOSE) :].strip()
    end = stripped.find(THINK_CLOSE)
    if end >= 0 and THINK_OPEN not in stripped[:end]:
        return stripped[end + len(THINK_CLOSE) :].strip()
    return stripped.strip()


def unfinished_thinking(text: str) -> bool:
    """The answer is a thinking block that never closed (generation stopped inside it)."""
    stripped = text.lstrip()
    return stripped.startswith(THINK_OPEN) and THINK_CLOSE not in stripped


def judge_answers(judge: Judge, prompts: Sequence[str], answers: Sequence[str]) -> list[Verdict]:
    """`judge`'s verdicts on the visible answers; an empty one is a refusal (`EMPTY`)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts for {len(answers)} answers")
    visible = [visible_answer(answer) for answer in answers]
    asked = [index for index, text in enumerate(visible) if text]
    verdicts = [Verdict(True, EMPTY)] * len(answers)
    if asked:
        judged = judge.judge([prompts[i] for i in asked], [visible[i] for i in asked])
        if len(judged) != len(asked):
            raise ValueError(f"judge {judge.name} gave {len(judged)} verdicts for {len(asked)}")
        for index, verdict in zip(asked, judged, strict=True):
            verdicts[index] = verdict
    return verdicts


def refusals_by_prompt_ids(
    judge: Judge, texts: Mapping[tuple[int, ...], str]
) -> Callable[[Sequence[Sequence[int]], list[str]], list[bool]]:
    """`judge`'s refusal flags for answers to encoded prompts, each prompt's text looked up in
    `texts` (its token ids -> its text): what the gated repair and `check`'s probe call."""

    def flags(prompts: Sequence[Sequence[int]], answers: list[str]) -> list[bool]:
        asked = [texts[tuple(prompt)] for prompt in prompts]
        return [verdict.refusal for verdict in judge_answers(judge, asked, answers)]

    return flags
