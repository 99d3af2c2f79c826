"""`adapter-fix check` end to end: it passes a benign adapter and fails one that undoes the
alignment (both built by peft on the llama fixture), with exit 0 / 12, a table on stderr, JSON on
stdout, Markdown and JSON reports, and the GitHub step summary."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.model  # every test here runs a transformers model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8


def build_adapter(
    fixtures_dir: Path,
    out: Path,
    factors: Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> Path:
    """A peft LoRA on the aligned fixture whose `(B, A)` per module come from `factors(name, D)`."""
    aligned = AutoModelForCausalLM.from_pretrained(
        fixtures_dir / "llama-aligned", dtype=torch.float32
    )
    base = load_file(fixtures_dir / "llama-base" / "model.safetensors")
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(aligned, config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            key = name.removeprefix("base_model.model.") + ".weight"
            displacement = module.base_layer.weight.double() - base[key].double()
            lora_b, lora_a = factors(name, displacement)
            module.lora_B["default"].weight.copy_(lora_b)
            module.lora_A["default"].weight.copy_(lora_a)
    model.save_pretrained(out)
    return out


def attack(name: str, displacement: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`s B A = -0.8 D_r`: undoes most of the alignment along its top directions."""
    u, s, vh = torch.linalg.svd(displacement, full_matrices=False)
    root = (0.8 * s[:RANK] / (ALPHA / RANK)).sqrt()
    return -u[:, :RANK] * root, root[:, None] * vh[:RANK]


def benign(name: str, displacement: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Random factors whose update is as large as the displacement: a task, blind to alignment."""
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    lora_b = torch.randn(displacement.shape[0], RANK, generator=generator, dtype=torch.float64)
    lora_a = torch.randn(RANK, displacement.shape[1], generator=generator, dtype=torch.float64)
    scale = displacement.norm() / ((ALPHA / RANK) * (lora_b @ lora_a).norm())
    return lora_b * scale.sqrt(), lora_a * scale.sqrt()


@pytest.fixture(scope="session")
def pair(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return {
        "attack": build_adapter(fixtures_dir, folder / "attack", attack),
        "benign": build_adapter(fixtures_dir, folder / "benign", benign),
    }


@pytest.fixture(scope="session")
def basis(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("check-basis") / "basis"
    models = (fixtures_dir / "llama-base", fixtures_dir / "llama-aligned")
    code, _, stderr = run_cli("basis", *models, "-o", out, "--energy", "1", "-q")
    assert code == 0, stderr
    return out


def inputs(fixtures_dir: Path, basis: Path, source: str) -> list[object]:
    if source == "basis":
        return ["--basis", basis]
    return [fixtures_dir / "llama-base", fixtures_dir / "llama-aligned"]


@pytest.mark.parametrize("source", ["weights", "basis"])
def test_check_passes_the_benign_adapter_and_fails_the_attack(
    fixtures_dir: Path, basis: Path, pair: dict[str, Path], source: str
) -> None:
    given = inputs(fixtures_dir, basis, source)
    code, stdout, stderr = run_cli("check", *given, pair["benign"], "--json")
    assert code == 0, stderr
    benign = json.loads(stdout)
    assert benign["check"]["passed"] and abs(benign["check"]["total_reversal"]) < 0.05
    assert "PASS" in stderr and "adapter-fix check" in stderr
    code, stdout, stderr = run_cli("check", *given, pair["attack"], "--json")
    assert code == 12, stderr
    attack = json.loads(stdout)
    assert not attack["check"]["passed"]
    assert attack["check"]["total_reversal"] > 0.7  # -0.8 D_r, and D_r holds most of ||D||^2
    assert "gate failed" in stderr and "total reversal" in stderr
    assert {m["action"] for m in attack["modules"]} == {"fail"}
    assert attack["check"]["reversal_against"] == ("D_k" if source == "basis" else "D")


def test_check_from_a_full_basis_measures_what_check_from_weights_measures(
    fixtures_dir: Path, basis: Path, pair: dict[str, Path]
) -> None:
    documents = [
        json.loads(
            run_cli(
                "check", *inputs(fixtures_dir, basis, source), pair["attack"], "--json",
                "--energy", "1",
            )[1]
        )
        for source in ("weights", "basis")
    ]  # fmt: skip
    for direct, via in zip(documents[0]["modules"], documents[1]["modules"], strict=True):
        assert via["reversal"] == pytest.approx(direct["reversal"], rel=1e-5)
        assert via["captured_energy"] == pytest.approx(1.0)


def test_thresholds_decide_the_verdict(
    fixtures_dir: Path, basis: Path, pair: dict[str, Path]
) -> None:
    given = ["--basis", basis, pair["attack"]]
    loose = ["--max-reversal", "0.99", "--max-module-reversal", "0.99"]
    assert run_cli("check", *given, *loose, "-q")[0] == 0
    code, _, stderr = run_cli("check", *given, *loose, "--max-off-energy", "0", "-q")
    assert code == 12 and "total off-subspace energy" in stderr
    code, _, stderr = run_cli(
        "check", "--basis", basis, pair["benign"], "--max-module-reversal", "-1"
    )
    assert code == 12 and "reversal" in stderr


def test_reports_and_the_github_step_summary(
    fixtures_dir: Path, basis: Path, pair: dict[str, Path], tmp_path: Path
) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier steps\n")
    reports = [tmp_path / "check.md", tmp_path / "check.json"]
    code, stdout, _ = run_cli(
        "check", "--basis", basis, pair["attack"], "--report", reports[0], "--report", reports[1],
        "-q", env={"GITHUB_STEP_SUMMARY": str(summary)},
    )  # fmt: skip
    assert code == 12 and stdout == ""
    markdown = reports[0].read_text()
    assert markdown.startswith("# adapter-fix check") and "FAIL" in markdown
    assert markdown.count("| model.layers.") == 14
    assert json.loads(reports[1].read_text())["schema"] == "adapter-fix/check-report"
    assert summary.read_text() == "earlier steps\n" + markdown


def test_a_report_inside_an_input_is_refused(
    fixtures_dir: Path, basis: Path, pair: dict[str, Path]
) -> None:
    code, _, stderr = run_cli("check", "--basis", basis, pair["benign"], "--report", basis / "x.md")
    assert code == 9 and "overlap" in stderr
    code, _, stderr = run_cli(
        "check", "--basis", basis, pair["benign"], "--report", basis / "x.txt"
    )
    assert code == 2


@pytest.mark.parametrize("source", ["weights", "basis"])
def test_default_thresholds_pass_the_miniatures_benign_adapter_and_fail_its_attack(
    fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory, source: str
) -> None:
    """The defaults were chosen on fixtures/chat-* (README, "adapter-fix check"): they must
    still separate its task-only adapter from its attack adapter, from weights or a basis."""
    models = (fixtures_dir / "chat-base", fixtures_dir / "chat-aligned")
    given: list[object] = list(models)
    if source == "basis":
        basis = tmp_path_factory.mktemp("chat-basis") / "basis"
        code, _, stderr = run_cli("basis", *models, "-o", basis, "-q")
        assert code == 0, stderr
        given = ["--basis", basis]
    code, stdout, stderr = run_cli("check", *given, fixtures_dir / "chat-benign", "--json", "-q")
    assert code == 0, stderr
    assert json.loads(stdout)["check"]["total_reversal"] < 0.01
    code, stdout, stderr = run_cli("check", *given, fixtures_dir / "chat-attack", "--json", "-q")
    assert code == 12, stderr
    assert json.loads(stdout)["check"]["total_reversal"] > 0.05
