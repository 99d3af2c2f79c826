"""The streaming reader: validated headers, lazy shards, refusals with the right error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapter_fix.errors import (
    CorruptCheckpointError,
    NonFiniteError,
    SourceNotFoundError,
    UnsafeFormatError,
)
from adapter_fix.io.checkpoint import Checkpoint, read_header
from adapter_fix.io.sources import LocalSource
from adapter_fix.io.writer import write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=generator),
        "b.weight": torch.randn(5, 2, generator=generator).to(torch.bfloat16),
        "c.bias": torch.arange(6, dtype=torch.int64),
    }


def _sharded(folder: Path) -> dict[str, torch.Tensor]:
    tensors = _tensors()
    folder.mkdir()
    save_file({"a.weight": tensors["a.weight"]}, folder / "model-00001-of-00002.safetensors")
    save_file(
        {k: tensors[k] for k in ("b.weight", "c.bias")},
        folder / "model-00002-of-00002.safetensors",
    )
    weight_map = {
        "a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors",
        "c.bias": "model-00002-of-00002.safetensors",
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tensors


def test_single_file_lists_keys_shapes_and_reads_exact_tensors(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    checkpoint = Checkpoint.open(LocalSource(tmp_path), "BASE")
    assert sorted(checkpoint.keys()) == sorted(tensors)
    assert checkpoint.info("b.weight").shape == (5, 2)
    assert checkpoint.info("b.weight").dtype == "BF16"
    for key, tensor in tensors.items():
        assert torch.equal(checkpoint.read(key), tensor)
    assert checkpoint.reads == list(tensors)


def test_a_single_safetensors_file_path_is_a_checkpoint(tmp_path: Path) -> None:
    save_file(_tensors(), tmp_path / "weights.safetensors")
    checkpoint = Checkpoint.open(LocalSource(tmp_path / "weights.safetensors"), "BASE")
    assert "a.weight" in checkpoint.weight_map


def test_sharded_checkpoint_is_listed_from_the_index_without_opening_shards(
    tmp_path: Path,
) -> None:
    tensors = _sharded(tmp_path / "model")
    checkpoint = Checkpoint.open(LocalSource(tmp_path / "model"), "BASE")
    assert checkpoint.keys() == ["a.weight", "b.weight", "c.bias"]
    assert checkpoint._headers == {}
    assert torch.equal(checkpoint.read("c.bias"), tensors["c.bias"])
    assert list(checkpoint._headers) == ["model-00002-of-00002.safetensors"]


def test_reads_do_not_record_other_tensors(tmp_path: Path) -> None:
    _sharded(tmp_path / "model")
    checkpoint = Checkpoint.open(LocalSource(tmp_path / "model"), "BASE")
    checkpoint.read("b.weight")
    assert checkpoint.reads == ["b.weight"]


def test_missing_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError) as error:
        LocalSource(tmp_path / "nope")
    assert error.value.exit_code == 3
    assert "nope" in error.value.render()


def test_pickle_only_folder_is_refused_with_conversion_hint(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded, never")
    with pytest.raises(UnsafeFormatError) as error:
        Checkpoint.open(LocalSource(tmp_path), "BASE")
    assert error.value.exit_code == 4
    assert "safe_serialization=True" in error.value.render()


def test_pickle_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(UnsafeFormatError):
        Checkpoint.open(LocalSource(tmp_path / "model.pt"), "BASE")


def test_truncated_file_is_corrupt_and_names_the_key(tmp_path: Path) -> None:
    save_file(_tensors(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CorruptCheckpointError) as error:
        Checkpoint.open(LocalSource(tmp_path), "BASE")
    assert error.value.exit_code == 5
    assert "truncated" in error.value.render()
    assert error.value.key is not None


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x05", (10**9).to_bytes(8, "little") + b"{}", (4).to_bytes(8, "little") + b"{bad"],
)
def test_garbage_headers_are_corrupt(tmp_path: Path, payload: bytes) -> None:
    (tmp_path / "model.safetensors").write_bytes(payload)
    with pytest.raises(CorruptCheckpointError):
        read_header(tmp_path / "model.safetensors")


def test_header_with_inconsistent_byte_count_is_corrupt(tmp_path: Path) -> None:
    header = json.dumps({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\0" * 8
    )
    with pytest.raises(CorruptCheckpointError, match="needs 16"):
        read_header(tmp_path / "model.safetensors")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x"])
def test_index_pointing_outside_the_folder_is_refused(tmp_path: Path, shard: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": shard}})
    )
    with pytest.raises(CorruptCheckpointError, match="outside the checkpoint folder"):
        Checkpoint.open(LocalSource(folder), "BASE")


def test_index_pointing_at_missing_shard_is_corrupt(tmp_path: Path) -> None:
    _sharded(tmp_path / "model")
    (tmp_path / "model" / "model-00002-of-00002.safetensors").unlink()
    checkpoint = Checkpoint.open(LocalSource(tmp_path / "model"), "BASE")
    with pytest.raises(CorruptCheckpointError, match="missing"):
        checkpoint.read("b.weight")


def test_tensor_listed_in_index_but_absent_from_shard_is_corrupt(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    _sharded(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    checkpoint = Checkpoint.open(LocalSource(folder), "BASE")
    with pytest.raises(CorruptCheckpointError) as error:
        checkpoint.read("ghost.weight")
    assert error.value.key == "ghost.weight"


def test_index_that_is_not_json_is_corrupt(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text("{nope")
    with pytest.raises(CorruptCheckpointError, match="index"):
        Checkpoint.open(LocalSource(tmp_path), "BASE")


def test_nan_is_reported_with_file_and_key(tmp_path: Path) -> None:
    save_file({"w": torch.tensor([1.0, float("nan")])}, tmp_path / "model.safetensors")
    checkpoint = Checkpoint.open(LocalSource(tmp_path), "BASE")
    with pytest.raises(NonFiniteError) as error:
        checkpoint.read("w")
    assert error.value.exit_code == 8
    assert error.value.key == "w"
    assert "model.safetensors" in error.value.render()
    assert torch.isnan(checkpoint.read("w", finite=False)).any()


def test_folder_without_weights_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SourceNotFoundError, match="no safetensors weights"):
        Checkpoint.open(LocalSource(tmp_path), "BASE")


def test_writer_output_is_read_by_the_safetensors_library_in_the_given_order(
    tmp_path: Path,
) -> None:
    tensors = _tensors()
    order = [("c.bias", tensors["c.bias"]), ("a.weight", tensors["a.weight"])]
    order.append(("b.weight", tensors["b.weight"]))
    write_safetensors(tmp_path / "out.safetensors", order, {"note": "x"})
    with safe_open(tmp_path / "out.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "x"}
        for key, tensor in order:
            assert torch.equal(handle.get_tensor(key), tensor)
    assert list(read_header(tmp_path / "out.safetensors").tensors) == [k for k, _ in order]


def test_row_blocks_reassemble_the_tensor_and_record_one_read(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(37, 5).to(torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors")
    checkpoint = Checkpoint.open(LocalSource(tmp_path), "BASE")
    rebuilt = torch.empty(37, 5, dtype=torch.bfloat16)
    blocks = 0
    for rows, block in checkpoint.read_rows("w", block_bytes=64):
        rebuilt[rows] = block
        blocks += 1
    assert torch.equal(rebuilt, tensors["w"])
    assert blocks == 37 // (64 // 10) + 1
    assert checkpoint.reads == ["w"]


BAD = Path(__file__).resolve().parents[1] / "fixtures" / "bad"


@pytest.mark.parametrize(
    ("name", "key", "says"),
    [
        ("dtype-object", "a.weight", "dtype is an object, {'F32': 4}, not one of F64"),
        ("dtype-list", "a.weight", "dtype is a list, ['F32']"),
        ("shape-object", "a.weight", "shape is an object"),
        ("offsets-object", "a.weight", "data_offsets is an object"),
        (
            "overlapping-offsets",
            "b.weight",
            "tensors 'a.weight' (data bytes 8-24) and 'b.weight' (data bytes 16-32) overlap",
        ),
        (
            "offset-beyond-data",
            "b.weight",
            "4080 bytes between tensor 'a.weight' (ends at data byte 16) and this one",
        ),
        ("absurd-shape", "b.weight", "more than any real tensor: the header is corrupt"),
        (
            "shape-disagrees-with-offsets",
            "a.weight",
            "data_offsets [0, 16] span 16 bytes but shape [4, 4] of F32 needs 64",
        ),
    ],
)
def test_a_corrupt_header_says_what_is_wrong_with_it_and_not_that_the_file_is_truncated(
    name: str, key: str, says: str
) -> None:
    with pytest.raises(CorruptCheckpointError) as error:
        read_header(BAD / f"{name}.safetensors")
    message = error.value.render()
    assert error.value.key == key
    assert error.value.path == str(BAD / f"{name}.safetensors")
    assert says in message
    assert "truncated" not in message and "fetch it again" not in message


def test_a_truncated_file_names_the_first_tensor_it_cuts(tmp_path: Path) -> None:
    save_file(_tensors(), tmp_path / "model.safetensors")
    header = read_header(tmp_path / "model.safetensors")
    cut = min(header.tensors.values(), key=lambda info: info.offset + info.nbytes)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: cut.offset + cut.nbytes - 1])
    with pytest.raises(CorruptCheckpointError) as error:
        read_header(tmp_path / "model.safetensors")
    assert error.value.key == cut.key
    assert "the file is truncated" in error.value.render()
