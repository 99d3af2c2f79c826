"""The module stream: read-ahead changes nothing, methods get only what they need, Safe LoRA
runs no SVD, and the method registry is what the CLI offers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import adapter_fix.engine as engine_module
from adapter_fix import hardware
from adapter_fix.commands.repair import repair
from adapter_fix.engine import (
    DISPLACEMENT,
    REDUCED,
    SUBSPACE,
    Target,
    WeightPair,
    module_stream,
)
from adapter_fix.io.adapter import load_adapter
from adapter_fix.io.checkpoint import Checkpoint
from adapter_fix.io.sources import LocalSource
from adapter_fix.methods import METHODS, STREAM_METHODS, method_class, registry
from adapter_fix.options import RepairOptions, SubspaceSettings
from adapter_fix.results import Clock


def open_llama(fixtures_dir: Path) -> tuple[WeightPair, object]:
    base = Checkpoint.open(LocalSource(fixtures_dir / "llama-base"), "BASE")
    aligned = Checkpoint.open(LocalSource(fixtures_dir / "llama-aligned"), "ALIGNED")
    return WeightPair(base, aligned), load_adapter(LocalSource(fixtures_dir / "llama-lora"))


@pytest.mark.parametrize("method", ["csulora", "safelora"])
def test_read_ahead_does_not_change_the_result(fixtures_dir: Path, method: str) -> None:
    results = []
    for read_ahead in (True, False):
        source, adapter = open_llama(fixtures_dir)
        result = repair(source, adapter, RepairOptions(method=method), read_ahead=read_ahead)
        results.append([m.to_json() for m in result.modules])
    assert results[0] == results[1]


def test_stream_gives_each_consumer_only_what_it_needs(fixtures_dir: Path) -> None:
    source, adapter = open_llama(fixtures_dir)
    targets = [Target.of(module) for module in adapter.modules]  # type: ignore[attr-defined]
    for needs in (frozenset({SUBSPACE}), frozenset({DISPLACEMENT})):
        items = list(
            module_stream(targets, source, needs, SubspaceSettings(), Clock(), adapter=adapter)
        )
        assert [item.target.name for item in items] == [t.name for t in targets]
        for item in items:
            assert (item.subspace is not None) == (SUBSPACE in needs)
            assert (item.displacement is not None) == (DISPLACEMENT in needs)
            assert item.lora_b is not None and item.lora_a is not None
            assert item.displacement_norm > 0 and item.no_signal is None
            if item.displacement is not None:
                assert item.displacement.shape == item.target.shape


def test_safelora_runs_no_svd(fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_svd, real_subspace = torch.linalg.svd, engine_module.safety_subspace

    def counting_svd(*args: object, **kwargs: object) -> object:
        calls.append("svd")
        return real_svd(*args, **kwargs)  # type: ignore[arg-type]

    def counting_subspace(*args: object, **kwargs: object) -> object:
        calls.append("safety_subspace")
        return real_subspace(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    monkeypatch.setattr(engine_module, "safety_subspace", counting_subspace)
    source, adapter = open_llama(fixtures_dir)
    result = repair(source, adapter, RepairOptions(method="safelora"))
    assert calls == []
    assert all(m.rho_before == {} and m.subspace_method is None for m in result.modules)
    assert {m.action for m in result.modules} == {"repaired", "unchanged"}
    source, adapter = open_llama(fixtures_dir)
    repair(source, adapter, RepairOptions(method="csulora"))
    assert "safety_subspace" in calls  # the counter sees the SVD when there is one


def test_every_registered_method_declares_what_it_needs() -> None:
    classes = registry()
    assert set(classes) == set(STREAM_METHODS) == {"csulora", "project", "safelora", "none"}
    assert set(METHODS) == {*classes, "gate"}  # gate calibrates on prompts, not the stream
    for name, method in classes.items():
        assert method.name == name
        assert method.needs and method.needs <= {SUBSPACE, DISPLACEMENT, REDUCED}
    assert method_class("safelora").needs == {DISPLACEMENT, REDUCED}


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_safelora_gets_d_transpose_b_taken_while_d_is_read(fixtures_dir: Path, model: str) -> None:
    """GPT-2's Conv1D weights are stored transposed: the product follows the stored rows."""
    base = Checkpoint.open(LocalSource(fixtures_dir / f"{model}-base"), "BASE")
    aligned = Checkpoint.open(LocalSource(fixtures_dir / f"{model}-aligned"), "ALIGNED")
    adapter = load_adapter(LocalSource(fixtures_dir / f"{model}-lora"))
    targets = [Target.of(module) for module in adapter.modules]
    assert model == "llama" or any(target.transposed for target in targets)
    needs = frozenset({DISPLACEMENT, REDUCED})
    stream = module_stream(
        targets, WeightPair(base, aligned), needs, SubspaceSettings(), Clock(), adapter=adapter
    )
    for item in stream:
        assert item.displacement is not None and item.reduced is not None
        assert item.lora_b is not None
        expected = item.displacement.T @ item.lora_b.float()
        assert torch.allclose(item.reduced, expected, rtol=1e-5, atol=1e-7), item.target.name


@pytest.mark.parametrize(
    ("device", "flags", "expected"),
    [
        ("cpu", "fpu sse2 avx512f avx512_bf16 avx512_vnni", torch.bfloat16),
        ("cpu", "fpu sse2 amx_bf16 amx_tile", torch.bfloat16),
        ("cpu", "fpu sse2 avx2 avx512f", None),
        ("cuda", "fpu avx512_bf16", None),
    ],
)
def test_sketch_dtype_is_bfloat16_only_on_a_cpu_with_native_bfloat16(
    device: str, flags: str, expected: torch.dtype | None
) -> None:
    cpuinfo = f"processor\t: 0\nflags\t\t: {flags}\nbugs\t\t: avx512_bf16_fake\n"
    assert engine_module.sketch_dtype(device, cpuinfo) is expected
    assert engine_module.sketch_dtype("cpu", "") is None  # no /proc/cpuinfo (not Linux)


def test_the_svd_takes_the_machine_s_sketch_dtype(
    fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dtypes = []
    real = engine_module.safety_subspace

    def recording(*args: object, **kwargs: object) -> object:
        dtypes.append(kwargs["sketch_dtype"])
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module, "safety_subspace", recording)
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: "flags\t: avx512_bf16\n")
    source, adapter = open_llama(fixtures_dir)
    repair(source, adapter, RepairOptions())
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_sketch_dtype_float32_in_the_environment_turns_bfloat16_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flags = "flags\t: avx512_bf16\n"
    monkeypatch.setenv("ADAPTER_FIX_SKETCH_DTYPE", "float32")
    assert engine_module.sketch_dtype("cpu", flags) is None
    monkeypatch.setenv("ADAPTER_FIX_SKETCH_DTYPE", "auto")
    assert engine_module.sketch_dtype("cpu", flags) is torch.bfloat16


def test_an_unknown_sketch_dtype_setting_is_a_usage_error_before_any_output(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    from conftest import run_cli

    out = tmp_path / "out"
    result = run_cli(
        "repair",
        *(fixtures_dir / name for name in ("llama-base", "llama-aligned", "llama-lora")),
        "-o",
        out,
        env={"ADAPTER_FIX_SKETCH_DTYPE": "fp32"},
    )
    assert result.exit_code == 2
    assert "ADAPTER_FIX_SKETCH_DTYPE is 'fp32'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
