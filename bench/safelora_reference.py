"""Safe LoRA's whole job as the reference code does it: whole models in memory, dense `C`.

The public reference (IBM/SafeLoRA `model.py`) loads the base and the aligned
model whole, builds per module `C = D D^T / ||D||_F` (`m x m`), projects
`B~ = C B`, compares the flattened dense `B~ A` and `B A`, selects the least
similar modules and writes the adapter. This script does exactly that on
safetensors inputs (float32 math), so `engine_bench.py` can time it and read its
peak memory beside `adapter-fix repair --method safelora` on the same input.

    python bench/safelora_reference.py BASE ALIGNED ADAPTER OUT [--layers 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PEFT_PREFIX = "base_model.model."


def load_model(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (sharded) checkpoint, as `from_pretrained` would hold them."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(folder / "model.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        tensors.update(load_file(folder / shard))
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("aligned", type=Path)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=10, help="modules to project (number)")
    args = parser.parse_args()
    base, aligned = load_model(args.base), load_model(args.aligned)
    adapter = load_file(args.adapter / "adapter_model.safetensors")
    similarities: dict[str, float] = {}
    projected: dict[str, torch.Tensor] = {}
    for key_a in [k for k in adapter if k.endswith(".lora_A.weight")]:
        key_b = key_a.replace("lora_A", "lora_B")
        weight = key_a.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight") + ".weight"
        displacement = aligned[weight].float() - base[weight].float()
        projection = torch.mm(displacement, displacement.t()) / torch.norm(displacement)
        lora_b, lora_a = adapter[key_b].float(), adapter[key_a].float()
        new_b = torch.mm(projection, lora_b)
        cosine = torch.nn.functional.cosine_similarity(
            torch.mm(new_b, lora_a).reshape(1, -1), torch.mm(lora_b, lora_a).reshape(1, -1)
        )
        similarities[key_b] = round(float(cosine), 5)
        projected[key_b] = new_b
        del displacement, projection
    cutoff = sorted(similarities.values())[: args.layers][-1]
    for key, similarity in similarities.items():
        if similarity <= cutoff:
            adapter[key] = projected[key].to(adapter[key].dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(adapter, args.out / "adapter_model.safetensors", metadata={"format": "pt"})
    shutil.copyfile(args.adapter / "adapter_config.json", args.out / "adapter_config.json")


if __name__ == "__main__":
    main()
