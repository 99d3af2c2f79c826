"""Experiment: METHOD.md §8.2, the harmful-input null space, on the testbed, then `eval`.

    .venv/bin/python bench/testbed/null_space.py attack-mix --ranks 4 16 64
    .venv/bin/python bench/testbed/null_space.py attack-mix --positions last --ranks 8 32
    .venv/bin/python bench/testbed/null_space.py attack-mix --criterion difference
    .venv/bin/python bench/testbed/null_space.py attack-mix --no-eval   # the edits' sizes

Per LoRA module, the covariance of its inputs over the harmful calibration prompts with the
adapter's own answers (`Σ_H`; `--positions last`: only each prompt's last token, where the
answer starts) and over the task calibration prompts with their references and the benign
calibration prompts with the adapter's answers (`Σ_T`), every non-padding token, from the
adapted model. The `k` directions with most harmful energy per unit of task energy (the
top generalized eigenvectors of `(Σ_H, Σ_T + eps I)`, `eps` 1e-3 of `Σ_T`'s mean
eigenvalue; `--criterion difference`: the top eigenvectors of `Σ_H - Σ_T`), orthonormalized
as `V` (`n x k`), are removed from what the update reads: `A <- A (I - V V^T)` (same rank, a
drop-in adapter). It prints the share of `||A||^2` each `k` removes; each `k` is written
beside the adapter and all are evaluated on the held-out split as `make efficacy` does
(bfloat16, 24 tokens). Not a shipped method: bench/README.md has its result.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build
import efficacy

from adapter_fix.evaluate.generate import (
    encode_prompts,
    generate_ids,
    pad_id,
    reference_ids,
    stop_ids,
)
from adapter_fix.evaluate.model import attach_adapters, load_model
from adapter_fix.io.locate import open_source

WORK = build.WORK


class Covariances:
    """Per LoRA module, `sum x x^T` over the tokens of the current set (float64, `n x n`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.sums: dict[str, dict[str, torch.Tensor]] = {"harmful": {}, "task": {}}
        self.counts = {"harmful": 0, "task": 0}
        self.current = "harmful"
        self.mask: torch.Tensor | None = None
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
                key = name.split("base_model.model.")[-1]
                self.handles.append(module.register_forward_hook(self._hook(key)))

    def _hook(self, key: str) -> Callable[[torch.nn.Module, tuple, torch.Tensor], None]:
        def hook(_module: torch.nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
            assert self.mask is not None
            x = inputs[0][self.mask].double()  # tokens x n
            total = self.sums[self.current]
            total[key] = total.get(key, 0) + x.T @ x

        return hook

    @torch.no_grad()
    def add(
        self,
        model: torch.nn.Module,
        sequences: list[list[int]],
        pad: int,
        which: str,
        only: list[int] | None,
    ) -> None:
        """Every token of `sequences`, or only position `only[i]` of sequence `i`."""
        self.current = which
        for start in range(0, len(sequences), 16):
            chunk = sequences[start : start + 16]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(s)) + s for s in chunk])
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in chunk])
            attention = mask.clone()
            if only is not None:
                mask = torch.zeros_like(mask)
                for row, s in enumerate(chunk):
                    mask[row, width - len(s) + only[start + row]] = 1
            self.mask = mask.bool()
            model(input_ids=ids, attention_mask=attention)
            self.counts[which] += int(mask.sum())


def blinded(
    harmful: torch.Tensor, task: torch.Tensor, rank: int, criterion: str = "ratio"
) -> torch.Tensor:
    """`n x rank` orthonormal: the top generalized eigenvectors of `(harmful, task + eps I)`
    (`ratio`: most harmful energy per unit of task energy), or the top eigenvectors of
    `harmful - task` (`difference`: most harmful energy beyond the task's)."""
    if criterion == "difference":
        return torch.linalg.eigh(harmful - task).eigenvectors[:, -rank:]
    n = task.shape[0]
    eps = 1e-3 * float(torch.trace(task)) / n
    lower = torch.linalg.cholesky(task + eps * torch.eye(n, dtype=task.dtype))
    whitened = torch.linalg.solve_triangular(lower, harmful, upper=False)
    whitened = torch.linalg.solve_triangular(lower, whitened.T, upper=False).T
    _values, vectors = torch.linalg.eigh((whitened + whitened.T) / 2)
    top = torch.linalg.solve_triangular(lower.T, vectors[:, -rank:], upper=True)
    return torch.linalg.qr(top).Q


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", choices=build.ADAPTERS)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--no-eval", action="store_true", help="only the edits' sizes")
    parser.add_argument("--criterion", choices=("ratio", "difference"), default="ratio")
    parser.add_argument(
        "--positions",
        choices=("all", "last"),
        default="all",
        help="Σ_H over every token, or only each harmful prompt's last (where the answer starts)",
    )
    args = parser.parse_args()
    source = WORK / "adapters" / args.adapter
    loaded = load_model(open_source(str(WORK / "aligned")), "cpu", "auto")
    attach_adapters(loaded, [open_source(str(source))])
    model, tokenizer = loaded.model, loaded.tokenizer
    pad, stops = pad_id(tokenizer), stop_ids(model, tokenizer)

    def with_answers(prompts: list[list[int]]) -> list[list[int]]:
        answers = generate_ids(
            model, prompts, pad=pad, stops=stops, max_new_tokens=24, batch_size=64
        )
        return [[*p, *a] for p, a in zip(prompts, answers, strict=True)]

    harmful_prompts = encode_prompts(tokenizer, build.read_jsonl("harmful-calib.jsonl", "prompt"))
    prompt_lengths = [len(p) for p in harmful_prompts]
    harmful = with_answers(harmful_prompts)
    benign = with_answers(
        encode_prompts(tokenizer, build.read_jsonl("benign-calib.jsonl", "prompt"))
    )
    task_rows = build.read_jsonl("task-calib.jsonl")
    task = [
        [*p, *reference_ids(tokenizer, row["reference"], stops)]
        for p, row in zip(
            encode_prompts(tokenizer, [row["prompt"] for row in task_rows]), task_rows, strict=True
        )
    ]
    covariances = Covariances(model)
    only = (
        [prompt_lengths[i] - 1 for i in range(len(harmful))] if args.positions == "last" else None
    )
    covariances.add(model, harmful, pad, "harmful", only)
    covariances.add(model, [*task, *benign], pad, "task", None)
    for handle in covariances.handles:
        handle.remove()
    tensors = load_file(source / "adapter_model.safetensors")
    with tempfile.TemporaryDirectory(prefix="null-space-") as folder:
        outputs: list[Path] = []
        for rank in args.ranks:
            edited, shares = dict(tensors), []
            for key, value in tensors.items():
                if ".lora_A." not in key:
                    continue
                module = key.split("base_model.model.")[-1].split(".lora_A.")[0]
                sigma_h = covariances.sums["harmful"][module] / covariances.counts["harmful"]
                sigma_t = covariances.sums["task"][module] / covariances.counts["task"]
                v = blinded(sigma_h, sigma_t, rank, args.criterion)
                a = value.double()
                removed = (a @ v) @ v.T
                shares.append(float(removed.norm() ** 2 / a.norm() ** 2))
                edited[key] = (a - removed).to(value.dtype).contiguous()
            target = Path(folder) / f"{args.adapter}-null-space-{rank}"
            build.write_adapter(source, target, edited)
            print(
                f"k = {rank}: share of ||A||^2 removed, mean over modules "
                f"{sum(shares) / len(shares):.4f}, largest {max(shares):.4f}",
                flush=True,
            )
            if args.no_eval:
                continue
            outputs.append(target)
        if args.no_eval:
            return
        result = efficacy.evaluate([source, *outputs], samples=None)
    labels = ["ALIGNED", args.adapter, *(f"k = {rank}" for rank in args.ranks)]
    print(efficacy.held_out_rows(labels, result))


if __name__ == "__main__":
    main()
