"""The gated repair's memory and per-token costs against the number of calibration prompts.

    .venv/bin/python bench/testbed/gate_memory.py              # 50, 100, 200, 400 prompts
    .venv/bin/python bench/testbed/gate_memory.py --counts 50 400

For each count N, a fresh child process loads the testbed's ALIGNED with attack-mix on it
(component gates, as `repair --method gate` does) and runs each pass a gated-repair round
makes, over N harmful prompts and the 32 task calibration prompts, at the repair's default
batch sizes: greedy generation of the calibration answers, the refusal margin with its
backward pass (against the attack's compliance text), the teacher-forced refusal check, the
descent's refusal term (ALIGNED's 4-token refusal starts), its compliance term (the
attack's compliance start, every row once) and the task loss, each with its
backward pass (a descent step runs the refusal and task passes on a fifth of the prompts
and the compliance pass on a tenth), and the descent's
moments' pass (no gradient) over the prompts with an answer after each.
It prints, per N, the child's resident memory once loaded and run on one prompt (every
weight paged in) and at its peak (`ru_maxrss`)
and each pass's milliseconds per token, then the peak once each pass has run (which pass
sets it), and the load average before and after. The memory the passes use should not
grow with N (one batch at a time); the RSS also holds what glibc's allocator keeps after
tensors are freed, which grew 6-8% from 50 to 400 prompts (`MALLOC_MMAP_THRESHOLD_=131072`
in the environment hands large freed buffers back: bench/README.md, "Where the memory
growth comes from"). The per-token costs are what bench/README.md's 8B estimate starts
from.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build
import data

if TYPE_CHECKING:
    from adapter_fix.methods.gate import Calibration, GateOptions

WORK = build.WORK
PASSES = (
    "generate",
    "margin_backward",
    "refusal_check",
    "descent_backward",
    "compliance_backward",
    "task_backward",
    "moments",
)
"""The passes `child` runs, in order."""


def child(count: int) -> dict:
    import torch

    from adapter_fix.evaluate.generate import encode_prompts, pad_id, reference_ids, stop_ids
    from adapter_fix.evaluate.model import attach_adapters, load_model
    from adapter_fix.io.adapter import load_adapter
    from adapter_fix.io.locate import open_source
    from adapter_fix.methods.gate import Calibration, GatedModel, GateOptions, gateable

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    adapter_source = open_source(str(WORK / "adapters" / "attack-mix"))
    loaded = load_model(open_source(str(WORK / "aligned")), "cpu", "auto")
    attach_adapters(loaded, [adapter_source])
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = [e.prompt for split in ("train", "calib", "eval") for e in data.harmful(split, 5)]
    if len(prompts) < count:
        raise SystemExit(f"only {len(prompts)} harmful prompts in the testbed's data")
    harmful = encode_prompts(tokenizer, prompts[:count], None)
    rows = build.read_jsonl("task-calib.jsonl")
    stops, pad = stop_ids(model, tokenizer), pad_id(tokenizer)
    task = encode_prompts(tokenizer, [r["prompt"] for r in rows], None)
    references = [reference_ids(tokenizer, r["reference"], stops) for r in rows]
    options = GateOptions()
    calibration = Calibration(harmful, [], task, references)
    gated = GatedModel(model, gateable(load_adapter(adapter_source)), options.unit)
    gated.set_values(torch.full_like(gated.values(), 0.5))
    with torch.no_grad():  # page every weight in: the baseline is the model as it runs
        model(input_ids=torch.tensor([harmful[0]]))
    loaded_mb = peak_mb()
    comply = tokenizer(data.COMPLIANCE, add_special_tokens=False)["input_ids"]
    costs = measure_passes(model, calibration, comply, pad=pad, stops=stops, options=options)
    # The descent's moments' pass (before its first step): each prompt with an answer after it
    # (the compliance start stands for the adapter's answer), no gradient, one batch at a time.
    answered = [[*prompt, *comply] for prompt in harmful]
    start = time.perf_counter()
    gated.inner_moments(answered, pad=pad, batch=options.batch_size)
    moments_tokens = sum(len(row) for row in answered)
    costs["moments_ms_per_token"] = (time.perf_counter() - start) / moments_tokens * 1000
    costs["moments_rss_mb"] = peak_mb()
    return {"prompts": count, "loaded_mb": loaded_mb, "peak_mb": peak_mb(), **costs}


def measure_passes(
    model: Any,
    calibration: Calibration,
    comply: list[int],
    *,
    pad: int,
    stops: list[int],
    options: GateOptions,
) -> dict[str, float]:
    """Run each pass a gated-repair round makes, once, over `calibration`'s harmful and task
    prompts on `model` (a peft model with gates), at `options`' batch sizes.

    `comply`: the token ids of the compliance start, the margin's other row. Returns each
    pass's milliseconds per token (`*_ms_per_token`; generation's per prompt token, the
    others' per token of the rows they score), the process's peak RSS once it has run
    (`*_rss_mb`: which pass sets the peak), the generation and gradient batch sizes, and on
    CUDA each pass's peak allocated memory above what was allocated before it
    (`*_peak_mib`) beside the repair's own estimate of the largest pass (`estimate_mib`).
    """
    import torch

    from adapter_fix.evaluate.generate import generate_ids
    from adapter_fix.evaluate.objectives import (
        Scored,
        greedy_matches,
        refusal_margins,
        token_nll,
        with_stop,
    )
    from adapter_fix.methods.gate import (
        DESCENT_COMPLIANCE_CHUNKS,
        DESCENT_START_TOKENS,
        _compliance_backward,
        generation_batch,
        memory_needed,
    )

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    harmful, task, references = calibration.harmful, calibration.task, calibration.task_references
    batch, generation = options.batch_size, generation_batch(model, calibration, options)
    results: dict[str, float] = {"generation_batch": generation, "batch": batch}

    def timed(name: str, tokens: int, work: Any) -> Any:
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = work()
        if cuda:
            torch.cuda.synchronize(device)
            results[f"{name}_peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        results[f"{name}_ms_per_token"] = (time.perf_counter() - start) / max(tokens, 1) * 1000
        results[f"{name}_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return result

    new = options.max_new_tokens

    def generate() -> list[list[int]]:
        with model.disable_adapter():
            return generate_ids(
                model, harmful, pad=pad, stops=stops, max_new_tokens=new, batch_size=generation
            )

    prompt_tokens = sum(len(p) for p in harmful)
    refusals = [with_stop(a, stops, new) for a in timed("generate", prompt_tokens, generate)]
    answers = [comply] * len(harmful)
    timed(
        "margin_backward",
        prompt_tokens,
        lambda: refusal_margins(
            model, harmful, refusals, answers, window=1, pad=pad, batch_size=batch, backward=True
        ),
    )
    check_rows = [
        Scored([*p, *r[:4]], min(4, len(r))) for p, r in zip(harmful, refusals, strict=True)
    ]
    timed(
        "refusal_check",
        sum(len(r.tokens) for r in check_rows),
        lambda: greedy_matches(model, check_rows, pad=pad, batch_size=batch),
    )
    # The descent's refusal term: ALIGNED's refusal start (its first tokens) after each prompt.
    starts = [r[:DESCENT_START_TOKENS] for r in refusals]
    timed(
        "descent_backward",
        sum(len(p) + len(r) for p, r in zip(harmful, starts, strict=True)),
        lambda: token_nll(model, harmful, starts, pad=pad, batch_size=batch, backward=True),
    )
    # The descent's compliance term: the attack's compliance start after each prompt, every
    # row once (one run of its chunks).
    compliance = [comply[:DESCENT_START_TOKENS]] * len(harmful)

    def compliance_round() -> None:
        for step in range(1, DESCENT_COMPLIANCE_CHUNKS + 1):
            _compliance_backward(model, harmful, compliance, step, 1.0, pad=pad, batch=batch)

    timed(
        "compliance_backward",
        sum(len(p) + len(c) for p, c in zip(harmful, compliance, strict=True)),
        compliance_round,
    )
    task_tokens = sum(len(p) + len(r) for p, r in zip(task, references, strict=True))
    timed(
        "task_backward",
        task_tokens,
        lambda: token_nll(model, task, references, pad=pad, batch_size=batch, backward=True),
    )
    if cuda:
        results["estimate_mib"] = memory_needed(model, calibration, options).total / 2**20
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[50, 100, 200, 400])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    build.ensure_built()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(
        "| prompts | generation batch | loaded MB | peak MB | peak - loaded "
        "| generation ms/prompt token "
        "| margin fwd+bwd ms/token | refusal check ms/token | descent refusal fwd+bwd ms/token "
        "| compliance fwd+bwd ms/token | task fwd+bwd ms/token | moments ms/token |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows: list[dict[str, Any]] = []
    for count in args.counts:
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(count)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(
            f"| {r['prompts']} | {r['generation_batch']} | {r['loaded_mb']:.0f} "
            f"| {r['peak_mb']:.0f} "
            f"| {r['peak_mb'] - r['loaded_mb']:.0f} "
            f"| {r['generate_ms_per_token']:.2f} | {r['margin_backward_ms_per_token']:.2f} "
            f"| {r['refusal_check_ms_per_token']:.2f} | {r['descent_backward_ms_per_token']:.2f} "
            f"| {r['compliance_backward_ms_per_token']:.2f} "
            f"| {r['task_backward_ms_per_token']:.2f} | {r['moments_ms_per_token']:.2f} |",
            flush=True,
        )
    print("\nPeak RSS (MB) once each pass has run, in the order they run:\n")
    print("| prompts | " + " | ".join(PASSES) + " |")
    print("| --- |" + " --- |" * len(PASSES))
    for r in rows:
        print(f"| {r['prompts']} | " + " | ".join(f"{r[f'{p}_rss_mb']:.0f}" for p in PASSES) + " |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
