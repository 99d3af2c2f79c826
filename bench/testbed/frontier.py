"""The gated repair's trade-off on held-out prompts, along the order its first round takes.

    .venv/bin/python bench/testbed/frontier.py                       # attack-mix, SVD units
    .venv/bin/python bench/testbed/frontier.py --units activation    # role-separated units
    .venv/bin/python bench/testbed/frontier.py --adapter attack-benign --shares 0 0.5 1
    .venv/bin/python bench/testbed/frontier.py --uniform 1 0.8 0.6 0.4 0.2   # the baseline
    .venv/bin/python bench/testbed/frontier.py --off-value -1   # units negated, not switched off

A diagnostic, not a repair: it runs `adapter-fix repair --method gate` on a testbed adapter
with the calibration files (defaults otherwise) up to round 1's attribution order, then,
instead of the round's search, switches off the first `share x n` units of that order for
each share and measures, at each point, what the search sees (the calibration refusal
share and the kept task, teacher-forced) beside what `eval` would report on the held-out
split (refusal on seen and unseen categories by greedy generation and the keyword judge,
task exact match teacher-forced). It writes no adapter. If no point keeps the held-out
task while restoring held-out refusals, no stopping rule can: the units or their order
are what limit the repair.

`--units activation` rewrites each LoRA layer's factors, before round 1, in the basis that
separates its inner activations `z = A x` on the harmful calibration prompts (with the
adapter's own answers) from those on the task prompts (with their references): the
generalized eigenvectors `V` of `(C_h, C_t)`, `C = E[z z^T]` over tokens, so that
`V^T C_t V = I` and `V^T C_h V = diag(lambda)` (the update is unchanged: `A <- V^T A`,
`B <- B V^-T`). Each unit then carries harmful-prompt activity `lambda` times its task
activity. The shipped gate uses the singular components (`--units svd`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build
import data

import adapter_fix.commands.repair as repair_command
import adapter_fix.methods.gate as gate_method
from adapter_fix.cli.main import main as cli
from adapter_fix.evaluate.generate import encode_prompts, generate_ids, reference_ids
from adapter_fix.evaluate.judges import make_judge
from adapter_fix.evaluate.judges.base import judge_answers
from adapter_fix.evaluate.objectives import Scored, greedy_matches

WORK = build.WORK
PROMPTS = WORK / "prompts"
SHARES = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0)
RIDGE = 1e-3
"""Ridge on `C_t`, as a share of its mean eigenvalue, so a direction the task never uses
does not divide by zero."""


class Frontier(Exception):
    """Raised once round 1's points are measured: the repair stops there."""


def inner_moments(
    gated: gate_method.GatedModel, rows: Sequence[list[int]], pad: int, batch: int = 16
) -> dict[str, torch.Tensor]:
    """Per gated layer, `E[z z^T]` (`r x r`, float64) of `z = A x` over the rows' tokens."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask: list[torch.Tensor] = []
    handles = []
    for layer in gated.layers:
        module = gate_method._lora_layer(gated.model, layer.name)
        sums[layer.name] = torch.zeros(layer.rank, layer.rank, dtype=torch.float64)
        counts[layer.name] = 0

        def record(_module: Any, _inputs: Any, output: torch.Tensor, name: str = layer.name):
            inner = output.detach().reshape(-1, output.shape[-1])[mask[0].reshape(-1)].double()
            sums[name] += inner.T @ inner
            counts[name] += inner.shape[0]

        handles.append(module.lora_A[module.active_adapters[0]].register_forward_hook(record))
    try:
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(row)) + list(row) for row in chunk])
            attention = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in chunk])
            mask[:] = [attention.bool()]
            with torch.no_grad():
                gated.model(input_ids=ids, attention_mask=attention)
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / max(counts[name], 1) for name in sums}


def separate_by_activation(
    gated: gate_method.GatedModel, data: gate_method.Calibration, pad: int, stops: list[int]
) -> list[float]:
    """Rewrite every gated layer's factors in the activation-separating basis; the lambdas."""
    answers = generate_ids(
        gated.model, data.harmful, pad=pad, stops=stops, max_new_tokens=24, batch_size=32
    )
    harmful = inner_moments(
        gated, [[*p, *a] for p, a in zip(data.harmful, answers, strict=True)], pad
    )
    task = inner_moments(
        gated, [[*p, *r] for p, r in zip(data.task, data.task_references, strict=True)], pad
    )
    lambdas: list[float] = []
    for layer in gated.layers:
        task_moment = task[layer.name]
        ridge = RIDGE * torch.trace(task_moment) / task_moment.shape[0]
        cholesky = torch.linalg.cholesky(task_moment + ridge * torch.eye(task_moment.shape[0]))
        inverse = torch.linalg.inv(cholesky)
        whitened = inverse @ harmful[layer.name] @ inverse.T
        values, vectors = torch.linalg.eigh((whitened + whitened.T) / 2)
        basis = inverse.T @ vectors  # V: V^T C_t V = I, V^T C_h V = diag(values)
        module = gate_method._lora_layer(gated.model, layer.name)
        adapter = module.active_adapters[0]
        lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        with torch.no_grad():
            new_a = basis.T @ lora_a.double()
            new_b = lora_b.double() @ torch.linalg.inv(basis).T
            lora_a.copy_(new_a.to(lora_a.dtype))
            lora_b.copy_(new_b.to(lora_b.dtype))
        lambdas.extend(values.tolist())
    return sorted(lambdas)


def held_out_measure(
    tokenizer: Any,
    model: torch.nn.Module,
    pad: int,
    stops: list[int],
    over_refusal: bool = True,
    by_template: bool = False,
) -> Callable[[], tuple[float, float, float, float]]:
    """A function that measures the model as it stands on the held-out split: refusal on the
    seen and unseen categories and over-refusal (greedy, 24 tokens, the keyword judge; NaN
    without `over_refusal`, which saves generating the benign prompts), and task exact
    match (teacher-forced, `greedy_matches`), as `eval` reports them. With `by_template` it
    also prints the refusal share under each held-out harmful template."""
    judge = make_judge(phrases=None)
    harmful_rows, benign, task_rows_json = (
        build.read_jsonl("harmful-eval.jsonl"),
        build.read_jsonl("benign-eval.jsonl", "prompt") if over_refusal else [],
        build.read_jsonl("task-eval.jsonl"),
    )
    harmful = [row["prompt"] for row in harmful_rows]
    prompts = encode_prompts(tokenizer, [*harmful, *benign])
    task_prompts = encode_prompts(tokenizer, [row["prompt"] for row in task_rows_json])
    task_rows = [
        Scored([*prompt, *reference], len(reference))
        for prompt, reference in zip(
            task_prompts,
            (reference_ids(tokenizer, row["reference"], stops) for row in task_rows_json),
            strict=True,
        )
    ]

    def share(flags: Sequence[bool]) -> float:
        return sum(flags) / len(flags)

    def measure() -> tuple[float, float, float, float]:
        answers = generate_ids(
            model, prompts, pad=pad, stops=stops, max_new_tokens=24, batch_size=48
        )
        texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
        verdicts = [v.refusal for v in judge_answers(judge, [*harmful, *benign], texts)]
        declined = verdicts[: len(harmful)]
        seen = [v for v, row in zip(declined, harmful_rows, strict=True) if row["seen"]]
        unseen = [v for v, row in zip(declined, harmful_rows, strict=True) if not row["seen"]]
        matches = greedy_matches(model, task_rows, pad=pad, batch_size=16, stops=stops)
        over = share(verdicts[len(harmful) :]) if benign else float("nan")
        if by_template:
            print("    held-out refusal by template: " + template_shares(harmful, declined))
        return share(seen), share(unseen), over, share(matches)

    return measure


def template_shares(prompts: Sequence[str], refused: Sequence[bool]) -> str:
    """The refusal share of `prompts` under each harmful template of the testbed, as text."""
    templates = [t for split in data.HARMFUL_TEMPLATES.values() for t in split]
    patterns = {t: re.compile(re.escape(t).replace(re.escape("{act}"), ".+")) for t in templates}
    counts: dict[str, list[int]] = {}
    for prompt, flag in zip(prompts, refused, strict=True):
        template = next(t for t, p in patterns.items() if p.fullmatch(prompt))
        counts.setdefault(template, [0, 0])[0] += int(flag)
        counts[template][1] += 1
    return "; ".join(f"{t!r} {k}/{n}" for t, (k, n) in counts.items())


def run_gate_repair(adapter: str, gate: Callable[..., Any], *patches: Any) -> None:
    """`adapter-fix repair --method gate` on a testbed adapter with the calibration files
    (defaults otherwise), `gate(gated, data, options, tokenizer=..., **kw)` called in place of
    `gate_repair`, under `patches` (more `mock.patch` objects). `gate` (or a patch) must raise
    `Frontier` to end the run, which then writes nothing; a run that went on would write its
    adapter into a temporary folder, deleted on return."""
    captured: dict[str, Any] = {}
    real_encode = repair_command.encode_prompts

    def encode(tokenizer: Any, texts: Sequence[str], system: str | None = None) -> Any:
        captured["tokenizer"] = tokenizer
        return real_encode(tokenizer, texts, system)

    def replaced(gated: gate_method.GatedModel, data: Any, options: Any, **kw: Any) -> Any:
        return gate(gated, data, options, tokenizer=captured["tokenizer"], **kw)

    scratch = tempfile.TemporaryDirectory(prefix="gate-experiment-")
    out = Path(scratch.name) / "never-written"  # the run stops before writing
    command = [
        "repair", str(WORK / "base"), str(WORK / "aligned"), str(WORK / "adapters" / adapter),
        "-o", str(out), "--method", "gate",
        "--harmful", str(PROMPTS / "harmful-calib.jsonl"),
        "--benign", str(PROMPTS / "benign-calib.jsonl"),
        "--task", str(PROMPTS / "task-calib.jsonl"),
    ]  # fmt: skip
    os.environ["ADAPTER_FIX_DEBUG"] = "1"  # let `Frontier` through the CLI's error wrapper
    with contextlib.ExitStack() as stack:
        stack.enter_context(scratch)
        stack.enter_context(mock.patch.object(repair_command, "encode_prompts", encode))
        stack.enter_context(mock.patch.object(repair_command, "gate_repair", replaced))
        for patch in patches:
            stack.enter_context(patch)
        stack.enter_context(contextlib.suppress(Frontier))
        cli(command, standalone_mode=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default="attack-mix", choices=build.ADAPTERS)
    parser.add_argument("--units", choices=("svd", "activation"), default="svd")
    parser.add_argument("--shares", type=float, nargs="+", default=list(SHARES))
    parser.add_argument(
        "--uniform",
        type=float,
        nargs="+",
        help="instead of the order: every gate at each of these values (the whole update "
        "scaled), the baseline the order should beat",
    )
    parser.add_argument(
        "--off-value",
        type=float,
        default=0.0,
        help="the gate value a unit taken off the adapter gets (below 0: the unit negated)",
    )
    args = parser.parse_args()
    if not build.is_ready():
        parser.error("the testbed is not built: run `make efficacy` (or build.py) first")
    print(f"frontier: {args.adapter}, {args.units} units; load {os.getloadavg()[0]:.2f}")
    captured: dict[str, Any] = {}

    def gate(
        gated: gate_method.GatedModel, data: gate_method.Calibration, options: Any, **kw: Any
    ) -> Any:
        captured["gated"] = gated
        captured["measure"] = held_out_measure(
            kw.pop("tokenizer"), gated.model, kw["pad_id"], list(kw["stop_ids"]), over_refusal=False
        )
        if args.units == "activation":
            lambdas = separate_by_activation(gated, data, kw["pad_id"], list(kw["stop_ids"]))
            quantiles = [lambdas[int(q * (len(lambdas) - 1))] for q in (0, 0.1, 0.5, 0.9, 1)]
            print("lambda quantiles 0/10/50/90/100%: " + " ".join(f"{q:.3g}" for q in quantiles))
        return gate_method.gate_repair(gated, data, options, **kw)

    def held_out() -> str:
        """Held-out refusal (seen, unseen) and task exact match at the current gates."""
        seen, unseen, _over, task = captured["measure"]()
        return f"{seen:.2f} | {unseen:.2f} | {task:.3f}"

    def frontier(
        count: int, *, refusal: Callable[[int], float], task_kept: Callable[[int], float], **_: Any
    ) -> int:
        if args.uniform:
            print("| every gate at | held-out refusal seen | unseen | held-out task EM |")
            print("| --- | --- | --- | --- |")
            gated = captured["gated"]
            for scale in args.uniform:
                gated.set_values(torch.full_like(gated.values(), scale))
                print(f"| {scale:g} | {held_out()} |", flush=True)
            raise Frontier
        print(f"round 1 orders {count} candidate units")
        print("| units off | calibration refusal | calibration kept task | held-out refusal seen "
              "| unseen | held-out task EM |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- |")
        for off in sorted({round(count * share) for share in args.shares}):
            started = time.perf_counter()
            calibration_refusal, kept = refusal(off), task_kept(off)
            print(
                f"| {off} | {calibration_refusal:.2f} | {kept:.2f} | {held_out()} |  "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        raise Frontier

    def switch_off(
        gated: gate_method.GatedModel, current: torch.Tensor, order: Sequence[int], count: int
    ) -> None:
        values = current.clone()
        values[list(order[:count])] = args.off_value
        gated.set_values(values)

    run_gate_repair(
        args.adapter,
        gate,
        mock.patch.object(gate_method, "search_prefix", frontier),
        mock.patch.object(gate_method, "_switch_off", switch_off),
    )
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
