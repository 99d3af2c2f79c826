"""Report rendering: long tables collapse to the modules changed most."""

from __future__ import annotations

import io

from rich.console import Console

from adapter_fix.options import RepairOptions
from adapter_fix.report.repair import render_repair
from adapter_fix.results import ModuleResult, RepairResult, Timings


def _result(count: int) -> RepairResult:
    modules = [
        ModuleResult(
            name=f"model.layers.{i // 2}.self_attn.{'q' if i % 2 else 'v'}_proj",
            kind="linear",
            shape=(8, 8),
            rank=2,
            scaling=2.0,
            action="repaired",
            update_norm=1.0,
            repaired_norm=0.5,
            relative_change=i / count,
            rho_before={"full": 0.1, "partial": 0.2, "off": 0.7},
            rho_after={"full": 0.2, "partial": 0.3, "off": 0.5},
        )
        for i in range(count)
    ]
    inputs = {"base": "b", "aligned": "a", "adapter": "l", "adapter_sha256": "0" * 64}
    timings = Timings(total_s=1.0, read_s=0.5, subspace_s=0.4, solve_s=0.1)
    return RepairResult(RepairOptions(), inputs, modules, timings)


def test_long_tables_show_the_modules_changed_most_and_point_to_the_report() -> None:
    buffer = io.StringIO()
    render_repair(_result(50), Console(file=buffer, width=200), max_rows=10)
    text = buffer.getvalue()
    assert "40 more modules not shown" in text
    assert "model.layers.24.self_attn.q_proj" in text  # the largest relative change
    assert "model.layers.0.self_attn.v_proj" not in text  # the smallest
    assert "energy kept: 25.0%" in text
    assert "50.0% of the work reading weights" in text
