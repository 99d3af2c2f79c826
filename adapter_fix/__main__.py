"""`python -m adapter_fix` runs the CLI."""

from adapter_fix.cli import main

main(prog_name="adapter-fix")
