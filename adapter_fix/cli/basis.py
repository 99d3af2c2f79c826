"""`adapter-fix basis`: its flags; the work is commands/basis.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from adapter_fix.cli.inputs import check_device
from adapter_fix.cli.main import EXIT_CODES_HELP, main, module_bars, reports_errors, stderr_console
from adapter_fix.cli.options import (
    FiniteFloat,
    hub_options,
    hub_settings,
    subspace_options,
    subspace_settings,
    workers_option,
)
from adapter_fix.io.locate import open_source
from adapter_fix.options import ALL_LINEAR, BASIS_DTYPES, BasisOptions

DEFAULTS = BasisOptions()


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("base")
@click.argument("aligned")
@click.option(
    "-o", "--out", type=click.Path(path_type=Path), required=True, help="Folder for the basis."
)
@click.option(
    "--like",
    metavar="ADAPTER",
    help="Cover exactly the modules of this adapter (folder or Hub id).",
)
@click.option(
    "--modules",
    default=DEFAULTS.modules,
    show_default=True,
    help="Without --like: 'all-linear' (every 2-D weight but embeddings and the output head) "
    "or a regex matched against whole module names (e.g. '.*\\.(q|v)_proj').",
)
@subspace_options(DEFAULTS.subspace)
@workers_option
@click.option(
    "--dtype",
    type=click.Choice(BASIS_DTYPES),
    default=DEFAULTS.dtype,
    show_default=True,
    help="Storage dtype of U and V (S and the norms are always float64).",
)
@click.option(
    "--shard-size",
    type=FiniteFloat(min=0, min_open=True),
    default=DEFAULTS.shard_bytes / 1e9,
    show_default=True,
    help="Largest shard in GB; a bigger basis is sharded with an index.",
)
@click.option("--report", type=click.Path(path_type=Path), help="Also write a JSON report here.")
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing BASIS folder an earlier adapter-fix run wrote (or an empty "
    "folder), and an existing --report file; never an input, never anything else.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@hub_options
@reports_errors
def basis(
    base: str,
    aligned: str,
    out: Path,
    like: str | None,
    report: Path | None,
    force: bool,
    quiet: bool,
    shard_size: float,
    revision: str | None,
    cache_dir: Path | None,
    offline: bool,
    endpoint: str | None,
    **settings: Any,
) -> None:
    """Compute the safety basis of ALIGNED - BASE once; write it to OUT for check and repair.

    For every chosen module, the truncated SVD of D = W_aligned - W_base (U_k,
    S_k, V_k, ||D||_F, ||W_aligned||_F, captured energy), as safetensors with a
    README.md model card, so it can be published beside the chat model. Weights
    are streamed one module at a time; the output is written atomically, and
    the same inputs give a byte-identical basis.

    \b
    Examples:
      adapter-fix basis fixtures/llama-base fixtures/llama-aligned -o llama-basis
      adapter-fix basis meta-llama/Llama-3.1-8B meta-llama/Llama-3.1-8B-Instruct \\
          -o llama-3.1-8b-basis --dtype bfloat16
      adapter-fix basis B A -o basis --like ./my-lora          # only the adapter's modules
    """
    from adapter_fix.commands.basis import run
    from adapter_fix.report.basis import render_basis

    check_device(settings["device"])
    if like is None:
        pattern = settings["modules"]
        if pattern != ALL_LINEAR:
            try:
                re.compile(pattern)  # typed by the user: trusted, unlike patterns from files
            except re.error as error:
                raise click.BadParameter(f"not a regex ({error})", param_hint="--modules") from None
    options = BasisOptions(
        subspace=subspace_settings(settings), **settings, shard_bytes=int(shard_size * 1e9)
    )
    hub = hub_settings(revision, cache_dir, offline, endpoint)
    sources = [open_source(spec, hub) for spec in (base, aligned)]
    adapter_source = open_source(like, hub) if like is not None else None
    console = stderr_console()
    result = run(
        *sources,
        adapter_source,
        options,
        out,
        report=report,
        force=force,
        progress=module_bars(console, quiet, "basis"),
    )
    if not quiet:
        render_basis(result, console)
