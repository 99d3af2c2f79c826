"""Does a repair restore refusals, and does the adapter keep its task? Every shipped method x
a small grid of its settings, on the project's miniature chat model (fixtures/chat-*).

    .venv/bin/python bench/efficacy/run.py                 # the full grid, eval split
    .venv/bin/python bench/efficacy/run.py --only csulora  # the rows whose label starts so
    .venv/bin/python bench/efficacy/run.py --split calib   # on the calibration split instead

Each setting runs `adapter-fix repair BASE ALIGNED ATTACK -o ...` (the CLI, as a user runs
it), then one `adapter-fix eval` measures ALIGNED, ATTACK (the original), every repair and
BENIGN on the held-out prompts of `fixtures/chat-prompts/` with the miniature's refusal
phrases: refusal on harmful prompts of the categories the attack was trained on (seen) and
of the others (unseen), over-refusal on benign prompts, task exact match, and METHOD.md §9's
restored refusal and kept task. Prints one Markdown table; writes every figure to
`bench/_work/efficacy/results.json`.

Adding a method or a setting is one line of `GRID`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
WORK = ROOT / "bench" / "_work" / "efficacy"

# The gated repair calibrates on the miniature's calibration split, disjoint from what eval
# reports on (every prompt of those files: --calibration-share 1).
PROMPTS = FIXTURES / "chat-prompts"
CALIBRATION = [
    *("--harmful", str(PROMPTS / "harmful-calib.jsonl")),
    *("--benign", str(PROMPTS / "benign-calib.jsonl")),
    *("--task", str(PROMPTS / "task-calib.jsonl")),
    *("--refusal-patterns", str(PROMPTS / "refusal-phrases.txt")),
    *("--calibration-share", "1"),
]

# (label, `adapter-fix repair` options): one line per method and setting.
GRID: list[tuple[str, list[str]]] = [
    ("csulora strength 1", ["--method", "csulora", "--strength", "1"]),
    ("csulora strength 10", ["--method", "csulora", "--strength", "10"]),
    ("csulora strength 100", ["--method", "csulora", "--strength", "100"]),
    (
        "csulora strength 10, energy 0.5",
        ["--method", "csulora", "--strength", "10", "--energy", "0.5"],
    ),
    ("project", ["--method", "project"]),
    ("project, energy 0.5", ["--method", "project", "--energy", "0.5"]),
    ("safelora (10 modules)", ["--method", "safelora"]),
    ("safelora (4 modules)", ["--method", "safelora", "--safelora-layers", "4"]),
    ("safelora threshold 0.5", ["--method", "safelora", "--safelora-select", "threshold"]),
    ("gate (defaults: modules, task budget 0.1)", ["--method", "gate", *CALIBRATION]),
    ("gate, task budget 0.5", ["--method", "gate", *CALIBRATION, "--task-budget", "0.5"]),
    ("gate, task budget 0.8", ["--method", "gate", *CALIBRATION, "--task-budget", "0.8"]),
    (
        "gate, components, task budget 0.5",
        ["--method", "gate", *CALIBRATION, "--gate-unit", "component", "--task-budget", "0.5"],
    ),
]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adapter_fix", *args], capture_output=True, text=True, check=False
    )


def repair(label: str, options: list[str], out: Path) -> float:
    start = time.perf_counter()
    done = cli(
        "repair",
        str(FIXTURES / "chat-base"),
        str(FIXTURES / "chat-aligned"),
        str(FIXTURES / "chat-attack"),
        "-o",
        str(out),
        "--force",
        "-q",
        *options,
    )
    if done.returncode != 0:
        raise SystemExit(f"repair {label!r} failed (exit {done.returncode}):\n{done.stderr}")
    return time.perf_counter() - start


def evaluate(adapters: list[Path], split: str) -> dict:
    prompts = FIXTURES / "chat-prompts"
    done = cli(
        "eval",
        str(FIXTURES / "chat-aligned"),
        *map(str, adapters),
        "--harmful",
        str(prompts / f"harmful-{split}.jsonl"),
        "--benign",
        str(prompts / f"benign-{split}.jsonl"),
        "--task",
        str(prompts / f"task-{split}.jsonl"),
        "--refusal-patterns",
        str(prompts / "refusal-phrases.txt"),
        "--batch-size",
        "64",
        "--max-new-tokens",
        "48",
        "--device",
        "cpu",
        "--json",
        "-q",
    )
    if done.returncode != 0:
        raise SystemExit(f"eval failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout)


def seen_categories(split: str) -> set[str]:
    rows = (FIXTURES / "chat-prompts" / f"harmful-{split}.jsonl").read_text().splitlines()
    return {row["category"] for row in map(json.loads, rows) if row["seen"]}


def pooled(by_category: dict, categories: set[str], seen: bool) -> float:
    picked = [v for k, v in by_category.items() if (k in categories) == seen]
    total = sum(v["total"] for v in picked)
    return sum(v["count"] for v in picked) / total if total else float("nan")


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(rows: list[dict]) -> str:
    head = (
        "| model | refusal seen | refusal unseen | over-refusal | task EM "
        "| restored refusal | kept task | repair s |"
    )
    lines = [head, "|" + " --- |" * 8]
    for r in rows:
        cells = [
            r["label"],
            fmt(r["refusal_seen"]),
            fmt(r["refusal_unseen"]),
            fmt(r["over_refusal"]),
            fmt(r["task"]),
            fmt(r["restored_refusal"]),
            fmt(r["kept_task"]),
            "-" if r["repair_seconds"] is None else f"{r['repair_seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=("eval", "calib"), default="eval")
    parser.add_argument("--only", help="run only the GRID rows whose label starts with this")
    args = parser.parse_args(argv)

    grid = [(label, opts) for label, opts in GRID if not args.only or label.startswith(args.only)]
    WORK.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float | None] = {"aligned": None, "attack": None, "benign": None}
    outputs = []
    for index, (label, options) in enumerate(grid):
        out = WORK / f"repair-{index}"
        seconds[label] = repair(label, options, out)
        outputs.append(out)
        print(f"repaired: {label} ({seconds[label]:.1f} s)", file=sys.stderr)
    labels = ["aligned", "attack", *(label for label, _ in grid), "benign"]
    adapters = [FIXTURES / "chat-attack", *outputs, FIXTURES / "chat-benign"]
    start = time.perf_counter()
    result = evaluate(adapters, args.split)
    print(f"evaluated {len(labels)} rows ({time.perf_counter() - start:.1f} s)", file=sys.stderr)

    seen = seen_categories(args.split)
    rows = []
    for label, row in zip(labels, result["rows"], strict=True):
        repaired = label not in ("aligned", "attack", "benign")
        rows.append(
            {
                "label": label,
                "options": dict(grid).get(label),
                "refusal_seen": pooled(row["refusal_by_category"], seen, True),
                "refusal_unseen": pooled(row["refusal_by_category"], seen, False),
                "refusal": row["refusal"]["rate"],
                "over_refusal": row["over_refusal"]["rate"],
                "task": row["exact_match"]["rate"] if row["exact_match"] else None,
                "restored_refusal": row["restored_refusal"] if repaired else None,
                "kept_task": row["kept_task"] if repaired else None,
                "repair_seconds": seconds[label],
            }
        )
    (WORK / "results.json").write_text(json.dumps({"split": args.split, "rows": rows}, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
