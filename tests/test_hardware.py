"""The CPU's flags, and the warning for bfloat16 where the CPU has no native bfloat16."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

from adapter_fix import hardware
from adapter_fix.evaluate.model import dtype_warnings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\nbugs\t\t: avx512_bf16\n"
BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"


def test_cpu_flags_reads_the_flags_line_and_nothing_else() -> None:
    assert hardware.cpu_flags(AVX2) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert not hardware.native_bfloat16(AVX2)  # a flag named on the bugs line does not count
    assert hardware.native_bfloat16(BF16)
    assert hardware.cpu_flags("") is None  # not Linux
    assert hardware.cpu_flags("Features\t: fp asimd bf16\n") is None  # not x86


@pytest.mark.parametrize(
    ("dtype", "cpuinfo", "warned"),
    [
        ("bfloat16", AVX2, True),
        ("bfloat16", BF16, False),
        ("bfloat16", "", False),  # flags unknown: nothing is claimed
        ("float32", AVX2, False),
        ("auto", AVX2, False),  # float32 on the CPU
    ],
)
def test_bfloat16_on_a_cpu_without_it_warns_and_names_the_faster_dtype(
    dtype: str, cpuinfo: str, warned: bool
) -> None:
    warnings = dtype_warnings("cpu", dtype, cpuinfo)
    assert bool(warnings) is warned
    if warned:
        assert "avx512_bf16" in warnings[0] and "--dtype auto" in warnings[0]


@pytest.mark.parametrize(("cpuinfo", "count"), [(BF16, 1), (AVX2, 2), ("", 1)])
def test_bfloat16_with_gradients_on_the_cpu_warns_of_memory_whatever_the_flags(
    cpuinfo: str, count: int
) -> None:
    """The gated repair in bfloat16 on the CPU peaked at 2.7x float32's resident memory on
    a CPU with native bfloat16: that warning comes on any CPU, after the speed one."""
    warnings = dtype_warnings("cpu", "bfloat16", cpuinfo, gradients=True)
    assert len(warnings) == count
    assert "saves no memory" in warnings[-1] and "--dtype auto" in warnings[-1]
    assert dtype_warnings("cpu", "float32", cpuinfo, gradients=True) == []
    assert dtype_warnings("cpu", "bfloat16", cpuinfo) == warnings[:-1]


def test_no_warning_where_the_model_runs_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dtype_warnings("auto", "bfloat16", AVX2) == []
    assert dtype_warnings("auto", "bfloat16", BF16, gradients=True) == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dtype_warnings("auto", "bfloat16", AVX2)  # auto is the CPU here


@pytest.mark.model
@pytest.mark.parametrize(
    "command",
    [
        ["eval", FIXTURES / "chat-aligned", "--harmful", "missing.jsonl"],
        [
            "check",
            *(FIXTURES / name for name in ("chat-base", "chat-aligned", "chat-attack")),
            *("--harmful", "missing.jsonl"),
        ],
    ],
)
def test_eval_and_check_warn_before_they_load_the_model(
    command: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warning comes first, before any input is read (here a missing prompt file)."""
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: AVX2)
    result = run_cli(*command, "--device", "cpu", "--dtype", "bfloat16")
    assert result.exit_code == 3, result.stderr  # a missing input
    assert result.stderr.index("--dtype bfloat16 on this CPU") < result.stderr.index("missing")


@pytest.mark.model
def test_the_gated_repair_warns_of_bfloat16s_memory_before_it_loads_the_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On a CPU with native bfloat16 too: the memory warning comes before any input is read."""
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: BF16)
    result = run_cli(
        "repair",
        *(FIXTURES / name for name in ("chat-base", "chat-aligned", "chat-attack")),
        *("-o", tmp_path / "out", "--method", "gate", "--harmful", "missing.jsonl"),
        *("--device", "cpu", "--dtype", "bfloat16"),
    )
    assert result.exit_code == 3, result.stderr  # a missing input
    assert "on this CPU" not in result.stderr
    assert result.stderr.index("saves no memory") < result.stderr.index("missing")


def test_no_warning_where_no_model_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The weight-only check runs no model: its dtype is not the probe's. (The subspace
    repair refuses --dtype, a setting of --method gate.)"""
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: AVX2)
    result = run_cli(
        "check",
        *(FIXTURES / name for name in ("llama-base", "llama-aligned", "llama-lora")),
        *("--no-probe", "--dtype", "bfloat16", "-q"),
    )
    assert result.exit_code in (0, 12), result.stderr  # passed or failed its thresholds
    assert "on this CPU" not in result.stderr
