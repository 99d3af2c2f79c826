"""`adapter-fix repair` end to end on the fixtures: PEFT loads the output, logits match a
dense hand merge, runs are reproducible, the run streams, and failures leave nothing."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adapter_fix.commands.repair import repair
from adapter_fix.engine import WeightPair
from adapter_fix.io import adapter_writer
from adapter_fix.io import checkpoint as checkpoint_module
from adapter_fix.io.adapter import load_adapter
from adapter_fix.io.checkpoint import Checkpoint
from adapter_fix.io.sources import LocalSource
from adapter_fix.options import RepairOptions

CASES = {
    "llama": ("llama-base", "llama-aligned", "llama-lora"),
    "llama-rslora": ("llama-base", "llama-aligned-single", "llama-rslora"),
    "llama-embed": ("llama-base", "llama-aligned", "llama-embed-lora"),
    "gpt2": ("gpt2-base", "gpt2-aligned", "gpt2-lora"),
}
TOKENS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 127]])


def paths(fixtures_dir: Path, case: str) -> list[Path]:
    return [fixtures_dir / name for name in CASES[case]]


def repaired_update(out: Path, key_a: str, key_b: str, scaling: float) -> torch.Tensor:
    tensors = load_file(out / "adapter_model.safetensors")
    return scaling * tensors[key_b].double() @ tensors[key_a].double()


def hand_merged_logits(aligned: Path, adapter: Path) -> torch.Tensor:
    """Merge the written adapter densely, by hand, with PEFT's documented scaling rules."""
    model = AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    state = model.state_dict()
    for key in tensors:
        if not key.endswith(("lora_A.weight", "lora_embedding_A")):
            continue
        embedding = key.endswith("lora_embedding_A")
        stem = key.removesuffix(".lora_A.weight").removesuffix(".lora_embedding_A")
        module = stem.removeprefix("base_model.model.")
        a = tensors[key].double()
        b = tensors[f"{stem}.lora_embedding_B" if embedding else f"{stem}.lora_B.weight"].double()
        rank = a.shape[0]
        alpha = config["lora_alpha"]
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if module == pattern or module.endswith("." + pattern):
                alpha = value
                break
        scaling = alpha / (rank**0.5 if config.get("use_rslora") else rank)
        update = scaling * b @ a
        if embedding or config.get("fan_in_fan_out"):
            update = update.T
        state[f"{module}.weight"] = (state[f"{module}.weight"].double() + update).float()
    for key in tensors:
        if key == "base_model.model.lm_head.weight":
            state["lm_head.weight"] = tensors[key].float()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(TOKENS).logits


def peft_logits(aligned: Path, adapter: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, adapter)
    messages = " ".join(str(w.message).lower() for w in caught)
    assert "missing" not in messages and "unexpected" not in messages, messages
    written = load_file(adapter / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(peft_model)
    assert set(loaded) == set(written)
    for key, tensor in written.items():
        assert torch.equal(loaded[key].to(tensor.dtype), tensor), key
    peft_model = peft_model.float().eval()
    with torch.no_grad():
        return peft_model(TOKENS).logits


@pytest.mark.model
@pytest.mark.parametrize("method", ["csulora", "project", "safelora"])
@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_the_repair_and_its_logits_equal_a_hand_merge(
    fixtures_dir: Path, tmp_path: Path, case: str, method: str
) -> None:
    base, aligned, adapter = paths(fixtures_dir, case)
    out = tmp_path / "out"
    code, _, stderr = run_cli(
        "repair", base, aligned, adapter, "-o", out, "--method", method, "--quiet"
    )
    assert code == 0, stderr
    assert torch.allclose(peft_logits(aligned, out), hand_merged_logits(aligned, out), atol=1e-4)
    original = load_file(adapter / "adapter_model.safetensors")
    written = load_file(out / "adapter_model.safetensors")
    assert list(written) == list(original)
    for key, tensor in original.items():
        assert written[key].dtype == tensor.dtype
        assert written[key].shape == tensor.shape
    report = json.loads((out / "repair_report.json").read_text())
    assert report["schema"] == "adapter-fix/repair-report"
    assert {m["action"] for m in report["modules"]} <= {"repaired", "unchanged"}
    assert "repaired" in {m["action"] for m in report["modules"]}


def dense_csulora(
    displacement: torch.Tensor, update: torch.Tensor, energy: float, strength: float
) -> torch.Tensor:
    """METHOD.md §1-§3 computed densely with an exact SVD, as an independent reference."""
    u, s, vh = torch.linalg.svd(displacement.double())
    captured = torch.cumsum(s**2, 0) / (s**2).sum()
    k = int((captured < energy - 1e-12).sum()) + 1
    p = u[:, :k] @ u[:, :k].T
    q = vh[:k].T @ vh[:k]
    p_out = torch.eye(p.shape[0], dtype=torch.float64) - p
    q_out = torch.eye(q.shape[0], dtype=torch.float64) - q
    full, off = p @ update @ q, p_out @ update @ q_out
    partial = update - full - off
    total = update.square().sum()
    a_h = 1 / (1 + strength * partial.square().sum() / total)
    a_o = 1 / (1 + strength * off.square().sum() / total)
    return full + a_h * partial + a_o * off


def test_written_update_is_the_closest_safe_update_of_method_md(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama")
    out = tmp_path / "out"
    code, _, stderr = run_cli(
        "repair",
        base,
        aligned,
        adapter,
        "-o",
        out,
        "--output-rank",
        "exact",
        "--strength",
        "3",
        "-q",
    )
    assert code == 0, stderr
    config = json.loads((out / "adapter_config.json").read_text())
    w_base = load_file(base / "model.safetensors")
    w_aligned = load_file(aligned.parent / "llama-aligned-single" / "model.safetensors")
    original = load_file(adapter / "adapter_model.safetensors")
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        stem = f"base_model.model.{module}"
        key_a, key_b = f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"
        update = 2.0 * original[key_b].double() @ original[key_a].double()
        displacement = w_aligned[f"{module}.weight"] - w_base[f"{module}.weight"]
        expected = dense_csulora(displacement, update, 0.9, 3.0)
        rank = config["rank_pattern"][module]
        written = repaired_update(out, key_a, key_b, config["alpha_pattern"][module] / rank)
        assert torch.allclose(written, expected, atol=1e-5), module


@pytest.mark.model
@pytest.mark.parametrize("case", ["llama", "llama-rslora"])
def test_exact_output_rank_writes_rank_patterns_peft_loads(
    fixtures_dir: Path, tmp_path: Path, case: str
) -> None:
    base, aligned, adapter = paths(fixtures_dir, case)
    out = tmp_path / "out"
    code, _, stderr = run_cli(
        "repair", base, aligned, adapter, "-o", out, "--output-rank", "exact", "-q"
    )
    assert code == 0, stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"]
    assert max(config["rank_pattern"].values()) > config["r"]
    assert torch.allclose(peft_logits(aligned, out), hand_merged_logits(aligned, out), atol=1e-4)


def test_strength_zero_keeps_the_factors_bit_for_bit(fixtures_dir: Path, tmp_path: Path) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama")
    out = tmp_path / "out"
    code, _, _ = run_cli("repair", base, aligned, adapter, "-o", out, "--strength", "0", "-q")
    assert code == 0
    original = load_file(adapter / "adapter_model.safetensors")
    written = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(written[key], tensor) for key, tensor in original.items())
    report = json.loads((out / "repair_report.json").read_text())
    assert {m["action"] for m in report["modules"]} == {"unchanged"}


def test_untouched_tensors_and_other_files_are_kept(fixtures_dir: Path, tmp_path: Path) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama-rslora")
    source = tmp_path / "adapter"
    shutil.copytree(adapter, source)
    (source / "README.md").write_text("model card")
    out = tmp_path / "out"
    code, _, stderr = run_cli("repair", base, aligned, source, "-o", out, "-q")
    assert code == 0, stderr
    assert (out / "README.md").read_text() == "model card"
    assert (out / "adapter_config.json").read_text() == json.dumps(
        json.loads((source / "adapter_config.json").read_text()), indent=2
    ) + "\n"
    with safe_open(out / "adapter_model.safetensors", framework="pt") as handle:
        lm_head = handle.get_tensor("base_model.model.lm_head.weight")
        metadata = handle.metadata()
    assert torch.equal(
        lm_head, load_file(source / "adapter_model.safetensors")["base_model.model.lm_head.weight"]
    )
    assert metadata["format"] == "pt"
    assert metadata["adapter_fix.method"] == "csulora"
    assert metadata["adapter_fix.base"] == str(base.resolve())
    assert len(metadata["adapter_fix.adapter_sha256"]) == 64


def test_same_inputs_and_seed_give_byte_identical_output(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama")
    outputs = []
    for name in ("one", "two"):
        code, _, _ = run_cli(
            "repair", base, aligned, adapter, "-o", tmp_path / name, "--seed", "7", "-q"
        )
        assert code == 0
        outputs.append((tmp_path / name / "adapter_model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]


def test_sharded_and_single_file_aligned_give_the_same_tensors(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama")
    single = fixtures_dir / "llama-aligned-single"
    assert run_cli("repair", base, aligned, adapter, "-o", tmp_path / "a", "-q")[0] == 0
    assert run_cli("repair", base, single, adapter, "-o", tmp_path / "b", "-q")[0] == 0
    sharded = load_file(tmp_path / "a" / "adapter_model.safetensors")
    single = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert all(torch.equal(sharded[key], single[key]) for key in sharded)


def test_method_none_writes_nothing_and_reports(fixtures_dir: Path, tmp_path: Path) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama")
    report = tmp_path / "analysis.json"
    code, _, stderr = run_cli(
        "repair",
        base,
        aligned,
        adapter,
        "-o",
        tmp_path / "out",
        "--method",
        "none",
        "--report",
        report,
    )
    assert code == 0, stderr
    assert not (tmp_path / "out").exists()
    document = json.loads(report.read_text())
    assert {m["action"] for m in document["modules"]} == {"analysed"}
    assert "adapter-fix repair" in stderr


def test_reports_in_three_formats(fixtures_dir: Path, tmp_path: Path) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama")
    reports = [tmp_path / f"report.{ext}" for ext in ("json", "md", "html")]
    args = [a for r in reports for a in ("--report", r)]
    code, _, stderr = run_cli("repair", base, aligned, adapter, "-o", tmp_path / "out", *args)
    assert code == 0, stderr
    document = json.loads(reports[0].read_text())
    assert len(document["modules"]) == 14
    for field in (
        "subspace_rank",
        "captured_energy",
        "rho_before",
        "rho_after",
        "attenuation",
        "relative_change",
        "cosine",
        "truncation_residual",
        "action",
    ):
        assert field in document["modules"][0]
    assert 0 < document["totals"]["energy_kept"] <= 1
    markdown = reports[1].read_text()
    assert "| model.layers.0.self_attn.q_proj |" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 14
    assert len({len(re.findall(r"(?<!\\)\|", row)) for row in rows}) == 1
    page = reports[2].read_text()
    assert page.startswith("<!DOCTYPE html>") and "q_proj" in page
    assert "http://" not in page and "https://" not in page
    assert "energy kept" in stderr


@pytest.mark.parametrize("method", ["csulora", "safelora"])
def test_run_reads_exactly_the_adapted_weights_each_once(
    fixtures_dir: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_path, aligned_path, adapter_path = paths(fixtures_dir, "llama")
    data_reads: list[tuple[Path, str]] = []
    real_open = checkpoint_module._opened

    def recording_open(info: checkpoint_module.TensorInfo) -> object:
        data_reads.append((info.file.parent, info.key))
        return real_open(info)

    # Every read of tensor data, whole or in row blocks, goes through _opened.
    monkeypatch.setattr(checkpoint_module, "_opened", recording_open)
    base = Checkpoint.open(LocalSource(base_path), "BASE")
    aligned = Checkpoint.open(LocalSource(aligned_path), "ALIGNED")
    adapter = load_adapter(LocalSource(adapter_path))
    repair(WeightPair(base, aligned), adapter, RepairOptions(method=method))
    expected = sorted(f"{m.name}.weight" for m in adapter.modules)
    for folder in (base_path, aligned_path):
        assert sorted(key for parent, key in data_reads if parent == folder) == expected
    assert len(expected) == 14


def test_output_inside_an_input_is_refused(fixtures_dir: Path, tmp_path: Path) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama")
    for out in (adapter, adapter / "fixed", aligned, fixtures_dir):
        code, _, stderr = run_cli("repair", base, aligned, adapter, "-o", out, "--force")
        assert code == 9, stderr
        assert "overlap" in stderr
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_existing_output_needs_force(fixtures_dir: Path, tmp_path: Path) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama")
    out = tmp_path / "out"
    out.mkdir()
    code, _, stderr = run_cli("repair", base, aligned, adapter, "-o", out)
    assert code == 9 and "--force" in stderr
    assert run_cli("repair", base, aligned, adapter, "-o", out, "--force", "-q")[0] == 0
    assert (out / "adapter_model.safetensors").exists()


def test_failure_mid_write_leaves_no_output(
    fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama")
    previous = tmp_path / "out"
    assert (
        run_cli("repair", base, aligned, adapter, "-o", previous, "--method", "project", "-q")[0]
        == 0
    )
    before = {p.name: p.read_bytes() for p in previous.iterdir()}

    def interrupted(path: Path, *args: object) -> None:
        path.write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(adapter_writer, "write_safetensors", interrupted)
    code, _, stderr = run_cli("repair", base, aligned, adapter, "-o", tmp_path / "new", "-q")
    assert code == 130, stderr
    code, _, _ = run_cli("repair", base, aligned, adapter, "-o", previous, "--force", "-q")
    assert code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before


def test_dora_is_refused_with_exit_6(fixtures_dir: Path, tmp_path: Path) -> None:
    code, _, stderr = run_cli(
        "repair",
        fixtures_dir / "llama-base",
        fixtures_dir / "llama-aligned",
        fixtures_dir / "llama-dora",
        "-o",
        tmp_path / "out",
    )
    assert code == 6 and "DoRA" in stderr
    assert not (tmp_path / "out").exists()


def test_wrong_base_model_exits_7(fixtures_dir: Path, tmp_path: Path) -> None:
    code, _, stderr = run_cli(
        "repair",
        fixtures_dir / "gpt2-base",
        fixtures_dir / "llama-aligned",
        fixtures_dir / "llama-lora",
        "-o",
        tmp_path / "out",
    )
    assert code == 7 and "has no weight 'model.layers.0." in stderr


def test_same_base_and_aligned_exits_7(fixtures_dir: Path, tmp_path: Path) -> None:
    base, _, adapter = paths(fixtures_dir, "llama")
    code, _, stderr = run_cli("repair", base, base, adapter, "-o", tmp_path / "out")
    assert code == 7 and "same file" in stderr


def test_shape_mismatch_between_base_and_aligned_exits_7(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama")
    broken = tmp_path / "base"
    broken.mkdir()
    tensors = load_file(base / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 16)
    save_file(tensors, broken / "model.safetensors")
    code, _, stderr = run_cli("repair", broken, aligned, adapter, "-o", tmp_path / "out")
    assert code == 7 and "model.layers.0.self_attn.q_proj.weight" in stderr


def test_nan_in_aligned_exits_8_naming_file_and_key(fixtures_dir: Path, tmp_path: Path) -> None:
    base, _, adapter = paths(fixtures_dir, "llama")
    broken = tmp_path / "aligned"
    broken.mkdir()
    tensors = load_file(fixtures_dir / "llama-aligned-single" / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 3] = float("inf")
    save_file(tensors, broken / "model.safetensors")
    code, _, stderr = run_cli("repair", base, broken, adapter, "-o", tmp_path / "out")
    assert code == 8
    assert "model.layers.1.mlp.up_proj.weight" in stderr and "model.safetensors" in stderr
    assert not (tmp_path / "out").exists()


def test_pickle_base_exits_4(fixtures_dir: Path, tmp_path: Path) -> None:
    _, aligned, adapter = paths(fixtures_dir, "llama")
    pickled = tmp_path / "base"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    code, _, stderr = run_cli("repair", pickled, aligned, adapter, "-o", tmp_path / "out")
    assert code == 4 and "safe_serialization" in stderr


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ((), lambda sims: sorted(sims)[9]),
        (("--safelora-layers", "3"), lambda sims: sorted(sims)[2]),
        (("--safelora-select", "threshold", "--safelora-threshold", "0.9"), lambda _: 0.9),
    ],
)
def test_safelora_selects_by_similarity_and_changes_only_b(
    fixtures_dir: Path, tmp_path: Path, options: tuple[str, ...], expected: object
) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama")
    out = tmp_path / "out"
    code, _, stderr = run_cli(
        "repair", base, aligned, adapter, "-o", out, "--method", "safelora", "-q", *options
    )
    assert code == 0, stderr
    modules = json.loads((out / "repair_report.json").read_text())["modules"]
    similarities = [m["safelora_similarity"] for m in modules]
    cut = expected(similarities)  # type: ignore[operator]
    original = load_file(adapter / "adapter_model.safetensors")
    written = load_file(out / "adapter_model.safetensors")
    for module in modules:
        selected = module["safelora_similarity"] <= cut
        assert module["action"] == ("repaired" if selected else "unchanged")
        stem = f"base_model.model.{module['name']}"
        assert torch.equal(written[f"{stem}.lora_A.weight"], original[f"{stem}.lora_A.weight"])
        same_b = torch.equal(written[f"{stem}.lora_B.weight"], original[f"{stem}.lora_B.weight"])
        assert same_b != selected


def test_usage_errors_exit_2(fixtures_dir: Path, tmp_path: Path) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama")
    code, _, stderr = run_cli("repair", base, aligned, adapter)
    assert code == 2 and "-o/--out is required" in stderr
    code, _, stderr = run_cli(
        "repair", base, aligned, adapter, "-o", tmp_path / "out", "--report", "x.txt"
    )
    assert code == 2 and "--report" in stderr


def test_write_failure_exits_9_and_leaves_nothing(
    fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama")

    def disk_full(path: Path, *args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapter_writer, "write_safetensors", disk_full)
    code, _, stderr = run_cli("repair", base, aligned, adapter, "-o", tmp_path / "out", "-q")
    assert code == 9 and "No space left on device" in stderr
    assert list(tmp_path.iterdir()) == []


def test_report_path_inside_an_input_is_refused_before_any_work(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama")
    config = (adapter / "adapter_config.json").read_bytes()
    report = adapter / "adapter_config.json"
    code, _, stderr = run_cli(
        "repair",
        base,
        aligned,
        adapter,
        "-o",
        tmp_path / "out",
        "--report",
        report.with_suffix(".json"),
    )
    assert code == 9 and "overlap" in stderr
    assert (adapter / "adapter_config.json").read_bytes() == config
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_is_refused(fixtures_dir: Path, tmp_path: Path) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama")
    (tmp_path / "out").write_text("a file")
    code, _, stderr = run_cli("repair", base, aligned, adapter, "-o", tmp_path / "out", "--force")
    assert code == 9 and "not a folder" in stderr
    assert (tmp_path / "out").read_text() == "a file"


def test_same_model_as_folder_and_file_exits_7(fixtures_dir: Path, tmp_path: Path) -> None:
    base, _, adapter = paths(fixtures_dir, "llama")
    code, _, stderr = run_cli(
        "repair", base, base / "model.safetensors", adapter, "-o", tmp_path / "out"
    )
    assert code == 7 and "same file" in stderr


def test_quantized_aligned_weights_exit_7(fixtures_dir: Path, tmp_path: Path) -> None:
    base, _, adapter = paths(fixtures_dir, "llama")
    quantized = tmp_path / "aligned"
    quantized.mkdir()
    tensors = load_file(fixtures_dir / "llama-aligned-single" / "model.safetensors")
    tensors = {k: (v * 100).to(torch.int8) if v.ndim == 2 else v for k, v in tensors.items()}
    save_file(tensors, quantized / "model.safetensors")
    code, _, stderr = run_cli("repair", base, quantized, adapter, "-o", tmp_path / "out")
    assert code == 7 and "I8" in stderr and "dequantized" in stderr


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"rank_pattern": {"q_proj": "x"}}, "rank_pattern['q_proj'] must be a positive integer"),
        ({"alpha_pattern": {"q_[": 4}}, "not a valid regular expression"),
        ({"r": 4.5}, "r must be a positive integer"),
        ({"target_modules": 7}, "target_modules"),
    ],
)
def test_invalid_config_values_exit_6(
    fixtures_dir: Path, tmp_path: Path, change: dict[str, object], words: str
) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama")
    folder = Path(shutil.copytree(adapter, tmp_path / "adapter"))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    code, _, stderr = run_cli("repair", base, aligned, folder, "-o", tmp_path / "out")
    assert code == 6 and words in stderr, stderr


def test_integer_lora_factors_exit_6(fixtures_dir: Path, tmp_path: Path) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama")
    folder = Path(shutil.copytree(adapter, tmp_path / "adapter"))
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file(
        {k: (v * 100).to(torch.int32) for k, v in tensors.items()},
        folder / "adapter_model.safetensors",
    )
    code, _, stderr = run_cli("repair", base, aligned, folder, "-o", tmp_path / "out")
    assert code == 6 and "I32" in stderr


def test_output_next_to_a_single_file_input_is_allowed(fixtures_dir: Path, tmp_path: Path) -> None:
    base, aligned, adapter = paths(fixtures_dir, "llama")
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(base / "model.safetensors", models / "base.safetensors")
    code, _, stderr = run_cli(
        "repair", models / "base.safetensors", aligned, adapter, "-o", models / "fixed", "-q"
    )
    assert code == 0, stderr
    code, _, stderr = run_cli(
        "repair", models / "base.safetensors", aligned, adapter, "-o", models / "base.safetensors"
    )
    assert code == 9
