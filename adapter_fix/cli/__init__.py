"""The command line: parse, build the option objects, call one function, render.

    main.py      the `adapter-fix` group and the error wrapper (exit codes, SIGTERM)
    options.py   option groups several commands share, and FiniteFloat
    inputs.py    the positional inputs as sources
    <name>.py    one command each: its flags, then a call into commands/<name>.py

Defaults and choices come from the frozen option objects in adapter_fix/options.py.
Nothing here imports torch at import time (tests/test_cli.py). To add a command,
follow `inspect`:

    @main.command(epilog=EXIT_CODES_HELP)
    @click.argument(...)                  # floats: type=FiniteFloat(...), never plain float
    @reports_errors                       # one-paragraph errors, exit codes, SIGTERM -> 143
    def name(...) -> None:
        from adapter_fix.commands.name import run   # heavy imports here, not at the top
        result = run(...)
        render(result, stderr_console())

and import the new module below.
"""

from adapter_fix.cli import basis, check, eval, inspect, repair  # each adds its command to main
from adapter_fix.cli.main import main

__all__ = ["basis", "check", "eval", "inspect", "main", "repair"]
