"""`--workers`: each weight-space command at 1 and 2 workers, warm and cold, and a cost model.

On the synthetic llama-3-8b checkpoint of `make_checkpoints.py` (`--layers`,
default 2), each figure is one child process under perf.py's wrapper
(process wall time, interpreter start to exit, and its own peak RSS), with
the load average printed before and after it and the command that
reproduces it. Figures:

- `repair` (csulora) and `repair --method safelora` at 1 and 2 workers, page
  cache warm, and at the default workers with the checkpoint evicted (cold);
  the I/O floor (plain safetensors reads of the same tensors) warm and cold;
- `basis --like ADAPTER` at 1 and 2 workers;
- `check --basis` and `repair --basis` at 1 and 2 workers on a 32-layer adapter and
  basis (engine_bench.py's: the 2-layer basis repeated for every layer);
- the outputs of 1 and 2 workers compared byte for byte;
- the cost model: per module, the CPU seconds of the 1-worker run (`c =
  (CPU - CPU of the imports) / modules`), and the predicted wall of N workers
  on N idle cores for a 32-layer model, `imports + 224 c / N`.

    python bench/workers.py                       # everything, ~4 min on 2 idle cores
    python bench/workers.py --only repair,safelora
    python bench/workers.py --only basis,check

bench/README.md, "Workers", says how to read them.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_bench import full_depth_basis
from make_checkpoints import WORK, make_checkpoints
from perf import adapter_weight_keys, evict, line, read_floor, run_measured, section, wait_for_quiet

FULL_LAYERS = 32
MODELLED_WORKERS = (1, 2, 4, 8, 16)
SECTIONS = ("repair", "safelora", "basis", "check")
TARGETS_32 = {  # issue 19's targets at 32 layers, seconds
    "repair": 60.0,
    "check --basis": 5.0,
    "repair --basis": 10.0,
}


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "adapter_fix", *(str(a) for a in args)]


def shown(command: list[str]) -> str:
    """The command as a user would type it (paths relative to the repository)."""
    root = str(Path(__file__).resolve().parents[1]) + "/"
    if command[1] != "-m":
        return " ".join(["python", command[1], repr(command[2])])
    words = ["adapter-fix" if word == "adapter_fix" else word for word in command[2:]]
    return " ".join(word.removeprefix(root) for word in words)


class Runs:
    def __init__(self, quiet: float) -> None:
        self.quiet = quiet
        self.results: dict[str, Any] = {}

    def run(
        self, label: str, command: list[str], report: Path | None = None, *, warm: Path | None
    ) -> dict[str, Any]:
        """One measured child process; `warm`: read this checkpoint's tensors just before."""
        if warm is not None:
            read_floor(warm, adapter_weight_keys(warm / "adapter"))
        wait_for_quiet(self.quiet)
        before = os.getloadavg()[0]
        run = run_measured(command, WORK / "out" / f"{label.replace(' ', '_')}.log")
        after = os.getloadavg()[0]
        run["load"] = (before, after)
        if report is not None:
            document = json.loads(report.read_text())
            run["total_s"] = document["timings"]["total_s"]
            run["modules"] = len(document["modules"])
        line(
            label,
            f"{run['wall_s']:6.2f} s wall, {run['maxrss_kb'] / 1024:5.0f} MB peak RSS; "
            f"load {before:.2f} -> {after:.2f}",
        )
        print(f"    $ {shown(command)}", flush=True)
        self.results[label] = run
        return run


def same_files(first: Path, second: Path, skip: tuple[str, ...] = ()) -> bool:
    names = sorted(p.name for p in first.iterdir() if p.name not in skip)
    if names != sorted(p.name for p in second.iterdir() if p.name not in skip):
        return False
    return all(filecmp.cmp(first / name, second / name, shallow=False) for name in names)


def model(
    label: str, one: dict[str, Any], two: dict[str, Any], layers: int, imports_cpu_s: float
) -> dict[str, Any]:
    """Per-module CPU seconds of the 1-worker run, and the predicted 32-layer wall by workers.

    On a loaded machine wall times measure the others' load; CPU time measures the work:
    `c = (CPU of the run - CPU of the imports) / modules`, and N workers on N idle cores
    take `imports + modules c / N` (the per-module work is independent and single-threaded).
    """
    modules = one["modules"]
    cpu = {n: run["user_s"] + run["sys_s"] for n, run in ((1, one), (2, two))}
    per_module = (cpu[1] - imports_cpu_s) / modules
    full = modules * FULL_LAYERS // layers
    predicted = {n: imports_cpu_s + full * per_module / n for n in MODELLED_WORKERS}
    line(
        f"{label}: 1 / 2 workers, wall",
        f"{one['wall_s']:.2f} s / {two['wall_s']:.2f} s = {one['wall_s'] / two['wall_s']:.2f}x "
        f"(CPU {cpu[1]:.1f} / {cpu[2]:.1f} s; the run had {cpu[1] / one['wall_s']:.2f} / "
        f"{cpu[2] / two['wall_s']:.2f} cores)",
    )
    line(
        f"{label}: cost model",
        f"{per_module * 1e3:.0f} ms CPU per module, {imports_cpu_s:.2f} s imports",
    )
    text = ", ".join(f"{n}: {seconds:.1f} s" for n, seconds in predicted.items())
    line(f"{label}: predicted {FULL_LAYERS} layers ({full} modules), idle cores", text)
    target = TARGETS_32.get(label)
    if target is not None:
        line(
            f"{label}: {FULL_LAYERS} layers, 2 workers on 2 idle cores",
            f"{predicted[2]:.1f} s (target <= {target:.0f} s: "
            f"{'PASS' if predicted[2] <= target else 'FAIL'})",
        )
    return {
        "per_module_cpu_s": per_module,
        "imports_cpu_s": imports_cpu_s,
        "predicted_32": predicted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--only", default=",".join(SECTIONS), help=",".join(SECTIONS))
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        default=30.0,
        help="Before each run, wait up to this long for other processes to use < 0.3 cores.",
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    checkpoint = make_checkpoints("llama-3-8b", args.layers)
    base, aligned, adapter = (checkpoint / name for name in ("base", "aligned", "adapter"))
    out = WORK / "out" / "workers"
    out.mkdir(parents=True, exist_ok=True)
    basis = WORK / f"llama-3-8b-basis-workers-L{args.layers}"
    runs = Runs(args.quiet_timeout)
    models: dict[str, Any] = {}
    started = time.perf_counter()
    print(
        f"workers benchmark: llama-3-8b at {args.layers} layers, {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    imports = runs.run(
        "imports (the commands' modules, torch included)",
        [sys.executable, "-c", "import adapter_fix.commands.repair, adapter_fix.commands.check"],
        warm=None,
    )
    imports_cpu = imports["user_s"] + imports["sys_s"]

    for method in ("csulora", "safelora"):
        name = "repair" if method == "csulora" else "safelora"
        if name not in only:
            continue
        label = "repair" if method == "csulora" else "repair --method safelora"
        section(f"{label}, {args.layers} layers")
        measured = {}
        for workers in (1, 2):
            folder, report = out / f"{name}-w{workers}", out / f"{name}-w{workers}.json"
            command = cli(
                "repair", base, aligned, adapter, "-o", folder, "--method", method, "--force",
                "-q", "--report", report, "--workers", workers,
            )  # fmt: skip
            measured[workers] = runs.run(
                f"{label}, {workers} worker(s), warm", command, report, warm=checkpoint
            )
        line(
            "outputs of 1 and 2 workers byte-identical",
            "yes" if same_files(out / f"{name}-w1", out / f"{name}-w2", ("repair_report.json",))
            else "NO",
        )  # fmt: skip
        evict(checkpoint)
        report = out / f"{name}-cold.json"
        runs.run(
            f"{label}, default workers, cold (evicted)",
            cli("repair", base, aligned, adapter, "-o", out / f"{name}-cold", "--method", method,
                "--force", "-q", "--report", report),
            report,
            warm=None,
        )  # fmt: skip
        models[label] = model(label, measured[1], measured[2], args.layers, imports_cpu)
        if method == "safelora":
            keys = adapter_weight_keys(adapter)
            read_floor(checkpoint, keys)
            warm = min(read_floor(checkpoint, keys)[0] for _ in range(2))
            evict(checkpoint)
            cold = read_floor(checkpoint, keys)[0]
            line("I/O floor, same tensors, warm / cold", f"{warm:.2f} s / {cold:.2f} s")
            line(
                "Safe LoRA loop (report total_s) / warm floor, 1 and 2 workers",
                f"{measured[1]['total_s'] / warm:.2f}x, {measured[2]['total_s'] / warm:.2f}x",
            )
            runs.results["floor"] = {"warm_s": warm, "cold_s": cold}

    if "basis" in only:
        section(f"basis --like ADAPTER (--energy 0.99 --max-rank 128), {args.layers} layers")
        measured = {}
        for workers in (1, 2):
            report = out / f"basis-w{workers}.json"
            folder = basis if workers == 1 else out / "basis-w2"
            command = cli(
                "basis", base, aligned, "-o", folder, "--like", adapter, "--force", "-q",
                "--report", report, "--workers", workers,
            )  # fmt: skip
            measured[workers] = runs.run(
                f"basis, {workers} worker(s), warm", command, report, warm=checkpoint
            )
        line(
            "bases of 1 and 2 workers byte-identical",
            "yes" if same_files(basis, out / "basis-w2") else "NO",
        )
        models["basis"] = model("basis", measured[1], measured[2], args.layers, imports_cpu)

    if "check" in only:
        # At full depth: the 2-layer basis repeated for 32 layers, and a 32-layer adapter.
        deep_basis, deep_adapter = full_depth_basis(checkpoint, "llama-3-8b", args.layers)
        for label, command in (
            ("check --basis", cli("check", "--basis", deep_basis, deep_adapter, "-q",
                                  "--max-reversal", "1", "--max-module-reversal", "1", "--force")),
            ("repair --basis", cli("repair", "--basis", deep_basis, deep_adapter, "-q", "--force")),
        ):  # fmt: skip
            section(f"{label}, {FULL_LAYERS} layers ({FULL_LAYERS * 7} modules)")
            measured = {}
            for workers in (1, 2):
                report = out / f"{label.split()[0]}-basis-w{workers}.json"
                extra = ["--report", report, "--workers", workers]
                if label == "repair --basis":
                    extra += ["-o", out / f"repair-basis-w{workers}"]
                measured[workers] = runs.run(
                    f"{label}, {workers} worker(s)", command + [str(e) for e in extra], report,
                    warm=None,
                )  # fmt: skip
            models[label] = model(label, measured[1], measured[2], FULL_LAYERS, imports_cpu)

    if "basis" in models and "repair" in models:
        ratio = models["basis"]["per_module_cpu_s"] / models["repair"]["per_module_cpu_s"]
        line(
            "basis / repair, CPU per module",
            f"{ratio:.2f}x (target <= 1: {'PASS' if ratio <= 1 else 'FAIL'})",
        )
    results = WORK / f"workers-L{args.layers}.json"
    results.write_text(json.dumps({"runs": runs.results, "models": models}, indent=2) + "\n")
    print(
        f"\nfinished in {time.perf_counter() - started:.0f} s; load average "
        f"{os.getloadavg()[0]:.2f}; every figure in {results}",
        flush=True,
    )


if __name__ == "__main__":
    main()
