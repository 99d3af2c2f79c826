"""Option groups more than one command shares, and the float type every float option uses.

Defaults and choices come from the option objects (adapter_fix/options.py),
never from literals here: each is defined once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from adapter_fix.io.sources import HubOptions
from adapter_fix.options import DEVICES, SubspaceSettings

F = TypeVar("F", bound=Callable[..., Any])


class FiniteFloat(click.FloatRange):
    """A float option that must be finite (no nan, inf), within optional bounds: exit 2 if not.

    click's FloatRange lets `nan` through every bound (comparisons with NaN are
    false) and `inf` through open-ended ones; a NaN strength or energy would
    only fail deep in the SVD, as a crash.
    """

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = float(click.FLOAT.convert(value, param, ctx))
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


def apply(options: list[Callable[[F], F]], command: F) -> F:
    """Decorate `command` with `options`, the first listed first in --help."""
    for option in reversed(options):
        command = option(command)
    return command


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
    return apply(options, command)


def hub_settings(
    revision: str | None, cache_dir: Path | None, offline: bool, endpoint: str | None
) -> HubOptions:
    return HubOptions(revision=revision, cache_dir=cache_dir, offline=offline, endpoint=endpoint)


def basis_option(command: F) -> F:
    """--basis BASIS: a basis from `adapter-fix basis` in place of BASE and ALIGNED."""
    return click.option(
        "--basis",
        metavar="BASIS",
        help="A basis from `adapter-fix basis` (folder or Hub id) in place of BASE and ALIGNED: "
        "only the basis and the adapter are read.",
    )(command)


def workers_option(command: F) -> F:
    """--workers: modules processed at once (engine.map_modules)."""
    return click.option(
        "--workers",
        type=click.IntRange(min=1),
        help="Modules processed at once, each on one thread [default: the usable cores, at "
        "most 8]. Memory grows by about one module per worker; the output is the same bytes "
        "for any value.",
    )(command)


SUBSPACE_FLAGS = ("energy", "max_rank", "rank", "seed", "device")
"""The parameters `subspace_options` adds: `SubspaceSettings`' fields."""


def subspace_options(defaults: SubspaceSettings) -> Callable[[F], F]:
    """--energy, --max-rank, --rank, --seed, --device: how `k` is chosen and where the SVD runs,
    with the command's defaults."""

    def decorate(command: F) -> F:
        options = [
            click.option(
                "--energy",
                type=FiniteFloat(min=0, max=1, min_open=True),
                default=defaults.energy,
                show_default=True,
                help="Subspace rank k: smallest k whose singular values hold this share of "
                "||D||^2 (with --basis: within what the basis holds).",
            ),
            click.option(
                "--max-rank",
                type=click.IntRange(min=1),
                default=defaults.max_rank,
                show_default=True,
                help="Cap on k.",
            ),
            click.option(
                "--rank",
                type=click.IntRange(min=1),
                default=defaults.rank,
                help="Fix k instead of choosing by energy.",
            ),
            click.option(
                "--seed",
                type=int,
                default=defaults.seed,
                show_default=True,
                help="Seed of the randomized SVD.",
            ),
            click.option(
                "--device",
                type=click.Choice(DEVICES),
                default=defaults.device,
                show_default=True,
                help="Where the SVD runs.",
            ),
        ]
        return apply(options, command)

    return decorate


def subspace_settings(settings: dict[str, Any]) -> SubspaceSettings:
    """The `SubspaceSettings` of `subspace_options`' flags, taken out of `settings`."""
    return SubspaceSettings(**{name: settings.pop(name) for name in SUBSPACE_FLAGS})


def prompt_set_options(prefix: str = "") -> Callable[[F], F]:
    """--harmful, --benign, --task, --field, --system, --refusal-patterns (eval, and the gated
    repair's calibration data, whose help starts with `prefix`)."""
    options = [
        click.option(
            "--harmful",
            metavar="FILE",
            help=f"{prefix}Harmful prompts (.txt/.jsonl/.json/.csv, or "
            "hf://datasets/org/name/file); default: the shipped smoke probe.",
        ),
        click.option(
            "--benign",
            metavar="FILE",
            help=f"{prefix}Safe prompts that look risky (over-refusal; the gated repair's "
            "task term without --task); default: the shipped set.",
        ),
        click.option(
            "--task",
            metavar="FILE",
            help=f"{prefix}The adapter's own prompts, with `reference` answers.",
        ),
        click.option(
            "--field",
            help=f"{prefix}Prompt column of --harmful/--benign/--task files, when not known.",
        ),
        click.option("--system", help=f"{prefix}System prompt for every conversation."),
        click.option(
            "--refusal-patterns",
            type=click.Path(path_type=Path),
            help=f"{prefix}Refusal phrases, one a line, replacing the default list "
            "(plain text, not regex; a leading ^ matches only at the start of the answer).",
        ),
    ]

    def decorate(command: F) -> F:
        return apply(options, command)

    return decorate


def check_report_formats(command: str, paths: Sequence[Path]) -> None:
    """Exit 2 on a --report whose extension `command` does not write (before anything runs)."""
    from adapter_fix.report.formats import FORMATS, format_names

    for path in paths:
        if path.suffix.lower() not in FORMATS[command]:
            raise click.BadParameter(f"{path}: use {format_names(command)}", param_hint="--report")
