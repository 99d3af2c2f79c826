"""Experiment: restore refusals by adding, not removing: ALIGNED's alignment or its refusal.

    .venv/bin/python bench/testbed/add_refusal.py extrapolate --strength 1
    .venv/bin/python bench/testbed/add_refusal.py steer --layers 8 12 16 --strengths 2 4 8

Every idea the gated repair and METHOD.md §8.1-8.2 tried takes something out of the
adapter. These two edits put something in instead (neither writes an adapter):

- `extrapolate`: ALIGNED pushed further along its own alignment, `W_a + beta (W_a - W_b)`
  in every linear weight of the decoder layers (full rank, more than any adapter could
  carry), written as a model in a temporary folder; `eval` measures it alone and with the
  attack adapters on it, on the held-out split as `make efficacy` does (bfloat16, 24
  tokens).
- `steer`: a conditional refusal direction, a static rank-1 edit of `down_proj` in each
  of `--layers`: `y <- y + beta (a^T z) r`, with `r` ALIGNED's refusal direction after that
  layer (mean last-token hidden state on the harmful minus the benign calibration prompts,
  Arditi et al. 2024, at its own length) and `a` a probe of `down_proj`'s input `z` with the
  adapter on (harmful minus benign-and-task calibration means at the last prompt token, made
  orthogonal to the benign and the task means so that on average it adds nothing there, and
  scaled to read 1 on the harmful ones). Applied as a forward hook at every position; the
  held-out split measured as `frontier.py` does (float32), at each `beta`, per adapter.

Not shipped methods: bench/README.md has their results.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build
import efficacy
import frontier
from refusal_direction import mean_last_states

from adapter_fix.evaluate.generate import encode_prompts, pad_id, stop_ids
from adapter_fix.evaluate.model import attach_adapters, load_model
from adapter_fix.io.locate import open_source

WORK = build.WORK


def extrapolate(strength: float, adapters: list[str]) -> None:
    """`eval` of ALIGNED + strength (ALIGNED - BASE), alone and under `adapters`."""
    with tempfile.TemporaryDirectory(prefix="extrapolated-") as folder:
        target = Path(folder)
        for item in (WORK / "aligned").iterdir():
            if item.name != "model.safetensors":
                shutil.copy(item, target)
        aligned = load_file(WORK / "aligned" / "model.safetensors")
        base = load_file(WORK / "base" / "model.safetensors")
        for key, value in aligned.items():
            if ".layers." in key and value.ndim == 2:
                pushed = value.double() + strength * (value.double() - base[key].double())
                aligned[key] = pushed.to(value.dtype).contiguous()
        save_file(aligned, target / "model.safetensors", metadata={"format": "pt"})
        del aligned, base
        result = efficacy.evaluate(
            [WORK / "adapters" / name for name in adapters], samples=None, aligned=target
        )
    labels = [f"ALIGNED + {strength:g} (ALIGNED - BASE)", *adapters]
    print(efficacy.held_out_rows(labels, result))


@torch.no_grad()
def last_token_inputs(
    model: Any, module: torch.nn.Module, rows: list[list[int]], pad: int
) -> torch.Tensor:
    """The input of `module` at each row's last token, `rows x in`, float64."""
    inputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(
        lambda _m, given, _out: inputs.append(given[0][:, -1].double())
    )
    try:
        for start in range(0, len(rows), 32):
            chunk = rows[start : start + 32]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(row)) + row for row in chunk])
            mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in chunk])
            model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    return torch.cat(inputs)


def adder(
    probe: torch.Tensor, refusal: torch.Tensor, strength: list[float]
) -> Callable[[Any, tuple, torch.Tensor], torch.Tensor]:
    """A forward hook adding `strength[0] * (probe . input) * refusal` to a module's output."""

    def add(_module: Any, given: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + strength[0] * (given[0] @ probe)[..., None] * refusal

    return add


def steer(adapter: str, layers: list[int], strengths: list[float]) -> None:
    """The held-out split at each strength of the conditional refusal edit (module docstring)."""
    loaded = load_model(open_source(str(WORK / "aligned")), "cpu", "float32")
    attach_adapters(loaded, [open_source(str(WORK / "adapters" / adapter))])
    model, tokenizer = loaded.model, loaded.tokenizer
    pad, stops = pad_id(tokenizer), stop_ids(model, tokenizer)
    harmful, benign, task = (
        encode_prompts(tokenizer, build.read_jsonl(f"{name}-calib.jsonl", "prompt"))
        for name in ("harmful", "benign", "task")
    )
    with model.disable_adapter():  # ALIGNED's refusal direction after every layer
        directions = mean_last_states(model, harmful, pad) - mean_last_states(model, benign, pad)
    decoder = model.get_base_model().model.layers
    strength = [0.0]
    for layer in layers:
        module = decoder[layer].mlp.down_proj
        refusal = directions[layer]
        harmful_inputs, benign_inputs, task_inputs = (
            last_token_inputs(model, module, rows, pad) for rows in (harmful, benign, task)
        )
        probe = harmful_inputs.mean(0) - torch.cat([benign_inputs, task_inputs]).mean(0)
        means = torch.linalg.qr(torch.stack([benign_inputs.mean(0), task_inputs.mean(0)], 1)).Q
        probe -= means @ (means.T @ probe)
        probe /= (harmful_inputs @ probe).mean()
        reads = ", ".join(
            f"{name} {(inputs @ probe).mean():.2f} +- {(inputs @ probe).std():.2f}"
            for name, inputs in (
                ("harmful", harmful_inputs),
                ("benign", benign_inputs),
                ("task", task_inputs),
            )
        )
        print(f"layer {layer}: |r| {refusal.norm():.2f}; the probe reads {reads}", flush=True)

        module.register_forward_hook(adder(probe.float(), refusal.float(), strength))
    measure = frontier.held_out_measure(tokenizer, model, pad, stops)
    print("| strength | held-out refusal seen / unseen | over-refusal | task EM |")
    print("| --- | --- | --- | --- |")
    for value in strengths:
        strength[0] = value
        seen, unseen, over, exact = measure()
        print(f"| {value:g} | {seen:.2f} / {unseen:.2f} | {over:.2f} | {exact:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("idea", choices=("extrapolate", "steer"))
    parser.add_argument(
        "--adapters",
        nargs="+",
        choices=build.ADAPTERS,
        help="default: attack-mix and attack-comply to extrapolate, attack-mix to steer",
    )
    parser.add_argument("--strength", type=float, default=1.0, help="extrapolate's beta")
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 12, 16])
    parser.add_argument("--strengths", type=float, nargs="+", default=[0, 2, 4, 8])
    args = parser.parse_args()
    if not build.is_ready():
        parser.error("the testbed is not built: run `make efficacy` (or build.py) first")
    if args.idea == "extrapolate":
        extrapolate(args.strength, args.adapters or ["attack-mix", "attack-comply"])
        return
    for adapter in args.adapters or ["attack-mix"]:
        print(f"steer: {adapter}", flush=True)
        steer(adapter, args.layers, args.strengths)


if __name__ == "__main__":
    main()
