"""An evaluation as a terminal table (80 columns), JSON, Markdown or HTML, and its samples as
JSONL (texts only: `commands/eval.py` writes them through `io.outputs.OutputSet`)."""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from adapter_fix.errors import OutputError
from adapter_fix.evaluate.metrics import Rate
from adapter_fix.evaluate.runner import JUDGE_CAVEAT, EvalResult, Row


def _percent(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.0%}"


def _rate(rate: Rate) -> str:
    return f"{_percent(rate.value)} {rate.count}/{rate.total}"


def _interval(rate: Rate) -> str:
    return f"{rate.low * 100:.0f}-{rate.high * 100:.0f}"


def _delta(value: float | None, reference: float | None, is_reference: bool) -> str:
    """Change from the reference in percentage points."""
    if is_reference or value is None or reference is None:
        return ""
    return f"{(value - reference) * 100:+.0f}"


def _task(row: Row) -> str:
    return _percent(row.task_score) if row.task_score is not None else "-"


def _columns(result: EvalResult) -> list[str]:
    columns = ["model", "refused", "95% CI", "Δ", "over-ref.", "Δ"]
    task = result.sets.task
    if task is not None:
        columns += ["EM" if task.references is not None else "agree", "Δ"]
        if task.references is not None:
            columns.append("NLL")
    return columns


def _cells(result: EvalResult, row: Row) -> list[str]:
    reference = result.reference
    first = row is reference
    cells = [
        row.name,
        _rate(row.refusal),
        _interval(row.refusal),
        _delta(row.refusal.value, reference.refusal.value, first),
        _rate(row.over_refusal),
        _delta(row.over_refusal.value, reference.over_refusal.value, first),
    ]
    task = result.sets.task
    if task is not None:
        cells += [_task(row), _delta(row.task_score, reference.task_score, first)]
        if task.references is not None:
            cells.append("-" if row.nll is None else f"{row.nll:.2f}")
    return cells


def _ratio_lines(result: EvalResult) -> list[str]:
    if len(result.rows) < 3:
        return []
    original = result.rows[1].name
    lines = [f"Repairs of {original} (1 = like ALIGNED / like {original}):"]
    for row in result.rows[2:]:
        restored = _percent(row.restored_refusal)
        kept = _percent(row.kept_task) if result.sets.task is not None else "no --task"
        lines.append(f"  {row.name}: restored refusal {restored}, kept task {kept}")
    return lines


def footer_lines(result: EvalResult) -> list[str]:
    """What the numbers are: prompt counts, the task metric, the judge's limits, warnings."""
    sets = result.sets
    counts = f"{len(sets.harmful)} harmful ({sets.harmful.origin}), {len(sets.benign)} benign"
    counts += f" ({sets.benign.origin})"
    if sets.task is not None:
        counts += f", {len(sets.task)} task ({sets.task.origin})"
    lines = [
        f"Prompts: {counts}. Δ: change from {result.reference.name} in percentage points.",
    ]
    if sets.task is not None:
        if sets.task.references is not None:
            lines.append("EM: exact match with the references; NLL: mean nats per reference token.")
        elif len(result.rows) > 1:
            lines.append(
                f"agree: task answers identical to {result.rows[1].name}'s (no references)."
            )
    lines.append(JUDGE_CAVEAT)
    lines += [f"Warning: {warning}" for warning in result.warnings]
    return lines


def render_eval(result: EvalResult, console: Console) -> None:
    """The table on stderr: reference first, then each adapter; fits 80 columns."""
    table = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    for index, column in enumerate(_columns(result)):
        table.add_column(
            column,
            justify="left" if index == 0 else "right",
            overflow="fold",
            max_width=18 if index == 0 else None,
        )
    for row in result.rows:
        table.add_row(*_cells(result, row))
    console.print(table)
    for line in [*_ratio_lines(result), *footer_lines(result)]:
        console.print(line, markup=False, highlight=False)


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_eval(result: EvalResult) -> str:
    columns = _columns(result)
    lines = [
        "# adapter-fix eval",
        "",
        f"ALIGNED: `{result.aligned}`",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|",
    ]
    for row in result.rows:
        lines.append("| " + " | ".join(_markdown_cell(cell) for cell in _cells(result, row)) + " |")
    lines.append("")
    lines += [_markdown_cell(line) + "  " for line in _ratio_lines(result)]
    categories = _categories(result)
    if categories:
        lines += ["", "Refusal by harmful category:", ""]
        lines.append(
            "| category | " + " | ".join(_markdown_cell(r.name) for r in result.rows) + " |"
        )
        lines.append("|---|" + "---:|" * len(result.rows))
        for category in categories:
            cells = [_category_cell(row, category) for row in result.rows]
            lines.append(f"| {_markdown_cell(category)} | " + " | ".join(cells) + " |")
    lines += ["", *[_markdown_cell(line) for line in footer_lines(result)]]
    return "\n".join(lines) + "\n"


def _categories(result: EvalResult) -> list[str]:
    return list(result.reference.refusal_by_category)


def _category_cell(row: Row, category: str) -> str:
    value = row.refusal_by_category.get(category)
    return "-" if value is None else _rate(value)


def _bar(value: float, color: str) -> str:
    width = 0.0 if value != value else max(0.0, min(1.0, value)) * 100
    return (
        f'<div class="bar"><div style="width:{width:.1f}%;background:{color}"></div>'
        f"<span>{_percent(value)}</span></div>"
    )


def html_eval(result: EvalResult) -> str:
    """A self-contained page: the table and CSS bar charts of refusal and over-refusal."""
    escape = html.escape
    head = "".join(f"<th>{escape(column)}</th>" for column in _columns(result))
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in _cells(result, row)) + "</tr>"
        for row in result.rows
    )
    charts = "".join(
        f"<tr><td>{escape(row.name)}</td><td>{_bar(row.refusal.value, '#2e7d32')}</td>"
        f"<td>{_bar(row.over_refusal.value, '#c62828')}</td></tr>"
        for row in result.rows
    )
    categories = _categories(result)
    by_category = ""
    if categories:
        names = "".join(f"<th>{escape(row.name)}</th>" for row in result.rows)
        by_category = (
            "<h2>refusal by harmful category</h2>"
            f"<table><tr><th>category</th>{names}</tr>"
            + "".join(
                f"<tr><td>{escape(category)}</td>"
                + "".join(
                    f"<td>{escape(_category_cell(row, category))}</td>" for row in result.rows
                )
                + "</tr>"
                for category in categories
            )
            + "</table>"
        )
    notes = "".join(
        f"<p>{escape(line)}</p>" for line in [*_ratio_lines(result), *footer_lines(result)]
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>adapter-fix eval</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{padding:2px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        ".bar{position:relative;width:240px;height:16px;background:#eee}"
        ".bar div{height:100%}.bar span{position:absolute;left:4px;top:0;font-size:12px}"
        "</style></head><body>"
        f"<h1>adapter-fix eval</h1><p>ALIGNED: <code>{escape(result.aligned)}</code></p>"
        f"<table><tr>{head}</tr>{body}</table>"
        "<h2>refusal on harmful prompts / over-refusal on benign prompts</h2>"
        f"<table><tr><th>model</th><th>refusal</th><th>over-refusal</th></tr>{charts}</table>"
        f"{by_category}{notes}</body></html>\n"
    )


def json_eval(result: EvalResult) -> str:
    return json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n"


EVAL_REPORT_FORMATS: dict[str, Callable[[EvalResult], str]] = {
    ".json": json_eval,
    ".md": markdown_eval,
    ".html": html_eval,
}


def eval_report_text(result: EvalResult, path: Path) -> str:
    """The report for `path`, its format chosen by the extension (.json, .md, .html)."""
    render = EVAL_REPORT_FORMATS.get(path.suffix.lower())
    if render is None:
        raise OutputError(
            f"unknown report format {path.suffix!r}; use .json, .md or .html.", path=path
        )
    return render(result)


def samples_jsonl(result: EvalResult) -> str:
    """Every prompt, response and judgement, one JSON object a line."""
    return "".join(json.dumps(sample.to_json()) + "\n" for sample in result.samples)
