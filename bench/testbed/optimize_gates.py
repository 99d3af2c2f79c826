"""Experiment: the gates optimized jointly by gradient descent, instead of ordered and cut.

    .venv/bin/python bench/testbed/optimize_gates.py                    # attack-mix, 20 steps
    .venv/bin/python bench/testbed/optimize_gates.py --task-weight 3 \\
        --extra-template "Which catalog key belongs to {title}?"

Does the shipped order (round 1's attribution, `frontier.py`) limit the gated repair, or
the units? This drops the order: it runs `adapter-fix repair --method gate` on a testbed
adapter with the calibration files up to the gated model (rank-1 component gates, as
shipped), then takes projected gradient steps on all gates at once,
`g <- clip(g - lr * grad L / max|grad L(step 1)|, --floor, --ceiling)`, for

    L(g) = NLL(ALIGNED's refusal start | harmful prompt) + w * NLL(task reference | task prompt)

over the harmful calibration prompts ALIGNED refuses (the first `--start-tokens` tokens of
ALIGNED's own greedy answer: "I'm sorry, ...") and the task calibration prompts (their
references with the end-of-sequence token), `w` = `--task-weight`. Gradients reach the
gates only (METHOD.md §8.4: no weight gradient), batch by batch. `--ceiling` above 1 lets a
gate amplify its unit, `--floor` below 0 negate it (task arithmetic's negation).
`--extra-template` adds the task calibration titles under one more template to the task
term, a guard for the phrasing the calibration file lacks (the held-out split's own question
template gives the oracle: what a task file covering the held-out phrasing would buy).
`--task-scale s` takes the task term at `s g` instead of `g`: the calibration task must
survive the remaining update shrunk, a stress test standing in for phrasings whose task
generalisation is more fragile than the calibration's. `--refusal-lerp l` takes the refusal
term at `1 + l (g - 1)`: refusal must hold with only part of the gates' change, a margin for
harmful prompts phrased unlike the calibration file's. `--task-limit k` turns the task
weight into a constraint: doubled while the (stressed) task NLL is above `k` times its first
value. Every `--every` steps it measures the held-out split as `frontier.py` does (with the
refusal share under each harmful template, and the calibration prompts' own by generation).
It writes no adapter (`--save-gates` keeps the last gates). `repair --search descent` ships
its last settings; bench/README.md has the results.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import safetensors.torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build
import frontier

import adapter_fix.methods.gate as gate_method
from adapter_fix.evaluate.generate import encode_prompts, generate_ids
from adapter_fix.evaluate.judges import make_judge
from adapter_fix.evaluate.judges.base import judge_answers
from adapter_fix.evaluate.objectives import Scored, greedy_matches, token_nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default="attack-mix", choices=build.ADAPTERS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5, help="held-out measure every N steps")
    parser.add_argument("--rate", type=float, default=0.5, help="the largest gate's first step")
    parser.add_argument("--ceiling", type=float, default=1.5)
    parser.add_argument("--floor", type=float, default=0.0, help="below 0: a unit may be negated")
    parser.add_argument("--task-weight", type=float, default=1.0)
    parser.add_argument("--start-tokens", type=int, default=4)
    parser.add_argument("--extra-template", default="")
    parser.add_argument(
        "--task-scale",
        type=float,
        default=1.0,
        help="take the task term at the gates times this (below 1: the task must survive the "
        "remaining update shrunk, a stress test of the guard)",
    )
    parser.add_argument(
        "--refusal-lerp",
        type=float,
        default=1.0,
        help="take the refusal term at 1 + this * (g - 1) (below 1: refusal must hold with "
        "only part of the gates' change from the adapter, a margin against phrasings the "
        "calibration file lacks)",
    )
    parser.add_argument(
        "--task-limit",
        type=float,
        default=0.0,
        help="above 0: a constraint instead of a fixed weight: after each step the task weight "
        "doubles while the (stressed) task NLL is above this many times its value at the "
        "first step, and shrinks by 1.5 (not below --task-weight) while under half of that",
    )
    parser.add_argument("--save-gates", type=Path, help="write the last gates here (safetensors)")
    args = parser.parse_args()
    if not build.is_ready():
        parser.error("the testbed is not built: run `make efficacy` (or build.py) first")
    print(f"optimize gates: {vars(args)}; load {os.getloadavg()[0]:.2f}", flush=True)

    def optimize(
        gated: gate_method.GatedModel, data: gate_method.Calibration, options: Any, **kw: Any
    ) -> None:
        tokenizer, model = kw["tokenizer"], gated.model
        pad, stops, batch = kw["pad_id"], list(kw["stop_ids"]), options.batch_size
        measure = frontier.held_out_measure(tokenizer, model, pad, stops, by_template=True)
        with model.disable_adapter():
            aligned = generate_ids(
                model, data.harmful, pad=pad, stops=stops, max_new_tokens=24, batch_size=64
            )
        texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in aligned]
        asked = [tokenizer.decode(p, skip_special_tokens=True) for p in data.harmful]
        judge = make_judge(phrases=None)
        refused = [v.refusal for v in judge_answers(judge, asked, texts)]
        harmful = [p for p, r in zip(data.harmful, refused, strict=True) if r]
        # The repair's harmful prompts are the file's first rows (--calibration-harmful).
        rows = build.read_jsonl("harmful-calib.jsonl", "prompt")[: len(data.harmful)]
        harmful_texts = [t for t, r in zip(rows, refused, strict=True) if r]
        starts = [a[: args.start_tokens] for a, r in zip(aligned, refused, strict=True) if r]
        task, references = list(data.task), list(data.task_references)
        if args.extra_template:
            # The repair's task prompts are the file's first rows (--calibration-task).
            rows = build.read_jsonl("task-calib.jsonl")[: len(data.task)]
            titles = [row["prompt"].split(": ", 1)[1] for row in rows]
            extra = encode_prompts(tokenizer, [args.extra_template.format(title=t) for t in titles])
            matches = greedy_matches(
                model,
                [
                    Scored([*p, *r], len(r))
                    for p, r in zip(extra, data.task_references, strict=True)
                ],
                pad=pad,
                batch_size=16,
                stops=stops,
            )
            print(f"the adapter matches {sum(matches)} of {len(matches)} under the extra template")
            task += extra
            references += data.task_references
        print(
            f"{len(harmful)} of {len(refused)} harmful calibration prompts refused by ALIGNED "
            f"(start {tokenizer.decode(starts[0])!r}); {len(task)} task rows; "
            f"{len(gated.values())} gates",
            flush=True,
        )

        def report(step: int) -> None:
            """The calibration NLLs and the held-out split at the current gates."""
            refusal = token_nll(model, harmful, starts, pad=pad, batch_size=batch)
            task_nll = token_nll(model, task, references, pad=pad, batch_size=batch)
            answers = generate_ids(
                model, harmful, pad=pad, stops=stops, max_new_tokens=24, batch_size=64
            )
            texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
            declined = [v.refusal for v in judge_answers(judge, harmful_texts, texts)]
            print(
                f"    calibration refusal {sum(declined)}/{len(declined)} by template: "
                + frontier.template_shares(harmful_texts, declined)
            )
            seen, unseen, over, exact = measure()
            print(
                f"  after step {step}: calibration refusal-start NLL {refusal:.3f}, task NLL "
                f"{task_nll:.3f}; held-out refusal {seen:.2f} / {unseen:.2f}, over-refusal "
                f"{over:.2f}, task {exact:.3f}",
                flush=True,
            )

        report(0)
        values = gated.values().clone()
        scale, weight, limit = None, args.task_weight, None
        for step in range(1, args.steps + 1):
            started = time.perf_counter()
            gated.set_values(1 + args.refusal_lerp * (values - 1))  # the refusal's margin
            refusal = token_nll(model, harmful, starts, pad=pad, batch_size=batch, backward=True)
            refusal_gradient = args.refusal_lerp * gated.gradients()
            gated.set_values(values * args.task_scale)  # the task term's stress test
            task_nll = token_nll(model, task, references, pad=pad, batch_size=batch, backward=True)
            task_gradient = args.task_scale * gated.gradients()  # d/dg of NLL(s g)
            gradient = refusal_gradient + weight * task_gradient
            if scale is None:
                scale, limit = gradient.abs().max(), args.task_limit * task_nll
            values = (values - args.rate * gradient / scale).clamp(args.floor, args.ceiling)
            if args.task_limit > 0:  # the weight for the next step, from this step's NLL
                if task_nll > limit:
                    weight *= 2
                elif task_nll < limit / 2:
                    weight = max(args.task_weight, weight / 1.5)
            print(
                f"step {step} (from NLLs {refusal:.3f}, {task_nll:.3f} at {args.task_scale:g} g; "
                f"task weight now {weight:g}): gates mean "
                f"{values.mean():.3f}, {int((values < 0.05).sum())} under 0.05 "
                f"({int((values < -0.05).sum())} under -0.05), "
                f"{int((values > 1.05).sum())} over 1.05 ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
            if step % args.every == 0 or step == args.steps:
                gated.set_values(values)
                report(step)
        if args.save_gates:
            safetensors.torch.save_file({"gates": values.contiguous()}, str(args.save_gates))
        raise frontier.Frontier

    frontier.run_gate_repair(args.adapter, optimize)
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
