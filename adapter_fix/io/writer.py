"""Writing safetensors files that stream carried tensors (output folders: io/outputs.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from adapter_fix.errors import OutputError
from adapter_fix.io.checkpoint import TensorInfo, dtype_name, read_header

CHUNK_BYTES = 16 << 20

# A tensor to write: new data, or an existing tensor whose bytes are copied as they are.
Entry = tuple[str, torch.Tensor | TensorInfo]


def _layout(value: torch.Tensor | TensorInfo) -> tuple[str, list[int], int]:
    if isinstance(value, TensorInfo):
        return value.dtype, list(value.shape), value.nbytes
    return dtype_name(value.dtype), list(value.shape), value.numel() * value.element_size()


def write_safetensors(path: Path, entries: Sequence[Entry], metadata: dict[str, str]) -> None:
    """Write `entries` in the given order (header and data alike), with string metadata.

    New tensors are written from memory; copied ones stream from their file in
    16 MB chunks, so a large carried tensor (a 1 GB `lm_head` in
    `modules_to_save`) never sits in memory. The header is padded with spaces
    to a multiple of 8 bytes, as the safetensors library does.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt", **metadata}}
    offset = 0
    for key, value in entries:
        dtype, shape, nbytes = _layout(value)
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for _, value in entries:
            for chunk in _chunks(value):
                handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())


def verify_safetensors(path: Path, entries: Sequence[Entry]) -> None:
    """Re-read `path` and compare every tensor's bytes with what was meant, chunk by chunk."""
    header = read_header(path)
    if list(header.tensors) != [key for key, _ in entries]:
        raise OutputError("the written file's keys differ from what was meant.", path=path)
    for key, value in entries:
        written = header.tensors[key]
        if _layout(value) != (written.dtype, list(written.shape), written.nbytes) or any(
            ours != theirs for ours, theirs in zip(_chunks(value), _chunks(written), strict=True)
        ):
            raise OutputError(
                "a tensor read back differs from what was written.", path=path, key=key
            )


def _chunks(value: torch.Tensor | TensorInfo) -> Iterator[bytes]:
    """The raw bytes of a tensor, in chunks of at most CHUNK_BYTES."""
    if isinstance(value, TensorInfo):
        with value.file.open("rb") as handle:
            handle.seek(value.offset)
            left = value.nbytes
            while left:
                chunk = handle.read(min(CHUNK_BYTES, left))
                if not chunk:
                    raise OutputError("the file ended early while copying.", path=value.file)
                left -= len(chunk)
                yield chunk
        return
    data = value.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    for start in range(0, len(data), CHUNK_BYTES):
        yield data[start : start + CHUNK_BYTES].tobytes()
