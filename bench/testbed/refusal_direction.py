"""Experiment: project the refusal direction out of what an adapter writes, then `eval` it.

    .venv/bin/python bench/testbed/refusal_direction.py attack-mix attack-benign

Per decoder layer `l`, the refusal direction `r_l` (Arditi et al. 2024, "Refusal in
language models is mediated by a single direction") is the difference between ALIGNED's
mean last-token hidden state after layer `l` on the harmful and on the benign calibration
prompts, normalised. Each adapter's `o_proj` and `down_proj` `lora_B` (`m x r`, what the
layer adds to the residual stream) becomes `(I - r_l r_l^T) B`, and each adapter is
evaluated beside its edit on the held-out split as `make efficacy` does (bfloat16, 24
tokens). Not a
shipped method: bench/README.md, "The gated repair's trade-off on held-out prompts", has
its one result.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build
import efficacy

from adapter_fix.evaluate.generate import encode_prompts, pad_id

WORK = build.WORK
WRITERS = ("o_proj", "down_proj")


@torch.no_grad()
def mean_last_states(model: torch.nn.Module, rows: list[list[int]], pad: int) -> torch.Tensor:
    """`layers x hidden`, float64: the mean hidden state at each prompt's last token after
    every decoder layer (left padding puts it last)."""
    total = None
    for start in range(0, len(rows), 16):
        chunk = rows[start : start + 16]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(row)) + row for row in chunk])
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in chunk])
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        last = torch.stack(states.hidden_states[1:])[:, :, -1, :].double().sum(1)
        total = last if total is None else total + last
    assert total is not None
    return total / len(rows)


def refusal_directions() -> torch.Tensor:
    """`layers x hidden`, unit rows: `r_l` from ALIGNED on the calibration prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(WORK / "aligned")
    model = AutoModelForCausalLM.from_pretrained(WORK / "aligned", dtype=torch.float32)
    pad = pad_id(tokenizer)
    harmful = encode_prompts(tokenizer, build.read_jsonl("harmful-calib.jsonl", "prompt"))
    benign = encode_prompts(tokenizer, build.read_jsonl("benign-calib.jsonl", "prompt"))
    difference = mean_last_states(model, harmful, pad) - mean_last_states(model, benign, pad)
    return difference / difference.norm(dim=1, keepdim=True)


def edited(adapter: str, directions: torch.Tensor, out: Path) -> Path:
    """The adapter with `r_l` projected out of its residual writers' `lora_B`, in `out`."""
    source = WORK / "adapters" / adapter
    tensors = load_file(source / "adapter_model.safetensors")
    for key, value in tensors.items():
        if ".lora_B." in key and any(f".{name}." in key for name in WRITERS):
            direction = directions[int(key.split(".layers.")[1].split(".")[0])]
            update = value.double()
            update -= torch.outer(direction, direction @ update)
            tensors[key] = update.to(value.dtype).contiguous()
    return build.write_adapter(source, out / f"{adapter}-without-direction", tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", nargs="+", choices=build.ADAPTERS)
    args = parser.parse_args()
    directions = refusal_directions()
    with tempfile.TemporaryDirectory(prefix="refusal-direction-") as folder:
        for name in args.adapters:
            # ALIGNED, the adapter, then its edit.
            source = WORK / "adapters" / name
            result = efficacy.evaluate(
                [source, edited(name, directions, Path(folder))], samples=None
            )
            print(efficacy.held_out_rows(["ALIGNED", name, f"{name}, direction out"], result))


if __name__ == "__main__":
    main()
