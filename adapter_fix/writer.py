"""Writing results: safetensors files in a given key order, and folders that appear atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from adapter_fix.checkpoint import dtype_name
from adapter_fix.errors import OutputError


def write_safetensors(
    path: Path, tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str]
) -> None:
    """Write `tensors` in the given order (header and data alike), with string metadata.

    The header is padded with spaces to a multiple of 8 bytes, as the
    safetensors library does, so the data of every tensor is aligned.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt", **metadata}}
    offset = 0
    payloads = []
    for key, tensor in tensors:
        data = tensor.detach().contiguous().cpu()
        nbytes = data.numel() * data.element_size()
        header[key] = {
            "dtype": dtype_name(data.dtype),
            "shape": list(data.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        payloads.append(data)
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for data in payloads:
            if data.numel():
                handle.write(data.view(-1).view(torch.uint8).numpy().data)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_directory(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it replaces `out` by renames.

    On any error, or Ctrl-C, the temporary folder is removed and `out` is
    untouched: no half-written output ever appears under the final name.
    """
    out = out.resolve()
    if out.exists() and not force:
        raise OutputError("the output already exists; pass --force to replace it.", path=out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as error:
        raise OutputError(
            f"cannot create the output folder ({error.strerror}).", path=out
        ) from None
    try:
        yield staging
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    retired.rmdir()
    out.rename(retired)
    try:
        staging.rename(out)
    except OSError:
        retired.rename(out)
        raise
    if retired.is_dir():
        shutil.rmtree(retired)
    else:
        retired.unlink()
