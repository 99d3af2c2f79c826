"""The commands' inputs as sources (nothing read yet), and the checks on them click cannot do."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from adapter_fix.io.locate import open_source
from adapter_fix.io.sources import HubOptions, Source

if TYPE_CHECKING:
    from adapter_fix.engine import SubspaceSource


def open_inputs(inputs: tuple[str, ...], basis: str | None, hub: HubOptions) -> list[Source]:
    """`BASE ALIGNED ADAPTER`, or `--basis BASIS ADAPTER`, as sources (nothing read yet)."""
    wanted = "--basis BASIS ADAPTER" if basis else "BASE ALIGNED ADAPTER"
    if len(inputs) != (1 if basis else 3):
        raise click.UsageError(f"expected {wanted}, got {len(inputs)} argument(s)")
    return [open_source(spec, hub) for spec in ([basis] if basis else []) + list(inputs)]


def subspace_source(sources: list[Source]) -> SubspaceSource:
    """The stream's source: a basis, or BASE and ALIGNED (headers and index only)."""
    from adapter_fix.engine import BasisSource, WeightPair
    from adapter_fix.io.basis import Basis
    from adapter_fix.io.checkpoint import Checkpoint

    if len(sources) == 1:
        return BasisSource(Basis.open(sources[0]))
    return WeightPair(Checkpoint.open(sources[0], "BASE"), Checkpoint.open(sources[1], "ALIGNED"))


def local_paths(sources: list[Source]) -> list[Path]:
    """The inputs on local disk, which no output may overlap."""
    return [path for source in sources for path in source.local_paths]


def check_device(device: str) -> None:
    """Exit 2 on --device cuda where CUDA is not available."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
