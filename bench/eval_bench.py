"""Throughput of `adapter-fix eval` on the miniature chat model (fixtures/chat-*).

Prints, for each batch size, prompts per second and generated tokens per
second of greedy generation with ALIGNED alone and with the ATTACK adapter
attached (peft's LoRA layers add work), and the speed-up of batching over one
prompt at a time beside its target. The model is loaded once; each figure is
the best of `--repeats` timed passes over the same prompts, after one warm-up.

    .venv/bin/python bench/eval_bench.py                      # defaults: the miniature
    .venv/bin/python bench/eval_bench.py --prompts 64 --batch-sizes 1 8 32 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from adapter_fix.commands.eval import quiet_transformers
from adapter_fix.evaluate.generate import generate
from adapter_fix.evaluate.model import attach_adapters, load_model
from adapter_fix.evaluate.prompts import load_prompt_set
from adapter_fix.io.locate import open_source

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BATCH_SPEEDUP_MIN = 2.0  # batch 8 vs batch 1, prompts/s


def measure(
    model: object, tokenizer: object, prompts: list[str], args: argparse.Namespace, batch_size: int
) -> tuple[float, float]:
    """Best (prompts/s, tokens/s) over `args.repeats` passes."""
    best = (0.0, 0.0)
    for _ in range(args.repeats):
        tokens = 0

        def count(done: int, generated: int) -> None:
            nonlocal tokens
            tokens += generated

        started = time.perf_counter()
        generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=args.max_new_tokens,
            batch_size=batch_size,
            on_batch=count,
        )
        elapsed = time.perf_counter() - started
        best = max(best, (len(prompts) / elapsed, tokens / elapsed))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aligned", default=str(FIXTURES / "chat-aligned"))
    parser.add_argument("--adapter", default=str(FIXTURES / "chat-attack"))
    parser.add_argument(
        "--prompts-file", default=str(FIXTURES / "chat-prompts" / "harmful-eval.jsonl")
    )
    parser.add_argument("--prompts", type=int, default=64, help="how many prompts to time")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads (on a busy shared machine, 1 avoids threads spinning on each other)",
    )
    args = parser.parse_args()
    if not Path(args.aligned).is_dir():
        print(f"no miniature at {args.aligned}: run fixtures/make_miniature.py", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    quiet_transformers()
    loaded = load_model(open_source(args.aligned), device="cpu")
    attach_adapters(loaded, [open_source(args.adapter)])
    prompts = load_prompt_set(args.prompts_file, "harmful").limited(args.prompts).texts
    print(
        f"eval throughput on {Path(args.aligned).name} ({platform.processor() or 'cpu'}, "
        f"{args.threads} threads, torch {torch.__version__}): {len(prompts)} prompts, "
        f"at most {args.max_new_tokens} new tokens, best of {args.repeats}"
    )
    speeds: dict[tuple[str, int], float] = {}
    for variant in (None, "adapter_0"):
        label = "aligned" if variant is None else "attack"
        with loaded.variant(variant) as model:
            generate(model, loaded.tokenizer, prompts[:4], max_new_tokens=4)  # warm-up
            for batch_size in args.batch_sizes:
                per_second, tokens = measure(model, loaded.tokenizer, prompts, args, batch_size)
                speeds[label, batch_size] = per_second
                print(
                    f"  {label:8s} batch {batch_size:3d}: {per_second:8.1f} prompts/s "
                    f"{tokens:9.0f} tokens/s"
                )
    if 1 in args.batch_sizes and 8 in args.batch_sizes:
        ratio = speeds["attack", 8] / speeds["attack", 1]
        verdict = "PASS" if ratio >= BATCH_SPEEDUP_MIN else "FAIL"
        print(
            f"batching speed-up (attack, batch 8 / batch 1): {ratio:.1f}x "
            f"(target >= {BATCH_SPEEDUP_MIN:.0f}x) {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
