"""`adapter-fix inspect` on every fixture, its JSON, its warnings and its refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from adapter_fix import __version__

ADAPTERS = ["llama-lora", "llama-rslora", "llama-dora", "llama-embed-lora", "gpt2-lora"]


@pytest.mark.parametrize("name", ADAPTERS)
def test_inspect_prints_the_module_table(fixtures_dir: Path, name: str) -> None:
    code, stdout, stderr = run_cli("inspect", str(fixtures_dir / name))
    assert code == 0, stderr
    assert "LoRA modules" in stderr
    assert stdout == ""


@pytest.mark.parametrize("name", ADAPTERS)
def test_inspect_json_norms_equal_dense_scaled_product(fixtures_dir: Path, name: str) -> None:
    code, stdout, stderr = run_cli("inspect", str(fixtures_dir / name), "--json")
    assert code == 0, stderr
    document = json.loads(stdout)
    assert document["schema"] == "adapter-fix/inspect"
    assert document["tool"]["version"] == __version__
    tensors = load_file(fixtures_dir / name / "adapter_model.safetensors")
    assert document["adapter"]["module_count"] == len(document["modules"]) > 0
    for module in document["modules"]:
        stem = f"base_model.model.{module['name']}"
        if module["kind"] == "embedding":
            a, b = tensors[f"{stem}.lora_embedding_A"], tensors[f"{stem}.lora_embedding_B"]
        else:
            a, b = tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"]
        dense = module["scaling"] * b.double() @ a.double()
        expected = float(torch.linalg.matrix_norm(dense))
        assert module["update_norm"] == pytest.approx(expected, rel=1e-5)
        assert module["rank"] == a.shape[0]
        assert 1.0 <= module["effective_rank"] <= module["rank"] + 1e-6


def test_inspect_reports_rslora_patterns_and_carried_tensors(fixtures_dir: Path) -> None:
    _, stdout, _ = run_cli("inspect", str(fixtures_dir / "llama-rslora"), "--json")
    document = json.loads(stdout)
    scalings = {m["name"]: m["scaling"] for m in document["modules"]}
    assert scalings["model.layers.0.self_attn.q_proj"] == pytest.approx(3 / 2**0.5)
    assert scalings["model.layers.1.self_attn.v_proj"] == pytest.approx(8 / 6**0.5)
    assert document["adapter"]["dtypes"] == ["BF16"]
    assert "base_model.model.lm_head.weight" in document["adapter"]["carried_keys"]


def test_inspect_orients_gpt2_and_embedding_updates(fixtures_dir: Path) -> None:
    _, stdout, _ = run_cli("inspect", str(fixtures_dir / "gpt2-lora"), "--json")
    kinds = {m["kind"] for m in json.loads(stdout)["modules"]}
    assert kinds == {"conv1d"}
    _, stdout, _ = run_cli("inspect", str(fixtures_dir / "llama-embed-lora"), "--json")
    embedding = next(m for m in json.loads(stdout)["modules"] if m["kind"] == "embedding")
    assert embedding["shape"] == [128, 32]


def test_dora_is_a_warning_and_strict_makes_it_fail(fixtures_dir: Path) -> None:
    code, stdout, _ = run_cli("inspect", str(fixtures_dir / "llama-dora"), "--json")
    assert code == 0
    assert any("DoRA" in w for w in json.loads(stdout)["warnings"])
    code, _, stderr = run_cli("inspect", str(fixtures_dir / "llama-dora"), "--strict")
    assert code == 11
    assert "--strict" in stderr


def test_clean_adapter_passes_strict(fixtures_dir: Path) -> None:
    code, _, stderr = run_cli("inspect", str(fixtures_dir / "llama-lora"), "--strict")
    assert code == 0, stderr


def _copy(fixtures_dir: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fixtures_dir / name, tmp_path / name))


def test_untargeted_zero_and_nan_modules_are_warnings(fixtures_dir: Path, tmp_path: Path) -> None:
    folder = _copy(fixtures_dir, "llama-lora", tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = [m for m in config["target_modules"] if m != "k_proj"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].zero_()
    tensors["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(tensors, folder / "adapter_model.safetensors")
    code, stdout, _ = run_cli("inspect", str(folder), "--json")
    assert code == 0
    warnings = "\n".join(json.loads(stdout)["warnings"])
    assert "k_proj: not matched by target_modules" in warnings
    assert "layers.0.self_attn.q_proj: the update is all zero" in warnings
    assert "layers.1.mlp.up_proj: lora_A or lora_B holds NaN" in warnings
    nan_module = next(
        m for m in json.loads(stdout)["modules"] if m["name"].endswith("1.mlp.up_proj")
    )
    assert nan_module["finite"] is False
    assert nan_module["update_norm"] is None


def test_rank_mismatch_with_config_is_a_warning(fixtures_dir: Path, tmp_path: Path) -> None:
    folder = _copy(fixtures_dir, "llama-lora", tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = 8
    (folder / "adapter_config.json").write_text(json.dumps(config))
    code, stdout, _ = run_cli("inspect", str(folder), "--json")
    assert code == 0
    assert any("config says r=8" in w for w in json.loads(stdout)["warnings"])


def assert_one_paragraph_error(code: int, stderr: str, expected_code: int, *words: str) -> None:
    assert code == expected_code, stderr
    assert "Traceback" not in stderr
    assert stderr.startswith("adapter-fix: ")
    assert "\n\n" not in stderr.strip()
    for word in words:
        assert word in stderr


def test_missing_path_exits_3(tmp_path: Path) -> None:
    code, _, stderr = run_cli("inspect", str(tmp_path / "missing"))
    assert_one_paragraph_error(code, stderr, 3, "missing", "no such file")


def test_bin_only_folder_exits_4(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    )
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle bytes we never load")
    code, _, stderr = run_cli("inspect", str(tmp_path))
    assert_one_paragraph_error(code, stderr, 4, "adapter_model.bin", "safe_serialization")


def test_truncated_adapter_exits_5(fixtures_dir: Path, tmp_path: Path) -> None:
    folder = _copy(fixtures_dir, "llama-lora", tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, _, stderr = run_cli("inspect", str(folder))
    assert_one_paragraph_error(code, stderr, 5, "adapter_model.safetensors", "truncated")


def test_model_with_bad_index_given_as_adapter_exits_5(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x.weight": "../../etc/passwd"}})
    )
    code, _, stderr = run_cli("inspect", str(tmp_path))
    assert_one_paragraph_error(code, stderr, 5, "model.safetensors.index.json", "x.weight")


def test_model_given_as_adapter_exits_6(fixtures_dir: Path) -> None:
    code, _, stderr = run_cli("inspect", str(fixtures_dir / "llama-base"))
    assert_one_paragraph_error(code, stderr, 6, "not a PEFT adapter")


def test_non_lora_adapter_exits_6(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    code, _, stderr = run_cli("inspect", str(tmp_path))
    assert_one_paragraph_error(code, stderr, 6, "IA3")


def test_version_and_help() -> None:
    code, stdout, _ = run_cli("--version")
    assert code == 0 and __version__ in stdout
    for command in ("inspect", "repair"):
        code, stdout, _ = run_cli(command, "--help")
        assert code == 0 and "Examples" in stdout and "Exit codes" in stdout
