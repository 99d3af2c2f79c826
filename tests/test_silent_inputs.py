"""Inputs that once ran to a silent wrong result: ALIGNED a copy of BASE (every displacement
zero, success reported), and finite adapter factors whose update overflows float32 (Inf
written, `inspect` saying `finite: true`). Each now ends in a documented refusal naming the
file and key, or, in `inspect`, a warning and an honest `finite`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

from adapter_fix.engine import Target, WeightPair
from adapter_fix.errors import IncompatibleModelsError, NonFiniteError
from adapter_fix.io.adapter import load_adapter
from adapter_fix.io.checkpoint import Checkpoint
from adapter_fix.io.sources import LocalSource
from adapter_fix.math.solve import FactoredUpdate, largest_singular_value
from adapter_fix.math.subspace import frobenius_norm
from adapter_fix.methods.base import Outcome, check_outcomes
from adapter_fix.results import ModuleResult

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
COMMANDS = {
    "repair": lambda base, aligned, out: [
        "repair",
        base,
        aligned,
        FIXTURES / "llama-lora",
        "-o",
        out,
    ],
    "check": lambda base, aligned, out: ["check", base, aligned, FIXTURES / "llama-lora"],
    "basis": lambda base, aligned, out: ["basis", base, aligned, "-o", out],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_aligned_a_copy_of_base_in_another_folder_is_refused_with_exit_7(
    command: str, tmp_path: Path
) -> None:
    aligned = Path(shutil.copytree(FIXTURES / "llama-base", tmp_path / "aligned"))
    out = tmp_path / "out"
    code, _, stderr = run_cli(*COMMANDS[command](FIXTURES / "llama-base", aligned, out))
    assert code == 7, stderr
    assert "ALIGNED equals BASE: there is no alignment to protect" in stderr
    assert str(FIXTURES / "llama-base" / "model.safetensors") in stderr
    assert f"file {aligned / 'model.safetensors'}, key 'model.layers." in stderr
    assert not out.exists()


def test_aligned_equal_to_base_names_the_first_module_whatever_order_the_loads_finish(
    tmp_path: Path,
) -> None:
    aligned = Path(shutil.copytree(FIXTURES / "llama-base", tmp_path / "aligned"))
    pair = WeightPair(
        Checkpoint.open(LocalSource(FIXTURES / "llama-base"), "BASE"),
        Checkpoint.open(LocalSource(aligned), "ALIGNED"),
    )
    targets = [Target.of(m) for m in load_adapter(LocalSource(FIXTURES / "llama-lora")).modules]
    plans = [pair.plan(target) for target in targets]
    for target, plan in reversed(list(zip(targets, plans, strict=True))):  # workers finish late
        pair.load(target, plan)
    with pytest.raises(IncompatibleModelsError) as refused:
        pair.finish()
    assert refused.value.key == plans[0][1].key
    assert f"All {len(targets)} weights read" in refused.value.message


def test_aligned_equal_to_base_on_all_but_one_read_weight_is_repaired(tmp_path: Path) -> None:
    """The refusal is for no displacement at all: one changed module is an alignment."""
    base = load_file(FIXTURES / "llama-base" / "model.safetensors")
    aligned = load_file(FIXTURES / "llama-aligned-single" / "model.safetensors")
    kept = "model.layers.1.self_attn.q_proj.weight"
    mixed = {key: aligned[key] if key == kept else tensor for key, tensor in base.items()}
    (tmp_path / "aligned").mkdir()
    shutil.copyfile(FIXTURES / "llama-base" / "config.json", tmp_path / "aligned" / "config.json")
    save_file(mixed, tmp_path / "aligned" / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, _, stderr = run_cli(
        *COMMANDS["repair"](FIXTURES / "llama-base", tmp_path / "aligned", out)
    )
    assert code == 0, stderr
    report = json.loads((out / "repair_report.json").read_text())
    actions = {row["name"]: row["action"] for row in report["modules"]}
    assert actions.pop("model.layers.1.self_attn.q_proj") == "repaired"
    assert set(actions.values()) == {"unchanged"}


def overflowing_adapter(tmp_path: Path, peak: float = 1e38) -> Path:
    """llama-lora with every factor's entries scaled up to `peak`: finite, but `s B A`
    (~1e77) is far beyond float32's largest value."""
    folder = Path(shutil.copytree(FIXTURES / "llama-lora", tmp_path / "adapter"))
    tensors = load_file(folder / "adapter_model.safetensors")
    scaled = {key: tensor / tensor.abs().max() * peak for key, tensor in tensors.items()}
    save_file(scaled, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def test_inspect_says_an_update_beyond_float32_is_not_finite_and_warns_naming_it(
    tmp_path: Path,
) -> None:
    adapter = overflowing_adapter(tmp_path)
    code, stdout, stderr = run_cli("inspect", adapter, "--json")
    assert code == 0, stderr
    document = json.loads(stdout)
    assert [module["finite"] for module in document["modules"]] == [False] * 14
    for module in document["modules"]:
        assert module["update_norm"] > 3.4e38
        assert any(
            warning.startswith(f"{module['name']}: the update s B A reaches")
            and "beyond the largest F32" in warning
            for warning in document["warnings"]
        )
    assert run_cli("inspect", adapter, "--strict")[0] == 11


def test_inspect_keeps_finite_true_for_an_update_inside_float32(tmp_path: Path) -> None:
    adapter = overflowing_adapter(tmp_path, peak=1e10)  # s B A ~ 1e21: large, representable
    code, stdout, stderr = run_cli("inspect", adapter, "--json")
    assert code == 0, stderr
    assert all(module["finite"] for module in json.loads(stdout)["modules"])


@pytest.mark.parametrize("method", ["csulora", "project", "safelora", "none"])
def test_repair_refuses_an_update_beyond_float32_with_exit_8_and_writes_nothing(
    method: str, tmp_path: Path
) -> None:
    adapter = overflowing_adapter(tmp_path)
    out = tmp_path / "out"
    code, _, stderr = run_cli(
        "repair",
        FIXTURES / "llama-base",
        FIXTURES / "llama-aligned",
        adapter,
        "-o",
        out,
        "--method",
        method,
    )
    assert code == 8, stderr
    assert f"file {adapter / 'adapter_model.safetensors'}, key 'base_model.model." in stderr
    assert "lora_B.weight': module 'model.layers." in stderr
    assert "beyond the largest F32" in stderr
    assert not out.exists()


def test_check_refuses_an_update_beyond_float32_with_exit_8(tmp_path: Path) -> None:
    adapter = overflowing_adapter(tmp_path)
    code, _, stderr = run_cli("check", FIXTURES / "llama-base", FIXTURES / "llama-aligned", adapter)
    assert code == 8, stderr
    assert "the update s B A they make reaches" in stderr


def test_largest_singular_value_bounds_every_entry_of_the_update() -> None:
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(7, 3, generator=generator, dtype=torch.float64)
    right = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    update = FactoredUpdate(left, right, 2.0)
    dense = 2.0 * left @ right
    top = largest_singular_value(update)
    assert top == pytest.approx(float(torch.linalg.matrix_norm(dense, ord=2)), rel=1e-12)
    assert float(dense.abs().max()) <= top


def test_a_computed_inf_factor_or_nan_metric_is_refused_naming_the_module() -> None:
    adapter = load_adapter(LocalSource(FIXTURES / "llama-lora"))
    module = adapter.modules[0]
    report = ModuleResult(module.name, module.kind, module.shape, module.rank, module.scaling)
    fine = Outcome(report, torch.zeros(4, 2), torch.zeros(3, 4))
    check_outcomes(adapter, [fine])
    with pytest.raises(NonFiniteError) as error:
        check_outcomes(adapter, [Outcome(report, torch.zeros(4, 2), torch.full((3, 4), math.inf))])
    assert error.value.key == module.key_b and "(lora_B)" in error.value.render()
    report.rho_after = {"full": math.nan}
    assert report.non_finite() == ["rho_after"]
    with pytest.raises(NonFiniteError, match=r"\(rho_after\)"):
        check_outcomes(adapter, [Outcome(report)])


def test_frobenius_norm_of_finite_entries_past_float32_squares_is_finite() -> None:
    matrix = torch.full((200, 100), 1e20)  # squares (1e40) overflow float32, entries do not
    assert frobenius_norm(matrix) == pytest.approx(1e20 * math.sqrt(200 * 100), rel=1e-6)
    matrix[3, 4] = math.inf
    assert frobenius_norm(matrix) == math.inf
