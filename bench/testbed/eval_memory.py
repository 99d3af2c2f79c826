"""`adapter-fix eval`'s peak memory and time against the number of harmful prompts.

    .venv/bin/python bench/testbed/eval_memory.py              # 50, 100, 200, 400 prompts
    .venv/bin/python bench/testbed/eval_memory.py --counts 50 400

For each count N, one `adapter-fix eval` of the testbed's ALIGNED (a child process, timed and
its peak RSS read by `efficacy.run`) on the first N harmful prompts of every split (drawn by
bench/testbed/data.py, written to a temporary file) and the 48 held-out benign prompts, at
`make efficacy`'s generation settings but in float32 (24 new tokens, batch 48, CPU). Peak
memory should not grow with N: generation runs one batch at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build
import efficacy

SPLITS = ("train", "calib", "eval", "tune")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[50, 100, 200, 400])
    args = parser.parse_args(argv)
    build.ensure_built()
    harmful = [row for split in SPLITS for row in build.data.harmful(split, 5)]
    if max(args.counts) > len(harmful):
        parser.error(f"--counts: at most {len(harmful)} harmful prompts")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print("| harmful prompts | eval s | peak MB |")
    print("| --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for count in args.counts:
            path = Path(folder) / f"harmful-{count}.jsonl"
            path.write_text(
                "".join(json.dumps({"prompt": row.prompt}) + "\n" for row in harmful[:count])
            )
            done, seconds, peak = efficacy.run(
                [
                    *("eval", str(build.WORK / "aligned"), "--harmful", str(path)),
                    *("--benign", str(efficacy.PROMPTS / "benign-eval.jsonl")),
                    *("--max-new-tokens", "24", "--batch-size", "48"),
                    *("--device", "cpu", "--dtype", "float32", "--json", "-q"),
                ]
            )
            if done.returncode != 0:
                raise SystemExit(f"eval failed (exit {done.returncode}):\n{done.stderr}")
            print(f"| {count} | {seconds:.0f} | {peak:.0f} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
