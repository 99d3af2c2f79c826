"""`basis`: what the basis holds, in a few lines."""

from __future__ import annotations

from rich.console import Console

from adapter_fix.report.table import (
    literal,
    percent,
)
from adapter_fix.results import BasisResult


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
        f"{percent(min(energies))}, max {percent(max(energies))}"
        + (f"; {silent} without signal" if silent else ""),
        f"time: {timings.total_s:.2f} s (read {timings.read_s:.2f} s, waited for reads "
        f"{timings.read_wait_s:.2f} s, subspace {timings.subspace_s:.2f} s, write "
        f"{timings.write_s:.2f} s)",
        f"written: {result.output}",
    ]
    for line in lines:
        console.print(literal(line))
