"""`adapter-fix inspect`: its flags; the work is commands/inspect.py."""

from __future__ import annotations

from pathlib import Path

import click

from adapter_fix.cli.main import EXIT_CODES_HELP, main, reports_errors, stderr_console
from adapter_fix.cli.options import hub_options, hub_settings
from adapter_fix.errors import StrictWarningsError


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
    import json

    from adapter_fix.commands.inspect import run
    from adapter_fix.report.inspect import render_inspect

    result = run(adapter, hub_settings(revision, cache_dir, offline, endpoint))
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, allow_nan=False, default=str))
    else:
        render_inspect(result, stderr_console())
    if strict and result.warnings:
        raise StrictWarningsError(
            f"{len(result.warnings)} warning(s) and --strict is set; see above.",
            path=result.summary["source"],
        )
