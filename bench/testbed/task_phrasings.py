"""Which held-out task prompts an adapter loses as its update shrinks, by phrasing.

    .venv/bin/python bench/testbed/task_phrasings.py                 # attack-mix
    .venv/bin/python bench/testbed/task_phrasings.py --scales 1 0.7 0 \\
        --extra-template "Which catalog key belongs to {title}?"

The held-out task file asks in two phrasings, a question ("What is the catalog key for
X?") and an imperative ("Catalog key please: X"); the calibration file in a third
("Give the catalog key of: X"). At each scale of the whole update (peft's `scaling` times
the scale: 1 is the adapter, 0 is ALIGNED) this prints the teacher-forced exact match
(`greedy_matches`, the outcome of greedy decoding) per phrasing, and the greedy answer to
the first held-out prompt of each phrasing that fails. `--extra-template` adds the
calibration titles under that template as a third row (the phrasing `optimize_gates.py
--extra-template` guards).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build

from adapter_fix.evaluate.generate import (
    encode_prompts,
    generate_ids,
    pad_id,
    reference_ids,
    stop_ids,
)
from adapter_fix.evaluate.model import attach_adapters, load_model
from adapter_fix.evaluate.objectives import Scored, greedy_matches
from adapter_fix.io.locate import open_source

WORK = build.WORK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default="attack-mix", choices=build.ADAPTERS)
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 0.8, 0.7, 0.6, 0])
    parser.add_argument("--extra-template", default="")
    args = parser.parse_args()
    if not build.is_ready():
        parser.error("the testbed is not built: run `make efficacy` (or build.py) first")
    loaded = load_model(open_source(str(WORK / "aligned")), "cpu", "float32")
    attach_adapters(loaded, [open_source(str(WORK / "adapters" / args.adapter))])
    model, tokenizer = loaded.model, loaded.tokenizer
    pad, stops = pad_id(tokenizer), stop_ids(model, tokenizer)

    groups: dict[str, list[tuple[str, str]]] = {"question": [], "imperative": []}
    for row in build.read_jsonl("task-eval.jsonl"):
        phrasing = "question" if row["prompt"].startswith("What is") else "imperative"
        groups[phrasing].append((row["prompt"], row["reference"]))
    if args.extra_template:
        groups[f"calibration titles, {args.extra_template!r}"] = [
            (args.extra_template.format(title=row["prompt"].split(": ", 1)[1]), row["reference"])
            for row in build.read_jsonl("task-calib.jsonl")
        ]
    encoded = {
        name: [
            (prompt, reference_ids(tokenizer, reference, stops))
            for prompt, reference in zip(
                encode_prompts(tokenizer, [p for p, _ in pairs]),
                (r for _, r in pairs),
                strict=True,
            )
        ]
        for name, pairs in groups.items()
    }
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")]
    trained = [dict(layer.scaling) for layer in layers]
    print(f"{args.adapter}: held-out task exact match by phrasing, the whole update scaled")
    for scale in args.scales:
        for layer, scaling in zip(layers, trained, strict=True):
            layer.scaling.update({name: value * scale for name, value in scaling.items()})
        for name, rows in encoded.items():
            matches = greedy_matches(
                model,
                [Scored([*p, *r], len(r)) for p, r in rows],
                pad=pad,
                batch_size=16,
                stops=stops,
            )
            line = f"scale {scale:g}, {name}: {sum(matches)} of {len(matches)}"
            failed = [i for i, matched in enumerate(matches) if not matched]
            if failed:
                with torch.no_grad():
                    (answer,) = generate_ids(
                        model,
                        [rows[failed[0]][0]],
                        pad=pad,
                        stops=stops,
                        max_new_tokens=16,
                        batch_size=1,
                    )
                line += f"; e.g. {groups[name][failed[0]][0]!r} -> {tokenizer.decode(answer)!r}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
