"""What the terminal shows: tables that fit 80 columns, strings from files shown literally,
warnings and written files named, unreachable ids explained."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli
from hub_server import isolate_from_real_hub
from rich.console import Console
from safetensors.torch import load_file, save_file

from adapter_fix.options import RepairOptions
from adapter_fix.report.repair import TERMINAL_REPAIR_COLUMNS, render_repair
from adapter_fix.report.table import short_module_names
from adapter_fix.results import ModuleResult, RepairResult, Timings

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _result(layers: int) -> RepairResult:
    modules = [
        ModuleResult(
            name=f"model.layers.{layer}.{'mlp' if 'p_' in kind else 'self_attn'}.{kind}",
            kind="linear",
            shape=(4096, 14336),
            rank=16,
            scaling=2.0,
            action="repaired",
            reason="Safe LoRA similarity 0.12345, selected" if layer else None,
            subspace_rank=128,
            captured_energy=0.912345,
            update_norm=12345.678,
            repaired_norm=0.000123456,
            relative_change=0.123456,
            cosine=0.987654321,
            truncation_residual=1.23456e-7,
            rho_before={"full": 0.1, "partial": 0.2, "off": 0.7},
            rho_after={"full": 0.2, "partial": 0.3, "off": 0.5},
            attenuation={"partial": 0.123456, "off": 0.654321},
        )
        for layer in range(layers)
        for kind in KINDS
    ]
    inputs = {"base": "b", "aligned": "a", "adapter": "l", "adapter_sha256": "0" * 64}
    return RepairResult(RepairOptions(), inputs, modules, Timings(total_s=1.0, read_s=0.5))


def _rendered(result: RepairResult, width: int) -> list[str]:
    buffer = io.StringIO()
    render_repair(result, Console(file=buffer, width=width))
    return buffer.getvalue().splitlines()


def test_repair_table_fits_80_columns_with_one_line_per_module() -> None:
    lines = _rendered(_result(2), 80)
    assert max(len(line) for line in lines) <= 80
    for name in ("L0 q_proj", "L1 down_proj"):
        rows = [line for line in lines if line.lstrip().startswith(name)]
        assert len(rows) == 1, lines
        assert "12.3%" in rows[0]  # the relative change, whole, on the module's own line
    assert any("not shown at this width" in line for line in lines)


def test_repair_table_at_200_columns_shows_every_column() -> None:
    lines = _rendered(_result(2), 200)
    assert max(len(line) for line in lines) <= 200
    header = next(line for line in lines if line.lstrip().startswith("module"))
    for column, _ in TERMINAL_REPAIR_COLUMNS:
        assert column in header
    assert not any("not shown at this width" in line for line in lines)


def test_short_module_names_stay_unique() -> None:
    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.experts.3.up_proj",
        "model.encoder.layers.0.self_attn.q_proj",
        "model.decoder.layers.0.self_attn.q_proj",
        "lm_head",
    ]
    short = short_module_names(names)
    assert len(set(short.values())) == len(names)
    assert short_module_names(names[:2]) == {names[0]: "L0 q_proj", names[1]: "L0 3.up_proj"}


def test_inspect_table_fits_80_columns(fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    result = run_cli("inspect", str(fixtures_dir / "llama-lora"))
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert sum(line.lstrip().startswith("L1 down_proj") for line in lines) == 1


def _adapter_copy(fixtures_dir: Path, tmp_path: Path, **change: object) -> Path:
    folder = Path(shutil.copytree(fixtures_dir / "llama-lora", tmp_path / "adapter"))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    return folder


def test_markup_and_regex_brackets_from_files_are_shown_literally(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    folder = _adapter_copy(
        fixtures_dir,
        tmp_path,
        base_model_name_or_path="[/x] [bold red]org/model",
        target_modules=r".*\.[a-z]+_proj",
    )
    result = run_cli("inspect", str(folder))
    assert result.exit_code == 0, result.stderr
    assert "[/x] [bold red]org/model" in result.stderr
    assert r".*\.[a-z]+_proj" in result.stderr


def test_control_characters_in_key_names_are_escaped(fixtures_dir: Path, tmp_path: Path) -> None:
    folder = _adapter_copy(fixtures_dir, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    hostile = {
        key.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.q\x1b[2J\u202e_proj"): value
        for key, value in tensors.items()
    }
    save_file(hostile, folder / "adapter_model.safetensors")
    result = run_cli("inspect", str(folder))
    assert result.exit_code == 0, result.stderr
    assert "\x1b" not in result.stderr and "\u202e" not in result.stderr
    assert "q\\x1b[2J\\u202e_proj" in result.stderr


def test_method_none_with_a_report_names_it_and_says_no_adapter_was_written(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    report = tmp_path / "analysis.json"
    names = ("llama-base", "llama-aligned", "llama-lora")
    result = run_cli(
        "repair",
        *(str(fixtures_dir / n) for n in names),
        "--method",
        "none",
        "--report",
        str(report),
    )
    assert result.exit_code == 0, result.stderr
    assert "nothing written" not in result.stderr
    assert "no adapter written" in result.stderr
    assert f"report: {report}" in " ".join(result.stderr.split())


def test_repair_shows_the_warnings_inspect_gives(fixtures_dir: Path, tmp_path: Path) -> None:
    folder = _adapter_copy(fixtures_dir, tmp_path, target_modules=["q_proj", "v_proj"])
    names = ("llama-base", "llama-aligned")
    result = run_cli(
        "repair", *(str(fixtures_dir / n) for n in names), str(folder), "-o", str(tmp_path / "o")
    )
    assert result.exit_code == 0, result.stderr
    assert "warning: model.layers.0.self_attn.k_proj: not matched by target_modules" in (
        " ".join(result.stderr.split())
    )


def test_an_id_neither_local_nor_on_a_reachable_hub_says_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_from_real_hub(monkeypatch)
    monkeypatch.chdir(tmp_path)
    args = ["inspect", "someorg/some-lora", "--endpoint", "http://127.0.0.1:9"]
    result = run_cli(*args, "--cache-dir", str(tmp_path / "cache"))
    assert result.exit_code == 10, result.stderr
    assert "neither a local file or folder nor reachable" in " ".join(result.stderr.split())


def test_the_warnings_repair_shows_read_no_carried_tensor(fixtures_dir: Path) -> None:
    from adapter_fix.commands.inspect import factor_warnings
    from adapter_fix.io.adapter import load_adapter
    from adapter_fix.io.sources import LocalSource

    adapter = load_adapter(LocalSource(fixtures_dir / "llama-rslora"))
    assert adapter.carried_keys
    factor_warnings(adapter)
    assert not set(adapter.weights.reads) & set(adapter.carried_keys)
    assert adapter.weights.reads  # the factors were read
