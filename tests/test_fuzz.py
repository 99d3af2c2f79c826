"""Fuzzing the parsers of untrusted files with hypothesis: safetensors headers, indexes,
adapter configs and their regexes. Whatever the bytes, the answer is a value or one
adapter-fix error (never a crash, a hang or a NaN); a bounded number of examples, fixed
(derandomized) so `make test` takes the same few seconds every run."""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any

from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter_fix.errors import EXIT_CODES, AdapterFixError
from adapter_fix.io.adapter import _read_config
from adapter_fix.io.checkpoint import DTYPES, _read_index, read_header
from adapter_fix.io.lora_keys import is_targeted
from adapter_fix.io.safe_regex import UnsafePatternError, compile_pattern
from adapter_fix.io.sources import LocalSource

BOUNDED = settings(
    max_examples=150,
    deadline=timedelta(seconds=2),
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
small_ints = st.integers(min_value=-2, max_value=64) | st.booleans()
tensor_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*DTYPES, "Q4", 3]) | json_values,
        "shape": st.lists(small_ints, max_size=3) | json_values,
        "data_offsets": st.lists(small_ints, min_size=2, max_size=2) | json_values,
    }
)
headers = st.dictionaries(st.text(max_size=6), tensor_entries | json_values, max_size=4)


@contextlib.contextmanager
def _written(data: bytes, name: str) -> Iterator[Path]:
    """`data` as file `name` in a folder of its own, deleted on leaving."""
    with tempfile.TemporaryDirectory(prefix="adapter-fix-fuzz-") as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        yield path


def _encode(header: Any) -> bytes:
    try:
        return json.dumps(header).encode()
    except ValueError:
        return b"{}"


@BOUNDED
@given(header=headers, data_size=st.integers(min_value=0, max_value=300))
def test_any_header_is_accepted_only_when_its_tensors_tile_the_data(
    header: dict[str, Any], data_size: int
) -> None:
    raw = _encode(header)
    with _written(struct.pack("<Q", len(raw)) + raw + bytes(data_size), "m.safetensors") as path:
        try:
            parsed = read_header(path)
        except AdapterFixError as error:
            assert error.exit_code in (3, 5)
            return
        size = path.stat().st_size
    end = parsed.data_start
    for info in sorted(parsed.tensors.values(), key=lambda i: (i.offset, i.nbytes)):
        assert info.offset == end
        assert all(type(d) is int and d >= 0 for d in info.shape)
        assert info.nbytes == math.prod(info.shape) * DTYPES[info.dtype].itemsize
        end += info.nbytes
    assert end == size


@BOUNDED
@given(data=st.binary(max_size=200), claimed=st.integers(min_value=0, max_value=2**64 - 1))
def test_any_bytes_as_a_safetensors_file_are_a_value_or_exit_5(data: bytes, claimed: int) -> None:
    for content in (data, struct.pack("<Q", claimed) + data):
        with _written(content, "m.safetensors") as path:
            try:
                read_header(path)
            except AdapterFixError as error:
                assert error.exit_code in (3, 5)


@BOUNDED
@given(index=json_values | st.fixed_dictionaries({"weight_map": json_values}))
def test_any_index_is_a_weight_map_of_plain_names_or_exit_4_or_5(index: Any) -> None:
    with _written(_encode(index), "model.safetensors.index.json") as path:
        try:
            weight_map = _read_index(path, LocalSource(path.parent))
        except AdapterFixError as error:
            assert error.exit_code in (4, 5)
            return
    for key, shard in weight_map.items():
        assert isinstance(key, str) and isinstance(shard, str)
        parts = PurePosixPath(shard.replace("\\", "/")).parts
        assert parts and not shard.startswith(("/", "\\")) and ".." not in parts


config_fields = st.fixed_dictionaries(
    {
        "peft_type": st.sampled_from(["LORA", "lora", "IA3"]) | json_values,
        "r": small_ints | st.floats() | json_values,
        "lora_alpha": st.floats() | st.integers() | json_values,
    },
    optional={
        "target_modules": st.text(alphabet="ab.*+?|()[]{}^$\\dw0-9", max_size=12)
        | st.lists(st.text(max_size=6), max_size=3)
        | json_values,
        "rank_pattern": st.dictionaries(st.text(max_size=6), small_ints | json_values, max_size=2),
        "alpha_pattern": st.dictionaries(st.text(max_size=6), st.floats(), max_size=2),
    },
)


@BOUNDED
@given(config=config_fields | json_values, raw=st.sampled_from(["", "NaN", "Infinity", "1e999"]))
def test_any_config_is_sane_or_exit_6(config: Any, raw: str) -> None:
    text = _encode(config)
    if raw and isinstance(config, dict):
        text = text[:-1] + f', "lora_alpha": {raw}}}'.encode()
    with _written(text, "adapter_config.json") as path:
        try:
            parsed = _read_config(path)
        except AdapterFixError as error:
            assert error.exit_code == 6
            return
    assert isinstance(parsed["r"], int) and 1 <= parsed["r"] <= 65536
    assert math.isfinite(parsed["lora_alpha"]) and 1e-6 <= parsed["lora_alpha"] <= 1e6
    targets = parsed.get("target_modules")
    if isinstance(targets, str):
        is_targeted("model.layers.0.self_attn.q_proj", targets)  # finishes: linear time


@BOUNDED
@given(
    pattern=st.text(alphabet="ab.*+?|()[]{}^$\\dw0-9,", max_size=14),
    texts=st.lists(st.text(alphabet="ab._1\n", max_size=8), min_size=1, max_size=5),
)
def test_safe_regex_answers_like_python_re_where_it_accepts_a_pattern(
    pattern: str, texts: list[str]
) -> None:
    try:
        compiled = compile_pattern(pattern)
    except (re.error, UnsafePatternError, OverflowError):
        return
    for text in texts:
        assert compiled.fullmatch(text) == (re.fullmatch(pattern, text) is not None), text


# Mutations of real headers, through the CLI, from a fixed seed: whatever one field becomes,
# the run ends in one documented refusal (or succeeds), never an internal error (exit 1) or a
# traceback, and never calls a file whose header alone is wrong truncated.

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NASTY: list[Any] = [
    None,
    True,
    -1,
    2**64,
    1.5,
    "F32",
    "",
    [],
    {},
    [[4]],
    {"F32": 4},
    ["F32"],
    [0, 2**40],
    [2**62, 2**62],
    [10**200, 10**200],
    [1] * 5000,
    [True, 16],
    [16, 0],
]


def _mutated(header: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """`header` with one random change to one tensor's entry (or the entry as a whole)."""
    header = json.loads(json.dumps(header))
    key = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[key]
    field = rng.choice(["dtype", "shape", "data_offsets", "entry", "drop"])
    kind = rng.random()
    if field == "entry":
        header[key] = rng.choice(NASTY)
    elif field == "drop":
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    elif kind < 0.5:
        entry[field] = rng.choice(NASTY)
    elif field == "dtype":
        entry["dtype"] = rng.choice([*DTYPES, "Q4", "f32"])
    elif field == "shape":
        shape = list(entry["shape"])
        shape[rng.randrange(len(shape))] = rng.choice([0, 1, shape[0] + 1, 10**12, 2**50])
        entry["shape"] = shape if rng.random() < 0.8 else [*shape, 2]
    else:
        other = header[rng.choice([k for k in header if k != "__metadata__"])]["data_offsets"]
        begin, end = entry["data_offsets"]
        shift = rng.choice([1, -1, 8, 4096, 2**40, -begin])
        entry["data_offsets"] = rng.choice(
            [[begin + shift, end + shift], [begin, end + shift], list(other), [end, begin]]
        )
    return header


def _with_header(path: Path, header: dict[str, Any], target: Path) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    raw = json.dumps(header).encode()
    target.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def _header(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header: dict[str, Any] = json.loads(data[8 : 8 + length])
    return header


def _assert_documented(result: Any, what: str) -> None:
    assert result.exit_code != 1, f"{what}: {result.stderr}"
    assert result.exit_code in EXIT_CODES, f"{what}: {result.stderr}"
    assert "Traceback" not in result.stderr, what
    if result.exit_code:
        assert result.stderr.startswith("adapter-fix: "), f"{what}: {result.stderr}"
    # Only the header changed, every data byte is there: never send the user to download again.
    assert "truncated" not in result.stderr, f"{what}: {result.stderr}"


def test_mutated_adapter_and_base_headers_end_in_a_documented_exit_code(tmp_path: Path) -> None:
    rng = random.Random(21)
    adapter = Path(shutil.copytree(FIXTURES / "llama-lora", tmp_path / "adapter"))
    weights = FIXTURES / "llama-lora" / "adapter_model.safetensors"
    for run in range(300):
        header = _mutated(_header(weights), rng)
        _with_header(weights, header, adapter / "adapter_model.safetensors")
        result = run_cli("inspect", str(adapter), "--json")
        _assert_documented(result, f"adapter mutation {run}: {json.dumps(header)[:300]}")
    base = tmp_path / "base"
    base.mkdir()
    shutil.copyfile(FIXTURES / "llama-base" / "config.json", base / "config.json")
    weights = FIXTURES / "llama-base" / "model.safetensors"
    for run in range(60):
        header = _mutated(_header(weights), rng)
        _with_header(weights, header, base / "model.safetensors")
        args = ["check", str(base), str(FIXTURES / "llama-aligned"), str(FIXTURES / "llama-lora")]
        result = run_cli(*args, "--quiet")
        _assert_documented(result, f"base mutation {run}: {json.dumps(header)[:300]}")
