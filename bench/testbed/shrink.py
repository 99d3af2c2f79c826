"""Experiment: the gated repair's written update scaled toward ALIGNED, then `eval` of a split.

    .venv/bin/python bench/testbed/shrink.py --split tune --scales 1 0.8 0.6 \\
        --samples /tmp/shrink-tune.jsonl

The gated repair writes `ALIGNED + sum_u g_u unit_u` as a LoRA adapter; its update is
linear in the gates, so scaling every `lora_B` by `t` is every gate scaled by `t`: a
uniform step back toward ALIGNED (t = 0). Each repaired adapter of `make efficacy`
(`repaired/KIND/gate`) is written at each scale into a temporary folder and all are
evaluated in one `eval` beside ALIGNED: how refusals, over-refusals and the task move
as the update shrinks. Not a shipped method: bench/README.md has its rows.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build
import efficacy


def scaled(adapter: Path, scale: float, out: Path) -> Path:
    """A copy of `adapter` (a folder) at `out`, every `lora_B` times `scale`."""
    shutil.copytree(adapter, out)
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file(
        {k: v * scale if "lora_B" in k else v for k, v in tensors.items()},
        out / "adapter_model.safetensors",
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--adapters", nargs="*", default=["attack-comply", "attack-mix", "attack-benign"]
    )
    parser.add_argument("--split", default="tune", choices=(*build.data.MEASURED_SPLITS, "calib"))
    parser.add_argument("--scales", nargs="*", type=float, default=[1.0, 0.8, 0.6])
    parser.add_argument("--samples", type=Path, required=True, help="a new JSONL file")
    args = parser.parse_args()
    missing = [k for k in args.adapters if not (build.WORK / "repaired" / k / "gate").is_dir()]
    if missing:
        parser.error(f"no gated repair of {', '.join(missing)}: run `make efficacy` first")
    efficacy.new_samples(args.samples)
    with tempfile.TemporaryDirectory(prefix="shrink-") as temporary:
        folders, labels = [], ["ALIGNED"]
        for kind in args.adapters:
            for scale in args.scales:
                source = build.WORK / "repaired" / kind / "gate"
                folders.append(scaled(source, scale, Path(temporary) / f"{kind}-x{scale}"))
                labels.append(f"{kind}, gated, x{scale}")
        print(efficacy.experiment_tables(folders, labels, args.split, args.samples))


if __name__ == "__main__":
    main()
