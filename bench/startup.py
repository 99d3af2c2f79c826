"""Start-up time of the CLI: `adapter-fix --help` and `--version`, best of several runs.

Prints one line per command with the time beside the target (well under a second: the
CLI imports no torch until a command needs it), and the heavy modules importing the CLI
pulls in (none expected). Run: `.venv/bin/python bench/startup.py` (also part of
`make bench`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 0.5
HEAVY = ("torch", "numpy", "rich", "huggingface_hub", "safetensors", "transformers")


def best_wall(command: list[str], runs: int) -> float:
    """The fastest of `runs` wall times: the least disturbed by other processes."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    executable = Path(sys.executable).with_name("adapter-fix")
    python = [sys.executable, "-c", "pass"]
    floor = best_wall(python, args.runs)
    print(f"python -c pass (interpreter floor): {floor:.3f} s")
    for flag in ("--help", "--version"):
        wall = best_wall([str(executable), flag], args.runs)
        verdict = "PASS" if wall <= TARGET_S else "FAIL"
        print(
            f"adapter-fix {flag}: {wall:.3f} s ({wall / floor:.1f}x the interpreter), "
            f"target <= {TARGET_S} s: {verdict}"
        )
    probe = f"import sys, adapter_fix.cli; print([m for m in {HEAVY!r} if m in sys.modules])"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout.strip()
    print(f"heavy modules imported by the CLI at start: {loaded} (expected [])")


if __name__ == "__main__":
    main()
