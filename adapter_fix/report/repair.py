"""`repair`: the terminal table and summary, the Markdown and HTML reports."""

from __future__ import annotations

import html
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from adapter_fix.report.table import (
    fitted_table,
    literal,
    number,
    percent,
    rho_shares,
    short_module_names,
)
from adapter_fix.results import ModuleResult, RepairResult


def _attenuation(module: ModuleResult) -> str:
    if module.attenuation is None:
        return "-"
    return f"{module.attenuation['partial']:.3f}/{module.attenuation['off']:.3f}"


REPAIR_COLUMNS = (
    ("module", "left"),
    ("k", "right"),
    ("captured", "right"),
    ("‖dW‖", "right"),
    ("rho F/H/O %", "right"),
    ("after %", "right"),
    ("a_H/a_O", "right"),
    ("‖X‖", "right"),
    ("rel. change", "right"),
    ("cos", "right"),
    ("trunc.", "right"),
    ("action", "left"),
)


def _repair_row(module: ModuleResult) -> list[str]:
    action = module.action if module.reason is None else f"{module.action}: {module.reason}"
    return [
        module.name,
        "-" if module.subspace_method is None else str(module.subspace_rank),
        "-" if module.subspace_method is None else percent(module.captured_energy),
        number(module.update_norm),
        rho_shares(module.rho_before),
        rho_shares(module.rho_after),
        _attenuation(module),
        number(module.repaired_norm),
        percent(module.relative_change),
        f"{module.cosine:.4f}",
        number(module.truncation_residual, 3),
        action,
    ]


def _summary_lines(result: RepairResult) -> list[str]:
    totals = result.totals()
    timings = result.timings
    actions = ", ".join(f"{count} {action}" for action, count in totals["actions"].items())
    # Phases are summed over the stream's threads, so the share is of their work, not of wall.
    work = timings.read_s + timings.subspace_s + timings.solve_s + timings.write_s
    read_share = timings.read_s / work if work > 0 else 0.0
    lines = [
        f"method {result.options.method}: {totals['modules']} modules ({actions})",
        f"energy kept: {percent(totals['energy_kept'])} (Σ‖X‖² / Σ‖dW‖²)",
        f"time: {timings.total_s:.2f} s, {percent(read_share)} of the work reading weights "
        f"(subspace {timings.subspace_s:.2f} s, solve {timings.solve_s:.2f} s, "
        f"write {timings.write_s:.2f} s)",
        *_calibration_lines(result.calibration),
    ]
    biases = sum(module.lora_bias is not None for module in result.modules)
    if biases:
        lines.append(f"LoRA bias: {biases} lora_B biases carried unchanged (not part of B A)")
    if totals["changed_most"]:
        most = ", ".join(
            f"{m['name']} ({percent(m['relative_change'])})" for m in totals["changed_most"]
        )
        lines.append(f"changed most: {most}")
    if result.output:
        lines.append(f"written: {result.output}")
    elif result.options.method == "none":
        lines.append("--method none: analysis only, no adapter written")
    return lines


def _calibration_lines(calibration: dict[str, Any] | None) -> list[str]:
    """The gated repair's outcome on its calibration prompts (not a result: eval is)."""
    if calibration is None:
        return []
    prompts = calibration["prompts"]
    kept = calibration["task_score"]["kept"]
    undone = sum(bool(r.get("undone")) for r in calibration["rounds"])
    rounds = f"{len(calibration['rounds'])} {_round_noun(calibration)}(s)"
    lines = [
        f"calibration: {prompts['harmful']} harmful, {prompts['benign']} benign, "
        f"{prompts['task']} task prompts; {rounds}"
        + (f" ({undone} undone)" if undone else "")
        + f", stopped: {calibration['stop_reason']}",
        f"calibration refusals: ALIGNED {percent(calibration['aligned_refusal_rate'])} "
        f"(only its {calibration['refused_by_aligned']} refused prompts are used); on those, "
        f"the adapter {percent(calibration['original_refusal_rate'])}, gated "
        f"{percent(calibration['refusal_rate'])} (target "
        f"{percent(calibration['target_refusal_rate'])}: "
        f"{'met' if calibration['target_met'] else 'NOT met'}); task kept "
        + ("not measurable (first-order budget only)" if kept is None else percent(kept)),
        _gate_time_line(calibration),
        "these are the prompts the search fitted (on the efficacy testbed they overstated "
        "held-out refusals and kept task by 0.3-0.6): measure the written adapter with "
        "`adapter-fix eval` on prompts it never saw",
    ]
    if calibration["task_set_missing"]:
        lines.append(
            "no --task set: the task term was the KL to the adapter's own outputs; a task set "
            "with references is strongly recommended"
        )
    return lines


def _round_noun(calibration: dict[str, Any]) -> str:
    """What one entry of `rounds` is: a round of the order search, a checkpoint of the
    descent (after its steps since the last)."""
    return "checkpoint" if calibration["options"].get("search") == "descent" else "round"


def _gate_time_line(calibration: dict[str, Any]) -> str:
    """Where the gated repair's time went: setup, each round, and the rest (a last round whose
    search found nothing to switch off, and the coarse-to-fine step)."""
    seconds = max(calibration["seconds"], 1e-9)
    setup = calibration["setup_seconds"] / seconds
    rounds = [r["share_of_time"] for r in calibration["rounds"]]
    rest = 1.0 - setup - sum(rounds)
    noun = _round_noun(calibration)
    return (
        f"time: {calibration['seconds']:.0f} s: setup {setup:.0%}"
        + "".join(f", {noun} {i} {share:.0%}" for i, share in enumerate(rounds, 1))
        + (f", a search that found nothing {rest:.0%}" if rest >= 0.005 else "")
    )


# The terminal table: most important first; the rest is in every report file.
TERMINAL_REPAIR_COLUMNS = (
    ("module", "left"),
    ("action", "left"),
    ("rel. change", "right"),
    ("rho F/H/O %", "right"),
    ("after %", "right"),
    ("k", "right"),
    ("captured", "right"),
    ("cos", "right"),
    ("‖dW‖", "right"),
    ("‖X‖", "right"),
    ("a_H/a_O", "right"),
    ("trunc.", "right"),
    ("why", "left"),
)


def _terminal_row(module: ModuleResult, name: str) -> list[Text]:
    full = dict(zip((c for c, _ in REPAIR_COLUMNS), _repair_row(module), strict=True))
    cells = {**full, "module": name, "action": module.action, "why": module.reason or ""}
    return [literal(cells[column]) for column, _ in TERMINAL_REPAIR_COLUMNS]


def render_repair(
    result: RepairResult, console: Console, max_rows: int = 40, reports: Sequence[Path] = ()
) -> None:
    """The diff table (collapsed to the modules changed most when long) and the summary."""
    modules = result.modules
    shown = modules
    if len(modules) > max_rows:
        shown = sorted(modules, key=lambda m: m.relative_change, reverse=True)[:max_rows]
    names = short_module_names([module.name for module in modules])
    table, dropped = fitted_table(
        console,
        "adapter-fix repair",
        TERMINAL_REPAIR_COLUMNS,
        [_terminal_row(module, names[module.name]) for module in shown],
        keep=2,
    )
    console.print(table)
    if len(shown) < len(modules):
        console.print(
            f"{len(modules) - len(shown)} more modules not shown (the table lists the "
            f"{len(shown)} changed most); every module is in the report file "
            "(--report report.md / .html / .json)."
        )
    if dropped:
        console.print(
            literal(
                f"not shown at this width: {', '.join(dropped)}; every column is in "
                "repair_report.json and --report files."
            )
        )
    if "why" in dropped:
        reasons = Counter(module.reason for module in shown if module.reason)
        for reason, count in reasons.most_common(5):
            console.print(literal(f"why ({count} module{'s' if count > 1 else ''}): {reason}"))
        if len(reasons) > 5:
            console.print(literal(f"... and {len(reasons) - 5} other reasons (see the report)"))
    for line in _summary_lines(result):
        console.print(literal(line))
    for path in reports:
        console.print(literal(f"report: {path}"))


def markdown_report(result: RepairResult) -> str:
    """The same content as the terminal, as Markdown (fits a pull-request comment)."""
    header = [name for name, _ in REPAIR_COLUMNS]
    lines = [
        "# adapter-fix repair report",
        "",
        *(f"- {line}" for line in _summary_lines(result)),
        f"- inputs: base `{result.inputs['base']}`, aligned `{result.inputs['aligned']}`, "
        f"adapter `{result.inputs['adapter']}`",
        f"- parameters: `{json.dumps(result.parameters(), sort_keys=True)}`",
        "",
        "| " + " | ".join(cell.replace("|", "\\|") for cell in header) + " |",
        "| " + " | ".join("---" if j == "left" else "---:" for _, j in REPAIR_COLUMNS) + " |",
    ]
    for module in result.modules:
        cells = [cell.replace("|", "\\|") for cell in _repair_row(module)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "rho F/H/O: share of the update's energy fully inside, partly inside and outside "
        "the safety subspace, before and after; a_H/a_O: CSULoRA attenuation factors."
    )
    return "\n".join(lines) + "\n"


LAYER = re.compile(r"\.(\d+)\.")


def _heatmap(result: RepairResult, value: Callable[[ModuleResult], float], title: str) -> str:
    """A layer x module-type grid, shaded by `value` in [0, 1]."""
    cells: dict[tuple[int, str], float] = {}
    for module in result.modules:
        match = LAYER.search(module.name)
        layer = int(match.group(1)) if match else -1
        cells[(layer, module.name.rsplit(".", 1)[-1])] = value(module)
    layers = sorted({layer for layer, _ in cells})
    kinds = list(dict.fromkeys(kind for _, kind in cells))
    rows = ["<tr><th>layer</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in kinds) + "</tr>"]
    for layer in layers:
        row = [f"<th>{layer if layer >= 0 else '-'}</th>"]
        for kind in kinds:
            if (layer, kind) not in cells:
                row.append("<td></td>")
                continue
            shade = max(0.0, min(1.0, cells[(layer, kind)]))
            color = f"rgba(200,40,40,{shade:.3f})"
            row.append(f'<td style="background:{color}">{100 * shade:.0f}</td>')
        rows.append("<tr>" + "".join(row) + "</tr>")
    return f"<h2>{html.escape(title)}</h2><table class='heat'>{''.join(rows)}</table>"


def html_report(result: RepairResult) -> str:
    """One self-contained HTML page (no network): summary, heatmaps, the full table."""
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in _summary_lines(result))
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in REPAIR_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _repair_row(m)) + "</tr>"
        for m in result.modules
    )
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}.heat td{width:3.5em;text-align:center}"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>adapter-fix repair report"
        f"</title><style>{style}</style></head><body><h1>adapter-fix repair report</h1>"
        f"<ul>{summary}</ul>"
        + _heatmap(result, lambda m: m.relative_change, "relative change ‖X − dW‖ / ‖dW‖ (%)")
        + _heatmap(
            result,
            lambda m: m.rho_before.get("off", 0.0),
            "off-subspace energy of the update before repair, rho_O (%)",
        )
        + f"<h2>modules</h2><table><tr>{head}</tr>{body}</table></body></html>\n"
    )
