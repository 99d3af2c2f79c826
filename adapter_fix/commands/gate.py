"""`repair --method gate`: the calibration prompts, the judge, then the gated repair.

The CLI (adapter_fix/cli/repair.py) gathers the gate's flags into `gate`;
this turns them into the calibration sets, the judge and `GateOptions`, and
runs `commands.repair.repair_gated`, printing each round's measurement.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapter_fix.io.sources import HubOptions, Source

if TYPE_CHECKING:
    from rich.console import Console

    from adapter_fix.methods.gate import Round


def repair_with_gates(
    sources: list[Source],
    adapter: Any,
    options: Any,
    gate: dict[str, Any],
    hub: HubOptions,
    out: Path | None,
    force: bool,
    console: Console | None,
) -> Any:
    """`repair --method gate`: calibration sets split by seed, the judge, then the repair.

    Each round's measurement is printed on `console` (None: quiet)."""
    from adapter_fix.commands.eval import quiet_transformers
    from adapter_fix.commands.repair import calibration_sets, repair_gated
    from adapter_fix.evaluate.judges import make_judge
    from adapter_fix.evaluate.model import require_eval_extra
    from adapter_fix.methods.gate import GateOptions

    require_eval_extra()
    quiet_transformers()
    calibration = calibration_sets(
        harmful=gate["harmful"],
        benign=gate["benign"],
        task=gate["task"],
        field=gate["field"],
        system=gate["system"],
        share=gate["calibration_share"],
        seed=options.subspace.seed,
        hub=hub,
        harmful_limit=gate["calibration_harmful"],
        task_limit=gate["calibration_task"],
    )
    judge = make_judge(phrases=gate["refusal_patterns"])
    gate_options = GateOptions(
        unit=gate["gate_unit"],
        target_refusal=gate["target_refusal"],
        task_budget=gate["task_budget"],
        rounds=gate["rounds"],
        steps=gate["ig_steps"],
        margin_tokens=gate["margin_tokens"],
        min_harm_share=gate["min_harm_share"],
        refine=gate["refine"],
        search=gate["search"],
        descent_steps=gate["descent_steps"],
        descent_start=gate["descent_start"],
        max_new_tokens=gate["calibration_tokens"],
        batch_size=gate["batch_size"],
    )
    inputs = {"base": sources[0].identity}
    return repair_gated(
        sources[1],
        adapter,
        options,
        gate_options,
        calibration,
        judge,
        out=out,
        force=force,
        device=options.subspace.device,
        dtype=gate["dtype"],
        inputs=inputs,
        on_round=None
        if console is None
        else lambda r: console.print(round_line(r), markup=False, highlight=False),
    )


def round_line(r: Round) -> str:
    """One round's measurement as printed: a round of the order search, or a checkpoint of
    the descent."""
    if r.steps:
        moved = (
            f"step {r.steps}: {len(r.switched_off)} gate(s) off, {len(r.negated)} negated, "
            f"{r.amplified} amplified"
        )
    else:
        moved = f"round {r.index}: {len(r.switched_off)} gate(s) off" + (
            f", {len(r.restored)} given back" if r.restored else ""
        )
    return (
        moved
        + f", calibration refusals {r.refusals}/{r.prompts}"
        + (f", benign refused {r.over_refusals}/{r.benign_prompts}" if r.benign_prompts else "")
        + ", task kept "
        + ("not measurable" if r.task_kept is None else f"{r.task_kept:.0%}")
        + f" ({r.seconds:.1f} s)"
        + (": no refusal gained, undone" if r.undone else "")
    )
