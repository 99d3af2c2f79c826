"""The command line itself: fast start, option validation, the documented exit codes."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from adapter_fix.cli import main
from adapter_fix.errors import EXIT_CODES
from adapter_fix.options import (
    BasisOptions,
    CalibrationOptions,
    CheckOptions,
    EvalInputs,
    EvalOptions,
    GateOptions,
    ProbeOptions,
    RepairOptions,
)

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
    result = run_cli(*args, *option)
    assert result.exit_code == 2, result.stderr
    assert "not a finite number" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from adapter_fix.cli import main\n"
        "for args in ([], *([name] for name in main.commands)):\n"
        "    try:\n"
        "        main([*args, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted({'torch', 'transformers', 'numpy'} & set(sys.modules)), file=sys.stderr)\n"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Commands:" in ran.stdout and "--max-reversal" in ran.stdout
    assert ran.stderr.strip() == "[]"


def _fields(options: object, renames: dict[str, str] | None = None) -> dict[str, object]:
    """An option object's fields and defaults, nested objects flattened, renamed to flags."""
    fields: dict[str, object] = {}
    for field in dataclasses.fields(options):  # type: ignore[arg-type]
        value = getattr(options, field.name)
        if dataclasses.is_dataclass(value):
            fields.update(_fields(value))
        else:
            fields[field.name] = value
    return {(renames or {}).get(name, name): value for name, value in fields.items()}


# Each command's option objects, with the flags named differently from their field, and the
# fields that are not a flag of their own (set from another flag, or not by the CLI).
OPTION_OBJECTS = {
    "repair": (
        [
            _fields(RepairOptions()),
            _fields(
                GateOptions(),
                {"unit": "gate_unit", "steps": "ig_steps", "max_new_tokens": "calibration_tokens"},
            ),
            _fields(
                CalibrationOptions(),
                {
                    "share": "calibration_share",
                    "harmful": "calibration_harmful",
                    "task": "calibration_task",
                },
            ),
        ],
        {"search"},  # the flag's default, auto, resolves to order or descent (test_gate.py)
    ),
    "check": (
        [_fields(CheckOptions()), _fields(ProbeOptions(), {"prompts": "probe_prompts"})],
        set(),
    ),
    "basis": ([_fields(BasisOptions())], {"shard_bytes"}),
    "eval": (
        [
            _fields(EvalOptions()),
            _fields(EvalInputs(aligned="", adapters=()), {"samples": "outputs"}),
        ],
        {"split_seed", "reports", "aligned", "adapters"},
    ),
}


@pytest.mark.parametrize("command", sorted(OPTION_OBJECTS))
def test_every_option_is_declared_once_with_its_objects_default(command: str) -> None:
    params = main.commands[command].params
    names = [param.name for param in params]
    flags = [flag for param in params for flag in param.opts]
    assert len(set(names)) == len(names) and len(set(flags)) == len(flags)
    # What the command receives when no flag is given (parsed as click parses a command line).
    defaults = main.commands[command].make_context(command, [], resilient_parsing=True).params
    objects, not_flags = OPTION_OBJECTS[command]
    for fields in objects:
        for name, default in fields.items():
            if name in not_flags:
                continue
            assert name in defaults, f"{command}: {name} has no flag"
            assert defaults[name] == default, f"{command} --{name}"
    if command == "basis":
        assert defaults["shard_size"] * 1e9 == BasisOptions().shard_bytes


@pytest.mark.parametrize("command", ["inspect", "repair", "basis", "check", "eval"])
def test_help_lists_every_exit_code(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for code, meaning in EXIT_CODES.items():
        assert f"{code} {meaning}" in text


def test_readme_exit_code_table_lists_every_exit_code() -> None:
    section = README.read_text().split("### Exit codes", 1)[1].split("\n#", 1)[0]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", section, re.MULTILINE)}
    assert documented == set(EXIT_CODES)
