"""The GPU check: `--device cuda` for the gated repair, `eval` and the subspace repair, and
the gated repair's memory and time on a model of Llama-3-8B's shape in bfloat16.

    python bench/gpu_check.py --out DIR                       # on a machine with CUDA
    python bench/gpu_check.py --device cpu --shape tiny --out DIR   # a dry run on the CPU

Run from the repository root with the package importable (`PYTHONPATH=.` where it is not
installed). Parts, each timed and reported on its own (one failing does not stop the rest):

1. `cli`: the CLI as a user runs it on the miniature chat model of `fixtures/`:
   `repair --method gate` in bfloat16 and float32 on the device, then one `eval` of ALIGNED,
   the attack and both repairs on the held-out split, on the device in bfloat16.
2. `passes`: a Llama of `--shape` (`8b`: hidden 4096, MLP 14,336, 32 layers, 32 heads, 8 KV
   heads, vocabulary 128,256; random weights, bfloat16, built on the device) with a random
   LoRA r=16 on all seven linear modules, rank-1 gates as the repair makes them. Each pass a
   round makes (`testbed/gate_memory.measure_passes`) at batch 8 and 16, over 100 and 400
   harmful prompts of the testbed's data and its 32 task prompts (tokenized with
   `--tokenizer`), after one untimed warm-up: milliseconds per token, peak memory per pass,
   and the repair's own estimate of the largest pass.
3. `gate`: the gated repair itself (`gate_repair`, defaults, batch 8) on that model, with a
   judge that calls an answer a refusal when it begins as ALIGNED's answer did (random
   weights refuse nothing, so ALIGNED's answers stand for refusals): wall time, setup and
   per-round seconds, peak memory.
4. `subspace`: `repair` (csulora) of `fixtures/llama-*` with `--device cuda` and on the
   CPU: the largest difference of the written factors.

Writes `gpu_check.json` (every figure) and `gpu_check.md` (the tables) to `--out` as it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "testbed"))
sys.path.insert(0, str(ROOT))

FIXTURES = ROOT / "fixtures"
PROMPTS = FIXTURES / "chat-prompts"
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 49152,
    },
}


class Report:
    """The figures of every part, written to `out` after each one."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.figures: dict[str, Any] = {}
        self.lines: list[str] = []

    def part(self, name: str, run: Callable[[], tuple[dict, list[str]]]) -> None:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            figures, lines = run()
        except Exception:  # report it and go on: each part is its own check
            figures, lines = (
                {"error": traceback.format_exc()},
                ["```", traceback.format_exc(), "```"],
            )
        figures["seconds"] = time.perf_counter() - start
        self.figures[name] = figures
        self.lines += [f"## {name} ({figures['seconds']:.0f} s)", "", *lines, ""]
        (self.out / "gpu_check.json").write_text(json.dumps(self.figures, indent=1))
        (self.out / "gpu_check.md").write_text("\n".join(self.lines))
        print("\n".join(lines), flush=True)


def cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "adapter_fix", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "ADAPTER_FIX_DEBUG": "1"},  # a traceback, should one come
    )
    return done, time.perf_counter() - start


def checked(done: subprocess.CompletedProcess, what: str) -> None:
    if done.returncode != 0:
        raise RuntimeError(f"{what}: exit {done.returncode}\n{done.stderr[-3000:]}")


def cli_part(device: str, scratch: Path) -> tuple[dict, list[str]]:
    """The miniature: gate repairs on `device` in two dtypes, then eval on `device`."""
    calibration = [
        *("--harmful", str(PROMPTS / "harmful-calib.jsonl")),
        *("--benign", str(PROMPTS / "benign-calib.jsonl")),
        *("--task", str(PROMPTS / "task-calib.jsonl")),
        *("--refusal-patterns", str(PROMPTS / "refusal-phrases.txt")),
        *("--calibration-share", "1"),
    ]
    figures: dict[str, Any] = {}
    outputs = []
    for dtype in ("bfloat16", "float32"):
        out = scratch / f"gate-{dtype}"
        done, seconds = cli(
            "repair",
            *(str(FIXTURES / name) for name in ("chat-base", "chat-aligned", "chat-attack")),
            *("-o", str(out), "--method", "gate", *calibration),
            *("--device", device, "--dtype", dtype, "-q"),
        )
        checked(done, f"repair --method gate --device {device} --dtype {dtype}")
        report = json.loads((out / "repair_report.json").read_text())
        figures[f"gate_{dtype}"] = {"seconds": seconds, "gate": report.get("gate")}
        outputs.append(out)
    done, seconds = cli(
        "eval",
        str(FIXTURES / "chat-aligned"),
        str(FIXTURES / "chat-attack"),
        *map(str, outputs),
        *("--harmful", str(PROMPTS / "harmful-eval.jsonl")),
        *("--benign", str(PROMPTS / "benign-eval.jsonl")),
        *("--task", str(PROMPTS / "task-eval.jsonl")),
        *("--refusal-patterns", str(PROMPTS / "refusal-phrases.txt")),
        *("--max-new-tokens", "48", "--batch-size", "64"),
        *("--device", device, "--dtype", "bfloat16", "--json", "-q"),
    )
    checked(done, f"eval --device {device} --dtype bfloat16")
    result = json.loads(done.stdout)
    figures["eval"] = {"seconds": seconds, "result": result}
    lines = [
        f"`repair --method gate --device {device}`: bfloat16 "
        f"{figures['gate_bfloat16']['seconds']:.1f} s, float32 "
        f"{figures['gate_float32']['seconds']:.1f} s (the CLI's wall time, start-up included); "
        f"`eval --device {device} --dtype bfloat16` of 4 rows: {seconds:.1f} s.",
        "",
        "| row | refusal | over-refusal | task EM |",
        "| --- | --- | --- | --- |",
    ]
    labels = ["ALIGNED", "attack", "gate bfloat16", "gate float32"]
    for label, row in zip(labels, rows_of(result), strict=False):
        lines.append(f"| {label} | {row} |")
    return figures, lines


def rows_of(result: dict) -> list[str]:
    """One `refusal | over-refusal | task` cell string per row of eval's JSON."""

    def rate(row: dict, key: str) -> str:
        value = (row.get(key) or {}).get("rate")
        return "-" if value is None else f"{value:.2f}"

    return [
        " | ".join(rate(row, key) for key in ("refusal", "over_refusal", "exact_match"))
        for row in result["rows"]
    ]


def build_model(shape: str, device: str, tokenizer_dir: Path) -> tuple[Any, Any, Any]:
    """A random Llama of `shape` in bfloat16 on `device` with a random LoRA (r=16, alpha 32,
    all seven linear modules) and rank-1 gates: (gated model, tokenizer, LoRA modules)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from adapter_fix.methods.gate import GatedModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=4096,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval()
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=list(MODULES), init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    peft_model.eval()
    names = [
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and name.endswith(MODULES)
    ]
    gated = GatedModel(peft_model, names, "component")
    return gated, tokenizer, len(names)


def testbed_prompts(model: Any, tokenizer: Any, count: int) -> tuple[list, list, list, list[int]]:
    """`count` harmful prompts and the 32 task prompts with references (ended by the first stop
    token, as the repair ends them), tokenized with the chat template; the compliance start."""
    import data

    from adapter_fix.evaluate.generate import encode_prompts, reference_ids, stop_ids

    harmful = [e.prompt for split in ("train", "calib", "eval") for e in data.harmful(split, 5)]
    harmful = (harmful * (count // len(harmful) + 1))[:count]
    task = data.task("calib", 32, 5)
    stops = stop_ids(model, tokenizer)
    return (
        encode_prompts(tokenizer, harmful, None),
        encode_prompts(tokenizer, [e.prompt for e in task], None),
        [reference_ids(tokenizer, e.reference, stops) for e in task],
        tokenizer(data.COMPLIANCE, add_special_tokens=False)["input_ids"],
    )


def passes_part(
    shape: str, device: str, tokenizer_dir: Path, state: dict
) -> tuple[dict, list[str]]:
    import torch
    from gate_memory import measure_passes

    from adapter_fix.evaluate.generate import pad_id, stop_ids
    from adapter_fix.methods.gate import Calibration
    from adapter_fix.options import GateOptions

    start = time.perf_counter()
    gated, tokenizer, modules = build_model(shape, device, tokenizer_dir)
    state.update(gated=gated, tokenizer=tokenizer)
    model = gated.model
    cuda = device == "cuda"
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    figures: dict[str, Any] = {
        "build_seconds": time.perf_counter() - start,
        "weights_gib": weights / 2**30,
        "lora_modules": modules,
        "gates": len(gated.values()),
        "allocated_gib": torch.cuda.memory_allocated() / 2**30 if cuda else None,
        "runs": [],
    }
    gated.set_values(torch.full_like(gated.values(), 0.5))
    pad, stops = pad_id(tokenizer), stop_ids(model, tokenizer)
    lines = [
        f"Model: {shape}, {weights / 2**30:.1f} GiB of bfloat16 weights with the LoRA, "
        f"{modules} LoRA modules, {len(gated.values())} rank-1 gates; built in "
        f"{figures['build_seconds']:.0f} s.",
        "",
        "| prompts | batch | generation batch | generation ms/prompt token | margin fwd+bwd "
        "ms/token | refusal check ms/token | task fwd+bwd ms/token | peak MiB: generation "
        "/ margin / check / task | estimate MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    # One untimed round of the passes first: CUDA's start-up (kernels, library handles) is
    # not a per-token cost.
    harmful, task, references, comply = testbed_prompts(model, tokenizer, 8)
    measure_passes(
        model,
        Calibration(harmful, [], task[:8], references[:8]),
        comply,
        pad=pad,
        stops=stops,
        options=GateOptions(batch_size=8),
    )
    for count, batch in ((100, 8), (100, 16), (400, 16)):
        harmful, task, references, comply = testbed_prompts(model, tokenizer, count)
        options = GateOptions(batch_size=batch)
        calibration = Calibration(harmful, [], task, references)
        r = measure_passes(model, calibration, comply, pad=pad, stops=stops, options=options)
        r.update(prompts=count)
        figures["runs"].append(r)
        peaks = " / ".join(
            f"{r.get(f'{name}_peak_mib', float('nan')):.0f}"
            for name in ("generate", "margin_backward", "refusal_check", "task_backward")
        )
        lines.append(
            f"| {count} | {batch} | {r['generation_batch']} | {r['generate_ms_per_token']:.2f} "
            f"| {r['margin_backward_ms_per_token']:.2f} | {r['refusal_check_ms_per_token']:.2f} "
            f"| {r['task_backward_ms_per_token']:.2f} | {peaks} "
            f"| {r.get('estimate_mib', float('nan')):.0f} |"
        )
    return figures, lines


def gate_part(state: dict, device: str) -> tuple[dict, list[str]]:
    """gate_repair at its defaults (batch 8) on the built model, with a judge that calls an
    answer a refusal when it begins as ALIGNED's answer to the same prompt did."""
    import torch

    from adapter_fix.evaluate.generate import pad_id, stop_ids
    from adapter_fix.methods.gate import Calibration, gate_repair
    from adapter_fix.options import GateOptions

    if "gated" not in state:
        raise RuntimeError("the gate part runs on the model the passes part builds: run both")
    gated, tokenizer = state["gated"], state["tokenizer"]
    gated.set_values(torch.ones_like(gated.values()))
    harmful, task, references, _comply = testbed_prompts(gated.model, tokenizer, 100)
    aligned: dict[tuple, str] = {}

    def decode(tokens: list[int]) -> str:
        return " ".join(map(str, tokens))

    def judge(prompts: Any, answers: list[str]) -> list[bool]:
        """A refusal: an answer whose first 4 tokens (or all, if fewer) are ALIGNED's."""
        verdicts = []
        for prompt, answer in zip(prompts, answers, strict=True):
            key = tuple(prompt)
            if key not in aligned:  # the first call: ALIGNED's own answers
                aligned[key] = answer.split()
            start = aligned[key][:4]
            verdicts.append(bool(start) and answer.split()[: len(start)] == start)
        return verdicts

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rounds: list[str] = []
    outcome = gate_repair(
        gated,
        Calibration(harmful, [], task, references),
        GateOptions(batch_size=8),
        judge_refusals=judge,
        decode=decode,
        pad_id=pad_id(tokenizer),
        stop_ids=stop_ids(gated.model, tokenizer),
        on_round=lambda r: rounds.append(
            f"round {r.index}: {len(r.switched_off)} units off, {r.seconds:.1f} s, "
            f"refusals {r.refusals}/{r.prompts}"
        ),
    )
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    figures = {
        "seconds_total": outcome.seconds,
        "setup_seconds": outcome.setup_seconds,
        "rounds": [r.seconds for r in outcome.rounds],
        "stop_reason": outcome.stop_reason,
        "peak_allocated_gib": peak,
        "refusal": [outcome.original_refusal_rate, outcome.refusal_rate],
    }
    lines = [
        f"gate_repair: {outcome.seconds:.1f} s in all, setup {outcome.setup_seconds:.1f} s, "
        f"{len(outcome.rounds)} round(s); stop: {outcome.stop_reason}; peak allocated "
        f"{'-' if peak is None else f'{peak:.1f} GiB'}; refusal share "
        f"{outcome.original_refusal_rate:.2f} -> {outcome.refusal_rate:.2f}.",
        "",
        *(f"- {line}" for line in rounds),
    ]
    return figures, lines


def subspace_part(device: str, scratch: Path) -> tuple[dict, list[str]]:
    from safetensors.torch import load_file

    inputs = [str(FIXTURES / name) for name in ("llama-base", "llama-aligned", "llama-lora")]
    written, seconds = {}, {}
    for where in dict.fromkeys((device, "cpu")):
        out = scratch / f"csulora-{where}"
        done, seconds[where] = cli("repair", *inputs, "-o", str(out), "--device", where, "-q")
        checked(done, f"repair --device {where}")
        written[where] = load_file(str(out / "adapter_model.safetensors"))
    first, second = written[device], written["cpu"]
    largest = max(
        float(
            (first[k].float() - second[k].float()).abs().max()
            / max(float(second[k].float().abs().max()), 1e-30)
        )
        for k in second
    )
    figures = {"seconds": seconds, "largest_relative_difference": largest}
    return figures, [
        f"`repair` (csulora) of fixtures/llama-*: {device} {seconds[device]:.1f} s, cpu "
        f"{seconds['cpu']:.1f} s; largest difference of a written factor against the CPU's, "
        f"relative to its largest entry: {largest:.2e}."
    ]


def environment(device: str) -> tuple[dict, list[str]]:
    import peft
    import torch
    import transformers

    figures = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.machine(),
        "cpus": os.cpu_count(),
    }
    return figures, [", ".join(f"{k} {v}" for k, v in figures.items())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=ROOT / "bench" / "_work" / "testbed" / "aligned",
        help="a folder with the testbed's tokenizer files (SmolLM2's: tokenizer.json, "
        "tokenizer_config.json, chat_template.jinja); the default exists once `make "
        "efficacy` has built the testbed",
    )
    parser.add_argument(
        "--parts", nargs="+", default=["cli", "passes", "gate", "subspace"], help="which parts"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out)
    state: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        report.part("environment", lambda: environment(args.device))
        if "cli" in args.parts:
            report.part("cli", lambda: cli_part(args.device, Path(scratch)))
        if "passes" in args.parts:
            report.part(
                "passes", lambda: passes_part(args.shape, args.device, args.tokenizer, state)
            )
        if "gate" in args.parts:
            report.part("gate", lambda: gate_part(state, args.device))
        if "subspace" in args.parts:
            report.part("subspace", lambda: subspace_part(args.device, Path(scratch)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
