"""Results -> terminal tables (rich, on stderr), JSON, Markdown and HTML."""

from __future__ import annotations

import html
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from adapter_fix.commands.basis import BasisResult
from adapter_fix.commands.check import CheckResult
from adapter_fix.commands.inspect import InspectResult
from adapter_fix.commands.repair import ModuleResult, RepairResult
from adapter_fix.display import printable
from adapter_fix.errors import OutputError


def _number(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


def _literal(value: object, style: str = "") -> Text:
    """A cell from untrusted text: no markup, control characters escaped."""
    return Text(printable(value), style=style)


def short_module_names(names: Sequence[str]) -> dict[str, str]:
    """Names that fit a terminal column: `model.layers.0.self_attn.q_proj` -> `L0 q_proj`.

    The layer number (the first numeric part) and the last part, plus any other
    numeric part (an expert index); where that is ambiguous, the whole path
    after the layer number; where even that is, the full name.
    """

    def short(name: str, keep_all: bool) -> str:
        parts = name.split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index is None:
            return ".".join(p for p in parts if p not in ("base_model", "model")) or name
        rest = parts[index + 1 :]
        if not keep_all:
            rest = [p for p in rest[:-1] if p.isdigit()] + rest[-1:]
        return f"L{parts[index]} {'.'.join(rest)}".rstrip()

    for keep_all in (False, True):
        shortened = {name: short(name, keep_all) for name in names}
        if len(set(shortened.values())) == len(shortened):
            return shortened
    return {name: name for name in names}


def fitted_table(
    console: Console,
    title: str,
    columns: Sequence[tuple[str, str]],
    rows: Sequence[Sequence[Text]],
    keep: int,
) -> tuple[Table, list[str]]:
    """A table of `columns` (header, justify; most important first) that fits the console.

    Columns are dropped from the end, never the first `keep`, until the table fits.
    Cells never wrap: a number is never split across lines. Returns the table and
    the headers of the dropped columns.
    """
    count = len(columns)
    while True:
        table = Table(
            title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, expand=False
        )
        for header, justify in columns[:count]:
            table.add_column(header, justify=justify, no_wrap=True, overflow="ellipsis")  # type: ignore[arg-type]
        for row in rows:
            table.add_row(*row[:count])
        natural = console.measure(table, options=console.options.update_width(1 << 16)).maximum
        if count <= keep or natural <= console.width:
            return table, [header for header, _ in columns[count:]]
        count -= 1


INSPECT_COLUMNS = (
    ("module", "left"),
    ("‖dW‖_F", "right"),
    ("rank", "right"),
    ("finite", "left"),
    ("eff. rank", "right"),
    ("scaling", "right"),
    ("kind", "left"),
    ("shape m x n", "right"),
)


def render_inspect(result: InspectResult, console: Console) -> None:
    """The inspect summary, the per-module table and the warnings."""
    summary = result.summary
    overview = Table.grid(padding=(0, 2))
    overview.add_column(style="bold", no_wrap=True)
    overview.add_column(overflow="fold")
    rows = {
        "adapter": summary["source"],
        "PEFT type": summary["peft_type"],
        "base model": summary["base_model_name_or_path"] or "(not set)",
        "r / alpha": f"{summary['r']} / {summary['lora_alpha']}",
        "scaling": summary["scaling_rule"],
        "target modules": str(summary["target_modules"]),
        "modules": str(summary["module_count"]),
        "parameters": f"{summary['parameter_count']:,} in {summary['tensor_count']} tensors",
        "dtypes": ", ".join(summary["dtypes"]),
        "file": f"{summary['file']} ({summary['file_size']:,} bytes)",
    }
    if summary["rank_pattern"] or summary["alpha_pattern"]:
        rows["patterns"] = f"rank {summary['rank_pattern']}, alpha {summary['alpha_pattern']}"
    if summary["carried_keys"]:
        rows["carried"] = f"{len(summary['carried_keys'])} tensors kept as they are"
    if summary.get("target_parameters"):
        rows["target parameters"] = str(summary["target_parameters"])
    if summary.get("lora_bias"):
        biases = sum(module.lora_bias is not None for module in result.modules)
        rows["LoRA bias"] = f"{biases} lora_B biases (added to the output, not part of B A)"
    for name, value in rows.items():
        overview.add_row(name, _literal(value))
    console.print(overview)

    names = short_module_names([module.name for module in result.modules])
    table, dropped = fitted_table(
        console,
        "LoRA modules",
        INSPECT_COLUMNS,
        [
            [
                _literal(names[module.name]),
                _literal("-" if module.update_norm is None else _number(module.update_norm)),
                _literal(module.rank),
                _literal("yes") if module.finite else _literal("NO", "red"),
                _literal("-" if module.effective_rank is None else f"{module.effective_rank:.2f}"),
                _literal(_number(module.scaling)),
                _literal(module.kind),
                _literal(f"{module.shape[0]} x {module.shape[1]}"),
            ]
            for module in result.modules
        ],
        keep=2,
    )
    console.print(table)
    if dropped:
        console.print(_literal(f"(not shown at this width: {', '.join(dropped)}; see --json)"))
    render_warnings(result.warnings, console)


def render_warnings(warnings: Sequence[str], console: Console) -> None:
    """One line per warning, shown literally."""
    for warning in warnings:
        console.print(Text.assemble(("warning: ", "yellow"), printable(warning)))


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _rho(rho: dict[str, float]) -> str:
    if not rho:
        return "-"
    return "/".join(f"{100 * rho[c]:.0f}" for c in ("full", "partial", "off"))


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
        "-" if module.subspace_method is None else _percent(module.captured_energy),
        _number(module.update_norm),
        _rho(module.rho_before),
        _rho(module.rho_after),
        _attenuation(module),
        _number(module.repaired_norm),
        _percent(module.relative_change),
        f"{module.cosine:.4f}",
        _number(module.truncation_residual, 3),
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
        f"energy kept: {_percent(totals['energy_kept'])} (Σ‖X‖² / Σ‖dW‖²)",
        f"time: {timings.total_s:.2f} s, {_percent(read_share)} of the work reading weights "
        f"(subspace {timings.subspace_s:.2f} s, solve {timings.solve_s:.2f} s, "
        f"write {timings.write_s:.2f} s)",
        *_calibration_lines(result.calibration),
    ]
    biases = sum(module.lora_bias is not None for module in result.modules)
    if biases:
        lines.append(f"LoRA bias: {biases} lora_B biases carried unchanged (not part of B A)")
    if totals["changed_most"]:
        most = ", ".join(
            f"{m['name']} ({_percent(m['relative_change'])})" for m in totals["changed_most"]
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
    lines = [
        f"calibration: {prompts['harmful']} harmful, {prompts['benign']} benign, "
        f"{prompts['task']} task prompts; {len(calibration['rounds'])} round(s), "
        f"stopped: {calibration['stop_reason']}",
        f"calibration refusals: ALIGNED {_percent(calibration['aligned_refusal_rate'])} "
        f"(only its {calibration['refused_by_aligned']} refused prompts are used); on those, "
        f"the adapter {_percent(calibration['original_refusal_rate'])}, gated "
        f"{_percent(calibration['refusal_rate'])} (target "
        f"{_percent(calibration['target_refusal_rate'])}: "
        f"{'met' if calibration['target_met'] else 'NOT met'}); task kept "
        + ("not measurable (first-order budget only)" if kept is None else _percent(kept)),
        _gate_time_line(calibration),
        "measure the written adapter with `adapter-fix eval` on prompts it never saw",
    ]
    if calibration["task_set_missing"]:
        lines.append(
            "no --task set: the task term was the KL to the adapter's own outputs; a task set "
            "with references is strongly recommended"
        )
    return lines


def _gate_time_line(calibration: dict[str, Any]) -> str:
    """Where the gated repair's time went: setup, each round kept, and the rest (tries that
    were cut back to nothing)."""
    seconds = max(calibration["seconds"], 1e-9)
    setup = calibration["setup_seconds"] / seconds
    rounds = [r["share_of_time"] for r in calibration["rounds"]]
    rest = 1.0 - setup - sum(rounds)
    return (
        f"time: {calibration['seconds']:.0f} s: setup {setup:.0%}"
        + "".join(f", round {i} {share:.0%}" for i, share in enumerate(rounds, 1))
        + (f", tries cut back to nothing {rest:.0%}" if rest >= 0.005 else "")
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
    return [_literal(cells[column]) for column, _ in TERMINAL_REPAIR_COLUMNS]


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
            _literal(
                f"not shown at this width: {', '.join(dropped)}; every column is in "
                "repair_report.json and --report files."
            )
        )
    if "why" in dropped:
        reasons = Counter(module.reason for module in shown if module.reason)
        for reason, count in reasons.most_common(5):
            console.print(_literal(f"why ({count} module{'s' if count > 1 else ''}): {reason}"))
        if len(reasons) > 5:
            console.print(_literal(f"... and {len(reasons) - 5} other reasons (see the report)"))
    for line in _summary_lines(result):
        console.print(_literal(line))
    for path in reports:
        console.print(_literal(f"report: {path}"))


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


REPORT_FORMATS: dict[str, Callable[[RepairResult], str]] = {
    ".json": lambda result: json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n",
    ".md": markdown_report,
    ".html": html_report,
}


def report_text(result: RepairResult, path: Path) -> str:
    """The report for `path`, its format chosen by the extension (.json, .md, .html)."""
    render = REPORT_FORMATS.get(path.suffix.lower())
    if render is None:
        raise OutputError(
            f"unknown report format {path.suffix!r}; use .json, .md or .html.", path=path
        )
    return render(result)


CHECK_COLUMNS = (
    ("module", "left"),
    ("k", "right"),
    ("captured", "right"),
    ("‖dW‖", "right"),
    ("rho F/H/O %", "right"),
    ("reversal u", "right"),
    ("verdict", "left"),
)


def _check_row(module: ModuleResult) -> list[str]:
    verdict = module.action if module.reason is None else f"{module.action}: {module.reason}"
    if module.note is not None:
        verdict += f" ({module.note})"
    return [
        module.name,
        str(module.subspace_rank),
        _percent(module.captured_energy),
        _number(module.update_norm),
        _rho(module.rho_before),
        "-" if module.reversal is None else f"{module.reversal:+.4f}",
        verdict,
    ]


def _check_summary(result: CheckResult) -> list[str]:
    against = (
        "D = W_aligned - W_base"
        if result.reversal_against == "D"
        else f"D_k in the basis, which holds {_percent(result.total_captured_energy)} of ||D||^2"
    )
    options = result.options
    lines = [
        f"{'PASS' if result.passed else 'FAIL'}: {len(result.modules)} modules checked in "
        f"{result.timings.total_s:.2f} s",
        f"total reversal u = {result.total_reversal:+.4f} (against {against}; "
        f"--max-reversal {options.max_reversal:g}, per module {options.max_module_reversal:g})",
        f"total off-subspace energy rho_O = {_percent(result.total_off_energy)} "
        f"(--max-off-energy {options.max_off_energy:g}, per module "
        f"{options.max_module_off_energy:g})",
        _probe_line(result.probe),
    ]
    lines.extend(f"failed: {failure}" for failure in result.failures[:10])
    if len(result.failures) > 10:
        lines.append(f"... and {len(result.failures) - 10} more (see --report)")
    return lines


def _probe_line(probe: dict[str, Any] | None) -> str:
    """The behavioural probe's figures, or why it did not run."""
    if probe is None or ("skipped" in probe and "margin_drop" not in probe):
        return f"behavioural probe: not run ({(probe or {}).get('skipped', 'not asked for')})"
    if "skipped" in probe:
        return f"behavioural probe: {probe['skipped']}"
    return (
        f"behavioural probe ({probe['refused_by_aligned']} of {probe['prompts']} harmful prompts "
        f"refused by ALIGNED, {probe['seconds']:.1f} s): refusal margin drop "
        f"{probe['margin_drop']:.2f} nats (--max-margin-drop {probe['max_margin_drop']:g}); "
        f"preferred start flips on {probe['flips']} ({_percent(probe['flip_share'])}; "
        f"--max-flip-share {probe['max_flip_share']:g})"
    )


def render_check(result: CheckResult, console: Console, max_rows: int = 20) -> None:
    """The modules that undo the alignment most (failures first), then the verdict."""
    shown = sorted(
        result.modules, key=lambda m: (m.action != "fail", -(m.reversal or 0.0), m.name)
    )[:max_rows]
    names = short_module_names([module.name for module in result.modules])
    columns = (*CHECK_COLUMNS[:1], CHECK_COLUMNS[-1], *CHECK_COLUMNS[1:-1], ("why", "left"))
    rows = []
    for module in shown:
        cells = _check_row(module)
        verdict = [module.action, *cells[1:-1], module.reason or ""]
        rows.append([_literal(names[module.name]), *(_literal(cell) for cell in verdict)])
    table, dropped = fitted_table(console, "adapter-fix check", columns, rows, keep=2)
    console.print(table)
    if dropped:
        console.print(_literal(f"not shown at this width: {', '.join(dropped)}; see --report"))
    if len(shown) < len(result.modules):
        console.print(
            f"{len(result.modules) - len(shown)} more modules not shown (the table lists failures "
            "and the largest reversals); every module is in --report / --json."
        )
    for line in _check_summary(result):
        console.print(_literal(line))


def check_markdown(result: CheckResult) -> str:
    """The check as Markdown: verdict, totals, every module (a CI step summary)."""
    header = [name for name, _ in CHECK_COLUMNS]
    lines = [
        "# adapter-fix check",
        "",
        *(f"- {line}" for line in _check_summary(result)),
        f"- inputs: {', '.join(f'{k} `{v}`' for k, v in result.inputs.items())}",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" if j == "left" else "---:" for _, j in CHECK_COLUMNS) + " |",
    ]
    for module in result.modules:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _check_row(module)) + " |")
    lines.append("")
    lines.append(
        "reversal u = -<dW, D> / ||D||^2: the share of the alignment displacement the update "
        "undoes. The ground truth is `adapter-fix eval`; check is a fast screen."
    )
    return "\n".join(lines) + "\n"


CHECK_FORMATS: dict[str, Callable[[CheckResult], str]] = {
    ".json": lambda result: json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n",
    ".md": check_markdown,
}


def render_basis(result: BasisResult, console: Console) -> None:
    """What the basis holds, in a few lines."""
    modules = result.modules
    ranks = [m.subspace_rank for m in modules] or [0]
    energies = [m.captured_energy for m in modules if m.subspace_rank] or [0.0]
    silent = sum(1 for m in modules if m.action != "computed")
    timings = result.timings
    lines = [
        f"basis of {len(modules)} modules: k min {min(ranks)}, mean "
        f"{sum(ranks) / len(ranks):.1f}, max {max(ranks)}; captured energy min "
        f"{_percent(min(energies))}, max {_percent(max(energies))}"
        + (f"; {silent} without signal" if silent else ""),
        f"time: {timings.total_s:.2f} s (read {timings.read_s:.2f} s, waited for reads "
        f"{timings.read_wait_s:.2f} s, subspace {timings.subspace_s:.2f} s, write "
        f"{timings.write_s:.2f} s)",
        f"written: {result.output}",
    ]
    for line in lines:
        console.print(_literal(line))


def render_notes(modules: list[ModuleResult], console: Console) -> None:
    """One warning line when modules carry notes (a basis short of the requested energy)."""
    noted = [module for module in modules if module.note is not None]
    if noted:
        more = (
            f" (and {len(noted) - 1} more; every note is in the report)" if len(noted) > 1 else ""
        )
        console.print(
            Text.assemble(
                ("warning: ", "yellow"), _literal(f"{noted[0].name}: {noted[0].note}{more}")
            )
        )
