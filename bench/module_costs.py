"""Per-module cost of each stage, on one thread, as one `--workers` worker pays it.

Runs the engine's stages one module after another on this thread (torch on
one thread, as every worker runs): the read (`SubspaceSource.load` and the
adapter's factors), the subspace (`complete`: the SVD, or the choice within a
basis), and the consumer's per-module work (a repair method's `run`, or
nothing for `basis`). Prints, per module shape, the median seconds of each
stage, the totals and their shares, the plain safetensors read of the same
tensors (the I/O floor), and with `--ops` the torch ops that took the most
time. The totals are the cost model of `--workers`: bench/README.md, "Workers".

    python bench/module_costs.py --layers 2 --method csulora
    python bench/module_costs.py --layers 2 --method safelora --ops
    python bench/module_costs.py --layers 2 --basis bench/_work/llama-3-8b-basis-L2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_checkpoints import make_checkpoints
from perf import adapter_weight_keys, read_floor

from adapter_fix.engine import REDUCED, SUBSPACE, BasisSource, SubspaceSource, Target, WeightPair
from adapter_fix.io.adapter import load_adapter, read_factors
from adapter_fix.io.basis import Basis
from adapter_fix.io.checkpoint import Checkpoint
from adapter_fix.io.sources import LocalSource
from adapter_fix.methods import STREAM_METHODS, method_class
from adapter_fix.options import RepairOptions, SubspaceSettings

STAGES = ("read", "subspace", "solve")


class Stopwatch:
    """Wall and this thread's CPU seconds per stage."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        wall, thread = time.perf_counter(), time.thread_time()
        yield
        self.wall[name] = time.perf_counter() - wall
        self.cpu[name] = time.thread_time() - thread


def module_costs(
    checkpoint: Path, method: str, basis: Path | None, energy: float
) -> tuple[list[dict[str, Any]], Any]:
    """Each module's stage seconds (wall and this thread's CPU), and the torch profile."""
    adapter = load_adapter(LocalSource(checkpoint / "adapter"))
    source: SubspaceSource
    if basis is not None:
        source = BasisSource(Basis.open(LocalSource(basis)))
    else:
        source = WeightPair(
            Checkpoint.open(LocalSource(checkpoint / "base"), "BASE"),
            Checkpoint.open(LocalSource(checkpoint / "aligned"), "ALIGNED"),
        )
    options = RepairOptions(
        method=method if method != "basis" else "none", subspace=SubspaceSettings(energy=energy)
    )
    runner = method_class(options.method)(options, adapter)
    needs = frozenset({SUBSPACE}) if method == "basis" else runner.needs
    settings = options.subspace
    rows = []
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for module in adapter.modules:
            target = Target.of(module)
            plan = source.plan(target)
            watch = Stopwatch()
            with watch.stage("read"):  # as engine.map_modules reads
                factors = read_factors(adapter, module)
                loaded = source.load(target, plan, factors[0] if REDUCED in needs else None)
            with watch.stage("subspace"):
                data = source.complete(target, loaded, settings, needs)
            del loaded
            data.lora_b, data.lora_a = factors
            with watch.stage("solve"):
                if method != "basis":
                    runner.run(data)
            del data
            rows.append({"shape": target.shape, "wall": watch.wall, "cpu": watch.cpu})
    return rows, profiler


def report(rows: list[dict[str, Any]], floor_s: float, profiler: Any, ops: bool) -> None:
    shapes: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        shapes[row["shape"]].append(row)
    print(f"{'shape':>14} {'modules':>7} " + " ".join(f"{s + ' s':>10}" for s in STAGES))
    for shape, group in shapes.items():
        medians = [statistics.median(r["wall"][s] for r in group) for s in STAGES]
        label = f"{shape[0]}x{shape[1]}"
        print(f"{label:>14} {len(group):>7} " + " ".join(f"{m:10.3f}" for m in medians))
    totals = {s: sum(r["wall"][s] for r in rows) for s in STAGES}
    cpu = {s: sum(r["cpu"][s] for r in rows) for s in STAGES}
    whole = sum(totals.values())
    print(f"total over {len(rows)} modules: {whole:.2f} s wall, {sum(cpu.values()):.2f} s CPU")
    for stage in STAGES:
        print(
            f"  {stage:<9} {totals[stage]:8.2f} s wall {totals[stage] / whole:6.1%}   "
            f"{cpu[stage]:8.2f} s CPU"
        )
    print(
        f"I/O floor, same tensors (plain safetensors, page cache): {floor_s:.2f} s; "
        f"all stages / floor {whole / floor_s:.2f}x, read / floor {totals['read'] / floor_s:.2f}x"
    )
    if ops:
        averages = profiler.key_averages()
        total = sum(e.self_cpu_time_total for e in averages) / 1e6
        print(f"torch ops, self time (sum {total:.2f} s; the rest is file reads and Python):")
        for event in sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]:
            share = event.self_cpu_time_total / 1e6
            print(f"  {event.key:<28} {share:8.2f} s {share / whole:6.1%} ({event.count} calls)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-3-8b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--method",
        default="csulora",
        choices=[*sorted(STREAM_METHODS), "basis"],
        help="basis: SVD only",
    )
    parser.add_argument("--energy", type=float, default=None, help="default: 0.99 basis, 0.9")
    parser.add_argument("--basis", type=Path, help="read subspaces from this basis")
    parser.add_argument("--ops", action="store_true", help="list the costliest torch ops")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # what each --workers worker runs on
    energy = args.energy if args.energy is not None else (0.99 if args.method == "basis" else 0.9)
    checkpoint = make_checkpoints(args.preset, args.layers)
    keys = adapter_weight_keys(checkpoint / "adapter")
    read_floor(checkpoint, keys)  # page cache warm
    floor = min(read_floor(checkpoint, keys)[0] for _ in range(2))
    load_before = os.getloadavg()
    rows, profiler = module_costs(checkpoint, args.method, args.basis, energy)
    load_after = os.getloadavg()
    print(
        f"{args.preset}, {args.layers} layers, {args.method}"
        + (f" from {args.basis}" if args.basis else "")
        + f", energy {energy:g}, one thread; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after"
    )
    report(rows, floor if not args.basis else float("nan"), profiler, args.ops)
    if args.json:
        args.json.write_text(json.dumps({"floor_s": floor, "rows": rows}, default=list) + "\n")


if __name__ == "__main__":
    main()
