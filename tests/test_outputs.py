"""Output safety: what --force may replace, where reports may go, atomic commits, signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli

from adapter_fix.io import outputs as outputs_module
from adapter_fix.io.outputs import MARKER_NAME

NAMES = ("llama-base", "llama-aligned", "llama-lora")


def run(fixtures_dir: Path, *args: object) -> tuple[int, str]:
    inputs = [str(fixtures_dir / name) for name in NAMES]
    code, _, stderr = run_cli("repair", *inputs, "--method", "project", "-q", *args)
    return code, stderr


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "data").mkdir()
    (path / "data" / "results.csv").write_text("1,2,3")
    return path


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_force_refuses_the_current_folder(
    fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = user_folder(tmp_path / "work")
    before = snapshot(work)
    monkeypatch.chdir(work)
    code, stderr = run(fixtures_dir, "-o", ".", "--force")
    assert code == 9 and "current folder" in stderr
    assert snapshot(work) == before
    code, stderr = run(fixtures_dir, "-o", "..", "--force")
    assert code == 9 and "holds the current folder" in stderr


def test_force_refuses_home_and_root(
    fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    code, stderr = run(fixtures_dir, "-o", home, "--force")
    assert code == 9 and "home folder" in stderr
    code, stderr = run(fixtures_dir, "-o", "/", "--force")
    assert code == 9 and "root folder" in stderr
    assert list(home.iterdir()) == []


def test_force_refuses_a_folder_adapter_fix_did_not_write(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    folder = user_folder(tmp_path / "out")
    before = snapshot(folder)
    code, stderr = run(fixtures_dir, "-o", folder, "--force")
    assert code == 9 and MARKER_NAME in stderr and "neither" in stderr
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_refuses_a_symlinked_output(fixtures_dir: Path, tmp_path: Path) -> None:
    target = user_folder(tmp_path / "elsewhere")
    before = snapshot(target)
    (tmp_path / "out").symlink_to(target)
    code, stderr = run(fixtures_dir, "-o", tmp_path / "out", "--force")
    assert code == 9 and "symbolic link" in stderr
    assert snapshot(target) == before and (tmp_path / "out").is_symlink()


def test_force_replaces_an_earlier_output_and_an_empty_folder(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert run(fixtures_dir, "-o", out, "--force")[0] == 0
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["tool"] == "adapter-fix"
    assert sorted(marker["files"]) == sorted(p.name for p in out.iterdir() if p.name != MARKER_NAME)
    assert run(fixtures_dir, "-o", out, "--force")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_keeps_an_earlier_output_that_holds_a_foreign_file(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert run(fixtures_dir, "-o", out)[0] == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    code, stderr = run(fixtures_dir, "-o", out, "--force")
    assert code == 9 and "notes.txt" in stderr
    assert snapshot(out) == before


def test_output_folder_gets_the_umask_mode_not_0700(fixtures_dir: Path, tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        assert run(fixtures_dir, "-o", tmp_path / "out")[0] == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_report_inside_out_is_refused_before_any_work(fixtures_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    for report in (out / "adapter_config.json", out / "sub" / "r.md", out / "r.html"):
        code, stderr = run(fixtures_dir, "-o", out, "--report", report)
        assert code == 9 and "inside the output folder" in stderr
    assert list(tmp_path.iterdir()) == []


def test_report_naming_outs_own_repair_report_is_written_once_with_out(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    code, stderr = run(fixtures_dir, "-o", out, "--report", out / "repair_report.json")
    assert code == 0, stderr
    assert json.loads((out / "repair_report.json").read_text())["output"] == str(out)


def test_unwritable_report_is_refused_before_work_and_keeps_the_old_out(
    fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    assert run(fixtures_dir, "-o", out)[0] == 0
    before = snapshot(out)
    started: list[str] = []
    monkeypatch.setattr("adapter_fix.io.adapter.load_adapter", lambda *a: started.append("x"))
    code, stderr = run(fixtures_dir, "-o", out, "--force", "--report", "/proc/r.md")
    assert code == 9 and "/proc" in stderr and "cannot write" in stderr
    assert started == []
    assert snapshot(out) == before


def test_a_failing_report_leaves_the_old_out_and_no_report(
    fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    assert run(fixtures_dir, "-o", out, "--method", "csulora")[0] == 0
    before = snapshot(out)
    real = outputs_module.OutputSet.write_report

    def second_fails(self: outputs_module.OutputSet, path: Path, text: str) -> None:
        if path.suffix == ".html":
            raise outputs_module.OutputError("disk full", path=path)
        real(self, path, text)

    monkeypatch.setattr(outputs_module.OutputSet, "write_report", second_fails)
    reports = ("--report", tmp_path / "r.md", "--report", tmp_path / "r.html")
    code, stderr = run(fixtures_dir, "-o", out, "--force", *reports)
    assert code == 9, stderr
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_existing_report_is_replaced_only_with_force(fixtures_dir: Path, tmp_path: Path) -> None:
    report = tmp_path / "r.md"
    report.write_text("my notes")
    code, stderr = run(fixtures_dir, "--method", "none", "--report", report)
    assert code == 9 and "--force" in stderr
    assert report.read_text() == "my notes"
    assert run(fixtures_dir, "--method", "none", "--report", report, "--force")[0] == 0
    assert report.read_text().startswith("# adapter-fix repair report")


def test_report_never_replaces_a_file_next_to_a_single_file_input(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(fixtures_dir / "llama-base" / "model.safetensors", models / "base.safetensors")
    (models / "config.json").write_text('{"model_type": "llama"}')
    result = run_cli(
        "repair",
        str(models / "base.safetensors"),
        str(fixtures_dir / "llama-aligned"),
        str(fixtures_dir / "llama-lora"),
        "--method",
        "none",
        "--report",
        str(models / "config.json"),
        "--force",
    )
    assert result.exit_code == 9 and "next to its inputs" in result.stderr
    assert (models / "config.json").read_text() == '{"model_type": "llama"}'


def test_stale_temporaries_of_a_killed_run_are_removed(fixtures_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run(fixtures_dir, "-o", out)[0] == 0
    pid = dead_pid()
    stale = [tmp_path / f".out.partial-{pid}-0badc0de", tmp_path / f".out.old-{pid}-deadbeef"]
    for folder in stale:
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    alive = tmp_path / f".out.partial-{os.getpid()}-12345678"  # a concurrent run: kept
    alive.mkdir()
    assert run(fixtures_dir, "-o", out, "--force")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", alive.name])


def test_old_output_moved_aside_by_a_killed_run_is_put_back(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert run(fixtures_dir, "-o", out)[0] == 0
    before = snapshot(out)
    out.rename(tmp_path / f".out.old-{dead_pid()}-deadbeef")  # killed between the renames
    code, stderr = run(fixtures_dir, "-o", out)
    assert code == 9 and "--force" in stderr
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


SLOW_WRITE = """
import sys, time
from adapter_fix.io import adapter_writer
def slow(path, *args):
    path.write_bytes(b"half")
    print("writing", flush=True)
    time.sleep(60)
adapter_writer.write_safetensors = slow
from adapter_fix.cli import main
main(sys.argv[1:], prog_name="adapter-fix")
"""


def test_sigterm_while_writing_cleans_up_and_exits_143(fixtures_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    inputs = [str(fixtures_dir / name) for name in NAMES]
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITE, "repair", *inputs, "-o", str(out), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline() == "writing\n"
    assert any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir())
    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert time.monotonic() - started < 30
    assert "SIGTERM" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_basis_force_refuses_a_folder_adapter_fix_did_not_write(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    folder = user_folder(tmp_path / "basis")
    before = snapshot(folder)
    models = [str(fixtures_dir / name) for name in NAMES[:2]]
    result = run_cli("basis", *models, "-o", str(folder), "--force", "-q")
    assert result.exit_code == 9 and MARKER_NAME in result.stderr
    assert snapshot(folder) == before


def test_check_replaces_an_existing_report_only_with_force(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    report = tmp_path / "check.md"
    report.write_text("my notes")
    args = ["check", *(str(fixtures_dir / name) for name in NAMES), "--report", str(report), "-q"]
    result = run_cli(*args)
    assert result.exit_code == 9 and "--force" in result.stderr
    assert report.read_text() == "my notes"
    result = run_cli(*args, "--force")
    assert result.exit_code in (0, 12), result.stderr
    assert report.read_text().startswith("# adapter-fix check")
