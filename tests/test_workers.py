"""`--workers`: several modules at once, results in module order, memory bounded by the workers,
each worker on one torch thread, and the same bytes for any number of workers."""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from conftest import run_cli

import adapter_fix.engine as engine_module
from adapter_fix import hardware
from adapter_fix.engine import (
    SUBSPACE,
    ModuleData,
    SubspaceSource,
    Target,
    default_workers,
    map_modules,
)
from adapter_fix.options import SubspaceSettings
from adapter_fix.results import Clock

LLAMA = ("llama-base", "llama-aligned", "llama-lora")
# Vary run to run (timings) or name the run's own output folder.
UNSTABLE = ("timings", "output")


class CountingSource(SubspaceSource):
    """A source of `count` tiny modules that records how many are held (read, not yet
    processed) at once, and sleeps longer for earlier modules so they finish out of order."""

    inputs: ClassVar[dict[str, str]] = {}
    provides_displacement = False

    def __init__(self, count: int) -> None:
        self.count = count
        self.held = 0
        self.most_held = 0
        self.lock = threading.Lock()

    def plan(self, target: Target) -> int:
        return int(target.name)

    def load(self, target: Target, plan: int, lora_b: torch.Tensor | None = None) -> int:
        with self.lock:
            self.held += 1
            self.most_held = max(self.most_held, self.held)
        return plan

    def complete(
        self, target: Target, loaded: int, settings: SubspaceSettings, needs: frozenset[str]
    ) -> ModuleData:
        time.sleep(0.002 * (self.count - loaded))
        return ModuleData(target, None, None, float(loaded), 1.0, None)

    def weights_read(self) -> int:
        return 0

    def release(self) -> None:
        with self.lock:
            self.held -= 1


def stream(
    count: int, source: CountingSource, process: Callable[[ModuleData], Any], workers: int
) -> Iterator[Any]:
    return map_modules(
        [Target(str(index), f"{index}.weight", (2, 2)) for index in range(count)],
        source,
        frozenset({SUBSPACE}),
        SubspaceSettings(),
        Clock(),
        process,
        workers=workers,
    )


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_come_in_module_order_and_memory_is_bounded_by_the_workers(
    workers: int,
) -> None:
    source = CountingSource(12)

    def process(data: ModuleData) -> str:
        source.release()
        return data.target.name

    names = list(stream(12, source, process, workers))
    assert names == [str(index) for index in range(12)]
    # Each worker holds its own module; one worker also reads the next one ahead.
    assert source.most_held == (2 if workers == 1 else workers)


def test_each_worker_runs_torch_on_one_thread_whatever_the_caller_runs_on() -> None:
    seen: list[int] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        list(stream(6, CountingSource(6), lambda data: seen.append(torch.get_num_threads()), 2))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    assert seen == [1] * 6


def test_a_failing_module_stops_the_stream_with_its_error() -> None:
    def process(data: ModuleData) -> str:
        if data.target.name == "3":
            raise ValueError("module 3 is broken")
        return data.target.name

    results = stream(10, CountingSource(10), process, 3)
    assert [next(results) for _ in range(3)] == ["0", "1", "2"]
    with pytest.raises(ValueError, match="module 3 is broken"):
        next(results)


def test_default_workers_is_the_usable_cores_at_most_eight() -> None:
    assert 1 <= default_workers() <= 8


def stable_report(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text())
    for key in UNSTABLE:
        document.pop(key, None)
    return document


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {
        path.name: path.read_bytes()
        for path in sorted(folder.iterdir())
        if path.name != "repair_report.json"
    }


def run(*args: object) -> None:
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("method", ["csulora", "safelora", "project"])
def test_repair_output_and_report_are_the_same_bytes_for_any_workers(
    fixtures_dir: Path, tmp_path: Path, method: str
) -> None:
    base, aligned, adapter = (fixtures_dir / name for name in LLAMA)
    outputs, reports = [], []
    for workers in (1, 2, 3):
        out, report = tmp_path / f"out-{workers}", tmp_path / f"report-{workers}.json"
        run(
            "repair",
            base,
            aligned,
            adapter,
            "-o",
            out,
            "--method",
            method,
            "--seed",
            "5",
            "--workers",
            workers,
            "--report",
            report,
            "-q",
        )
        outputs.append(folder_bytes(out))
        reports.append(stable_report(report))
        reports.append(stable_report(out / "repair_report.json"))
    assert outputs[0] == outputs[1] == outputs[2]
    assert all(report == reports[0] for report in reports[2::2])
    assert all(report == reports[1] for report in reports[3::2])


def test_basis_and_check_are_the_same_bytes_for_any_workers(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    base, aligned, adapter = (fixtures_dir / name for name in LLAMA)
    bases, basis_reports, checks, basis_checks = [], [], [], []
    for workers in (1, 2, 3):
        basis, report = tmp_path / f"basis-{workers}", tmp_path / f"basis-{workers}.json"
        run("basis", base, aligned, "-o", basis, "--workers", workers, "--report", report, "-q")
        bases.append({p.name: p.read_bytes() for p in sorted(basis.iterdir())})
        basis_reports.append(stable_report(report))
        for label, inputs, reports in (
            ("weights", (base, aligned), checks),
            ("basis", ("--basis", basis), basis_checks),
        ):
            check = tmp_path / f"check-{label}-{workers}.json"
            run(
                "check",
                *inputs,
                adapter,
                "--workers",
                workers,
                "--report",
                check,
                "-q",
                "--max-reversal",
                "1",
                "--max-module-reversal",
                "1",
            )
            reports.append(stable_report(check))
    assert bases[0] == bases[1] == bases[2]
    for runs in (basis_reports, checks):
        assert runs[0] == runs[1] == runs[2]
    # The check against each run's own basis names that basis's folder; the rest is the same.
    for document in basis_checks:
        document["inputs"].pop("basis")
    assert basis_checks[0] == basis_checks[1] == basis_checks[2]


def test_the_bfloat16_sketch_is_the_same_bytes_for_any_workers(
    fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The randomized SVD with its bfloat16 products (forced on the tiny fixtures, which
    would take the exact SVD: a 4 + 4 column sketch) gives the same output at 1 and 2
    workers, and differs from the float32 sketch's: the bfloat16 path ran."""
    real = engine_module.safety_subspace
    monkeypatch.setattr(
        engine_module, "safety_subspace", functools.partial(real, exact_below=0, oversampling=4)
    )
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: "flags\t: avx512_bf16\n")
    base, aligned, adapter = (fixtures_dir / name for name in LLAMA)
    outputs = {}
    for label, workers, environment in (
        ("1", 1, "auto"),
        ("2", 2, "auto"),
        ("float32", 1, "float32"),
    ):
        monkeypatch.setenv("ADAPTER_FIX_SKETCH_DTYPE", environment)
        out = tmp_path / f"out-{label}"
        run(
            "repair", base, aligned, adapter, "-o", out, "--workers", workers, "--max-rank", 4, "-q"
        )
        outputs[label] = folder_bytes(out)
    assert outputs["1"] == outputs["2"]
    assert outputs["1"] != outputs["float32"]
