"""The `adapter-fix` group, and the wrapper that turns errors into one paragraph and an exit code.

Start-up must stay fast (`adapter-fix --help` in well under a second): the
cli package imports only click and light adapter-fix modules (errors,
display, interrupts, options, io.sources). Anything that imports torch,
numpy, rich or huggingface_hub is imported inside the command that needs it.
`tests/test_cli.py` checks that importing the package imports no torch.
"""

from __future__ import annotations

import functools
import os
import sys
import textwrap
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from adapter_fix import __version__
from adapter_fix.display import printable
from adapter_fix.errors import EXIT_CODES, AdapterFixError
from adapter_fix.interrupts import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, sigterm_raises

if TYPE_CHECKING:
    from rich.console import Console

    from adapter_fix.progress import ModuleProgress

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES_HELP = "\b\n" + textwrap.fill(
    "Exit codes: " + ", ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + ".",
    width=78,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="adapter-fix")
def main() -> None:
    """Repair LoRA adapters so fine-tuning stops erasing a chat model's safety alignment.

    \b
    adapter-fix repair BASE ALIGNED ADAPTER -o OUT   corrected adapter + diff report
    adapter-fix inspect ADAPTER                      what is in an adapter
    adapter-fix basis BASE ALIGNED -o BASIS          safety basis, computed once
    adapter-fix check --basis BASIS ADAPTER          CI gate (exit 12 on failure)
    adapter-fix eval ALIGNED [ADAPTER ...]           refusals, over-refusals, task skill
    """


def stderr_console() -> Console:
    """Tables and progress go to stderr; logs (not a terminal) get room for the wide tables."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 200
    return console


def module_bars(console: Console, quiet: bool, label: str) -> Callable[[int], ModuleProgress]:
    """The module progress bar of a run (`commands.ProgressBar`): on stderr, off when quiet
    or when stderr is not a terminal."""
    from adapter_fix.progress import ModuleProgress

    def bar(total: int) -> ModuleProgress:
        return ModuleProgress(
            console, total, enabled=not quiet and console.is_terminal, label=label
        )

    return bar


def _print_error(title: str, message: str) -> None:
    from rich.text import Text

    stderr_console().print(
        Text.assemble((f"adapter-fix: {title}: ", "bold red"), printable(message)),
        soft_wrap=True,
    )


def reports_errors(command: F) -> F:
    """AdapterFixError -> one paragraph on stderr and its exit code, never a traceback.

    Ctrl-C exits 130 and SIGTERM 143, both after the code they interrupt has
    removed its temporary outputs (they unwind as KeyboardInterrupt).
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with sigterm_raises():
                return command(*args, **kwargs)
        except click.ClickException:
            raise  # usage errors: click prints them and exits 2
        except AdapterFixError as error:
            _print_error(error.title, error.render())
            sys.exit(error.exit_code)
        except Terminated:
            _print_error("terminated", "SIGTERM received; temporary outputs removed.")
            sys.exit(EXIT_TERMINATED)
        except KeyboardInterrupt:
            _print_error("interrupted", "no output was written.")
            sys.exit(EXIT_INTERRUPTED)
        except Exception as error:
            if os.environ.get("ADAPTER_FIX_DEBUG"):
                raise
            _print_error(
                "internal error",
                f"{type(error).__name__}: {error}. This is a bug in adapter-fix; please report "
                "it with the command you ran (set ADAPTER_FIX_DEBUG=1 to see the traceback).",
            )
            sys.exit(1)

    return wrapper  # type: ignore[return-value]
