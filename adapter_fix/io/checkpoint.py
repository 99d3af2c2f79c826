"""Lazy tensor index over single-file or sharded safetensors checkpoints.

The header of a safetensors file is validated before any data is touched, and
each tensor is read with one positioned read into a buffer of its own size:
no memory map, so the resident memory of a run is the tensors it holds, not
the pages of the shards it has looked at. No file stays open between reads.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import torch

from adapter_fix.errors import (
    CONVERT_HINT,
    PICKLE_SUFFIXES,
    CorruptCheckpointError,
    NonFiniteError,
    SourceNotFoundError,
    UnsafeFormatError,
    unsafe_format,
)
from adapter_fix.io.jsonfile import JsonError, parse_json
from adapter_fix.io.sources import Source

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Dtypes of weights and LoRA factors the math accepts; others are quantized and need scales.
FLOAT_WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")

MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: enough to read it without reading anything else."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors in file order, and the string metadata."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header of one .safetensors file without reading tensor data."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise unsafe_format(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, "the file is shorter than a safetensors header (8 bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise _corrupt(path, f"the header claims {header_len} bytes, the file has {size}")
            raw = handle.read(header_len)
    except OSError as error:
        raise SourceNotFoundError(f"cannot read the file ({error.strerror}).", path=path) from None
    try:
        header = parse_json(raw)
    except JsonError as error:
        raise _corrupt(path, f"the header is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        tensors[key] = _tensor_info(path, key, entry, data_start)
    _check_layout(path, tensors, data_start, size)
    return SafetensorsHeader(path, tensors, metadata, data_start)


def _is_count(value: object) -> bool:
    """A JSON non-negative integer (`true` is not one, although Python's bool is an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shown(value: object) -> str:
    """A header value as the message shows it: its JSON type and a bounded repr."""
    text = repr(value)
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else "null"
    )
    return f"{kind}, {text if len(text) <= 60 else text[:57] + '...'}"


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """The tensors' byte ranges tile the data section exactly, as the safetensors library
    requires: no two tensors share bytes, no bytes lie between, before or after them.

    Only a header whose tensors tile a data section longer than the file is a truncated
    file; overlaps, gaps and a first tensor that does not start the data section are
    faults of the header itself, named with both tensors involved.
    """
    ordered = sorted(tensors.values(), key=lambda i: (i.offset, i.nbytes))
    for previous, info in itertools.pairwise(ordered):
        if info.offset < previous.offset + previous.nbytes:
            raise _corrupt(
                path,
                f"the header's data_offsets make tensors {previous.key!r} (data bytes "
                f"{_span(previous, data_start)}) and {info.key!r} (data bytes "
                f"{_span(info, data_start)}) overlap; the header is corrupt",
                info.key,
            )
    end = data_start
    for index, info in enumerate(ordered):
        if info.offset > end:
            begin = info.offset - data_start
            where = (
                f"the data section starts at byte 0 but its first tensor at byte {begin}"
                if index == 0
                else f"{begin - (end - data_start)} bytes between tensor "
                f"{ordered[index - 1].key!r} (ends at data byte {end - data_start}) and this "
                f"one (starts at {begin}) belong to no tensor"
            )
            raise _corrupt(path, f"{where} (data_offsets); the header is corrupt", info.key)
        end = info.offset + info.nbytes
    if end < size:
        raise _corrupt(path, f"{size - end} bytes after the last tensor belong to none")
    if end > size:
        first_short = next(
            info
            for info in sorted(tensors.values(), key=lambda i: i.offset)
            if info.offset + info.nbytes > size
        )
        raise _corrupt(
            path,
            f"the header describes {end - data_start} bytes of tensor data but the file holds "
            f"{size - data_start} after the header, ending inside this tensor (data bytes "
            f"{_span(first_short, data_start)}): the file is truncated (an interrupted "
            "download or copy?); fetch it again (if a fresh copy has the same size, its "
            "header is corrupt instead)",
            first_short.key,
        )


def _span(info: TensorInfo, data_start: int) -> str:
    begin = info.offset - data_start
    return f"{begin}-{begin + info.nbytes}"


# No real tensor comes near this (1 PiB); a header that claims one is corrupt, not truncated.
MAX_TENSOR_BYTES = 1 << 50


def _byte_size(shape: list[int], itemsize: int) -> int | None:
    """Bytes of a tensor of `shape`, or None past `MAX_TENSOR_BYTES` (stops multiplying
    there, so a header of huge dimensions costs no big-integer arithmetic)."""
    if 0 in shape:
        return 0
    size = itemsize
    for dim in shape:
        size *= dim
        if size > MAX_TENSOR_BYTES:
            return None
    return size


def _bounded(values: list[int]) -> str:
    """A list of integers for a message, at most ~60 characters."""
    text = str(values[:8])
    if len(values) > 8 or len(text) > 60:
        return text[:57].rstrip("]") + ", ...]"
    return text


def _tensor_info(path: Path, key: str, entry: object, data_start: int) -> TensorInfo:
    """One header entry, every field's JSON type checked before it is used."""
    if not isinstance(entry, dict):
        raise _corrupt(path, f"the header entry is not an object but {_shown(entry)}", key)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        names = ", ".join(DTYPES)
        raise _corrupt(path, f"dtype is {_shown(dtype)}, not one of {names}", key)
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _corrupt(path, f"shape is {_shown(shape)}, not a list of non-negative integers", key)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise _corrupt(
            path,
            f"data_offsets is {_shown(offsets)}, not a list of two non-negative integers",
            key,
        )
    if offsets[0] > offsets[1]:
        raise _corrupt(path, f"data_offsets {offsets} end before they begin", key)
    nbytes = offsets[1] - offsets[0]
    expected = _byte_size(shape, DTYPES[dtype].itemsize)
    if expected is None:
        raise _corrupt(
            path,
            f"shape {_bounded(shape)} of {dtype} would need more than 2^50 bytes, more than "
            "any real tensor: the header is corrupt",
            key,
        )
    if nbytes != expected:
        raise _corrupt(
            path,
            f"data_offsets {_bounded(offsets)} span {nbytes} bytes but shape {_bounded(shape)} "
            f"of {dtype} needs {expected}: the header is corrupt",
            key,
        )
    return TensorInfo(key, dtype, tuple(shape), path, data_start + offsets[0], nbytes)


def _corrupt(path: Path, what: str, key: str | None = None) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"not a valid safetensors file: {what}.", path=path, key=key)


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor with a single positioned read; the result owns its memory."""
    buffer = torch.empty(info.nbytes, dtype=torch.uint8)
    with _opened(info) as handle:
        got = handle.readinto(buffer.numpy()) if info.nbytes else 0
    if got != info.nbytes:
        raise _corrupt(info.file, "the file ended before the tensor's data", info.key)
    return buffer.view(info.torch_dtype).reshape(info.shape)


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf (always true for integer tensors; FP8 is checked through float32)."""
    if not tensor.is_floating_point():
        return True
    if tensor.element_size() == 1:
        tensor = tensor.float()
    return bool(torch.isfinite(tensor).all())


def check_finite(tensor: torch.Tensor, info: TensorInfo) -> None:
    """Raise NonFiniteError naming file and key when a float tensor holds NaN or Inf."""
    if not is_finite(tensor):
        bad = int((~torch.isfinite(tensor.float())).sum())
        raise NonFiniteError(
            f"{bad} of {tensor.numel()} values are NaN or Inf. A repair cannot be computed from "
            "non-finite weights: check the checkpoint (a diverged fine-tune or a broken export).",
            path=info.file,
            key=info.key,
        )


class Checkpoint:
    """Keys, shapes and dtypes of a checkpoint, and its tensors one at a time.

    A sharded checkpoint is listed from its index alone; a shard is fetched
    (downloaded, for the Hub) and its header parsed only when a tensor in it
    is first asked for. `reads` records every key read, in order, so tests can
    prove a run streams.
    """

    def __init__(self, label: str, source: Source, weight_map: dict[str, str]) -> None:
        self.label = label
        self.source = source
        self.weight_map = weight_map
        self.reads: list[str] = []
        self._headers: dict[str, SafetensorsHeader] = {}

    @classmethod
    def open(cls, source: Source, label: str, filename: str | None = None) -> Checkpoint:
        """Open a model checkpoint (index, single file) or one named file of a source."""
        if source.single_file is not None:
            header = read_header(source.single_file)
            checkpoint = cls(label, source, dict.fromkeys(header.tensors, source.single_file.name))
            checkpoint._headers[source.single_file.name] = header
            return checkpoint
        if filename is not None:
            return cls._open_file(source, label, filename)
        index = source.fetch(INDEX_NAME)
        if index is not None:
            return cls(label, source, _read_index(index, source))
        if source.fetch(SINGLE_NAME) is not None:
            return cls._open_file(source, label, SINGLE_NAME)
        refuse_pickles(source, label)
        raise SourceNotFoundError(
            f"{label}: no safetensors weights ({INDEX_NAME} or {SINGLE_NAME}) in {source}. "
            "Point at the folder that holds the model's weights.",
            path=source.identity,
        )

    @classmethod
    def _open_file(cls, source: Source, label: str, filename: str) -> Checkpoint:
        path = source.fetch(filename)
        if path is None:
            raise SourceNotFoundError(f"{label}: {filename} is missing.", path=source.identity)
        header = read_header(path)
        checkpoint = cls(label, source, dict.fromkeys(header.tensors, filename))
        checkpoint._headers[filename] = header
        return checkpoint

    def keys(self) -> list[str]:
        """Every tensor key, in index (or file) order."""
        return list(self.weight_map)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def header(self, filename: str) -> SafetensorsHeader:
        """The validated header of one weight file, fetching the file on first use."""
        if filename not in self._headers:
            path = self.source.fetch(filename)
            if path is None:
                raise CorruptCheckpointError(
                    f"{self.label}: the index lists shard {filename!r}, which is missing. "
                    "Download the checkpoint again or fix the index.",
                    path=self.source.identity,
                )
            self._headers[filename] = read_header(_inside(self.source, path, self.label))
        return self._headers[filename]

    def info(self, key: str) -> TensorInfo:
        """Shape, dtype and location of one tensor, without reading its data."""
        filename = self.weight_map.get(key)
        if filename is None:
            raise CorruptCheckpointError(f"{self.label}: no tensor {key!r}.", path=self.source)
        header = self.header(filename)
        info = header.tensors.get(key)
        if info is None:
            raise CorruptCheckpointError(
                f"{self.label}: the index lists this tensor in {filename}, which lacks it: "
                "the checkpoint is incomplete or its index is stale.",
                path=header.path,
                key=key,
            )
        return info

    def read(self, key: str, *, finite: bool = True) -> torch.Tensor:
        """Read one tensor; with `finite`, NaN or Inf is an error naming file and key."""
        info = self.info(key)
        tensor = read_tensor(info)
        if finite:
            check_finite(tensor, info)
        self.reads.append(key)
        return tensor

    def read_rows(
        self, key: str, block_bytes: int = 4 << 20
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """One tensor in blocks of whole rows (~`block_bytes` each), read into one reused buffer.

        Yields `(rows, block)`; each block is only valid until the next one.
        Blocks small enough for the CPU cache make converting and subtracting
        a weight run at the speed of reading it. No finiteness check here: the
        caller folds it into reductions it computes anyway.
        """
        yield from read_info_rows(self.info(key), block_bytes)
        self.reads.append(key)


def _inside(source: Source, path: Path, label: str) -> Path:
    """`path`, unless it is a link that leaves the checkpoint's folder (for shards an index
    names: the index decides which files are read, so it may not reach outside)."""
    if not source.contains(path):
        raise CorruptCheckpointError(
            f"{label}: this weight file is a link to {path.resolve()}, outside the checkpoint "
            "folder; refusing to follow it. Copy the file into the folder if it is meant.",
            path=path,
        )
    return path


def read_info_rows(
    info: TensorInfo, block_bytes: int = 4 << 20
) -> Iterator[tuple[slice, torch.Tensor]]:
    """`Checkpoint.read_rows` for a tensor (or a contiguous part of one) given by its info."""
    rows = info.shape[0] if info.shape else 1
    row_bytes = info.nbytes // rows if rows else 0
    per_block = max(1, block_bytes // max(1, row_bytes))
    buffer = torch.empty(min(rows, per_block) * row_bytes, dtype=torch.uint8)
    with _opened(info) as handle:
        for start in range(0, rows, per_block):
            count = min(per_block, rows - start)
            view = buffer[: count * row_bytes]
            if handle.readinto(view.numpy()) != view.numel():
                raise _corrupt(info.file, "the file ended before the tensor's data", info.key)
            yield (
                slice(start, start + count),
                view.view(info.torch_dtype).reshape(count, *info.shape[1:]),
            )


@contextlib.contextmanager
def _opened(info: TensorInfo) -> Iterator[BinaryIO]:
    """The tensor's file, positioned at its data; OS errors become adapter-fix errors."""
    try:
        with info.file.open("rb") as handle:
            handle.seek(info.offset)
            yield handle
    except OSError as error:
        raise SourceNotFoundError(f"cannot read ({error.strerror}).", path=info.file) from None


def _read_index(path: Path, source: Source) -> dict[str, str]:
    try:
        index = parse_json(path.read_bytes())
        weight_map = index["weight_map"]
    except (OSError, JsonError, KeyError, TypeError):
        raise CorruptCheckpointError(
            "not a valid safetensors index: expected a JSON object with a 'weight_map'.",
            path=path,
        ) from None
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError("'weight_map' must map keys to shard names.", path=path)
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not _is_plain_relative(shard):
            raise CorruptCheckpointError(
                f"the index points this key at {shard!r}, outside the checkpoint folder. "
                "Shard names must be plain file names next to the index; refusing to follow it.",
                path=path,
                key=key,
            )
        if Path(shard).suffix in PICKLE_SUFFIXES:
            raise UnsafeFormatError(f"the index lists a pickle shard. {CONVERT_HINT}", path=path)
    return dict(weight_map)


def _is_plain_relative(name: str) -> bool:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return bool(parts) and not os.path.isabs(name) and ".." not in parts and ":" not in name


def refuse_pickles(source: Source, label: str) -> None:
    """Raise UnsafeFormatError when the source holds pickle weights (listed, never fetched)."""
    pickles = [name for name in source.list_files() if Path(name).suffix in PICKLE_SUFFIXES]
    if pickles:
        raise UnsafeFormatError(
            f"{label}: only pickle weights found ({', '.join(pickles[:3])}). {CONVERT_HINT}",
            path=source.identity,
        )


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (`torch.bfloat16` -> "BF16")."""
    return DTYPE_NAMES[dtype]
