"""`eval`: a terminal table (80 columns), the Markdown and HTML reports, and the samples as
JSONL (texts only: `commands/eval.py` writes them through `io.outputs.OutputSet`)."""

from __future__ import annotations

import html
import json

from rich.console import Console
from rich.table import Table

from adapter_fix.evaluate.chart import Goal, Point, tradeoff_svg
from adapter_fix.evaluate.metrics import Rate
from adapter_fix.evaluate.runner import EvalResult, Row, judge_caveat


def _percent(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.0%}"


def _rate(rate: Rate | None) -> str:
    return "-" if rate is None else f"{_percent(rate.value)} {rate.count}/{rate.total}"


def _value(rate: Rate | None) -> float | None:
    return None if rate is None else rate.value


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
        _delta(_value(row.over_refusal), _value(reference.over_refusal), first),
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
    lines += judge_lines(result)
    lines += [f"Warning: {warning}" for warning in result.warnings]
    return lines


def judge_lines(result: EvalResult) -> list[str]:
    """Which judge gave the rates, the others' rates, their agreement, empty answers."""
    judge = result.judge
    lines = [f"Judge: {judge.name}" + (" (the rates above)." if len(result.judges) > 1 else ".")]
    for other in result.judges[1:]:
        rates = ", ".join(
            f"{row.name} {_percent(_value(row.refusal_by_judge.get(other.name)))}"
            for row in result.rows
        )
        lines.append(f"Refusal by {other.name}: {rates}.")
    for pair in result.agreements:
        kappa = "undefined" if pair.kappa is None else f"{pair.kappa:.2f}"
        lines.append(
            f"{pair.first} and {pair.second} agree on {_percent(pair.agree.value)} of "
            f"{pair.agree.total} answers (Cohen's kappa {kappa})."
        )
    if any(row.empty for row in result.rows):
        counts = ", ".join(f"{row.name} {row.empty}" for row in result.rows)
        lines.append(f"Empty answers, counted as refusals: {counts}.")
    lines.append(judge_caveat(judge))
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


def _bar(value: float | None, color: str) -> str:
    if value is None or value != value:
        return '<div class="bar"><span>-</span></div>'
    width = max(0.0, min(1.0, value)) * 100
    return (
        f'<div class="bar"><div style="width:{width:.1f}%;background:{color}"></div>'
        f"<span>{_percent(value)}</span></div>"
    )


SAMPLE_PROMPTS = 4  # harmful prompts shown side by side in the HTML report
PAGE_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
    "td,th{padding:2px 8px;text-align:right;vertical-align:top}"
    "td:first-child,th:first-child{text-align:left}"
    ".bar{position:relative;width:240px;height:16px;background:#eee}"
    ".bar div{height:100%}.bar span{position:absolute;left:4px;top:0;font-size:12px}"
    ".legend span{margin-right:1.5em}.samples td,.samples th{text-align:left}"
    ".samples td{border-top:1px solid #ccc}"
    ".answer{white-space:pre-wrap;font-family:monospace;font-size:12px;max-width:360px;"
    "overflow-wrap:anywhere}.refused{color:#2e7d32}.complied{color:#c62828}"
)


def tradeoff_points(result: EvalResult) -> list[Point]:
    """ALIGNED at (0, 1), the attack at (1, 0), each repair at its ratios; a repair without
    both ratios (no --task, or nothing to restore) is left out."""
    if len(result.rows) < 3 or result.sets.task is None:
        return []
    rows = result.rows
    points = [
        Point(rows[0].name, 0.0, 1.0, "aligned"),
        Point(rows[1].name, 1.0, 0.0, "attack"),
    ]
    points += [
        Point(row.name, row.kept_task, row.restored_refusal, "repair")
        for row in rows[2:]
        if row.kept_task is not None and row.restored_refusal is not None
    ]
    return points


def _tradeoff_section(result: EvalResult) -> str:
    points = tradeoff_points(result)
    title = "<h2>trade-off: kept task against restored refusal</h2>"
    if len(points) < 3:
        why = (
            "needs ALIGNED, the attack and at least one repair, a --task set, and a "
            "refusal rate that differs between ALIGNED and the attack"
        )
        return f"{title}<p>No chart: it {why}.</p>"
    goal = Goal()
    missing = [row.name for row in result.rows[2:] if row.name not in {p.label for p in points}]
    legend = (
        '<p class="legend"><span style="color:#1565c0">&#9632; ALIGNED</span>'
        '<span style="color:#c62828">&#9650; attack</span>'
        '<span style="color:#2e7d32">&#9679; repair</span>'
        f'<span style="color:#1b5e20">goal: restored refusal &ge; {goal.restored_refusal:.0%}'
        f" and kept task &ge; {goal.kept_task:.0%}</span></p>"
    )
    note = (
        f"<p>Not drawn (a ratio undefined): {html.escape(', '.join(missing))}.</p>"
        if missing
        else ""
    )
    return f"{title}{legend}{tradeoff_svg(points, goal)}{note}"


def _category_section(result: EvalResult) -> str:
    categories = _categories(result)
    if not categories:
        return ""
    escape = html.escape
    names = "".join(f"<th>{escape(row.name)}</th>" for row in result.rows)
    cells = "".join(
        f"<tr><td>{escape(category)}</td>"
        + "".join(
            f"<td title='{escape(_category_cell(row, category))}'>"
            f"{_bar(_value(row.refusal_by_category.get(category)), '#2e7d32')}</td>"
            for row in result.rows
        )
        + "</tr>"
        for category in categories
    )
    return (
        "<h2>refusal by harmful category</h2>"
        f"<table><tr><th>category</th>{names}</tr>{cells}</table>"
    )


def sample_prompts(result: EvalResult, count: int = SAMPLE_PROMPTS) -> list[int]:
    """Rows (in the harmful file) of the prompts to show: first those the rows' verdicts
    disagree on, then the rest, in file order; at most `count`."""
    harmful = result.sets.harmful.name
    verdicts: dict[int, set[bool | None]] = {}
    for sample in result.samples:
        if sample.prompt_set == harmful:
            verdicts.setdefault(sample.row, set()).add(sample.refusal)
    disagreed = [row for row, seen in verdicts.items() if len(seen) > 1]
    agreed = [row for row, seen in verdicts.items() if len(seen) <= 1]
    return (disagreed + agreed)[:count]


def _samples_section(result: EvalResult) -> str:
    escape = html.escape
    harmful = result.sets.harmful.name
    chosen = sample_prompts(result)
    if not chosen:
        return ""
    by_key = {
        (sample.row, sample.model): sample
        for sample in result.samples
        if sample.prompt_set == harmful and sample.row in chosen
    }
    names = "".join(f"<th>{escape(row.name)}</th>" for row in result.rows)
    lines = []
    for prompt_row in chosen:
        cells = []
        for row in result.rows:
            sample = by_key.get((prompt_row, row.name))
            if sample is None:
                cells.append("<td>-</td>")
                continue
            verdict = {True: "refused", False: "complied", None: "not judged"}[sample.refusal]
            detail = f" ({escape(sample.matched)})" if sample.matched else ""
            cells.append(
                f'<td><div class="{verdict.replace(" ", "-")}">{verdict}{detail}</div>'
                f'<div class="answer">{escape(sample.response)}</div></td>'
            )
        prompt = next(s.prompt for s in by_key.values() if s.row == prompt_row)
        lines.append(
            f'<tr><td><div class="answer">{escape(prompt)}</div></td>{"".join(cells)}</tr>'
        )
    return (
        "<h2>sample answers to harmful prompts</h2>"
        f"<p>The same prompts for every row (those the rows disagree on first), answers as "
        f"generated; verdicts by {escape(result.judge.name)}.</p>"
        f'<table class="samples"><tr><th>prompt</th>{names}</tr>{"".join(lines)}</table>'
    )


def html_eval(result: EvalResult) -> str:
    """A self-contained page (no script, no network): the table, the trade-off chart (inline
    SVG), bars of refusal and over-refusal overall and per category, and sample answers."""
    escape = html.escape
    head = "".join(f"<th>{escape(column)}</th>" for column in _columns(result))
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in _cells(result, row)) + "</tr>"
        for row in result.rows
    )
    charts = "".join(
        f"<tr><td>{escape(row.name)}</td><td>{_bar(row.refusal.value, '#2e7d32')}</td>"
        f"<td>{_bar(_value(row.over_refusal), '#c62828')}</td></tr>"
        for row in result.rows
    )
    notes = "".join(
        f"<p>{escape(line)}</p>" for line in [*_ratio_lines(result), *footer_lines(result)]
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>adapter-fix eval</title>"
        f"<style>{PAGE_STYLE}</style></head><body>"
        f"<h1>adapter-fix eval</h1><p>ALIGNED: <code>{escape(result.aligned)}</code></p>"
        f"<table><tr>{head}</tr>{body}</table>"
        f"{_tradeoff_section(result)}"
        "<h2>refusal on harmful prompts / over-refusal on benign prompts</h2>"
        f"<table><tr><th>model</th><th>refusal</th><th>over-refusal</th></tr>{charts}</table>"
        f"{_category_section(result)}{_samples_section(result)}{notes}</body></html>\n"
    )


def samples_jsonl(result: EvalResult) -> str:
    """Every prompt, response and judgement, one JSON object a line."""
    return "".join(json.dumps(sample.to_json()) + "\n" for sample in result.samples)
