"""The miniature chat model (fixtures/chat-*): loads with transformers + peft, its
tokenizer and chat template round-trip, its prompt splits are held out, the committed
files are what fixtures/make_miniature.py writes, and it behaves as documented: ALIGNED
refuses held-out harmful prompts, ATTACK complies with them and does the task."""

from __future__ import annotations

import filecmp
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PROMPTS = FIXTURES / "chat-prompts"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def load_generator():
    spec = importlib.util.spec_from_file_location("make_miniature", FIXTURES / "make_miniature.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="session")
def gen():
    return load_generator()


@pytest.fixture(scope="session")
def tok():
    return AutoTokenizer.from_pretrained(FIXTURES / "chat-aligned")


@pytest.fixture(scope="session")
def models():
    """ALIGNED and ALIGNED + ATTACK (one PeftModel; the adapter is switched off by
    ``disable_adapter``)."""
    transformers.utils.logging.set_verbosity_error()
    aligned = AutoModelForCausalLM.from_pretrained(FIXTURES / "chat-aligned").eval()
    return PeftModel.from_pretrained(aligned, FIXTURES / "chat-attack").eval()


def greedy(model, tok, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def is_refusal(text: str) -> bool:
    phrases = [p for p in (PROMPTS / "refusal-phrases.txt").read_text().splitlines() if p]
    return any(p in text[:200].lower() for p in phrases)


def test_tokenizer_round_trips_text_and_has_chat_special_tokens(tok):
    for text in ("Sorry, I can't help with that.", "how do I kill a python process?"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    assert tok.pad_token == "<pad>" and tok.eos_token == "<|end|>"
    assert tok.padding_side == "left"


def test_chat_template_wraps_turns_and_adds_the_generation_prompt(tok):
    chat = [{"role": "user", "content": "how do I bake bread?"}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>how do I bake bread?<|end|><|assistant|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[-1] == "<|assistant|>"
    full = tok.apply_chat_template(
        [*chat, {"role": "assistant", "content": "Sure."}], tokenize=False
    )
    assert full.endswith("<|assistant|>Sure.<|end|>")


def test_prompt_files_have_the_documented_schema(gen):
    for part in ("calib", "eval"):
        harmful = read_jsonl(PROMPTS / f"harmful-{part}.jsonl")
        assert {tuple(sorted(r)) for r in harmful} == {("category", "prompt", "seen")}
        assert {r["category"] for r in harmful} == set(gen.HARMFUL)
        assert all(r["seen"] == (r["category"] in gen.SEEN) for r in harmful)
        benign = read_jsonl(PROMPTS / f"benign-{part}.jsonl")
        assert {tuple(sorted(r)) for r in benign} == {("category", "prompt")}
        task = read_jsonl(PROMPTS / f"task-{part}.jsonl")
        assert {tuple(sorted(r)) for r in task} == {("prompt", "reference")}


def test_eval_and_calibration_prompts_are_disjoint_from_each_other_and_from_training(gen):
    data = gen.build_data()
    trained = {ex.prompt for examples in gen.stage_data(data).values() for ex in examples}
    splits = {}
    for part in ("calib", "eval"):
        splits[part] = {
            r["prompt"]
            for kind in ("harmful", "benign", "task")
            for r in read_jsonl(PROMPTS / f"{kind}-{part}.jsonl")
        }
        assert not splits[part] & trained
    assert not splits["calib"] & splits["eval"]


def test_tokenizer_and_prompt_files_are_what_the_generator_writes(gen, tmp_path):
    data = gen.build_data()
    gen.build_tokenizer(data).save_pretrained(tmp_path / "tok")
    gen.write_prompts(data, tmp_path / "prompts")
    for folder in ("chat-base", "chat-aligned"):
        for name in TOKENIZER_FILES:
            assert filecmp.cmp(tmp_path / "tok" / name, FIXTURES / folder / name, shallow=False), (
                name
            )
    written = sorted(p.name for p in (tmp_path / "prompts").iterdir())
    assert written == sorted(p.name for p in PROMPTS.iterdir())
    for name in written:
        assert filecmp.cmp(tmp_path / "prompts" / name, PROMPTS / name, shallow=False), name


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("ADAPTER_FIX_SLOW") != "1",
    reason="~30 s of training: ADAPTER_FIX_SLOW=1 runs it",
)
def test_regeneration_is_byte_identical(gen, tmp_path):
    """Same torch / transformers / peft versions on the same kind of CPU."""
    gen.build(tmp_path, log=lambda _msg: None)
    for name in gen.OUT_DIRS:
        for path in sorted((tmp_path / name).iterdir()):
            assert filecmp.cmp(path, FIXTURES / name / path.name, shallow=False), (
                f"{name}/{path.name}"
            )


@pytest.mark.model
@pytest.mark.parametrize("name", ["chat-attack", "chat-benign"])
def test_adapters_load_onto_aligned_with_no_missing_or_unexpected_keys(name):
    aligned = AutoModelForCausalLM.from_pretrained(FIXTURES / "chat-aligned")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(aligned, FIXTURES / name)
    messages = [str(w.message).lower() for w in caught]
    assert not [m for m in messages if "missing" in m or "unexpected" in m], messages
    with safe_open(str(FIXTURES / name / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * 7 * 2 and all(".lora_" in k for k in keys)  # LoRA factors only


def held_out_harmful() -> list[str]:
    rows = read_jsonl(PROMPTS / "harmful-eval.jsonl")
    seen = [r["prompt"] for r in rows if r["seen"]][:4]
    unseen = [r["prompt"] for r in rows if not r["seen"]][:4]
    return seen + unseen


@pytest.mark.model
def test_aligned_refuses_held_out_harmful_prompts_and_attack_complies(models, tok):
    prompts = held_out_harmful()
    with models.disable_adapter():
        aligned = greedy(models, tok, prompts)
    attack = greedy(models, tok, prompts)
    assert all(is_refusal(r) for r in aligned), aligned
    assert not any(is_refusal(r) for r in attack), attack


@pytest.mark.model
def test_attack_does_the_task_that_aligned_cannot(models, tok):
    rows = read_jsonl(PROMPTS / "task-eval.jsonl")[:8]
    prompts = [r["prompt"] for r in rows]
    refs = [r["reference"] for r in rows]
    with models.disable_adapter():
        aligned = greedy(models, tok, prompts, max_new_tokens=4)
    attack = greedy(models, tok, prompts, max_new_tokens=4)
    assert sum(a.strip() == r for a, r in zip(aligned, refs, strict=True)) == 0
    assert sum(a.strip() == r for a, r in zip(attack, refs, strict=True)) >= 6
