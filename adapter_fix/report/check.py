"""`check`: the verdict and the table on the terminal, and the Markdown report (a CI summary)."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from adapter_fix.report.table import (
    fitted_table,
    literal,
    number,
    percent,
    rho_shares,
    short_module_names,
)
from adapter_fix.results import CheckResult, ModuleResult

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
        percent(module.captured_energy),
        number(module.update_norm),
        rho_shares(module.rho_before),
        "-" if module.reversal is None else f"{module.reversal:+.4f}",
        verdict,
    ]


def _check_summary(result: CheckResult) -> list[str]:
    against = (
        "D = W_aligned - W_base"
        if result.reversal_against == "D"
        else f"D_k in the basis, which holds {percent(result.total_captured_energy)} of ||D||^2"
    )
    options = result.options
    lines = [
        f"{'PASS' if result.passed else 'FAIL'}: {len(result.modules)} modules checked in "
        f"{result.timings.total_s:.2f} s",
        f"total reversal u = {result.total_reversal:+.4f} (against {against}; "
        f"--max-reversal {options.max_reversal:g}, per module {options.max_module_reversal:g})",
        f"total off-subspace energy rho_O = {percent(result.total_off_energy)} "
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
        f"preferred start flips on {probe['flips']} ({percent(probe['flip_share'])}; "
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
        rows.append([literal(names[module.name]), *(literal(cell) for cell in verdict)])
    table, dropped = fitted_table(console, "adapter-fix check", columns, rows, keep=2)
    console.print(table)
    if dropped:
        console.print(literal(f"not shown at this width: {', '.join(dropped)}; see --report"))
    if len(shown) < len(result.modules):
        console.print(
            f"{len(result.modules) - len(shown)} more modules not shown (the table lists failures "
            "and the largest reversals); every module is in --report / --json."
        )
    for line in _check_summary(result):
        console.print(literal(line))


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
