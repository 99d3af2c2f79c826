"""`inspect`: the summary, the per-module table and the warnings on the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from adapter_fix.report.table import (
    fitted_table,
    literal,
    number,
    render_warnings,
    short_module_names,
)
from adapter_fix.results import InspectResult

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
        overview.add_row(name, literal(value))
    console.print(overview)

    names = short_module_names([module.name for module in result.modules])
    table, dropped = fitted_table(
        console,
        "LoRA modules",
        INSPECT_COLUMNS,
        [
            [
                literal(names[module.name]),
                literal("-" if module.update_norm is None else number(module.update_norm)),
                literal(module.rank),
                literal("yes") if module.finite else literal("NO", "red"),
                literal("-" if module.effective_rank is None else f"{module.effective_rank:.2f}"),
                literal(number(module.scaling)),
                literal(module.kind),
                literal(f"{module.shape[0]} x {module.shape[1]}"),
            ]
            for module in result.modules
        ],
        keep=2,
    )
    console.print(table)
    if dropped:
        console.print(literal(f"(not shown at this width: {', '.join(dropped)}; see --json)"))
    render_warnings(result.warnings, console)
