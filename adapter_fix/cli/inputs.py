"""The positional inputs as sources (nothing read yet), and the checks click cannot do."""

from __future__ import annotations

import click

from adapter_fix.io.locate import open_source
from adapter_fix.io.sources import HubOptions, Source


def open_inputs(inputs: tuple[str, ...], basis: str | None, hub: HubOptions) -> list[Source]:
    """`BASE ALIGNED ADAPTER`, or `--basis BASIS ADAPTER`, as sources (nothing read yet)."""
    wanted = "--basis BASIS ADAPTER" if basis else "BASE ALIGNED ADAPTER"
    if len(inputs) != (1 if basis else 3):
        raise click.UsageError(f"expected {wanted}, got {len(inputs)} argument(s)")
    return [open_source(spec, hub) for spec in ([basis] if basis else []) + list(inputs)]


def check_device(device: str) -> None:
    """Exit 2 on --device cuda where CUDA is not available."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
