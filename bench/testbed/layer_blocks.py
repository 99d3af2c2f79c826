"""Where an adapter's compliance and task live: its update removed on blocks of modules.

    .venv/bin/python bench/testbed/layer_blocks.py                    # attack-comply, tune
    .venv/bin/python bench/testbed/layer_blocks.py --adapter attack-mix --split eval

Each block names the layers whose attention update and the layers whose MLP update are
removed (`lora_B` zeroed in a copy of the adapter; every other module untouched). One
`eval` of ALIGNED and every copy on the split then prints refusal, over-refusal and task
exact match per copy, and refusals per template (`efficacy.by_template`). A block whose
removal restores refusals while the task stays is what a removal-based repair (the gates
switched off) could find; a compliance that survives a block's removal is carried by what
is left. The copies go in a temporary folder, removed after; `--samples PATH` keeps the
answers (in a new file: an existing one is refused, exit 2).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build
import efficacy

ATTENTION = "self_attn"
KEY = re.compile(r"\.layers\.(\d+)\.(self_attn|mlp)\.\w+\.lora_[AB]\.weight$")


@dataclass(frozen=True)
class Block:
    """The layers whose attention update and whose MLP update a copy has removed."""

    name: str
    attention: range
    mlp: range

    def removes(self, layer: int, part: str) -> bool:
        """Whether the copy removes the update of `part` ("self_attn" or "mlp") in `layer`."""
        return layer in (self.attention if part == ATTENTION else self.mlp)


def blocks(layers: int) -> list[Block]:
    """Halves and thirds of the depth, each kind of module, and the attention with the MLPs
    of the later layers (from half, two thirds, five sixths) or of the first half."""
    none, every = range(0), range(layers)
    half, third = layers // 2, layers // 3
    spans = [range(0, third), range(third, 2 * third), range(2 * third, layers)]
    spans += [range(0, half), range(half, layers)]
    found = [Block(f"layers {s.start}-{s.stop - 1}", s, s) for s in spans]
    found += [Block("attention", every, none), Block("MLP", none, every)]
    for start in (half, 2 * third, layers - layers // 6):
        found.append(Block(f"attention + MLP {start}-{layers - 1}", every, range(start, layers)))
    found.append(Block(f"attention + MLP 0-{half - 1}", every, range(0, half)))
    return found


def removed(tensors: dict[str, Tensor], block: Block) -> dict[str, Tensor]:
    """`tensors` (a PEFT LoRA state dict) with `lora_B` zeroed on the modules `block`
    removes: those modules' updates `B A` become 0, the others are the same tensors.
    A key that names no decoder layer's attention or MLP module is an error."""
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        match = KEY.search(key)
        if match is None:
            raise ValueError(f"{key!r} names no decoder layer's attention or MLP LoRA factor")
        layer, part = int(match[1]), match[2]
        zero = ".lora_B." in key and block.removes(layer, part)
        out[key] = value.new_zeros(value.shape) if zero else value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default="attack-comply", choices=build.ADAPTERS)
    parser.add_argument("--split", default="tune", choices=build.data.MEASURED_SPLITS)
    parser.add_argument("--samples", type=Path, help="write every answer here (JSONL)")
    args = parser.parse_args()
    if not build.is_ready():
        parser.error("the testbed is not built: run `make efficacy` (or build.py) first")
    efficacy.new_samples(args.samples)
    source = build.WORK / "adapters" / args.adapter
    tensors = load_file(source / "adapter_model.safetensors")
    config = json.loads((build.WORK / "aligned" / "config.json").read_text())
    chosen = blocks(config["num_hidden_layers"])
    with tempfile.TemporaryDirectory(prefix="layer-blocks-") as temporary:
        folder = Path(temporary)
        copies = [
            build.write_adapter(source, folder / f"{args.adapter}-block{i}", removed(tensors, b))
            for i, b in enumerate(chosen)
        ]
        samples = args.samples or folder / "samples.jsonl"
        labels = ["ALIGNED", *(f"{args.adapter} without {b.name}" for b in chosen)]
        print(efficacy.experiment_tables(copies, labels, args.split, samples))


if __name__ == "__main__":
    main()
