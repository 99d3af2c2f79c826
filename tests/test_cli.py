"""The command line itself: fast start, option validation, the documented exit codes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapter_fix.cli import ALL_LINEAR, CHECK_DEFAULTS, REPAIR_METHODS, main
from adapter_fix.commands import basis, check
from adapter_fix.commands.repair import METHODS
from adapter_fix.errors import EXIT_CODES

README = Path(__file__).resolve().parents[1] / "README.md"


def test_importing_the_cli_imports_no_torch_numpy_rich_or_hub() -> None:
    heavy = ("torch", "numpy", "rich", "huggingface_hub", "safetensors")
    code = f"import sys, adapter_fix.cli; print([m for m in {heavy!r} if m in sys.modules])"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]"


@pytest.mark.parametrize(
    "option",
    [
        ("--strength", "nan"),
        ("--strength", "inf"),
        ("--strength", "-inf"),
        ("--energy", "nan"),
        ("--safelora-threshold", "nan"),
        ("--safelora-threshold", "inf"),
    ],
)
def test_non_finite_float_options_are_usage_errors(
    fixtures_dir: Path, tmp_path: Path, option: tuple[str, str]
) -> None:
    names = ("llama-base", "llama-aligned", "llama-lora")
    args = ["repair", *(str(fixtures_dir / n) for n in names), "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(main, [*args, *option])
    assert result.exit_code == 2, result.stderr
    assert "not a finite number" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_option_values_repeated_in_the_cli_equal_their_sources() -> None:
    assert REPAIR_METHODS == METHODS
    assert ALL_LINEAR == basis.ALL_LINEAR
    assert {
        name: getattr(check, f"DEFAULT_{name.upper()}") for name in CHECK_DEFAULTS
    } == CHECK_DEFAULTS


@pytest.mark.parametrize("command", ["inspect", "repair", "basis", "check", "eval"])
def test_help_lists_every_exit_code(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for code, meaning in EXIT_CODES.items():
        assert f"{code} {meaning}" in text


def test_readme_exit_code_table_lists_every_exit_code() -> None:
    section = README.read_text().split("### Exit codes", 1)[1].split("\n#", 1)[0]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", section, re.MULTILINE)}
    assert documented == set(EXIT_CODES)
