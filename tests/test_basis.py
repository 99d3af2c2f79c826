"""`adapter-fix basis` end to end on the fixtures, and `repair --basis` / `check --basis` with it:
reruns are byte-identical, a basis repair equals the direct repair at the same k, a basis works
from a local Hub server, and a basis that does not fit the adapter is exit 7 naming the module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_cli
from hub_server import isolate_from_real_hub, serve_hub
from safetensors import safe_open
from safetensors.torch import load_file

from adapter_fix.io.outputs import MARKER_NAME

LLAMA = ("llama-base", "llama-aligned")


@pytest.fixture(scope="session")
def llama_basis(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llama fixture's full-rank basis (--energy 1 keeps every direction)."""
    out = tmp_path_factory.mktemp("basis") / "llama-basis"
    base, aligned = (fixtures_dir / name for name in LLAMA)
    code, _, stderr = run_cli("basis", base, aligned, "-o", out, "--energy", "1", "-q")
    assert code == 0, stderr
    return out


def updates(adapter: Path) -> dict[str, torch.Tensor]:
    """Each module's `B @ A` (the scaling is the same on both sides of a comparison)."""
    tensors = load_file(adapter / "adapter_model.safetensors")
    products = {}
    for key, lora_a in tensors.items():
        if key.endswith("lora_A.weight"):
            lora_b = tensors[key.replace("lora_A", "lora_B")]
            products[key] = lora_b.double() @ lora_a.double()
        elif key.endswith("lora_embedding_A"):
            products[key] = tensors[key.replace("_A", "_B")].double() @ lora_a.double()
    return products


def test_basis_reruns_are_byte_identical(fixtures_dir: Path, tmp_path: Path) -> None:
    base, aligned = (fixtures_dir / name for name in LLAMA)
    for name in ("one", "two"):
        code, _, stderr = run_cli(
            "basis", base, aligned, "-o", tmp_path / name, "--seed", "3", "-q"
        )
        assert code == 0, stderr
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == [MARKER_NAME, "README.md", "basis_config.json", "model.safetensors"]
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_basis_holds_every_linear_module_with_provenance(llama_basis: Path) -> None:
    config = json.loads((llama_basis / "basis_config.json").read_text())
    assert config["format"] == "adapter-fix/basis" and config["modules"] == 14
    assert config["base"].endswith("llama-base") and config["parameters"]["energy"] == 1
    with safe_open(llama_basis / "model.safetensors", framework="pt") as handle:
        keys = list(handle.keys())
        metadata = json.loads(handle.metadata()["adapter_fix.basis"])
        left = handle.get_tensor("model.layers.0.mlp.down_proj.weight.U")
        values = handle.get_tensor("model.layers.0.mlp.down_proj.weight.S")
        norm = handle.get_tensor("model.layers.0.mlp.down_proj.weight.displacement_norm")
    assert metadata["aligned"] == config["aligned"]
    assert not any("embed" in key or "lm_head" in key for key in keys)
    assert left.shape == (32, 32) and values.dtype == torch.float64
    assert float(values.square().sum()) == pytest.approx(float(norm) ** 2, rel=1e-6)
    assert "adapter-fix check --basis" in (llama_basis / "README.md").read_text()


@pytest.mark.parametrize(
    ("case", "adapter", "like"),
    [
        ("llama", "llama-lora", False),
        ("gpt2", "gpt2-lora", False),  # Conv1D: the basis is stored in the checkpoint's layout
        ("llama", "llama-embed-lora", True),  # embeddings: only a --like basis covers them
    ],
)
@pytest.mark.parametrize("method", ["csulora", "project"])
def test_repair_with_a_basis_equals_the_direct_repair_at_the_same_k(
    fixtures_dir: Path, tmp_path: Path, case: str, adapter: str, like: bool, method: str
) -> None:
    base, aligned = fixtures_dir / f"{case}-base", fixtures_dir / f"{case}-aligned"
    lora = fixtures_dir / adapter
    basis = tmp_path / "basis"
    extra = ["--like", lora] if like else []
    code, _, stderr = run_cli("basis", base, aligned, "-o", basis, "--rank", "6", *extra, "-q")
    assert code == 0, stderr
    common = ["--rank", "3", "--method", method, "-q"]
    code, _, stderr = run_cli("repair", base, aligned, lora, "-o", tmp_path / "direct", *common)
    assert code == 0, stderr
    code, _, stderr = run_cli("repair", "--basis", basis, lora, "-o", tmp_path / "via", *common)
    assert code == 0, stderr
    direct, via = updates(tmp_path / "direct"), updates(tmp_path / "via")
    assert direct.keys() == via.keys()
    for key in direct:
        assert torch.allclose(direct[key], via[key], atol=1e-5), key
    report = json.loads((tmp_path / "via" / "repair_report.json").read_text())
    assert {m["subspace_method"] for m in report["modules"]} == {"basis"}
    assert {m["subspace_rank"] for m in report["modules"]} == {3}
    with safe_open(tmp_path / "via" / "adapter_model.safetensors", framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["adapter_fix.basis"] == str(basis.resolve())
    assert metadata["adapter_fix.base"] == str(base.resolve())


def test_a_sharded_basis_gives_the_same_repair(
    fixtures_dir: Path, tmp_path: Path, llama_basis: Path
) -> None:
    base, aligned = (fixtures_dir / name for name in LLAMA)
    sharded = tmp_path / "sharded"
    code, _, stderr = run_cli(
        "basis", base, aligned, "-o", sharded, "--energy", "1", "--shard-size", "0.00005", "-q"
    )
    assert code == 0, stderr
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3 and shards[0] == "model-00001-of-00003.safetensors"
    assert not list(sharded.glob(".spill*"))
    lora = fixtures_dir / "llama-lora"
    for name, basis in (("one", llama_basis), ("two", sharded)):
        code, _, stderr = run_cli("repair", "--basis", basis, lora, "-o", tmp_path / name, "-q")
        assert code == 0, stderr
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert all(torch.equal(one[key], two[key]) for key in one)


def test_a_basis_short_of_the_requested_energy_says_so(fixtures_dir: Path, tmp_path: Path) -> None:
    base, aligned = (fixtures_dir / name for name in LLAMA)
    basis = tmp_path / "basis"
    assert run_cli("basis", base, aligned, "-o", basis, "--rank", "2", "-q")[0] == 0
    report = tmp_path / "report.json"
    code, _, stderr = run_cli(
        "repair", "--basis", basis, fixtures_dir / "llama-lora", "-o", tmp_path / "out",
        "--energy", "0.99", "--report", report,
    )  # fmt: skip
    assert code == 0, stderr
    modules = json.loads(report.read_text())["modules"]
    assert {m["subspace_rank"] for m in modules} == {2}
    assert all("short of the requested energy 0.99" in m["note"] for m in modules)
    assert "warning: model.layers.0" in stderr and "short of the requested energy" in stderr


def test_a_bfloat16_basis_is_half_the_size_and_repairs_nearly_alike(
    fixtures_dir: Path, tmp_path: Path, llama_basis: Path
) -> None:
    base, aligned = (fixtures_dir / name for name in LLAMA)
    small = tmp_path / "bf16"
    code, _, stderr = run_cli(
        "basis", base, aligned, "-o", small, "--energy", "1", "--dtype", "bfloat16", "-q"
    )
    assert code == 0, stderr
    size = (small / "model.safetensors").stat().st_size
    assert size < 0.6 * (llama_basis / "model.safetensors").stat().st_size
    lora = fixtures_dir / "llama-lora"
    for name, basis in (("f32", llama_basis), ("bf16", small)):
        code, _, stderr = run_cli(
            "repair", "--basis", basis, lora, "-o", tmp_path / f"out-{name}", "--rank", "3", "-q"
        )
        assert code == 0, stderr
    f32, bf16 = updates(tmp_path / "out-f32"), updates(tmp_path / "out-bf16")
    for key in f32:
        assert torch.allclose(f32[key], bf16[key], atol=0.05 * float(f32[key].abs().max()))


def test_safelora_with_a_full_basis_selects_like_safelora_from_weights(
    fixtures_dir: Path, tmp_path: Path, llama_basis: Path
) -> None:
    base, aligned = (fixtures_dir / name for name in LLAMA)
    lora = fixtures_dir / "llama-lora"
    direct, via = tmp_path / "direct", tmp_path / "via"
    options = ["--method", "safelora", "--energy", "1", "-q"]
    assert run_cli("repair", base, aligned, lora, "-o", direct, *options)[0] == 0
    code, _, stderr = run_cli("repair", "--basis", llama_basis, lora, "-o", via, *options)
    assert code == 0, stderr
    rows = [
        json.loads((folder / "repair_report.json").read_text())["modules"]
        for folder in (direct, via)
    ]
    assert [m["safelora_similarity"] for m in rows[0]] == [
        pytest.approx(m["safelora_similarity"], abs=2e-5) for m in rows[1]
    ]
    assert [m["action"] for m in rows[0]] == [m["action"] for m in rows[1]]
    assert all(m["rho_before"] for m in rows[1])  # a subspace is at hand: rho is reported
    assert not any(m["rho_before"] for m in rows[0])  # from weights: no SVD, no rho


def test_a_basis_for_other_modules_exits_7_naming_the_module(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    base, aligned = (fixtures_dir / name for name in LLAMA)
    basis = tmp_path / "basis"
    assert run_cli("basis", base, aligned, "-o", basis, "--modules", r".*\.q_proj", "-q")[0] == 0
    assert json.loads((basis / "basis_config.json").read_text())["modules"] == 2
    for command in ("repair", "check"):
        code, _, stderr = (
            run_cli(command, "--basis", basis, fixtures_dir / "llama-lora", "-o", tmp_path / "out")
            if command == "repair"
            else run_cli(command, "--basis", basis, fixtures_dir / "llama-lora")
        )
        assert code == 7, stderr
        assert "no entry for module 'model.layers.0.mlp.down_proj'" in stderr
    assert not (tmp_path / "out").exists()


def test_a_basis_of_another_model_exits_7_naming_the_module(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    basis = tmp_path / "basis"
    base, aligned = fixtures_dir / "llama-base", fixtures_dir / "llama-aligned"
    assert run_cli("basis", base, aligned, "-o", basis, "-q")[0] == 0
    folder = basis / "model.safetensors"
    tensors = load_file(folder)
    tensors["model.layers.0.self_attn.q_proj.weight.U"] = torch.zeros(48, 2)
    tensors["model.layers.0.self_attn.q_proj.weight.S"] = torch.zeros(2, dtype=torch.float64)
    tensors["model.layers.0.self_attn.q_proj.weight.V"] = torch.zeros(32, 2)
    from safetensors.torch import save_file

    save_file(tensors, folder)
    code, _, stderr = run_cli("check", "--basis", basis, fixtures_dir / "llama-lora")
    assert code == 7, stderr
    assert "model.layers.0.self_attn.q_proj" in stderr and "[48, 32]" in stderr


def test_a_basis_whose_norm_is_not_one_number_exits_5_naming_the_key(
    llama_basis: Path, tmp_path: Path, fixtures_dir: Path
) -> None:
    import shutil

    from safetensors.torch import save_file

    basis = Path(shutil.copytree(llama_basis, tmp_path / "basis"))
    tensors = load_file(basis / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight.displacement_norm"
    tensors[key] = torch.ones(2, dtype=torch.float64)
    save_file(tensors, basis / "model.safetensors")
    code, _, stderr = run_cli("check", "--basis", basis, fixtures_dir / "llama-lora")
    assert code == 5, stderr
    assert f"key '{key}'" in stderr and "must be one number" in stderr


@pytest.mark.parametrize(
    ("field", "damage", "says"),
    [
        ("S", lambda s: s.to(torch.int32), "basis entry S is I32"),
        ("U", lambda u: u.to(torch.uint8), "basis entry U is U8"),
        ("S", lambda s: s * 0, "S holds a negative value or no positive one"),
        ("S", lambda s: -s, "S holds a negative value or no positive one"),
        ("S", lambda s: s.flip(0), "S is not in descending order"),
        ("S", lambda s: s * 1e3, "S holds sum(S^2) ="),
        ("captured_energy", lambda e: e + 2, "captured_energy 3"),
    ],
)
def test_a_basis_entry_that_cannot_be_an_svd_exits_5_naming_the_key(
    llama_basis: Path, tmp_path: Path, fixtures_dir: Path, field: str, damage: Any, says: str
) -> None:
    """A basis comes from anyone (the Hub): its values are checked, not only its finiteness
    (an S of zeros divided by zero; a uint8 U crashed the SVD code)."""
    import shutil

    from safetensors.torch import save_file

    basis = Path(shutil.copytree(llama_basis, tmp_path / "basis"))
    tensors = load_file(basis / "model.safetensors")
    weight = "model.layers.0.self_attn.q_proj.weight"
    tensors[f"{weight}.{field}"] = damage(tensors[f"{weight}.{field}"])
    save_file(tensors, basis / "model.safetensors")
    code, _, stderr = run_cli("check", "--basis", basis, fixtures_dir / "llama-lora")
    assert code == 5, stderr
    assert f"key '{weight}." in stderr and says in stderr


def test_a_basis_config_nested_too_deeply_exits_5(
    llama_basis: Path, tmp_path: Path, fixtures_dir: Path
) -> None:
    import shutil

    basis = Path(shutil.copytree(llama_basis, tmp_path / "basis"))
    (basis / "basis_config.json").write_text("[" * 100_000 + "]" * 100_000)
    code, _, stderr = run_cli("check", "--basis", basis, fixtures_dir / "llama-lora")
    assert code == 5, stderr
    assert "basis_config.json" in stderr


def test_usage_errors_of_basis_and_basis_inputs_exit_2(fixtures_dir: Path, tmp_path: Path) -> None:
    base, aligned = (fixtures_dir / name for name in LLAMA)
    code, _, stderr = run_cli("basis", base, aligned, "-o", tmp_path / "b", "--modules", "(")
    assert code == 2 and "--modules" in stderr
    code, _, stderr = run_cli("repair", "--basis", tmp_path, base, aligned, "-o", tmp_path / "o")
    assert code == 2 and "--basis BASIS ADAPTER" in stderr
    code, _, stderr = run_cli("check", base, fixtures_dir / "llama-lora")
    assert code == 2 and "BASE ALIGNED ADAPTER" in stderr


def test_a_folder_that_is_not_a_basis_exits_3(fixtures_dir: Path, tmp_path: Path) -> None:
    code, _, stderr = run_cli(
        "check", "--basis", fixtures_dir / "llama-base", fixtures_dir / "llama-lora"
    )
    assert code == 3 and "not an adapter-fix basis" in stderr


def test_a_basis_from_the_hub_serves_check_and_repair(
    fixtures_dir: Path, tmp_path: Path, llama_basis: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_from_real_hub(monkeypatch)
    lora = fixtures_dir / "llama-lora"
    with serve_hub({"org/llama-basis": llama_basis}) as (endpoint, log):
        hub = ["--endpoint", endpoint, "--cache-dir", tmp_path / "cache"]
        code, stdout, stderr = run_cli("check", "--basis", "org/llama-basis", lora, "--json", *hub)
        assert code == 0, stderr
        code, _, stderr = run_cli(
            "repair", "--basis", "org/llama-basis@main", lora, "-o", tmp_path / "hub", "-q", *hub
        )
        assert code == 0, stderr
        fetched = {path.rsplit("/", 1)[-1] for method, path in log if "/resolve/" in path}
    assert {"basis_config.json", "model.safetensors"} <= fetched
    assert "README.md" not in fetched
    assert json.loads(stdout)["inputs"]["basis"].startswith("org/llama-basis@")
    code, local_stdout, _ = run_cli("check", "--basis", llama_basis, lora, "--json")
    assert json.loads(local_stdout)["check"]["total_reversal"] == pytest.approx(
        json.loads(stdout)["check"]["total_reversal"], rel=1e-12
    )
    assert run_cli("repair", "--basis", llama_basis, lora, "-o", tmp_path / "local", "-q")[0] == 0
    hub_tensors = load_file(tmp_path / "hub" / "adapter_model.safetensors")
    local_tensors = load_file(tmp_path / "local" / "adapter_model.safetensors")
    assert all(torch.equal(hub_tensors[k], local_tensors[k]) for k in local_tensors)
