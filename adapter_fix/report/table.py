"""What every terminal table shares: short module names, tables that fit, literal cells."""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from adapter_fix.display import printable
from adapter_fix.results import ModuleResult


def number(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


def literal(value: object, style: str = "") -> Text:
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


def render_warnings(warnings: Sequence[str], console: Console) -> None:
    """One line per warning, shown literally."""
    for warning in warnings:
        console.print(Text.assemble(("warning: ", "yellow"), printable(warning)))


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def rho_shares(rho: dict[str, float]) -> str:
    if not rho:
        return "-"
    return "/".join(f"{100 * rho[c]:.0f}" for c in ("full", "partial", "off"))


def render_notes(modules: list[ModuleResult], console: Console) -> None:
    """One warning line when modules carry notes (a basis short of the requested energy)."""
    noted = [module for module in modules if module.note is not None]
    if noted:
        more = (
            f" (and {len(noted) - 1} more; every note is in the report)" if len(noted) > 1 else ""
        )
        console.print(
            Text.assemble(
                ("warning: ", "yellow"), literal(f"{noted[0].name}: {noted[0].note}{more}")
            )
        )
