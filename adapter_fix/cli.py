"""The command line: parse, call one function, render. Nothing else lives here."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import torch
from rich.console import Console
from rich.text import Text

from adapter_fix import __version__
from adapter_fix.commands.inspect import inspect_adapter
from adapter_fix.commands.repair import METHODS, RepairOptions, check_outputs
from adapter_fix.commands.repair import repair as run_repair
from adapter_fix.engine import WeightPair
from adapter_fix.errors import AdapterFixError, StrictWarningsError
from adapter_fix.io.adapter import load_adapter
from adapter_fix.io.checkpoint import Checkpoint
from adapter_fix.io.sources import HubOptions, LocalSource, open_source
from adapter_fix.progress import ModuleProgress
from adapter_fix.report import REPORT_FORMATS, render_inspect, render_repair, write_report

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES_HELP = """\b
Exit codes: 0 ok, 1 internal error, 2 usage, 3 not found, 4 pickle refused,
5 corrupt checkpoint, 6 invalid/unsupported adapter, 7 incompatible inputs,
8 NaN/Inf, 9 output refused, 10 download failed, 11 warnings with --strict."""


def stderr_console() -> Console:
    """Tables and progress go to stderr; logs (not a terminal) get room for the wide tables."""
    console = Console(stderr=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 200
    return console


def reports_errors(command: F) -> F:
    """Turn AdapterFixError into one paragraph on stderr and its exit code; never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        console = stderr_console()
        try:
            return command(*args, **kwargs)
        except click.ClickException:
            raise  # usage errors: click prints them and exits 2
        except AdapterFixError as error:
            console.print(
                Text.assemble((f"adapter-fix: {error.title}: ", "bold red"), error.render()),
                soft_wrap=True,
            )
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            console.print("adapter-fix: interrupted; no output was written.", soft_wrap=True)
            sys.exit(130)
        except Exception as error:
            if os.environ.get("ADAPTER_FIX_DEBUG"):
                raise
            console.print(
                Text.assemble(
                    ("adapter-fix: internal error: ", "bold red"),
                    f"{type(error).__name__}: {error}. This is a bug in adapter-fix; please report "
                    "it with the command you ran (set ADAPTER_FIX_DEBUG=1 to see the traceback).",
                ),
                soft_wrap=True,
            )
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def hub_options(command: F) -> F:
    """--revision, --cache-dir, --offline, --endpoint: how Hub ids are resolved."""
    options = [
        click.option(
            "--revision",
            help="Hub branch, tag or commit for inputs given as org/name "
            "(org/name@rev sets one input's revision).",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(path_type=Path),
            help="Hub cache folder (default: huggingface_hub's, HF_HUB_CACHE).",
        ),
        click.option(
            "--offline",
            is_flag=True,
            envvar="HF_HUB_OFFLINE",
            help="Use only files already in the Hub cache; no network.",
        ),
        click.option("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def hub_settings(
    revision: str | None, cache_dir: Path | None, offline: bool, endpoint: str | None
) -> HubOptions:
    return HubOptions(revision=revision, cache_dir=cache_dir, offline=offline, endpoint=endpoint)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="adapter-fix")
def main() -> None:
    """Repair LoRA adapters so fine-tuning stops erasing a chat model's safety alignment.

    \b
    adapter-fix repair BASE ALIGNED ADAPTER -o OUT   corrected adapter + diff report
    adapter-fix inspect ADAPTER                      what is in an adapter
    """


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("adapter")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
@click.option("--strict", is_flag=True, help="Exit 11 when the adapter has warnings (for CI).")
@hub_options
@reports_errors
def inspect(
    adapter: str,
    as_json: bool,
    strict: bool,
    revision: str | None,
    cache_dir: Path | None,
    offline: bool,
    endpoint: str | None,
) -> None:
    """Show what is in a PEFT LoRA adapter: config, modules, norms, warnings.

    ADAPTER is a folder with adapter_config.json and adapter_model.safetensors,
    or a Hub id org/name[@revision]. Only the adapter is read, never a model.

    \b
    Examples:
      adapter-fix inspect fixtures/llama-lora
      adapter-fix inspect org/my-lora@main --json | jq '.modules[].update_norm'
      adapter-fix inspect ./my-lora --strict        # CI: fail on warnings
    """
    source = open_source(adapter, hub_settings(revision, cache_dir, offline, endpoint))
    result = inspect_adapter(load_adapter(source))
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, allow_nan=False, default=str))
    else:
        render_inspect(result, stderr_console())
    if strict and result.warnings:
        raise StrictWarningsError(
            f"{len(result.warnings)} warning(s) and --strict is set; see above.",
            path=source.identity,
        )


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("base")
@click.argument("aligned")
@click.argument("adapter")
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    help="Folder for the repaired adapter (required unless --method none).",
)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="csulora",
    show_default=True,
    help="csulora: closed-form penalized minimum change; project: hard projection onto the "
    "safety subspace; safelora: Safe LoRA (Hsu et al. 2024); none: analyse and report only.",
)
@click.option(
    "--strength",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="CSULoRA penalty lambda: 0 keeps the update, larger pulls it toward the subspace.",
)
@click.option(
    "--energy",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=0.9,
    show_default=True,
    help="Subspace rank k: smallest k whose singular values hold this share of ||D||^2.",
)
@click.option(
    "--max-rank", type=click.IntRange(min=1), default=128, show_default=True, help="Cap on k."
)
@click.option("--rank", type=click.IntRange(min=1), help="Fix k instead of choosing by energy.")
@click.option(
    "--output-rank",
    type=click.Choice(["keep", "exact"]),
    default="keep",
    show_default=True,
    help="keep: best rank-r result, same config (drop-in); exact: rank up to 2r via "
    "rank_pattern/alpha_pattern.",
)
@click.option(
    "--safelora-select",
    type=click.Choice(["number", "threshold"]),
    default="number",
    show_default=True,
    help="Safe LoRA selection: the N least similar modules, or all below a threshold.",
)
@click.option(
    "--safelora-layers",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="N for --safelora-select number (ties included).",
)
@click.option(
    "--safelora-threshold",
    type=float,
    default=0.5,
    show_default=True,
    help="Similarity threshold for --safelora-select threshold.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Where the SVD runs.",
)
@click.option(
    "--report",
    "reports",
    type=click.Path(path_type=Path),
    multiple=True,
    help="Also write the report here: .json, .md or .html by extension (repeatable).",
)
@click.option("--force", is_flag=True, help="Replace an existing OUT (never an input).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table.")
@hub_options
@reports_errors
def repair(
    base: str,
    aligned: str,
    adapter: str,
    out: Path | None,
    reports: tuple[Path, ...],
    force: bool,
    quiet: bool,
    revision: str | None,
    cache_dir: Path | None,
    offline: bool,
    endpoint: str | None,
    **settings: Any,
) -> None:
    """Repair ADAPTER toward the safety subspace of ALIGNED - BASE; write it to OUT.

    BASE is the pretrained model, ALIGNED the chat model the adapter was trained
    on, ADAPTER a PEFT LoRA adapter: each a local folder, a .safetensors file
    (BASE, ALIGNED) or a Hub id org/name[@revision]. Weights are streamed one
    module at a time; only the tensors the adapter touches are read.

    \b
    Examples:
      adapter-fix repair fixtures/llama-base fixtures/llama-aligned fixtures/llama-lora -o fixed
      adapter-fix repair meta-llama/Llama-3.1-8B meta-llama/Llama-3.1-8B-Instruct ./lora \\
          -o ./lora-fixed --report report.md --report report.html
      adapter-fix repair B A ./lora --method none --report analysis.json   # analyse only
    """
    options = RepairOptions(**settings)
    if options.method != "none" and out is None:
        raise click.UsageError("-o/--out is required unless --method none")
    for path in reports:
        if path.suffix.lower() not in REPORT_FORMATS:
            raise click.BadParameter(f"{path}: use .json, .md or .html", param_hint="--report")
    if options.device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    hub = hub_settings(revision, cache_dir, offline, endpoint)
    sources = [open_source(spec, hub) for spec in (base, aligned, adapter)]
    out = out if options.method != "none" else None
    local = [Path(s.identity) for s in sources if isinstance(s, LocalSource)]
    check_outputs(out, reports, local, force=force)
    lora = load_adapter(sources[2])
    weights = WeightPair(
        Checkpoint.open(sources[0], "BASE"), Checkpoint.open(sources[1], "ALIGNED")
    )
    console = stderr_console()
    with ModuleProgress(
        console, len(lora.modules), enabled=not quiet and console.is_terminal
    ) as progress:
        result = run_repair(
            weights,
            lora,
            options,
            out=out,
            force=force,
            on_module=progress.advance,
        )
    for path in reports:
        write_report(result, path)
    if not quiet:
        render_repair(result, console)
