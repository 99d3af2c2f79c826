"""The bad-input matrix: every case exits with its documented code and one paragraph naming
the file, prints no traceback, changes no input and leaves nothing on disk.

Each case builds its inputs in a fresh folder (copies of the fixtures, then the damage),
runs one command, and compares the folder before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_cli
from safetensors import safe_open

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LORA_KEY = "base_model.model.model.layers.0.self_attn.q_proj"


@dataclass(frozen=True)
class Case:
    """`build(work)` makes the inputs under `work` and returns the command line."""

    id: str
    build: Callable[[Path], list[str]]
    code: int
    names: str  # a file (or option) name the message must contain


def adapter_copy(work: Path, name: str = "llama-lora") -> Path:
    return Path(shutil.copytree(FIXTURES / name, work / "adapter"))


def repair_args(work: Path, base: Path, aligned: Path, adapter: Path, *extra: str) -> list[str]:
    return ["repair", str(base), str(aligned), str(adapter), "-o", str(work / "out"), *extra]


def fixture_repair(work: Path, *extra: str) -> list[str]:
    return repair_args(
        work, FIXTURES / "llama-base", FIXTURES / "llama-aligned", FIXTURES / "llama-lora", *extra
    )


# adapter_config.json (exit 6)


def config_text(text: str) -> Callable[[Path], list[str]]:
    def build(work: Path) -> list[str]:
        folder = adapter_copy(work)
        (folder / "adapter_config.json").write_text(text)
        return ["inspect", str(folder)]

    return build


def config_bytes(data: bytes) -> Callable[[Path], list[str]]:
    def build(work: Path) -> list[str]:
        folder = adapter_copy(work)
        (folder / "adapter_config.json").write_bytes(data)
        return ["inspect", str(folder)]

    return build


def config_change(**change: object) -> Callable[[Path], list[str]]:
    def build(work: Path) -> list[str]:
        folder = adapter_copy(work)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
        return ["inspect", str(folder)]

    return build


def config_raw_value(key: str, raw: str) -> Callable[[Path], list[str]]:
    """Set `key` to a raw JSON token (NaN, Infinity, 1e400 cannot come from json.dumps)."""
    config = json.loads((FIXTURES / "llama-lora" / "adapter_config.json").read_text())
    config[key] = "@@"
    return config_text(json.dumps(config).replace('"@@"', raw))


def nested(depth: int) -> str:
    return '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "x": ' + "[" * depth + "]" * depth + "}"


CONFIG_CASES = [
    Case("config-alpha-nan", config_raw_value("lora_alpha", "NaN"), 6, "adapter_config.json"),
    Case("config-alpha-inf", config_raw_value("lora_alpha", "Infinity"), 6, "adapter_config"),
    Case("config-alpha-neg-inf", config_raw_value("lora_alpha", "-Infinity"), 6, "adapter_config"),
    Case("config-alpha-1e308", config_change(lora_alpha=1e308), 6, "adapter_config.json"),
    Case("config-alpha-1e400", config_raw_value("lora_alpha", "1e400"), 6, "adapter_config"),
    Case("config-alpha-tiny", config_change(lora_alpha=1e-300), 6, "adapter_config.json"),
    Case("config-alpha-string", config_change(lora_alpha="8"), 6, "adapter_config.json"),
    Case("config-r-zero", config_change(r=0), 6, "adapter_config.json"),
    Case("config-r-huge", config_change(r=10**9), 6, "adapter_config.json"),
    Case("config-r-true", config_change(r=True), 6, "adapter_config.json"),
    Case("config-r-5000-digits", config_raw_value("r", "9" * 5000), 6, "adapter_config.json"),
    Case("config-deep-nesting", config_text(nested(100_000)), 6, "adapter_config.json"),
    Case("config-nested-past-limit", config_text(nested(40)), 6, "adapter_config.json"),
    Case("config-not-json", config_text("{peft_type: LORA"), 6, "adapter_config.json"),
    Case("config-a-list", config_text("[1, 2]"), 6, "adapter_config.json"),
    Case("config-not-utf8", config_bytes(b'{"r": "\xff\xfe"}'), 6, "adapter_config.json"),
    Case(
        "config-duplicate-key",
        config_text('{"peft_type": "LORA", "r": 4, "r": 8, "lora_alpha": 8}'),
        6,
        "adapter_config.json",
    ),
    Case("config-ia3", config_change(peft_type="IA3"), 6, "adapter_config.json"),
    Case("config-target-int", config_change(target_modules=7), 6, "adapter_config.json"),
    Case(
        "config-target-lookahead",
        config_change(target_modules=r".*(?=q)q_proj"),
        6,
        "adapter_config.json",
    ),
    Case("config-target-backref", config_change(target_modules=r"(.)\1"), 6, "adapter_config"),
    Case("config-target-long", config_change(target_modules="a" * 5000), 6, "adapter_config"),
    Case("config-target-invalid", config_change(target_modules="q_[proj"), 6, "adapter_config"),
    Case(
        "config-rank-pattern-nan",
        config_text(
            json.dumps(
                {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"q": 1}}
            ).replace(": 1}", ": NaN}")
        ),
        6,
        "adapter_config.json",
    ),
    Case(
        "config-alpha-pattern-huge",
        config_change(alpha_pattern={"q_proj": 1e300}),
        6,
        "adapter_config.json",
    ),
    Case(
        "config-catastrophic-regex-strict",
        lambda work: [*config_change(target_modules="(.*.*)*X")(work), "--strict"],
        11,
        "adapter",
    ),
]


# adapter_model.safetensors headers (exit 5)


def safetensors_bytes(header: dict[str, object] | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def factors(a: list[int], b: list[int], shape_a: list[object] | None = None) -> dict[str, object]:
    return {
        f"{LORA_KEY}.lora_A.weight": {
            "dtype": "F32",
            "shape": shape_a or [4, 64],
            "data_offsets": a,
        },
        f"{LORA_KEY}.lora_B.weight": {"dtype": "F32", "shape": [64, 4], "data_offsets": b},
    }


def weights(content: bytes) -> Callable[[Path], list[str]]:
    def build(work: Path) -> list[str]:
        folder = adapter_copy(work)
        (folder / "adapter_model.safetensors").write_bytes(content)
        return ["inspect", str(folder)]

    return build


FULL = 2 * 4 * 64 * 4
HEADER_CASES = [
    Case(
        "header-overlapping-offsets",
        weights(safetensors_bytes(factors([0, 1024], [0, 1024]), bytes(1024))),
        5,
        "adapter_model.safetensors",
    ),
    Case(
        "header-gap",
        weights(safetensors_bytes(factors([0, 1024], [1032, 2056]), bytes(2056))),
        5,
        "adapter_model.safetensors",
    ),
    Case(
        "header-trailing-bytes",
        weights(safetensors_bytes(factors([0, 1024], [1024, 2048]), bytes(FULL + 64))),
        5,
        "adapter_model.safetensors",
    ),
    Case(
        "header-bool-in-shape",
        weights(safetensors_bytes(factors([0, 1024], [1024, 2048], [256, True]), bytes(FULL))),
        5,
        "adapter_model.safetensors",
    ),
    Case(
        "header-negative-offset",
        weights(safetensors_bytes(factors([-8, 1016], [1016, 2040]), bytes(FULL))),
        5,
        "adapter_model.safetensors",
    ),
    Case(
        "header-deep-nesting",
        weights(safetensors_bytes(b"[" * 100_000 + b"]" * 100_000, b"")),
        5,
        "adapter_model.safetensors",
    ),
    Case(
        "header-nan",
        weights(safetensors_bytes(b'{"x": {"dtype": "F32", "shape": [NaN]}}', b"")),
        5,
        "adapter_model.safetensors",
    ),
    Case(
        "header-duplicate-key",
        weights(
            safetensors_bytes(
                json.dumps(factors([0, 1024], [1024, 2048]))[:-1].encode()
                + b', "'
                + f"{LORA_KEY}.lora_A.weight".encode()
                + b'": {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]}}',
                bytes(FULL),
            )
        ),
        5,
        "adapter_model.safetensors",
    ),
    Case(
        "header-longer-than-file",
        weights(struct.pack("<Q", 10**6) + b"{}"),
        5,
        "adapter_model.safetensors",
    ),
    Case("header-shorter-than-8-bytes", weights(b"abc"), 5, "adapter_model.safetensors"),
    Case(
        "header-unknown-dtype",
        weights(
            safetensors_bytes({"x": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"1")
        ),
        5,
        "adapter_model.safetensors",
    ),
    Case(
        "header-metadata-not-strings",
        weights(safetensors_bytes({"__metadata__": {"format": 1}}, b"")),
        5,
        "adapter_model.safetensors",
    ),
    Case(
        "header-offsets-not-a-list",
        weights(safetensors_bytes({"x": {"dtype": "U8", "shape": [1], "data_offsets": 0}}, b"1")),
        5,
        "adapter_model.safetensors",
    ),
    Case(
        "header-truncated-data",
        weights(safetensors_bytes(factors([0, 1024], [1024, 2048]), bytes(FULL - 100))),
        5,
        "adapter_model.safetensors",
    ),
    Case(
        "factors-rank-zero",
        weights(
            safetensors_bytes(
                {
                    f"{LORA_KEY}.lora_A.weight": {
                        "dtype": "F32",
                        "shape": [0, 64],
                        "data_offsets": [0, 0],
                    },
                    f"{LORA_KEY}.lora_B.weight": {
                        "dtype": "F32",
                        "shape": [64, 0],
                        "data_offsets": [0, 0],
                    },
                },
                b"",
            )
        ),
        6,
        "adapter_model.safetensors",
    ),
    Case(
        "header-not-an-object",
        weights(safetensors_bytes(b"[1, 2]   ", b"")),
        5,
        "adapter_model.safetensors",
    ),
]


# The fuzz inputs saved in fixtures/bad/ (fixtures/make_bad.py): as adapter, BASE, ALIGNED

BAD_HEADERS = sorted(path.stem for path in (FIXTURES / "bad").glob("*.safetensors"))


def bad_header(name: str, role: str) -> Callable[[Path], list[str]]:
    def build(work: Path) -> list[str]:
        bad = FIXTURES / "bad" / f"{name}.safetensors"
        if role == "adapter":
            folder = adapter_copy(work)
            shutil.copyfile(bad, folder / "adapter_model.safetensors")
            return ["inspect", str(folder)]
        model = work / role
        model.mkdir()
        shutil.copyfile(FIXTURES / "llama-base" / "config.json", model / "config.json")
        shutil.copyfile(bad, model / "model.safetensors")
        inputs = {"base": FIXTURES / "llama-base", "aligned": FIXTURES / "llama-aligned"}
        inputs[role] = model
        return repair_args(work, inputs["base"], inputs["aligned"], FIXTURES / "llama-lora")

    return build


BAD_HEADER_CASES = [
    Case(
        f"fuzz-{name}-{role}",
        bad_header(name, role),
        5,
        f"file {{work}}/{'adapter/adapter_model' if role == 'adapter' else role + '/model'}"
        ".safetensors, key ",
    )
    for name in BAD_HEADERS
    for role in ("adapter", "base", "aligned")
]


# A sharded BASE with a broken index (exit 5) or pickles (exit 4)


def base_keys() -> list[str]:
    with safe_open(FIXTURES / "llama-base" / "model.safetensors", framework="pt") as handle:
        return list(handle.keys())


def sharded_base(index: object | str, link: Path | None = None) -> Callable[[Path], list[str]]:
    def build(work: Path) -> list[str]:
        base = work / "base"
        base.mkdir()
        shutil.copyfile(FIXTURES / "llama-base" / "config.json", base / "config.json")
        text = index if isinstance(index, str) else json.dumps(index)
        (base / "model.safetensors.index.json").write_text(text)
        if link is not None:
            elsewhere = work / "elsewhere"
            elsewhere.mkdir()
            shutil.copyfile(FIXTURES / "llama-base" / "model.safetensors", elsewhere / link.name)
            (base / "model-00001-of-00001.safetensors").symlink_to(elsewhere / link.name)
        return repair_args(work, base, FIXTURES / "llama-aligned", FIXTURES / "llama-lora")

    return build


def weight_map(shard: str) -> dict[str, object]:
    return {"weight_map": dict.fromkeys(base_keys(), shard)}


def pickle_only(kind: str) -> Callable[[Path], list[str]]:
    def build(work: Path) -> list[str]:
        folder = work / kind
        folder.mkdir()
        if kind == "adapter":
            (folder / "adapter_config.json").write_text(
                json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8})
            )
            (folder / "adapter_model.bin").write_bytes(b"never unpickled")
            return ["inspect", str(folder)]
        (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
        return repair_args(work, folder, FIXTURES / "llama-aligned", FIXTURES / "llama-lora")

    return build


INDEX_CASES = [
    Case(
        "index-shard-symlink-leaves-folder",
        sharded_base(weight_map("model-00001-of-00001.safetensors"), Path("model.safetensors")),
        5,
        "model-00001-of-00001.safetensors",
    ),
    Case(
        "index-shard-parent-path",
        sharded_base(weight_map("../llama-aligned/model.safetensors")),
        5,
        "model.safetensors.index.json",
    ),
    Case(
        "index-deep-nesting",
        sharded_base('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        5,
        "model.safetensors.index.json",
    ),
    Case(
        "index-weight-map-a-list",
        sharded_base({"weight_map": ["model.safetensors"]}),
        5,
        "model.safetensors.index.json",
    ),
    Case(
        "index-missing-shard",
        sharded_base(weight_map("model-00009-of-00009.safetensors")),
        5,
        "base",
    ),
    Case("pickle-adapter", pickle_only("adapter"), 4, "adapter_model.bin"),
    Case("pickle-base", pickle_only("base"), 4, "base"),
]


# Paths, outputs, values, options


def mistyped_local_path(work: Path) -> list[str]:
    (work / "models").mkdir()
    os.chdir(work)
    return ["inspect", "models/llama-lorra"]


def cwd_as_out(work: Path) -> list[str]:
    (work / "notes.txt").write_text("mine")
    os.chdir(work)
    args = fixture_repair(work, "--force")
    return [*args[: args.index("-o") + 1], ".", *args[args.index("-o") + 2 :]]


def symlinked_out(work: Path) -> list[str]:
    (work / "elsewhere").mkdir()
    (work / "elsewhere" / "data.csv").write_text("1,2")
    (work / "out").symlink_to(work / "elsewhere")
    return fixture_repair(work, "--force")


def user_folder_as_out(work: Path) -> list[str]:
    (work / "out").mkdir()
    (work / "out" / "thesis.tex").write_text("mine")
    return fixture_repair(work, "--force")


def file_as_out(work: Path) -> list[str]:
    (work / "out").write_text("a file")
    return fixture_repair(work, "--force")


def input_as_out(work: Path) -> list[str]:
    adapter = adapter_copy(work)
    args = repair_args(work, FIXTURES / "llama-base", FIXTURES / "llama-aligned", adapter)
    return [*args[:-1], str(adapter), "--force"]


def nan_aligned(work: Path) -> list[str]:
    from safetensors.torch import load_file, save_file

    tensors = load_file(FIXTURES / "llama-aligned-single" / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    (work / "aligned").mkdir()
    save_file(tensors, work / "aligned" / "model.safetensors")
    return repair_args(work, FIXTURES / "llama-base", work / "aligned", FIXTURES / "llama-lora")


def aligned_copy_of_base(work: Path) -> list[str]:
    aligned = Path(shutil.copytree(FIXTURES / "llama-base", work / "aligned"))
    return repair_args(work, FIXTURES / "llama-base", aligned, FIXTURES / "llama-lora")


def deep_base_config(work: Path) -> list[str]:
    base = Path(shutil.copytree(FIXTURES / "llama-base", work / "base"))
    (base / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return repair_args(work, base, FIXTURES / "llama-aligned", FIXTURES / "llama-lora")


def overflowing_adapter(work: Path) -> Path:
    """llama-lora with every factor scaled to entries up to 1e38: finite, but `s B A`
    reaches ~1e77, far beyond float32 (the repair once wrote Inf factors from it)."""
    from safetensors.torch import load_file, save_file

    folder = adapter_copy(work)
    tensors = load_file(folder / "adapter_model.safetensors")
    scaled = {key: tensor / tensor.abs().max() * 1e38 for key, tensor in tensors.items()}
    save_file(scaled, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def huge_weights(work: Path, base_value: float | None, aligned_value: float) -> list[str]:
    """BASE and ALIGNED with one weight set to finite values near float32's largest."""
    from safetensors.torch import load_file, save_file

    inputs = {}
    for role, value in (("base", base_value), ("aligned", aligned_value)):
        source = FIXTURES / ("llama-base" if role == "base" else "llama-aligned-single")
        if value is None:
            inputs[role] = source
            continue
        tensors = load_file(source / "model.safetensors")
        tensors["model.layers.0.self_attn.q_proj.weight"].fill_(value)
        (work / role).mkdir()
        shutil.copyfile(source / "config.json", work / role / "config.json")
        save_file(tensors, work / role / "model.safetensors", metadata={"format": "pt"})
        inputs[role] = work / role
    return repair_args(work, inputs["base"], inputs["aligned"], FIXTURES / "llama-lora")


def wrong_base(work: Path) -> list[str]:
    return repair_args(
        work, FIXTURES / "gpt2-base", FIXTURES / "llama-aligned", FIXTURES / "llama-lora"
    )


OTHER_CASES = [
    Case("path-missing", lambda work: ["inspect", str(work / "nothing-here")], 3, "nothing-here"),
    Case("path-mistyped-local", mistyped_local_path, 3, "models/llama-lorra"),
    Case("out-current-folder", cwd_as_out, 9, "current folder"),
    Case("out-symlink", symlinked_out, 9, "out"),
    Case("out-user-folder-with-force", user_folder_as_out, 9, "out"),
    Case("out-a-file", file_as_out, 9, "out"),
    Case("out-an-input", input_as_out, 9, "adapter"),
    Case(
        "report-inside-out",
        lambda work: fixture_repair(work, "--report", str(work / "out" / "adapter_config.json")),
        9,
        "adapter_config.json",
    ),
    Case(
        "report-unwritable",
        lambda work: fixture_repair(work, "--report", "/proc/r.md"),
        9,
        "/proc/r.md",
    ),
    Case("aligned-nan", nan_aligned, 8, "model.safetensors"),
    Case("base-wrong-architecture", wrong_base, 7, "model.layers.0"),
    Case("aligned-a-copy-of-base", aligned_copy_of_base, 7, "ALIGNED equals BASE"),
    Case("base-config-deep-nesting", deep_base_config, 5, "base/config.json"),
    Case(
        "adapter-update-overflows-float32",
        lambda work: repair_args(
            work, FIXTURES / "llama-base", FIXTURES / "llama-aligned", overflowing_adapter(work)
        ),
        8,
        "adapter/adapter_model.safetensors",
    ),
    Case(
        "displacement-overflows-float32",
        lambda work: huge_weights(work, -3e38, 3e38),
        8,
        "aligned/model.safetensors",
    ),
    Case(
        "displacement-svd-overflows-float32",
        lambda work: huge_weights(work, None, 3e38),
        8,
        "aligned/model.safetensors",
    ),
    Case(
        "option-strength-nan",
        lambda work: fixture_repair(work, "--strength", "nan"),
        2,
        "--strength",
    ),
    Case("option-energy-inf", lambda work: fixture_repair(work, "--energy", "inf"), 2, "--energy"),
]

CASES = CONFIG_CASES + HEADER_CASES + BAD_HEADER_CASES + INDEX_CASES + OTHER_CASES


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder`: file bytes, or a link's target; hidden entries included."""
    state: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            state[name] = f"-> {os.readlink(path)}"
        elif path.is_file():
            state[name] = path.read_bytes()
        else:
            state[name] = "folder"
    return state


def test_the_matrix_has_at_least_40_cases() -> None:
    assert len(CASES) >= 40
    assert len(BAD_HEADERS) >= 8
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_exits_with_its_code_names_the_file_and_changes_nothing(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    args = case.build(work)
    before = snapshot(work)
    fixtures_before = snapshot(FIXTURES)
    result = run_cli(*args)
    stderr = result.stderr
    assert result.exit_code == case.code, stderr
    assert case.names.format(work=work) in stderr, stderr
    assert "Traceback" not in stderr
    if case.code not in (2, 11):  # usage errors are click's; --strict prints the table first
        assert stderr.startswith("adapter-fix: "), stderr
        assert "\n\n" not in stderr.strip()
    assert snapshot(work) == before
    assert snapshot(FIXTURES) == fixtures_before
