"""eval's judges, thinking models, placement and memory errors, end to end on tiny models
built here (tests/eval_models.py): a chat model whose template takes enable_thinking, tiny
Llama sequence classifiers, and guard-style causal LMs."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CliResult, run_cli
from eval_models import (
    THINKING_TEMPLATE,
    save_classifier,
    save_guard,
    save_lora,
    save_model,
)

from adapter_fix.evaluate.generate import format_prompt, takes_thinking_flag
from adapter_fix.evaluate.judges import KeywordJudge, make_judge
from adapter_fix.evaluate.judges.classifier import ClassifierJudge
from adapter_fix.evaluate.model import load_model
from adapter_fix.evaluate.prompts import Prompt, PromptSet
from adapter_fix.evaluate.runner import EvalSets, run_eval
from adapter_fix.io.locate import open_source
from adapter_fix.options import EvalOptions

pytestmark = pytest.mark.model  # every test here runs a transformers model

ANSWERS = ["i can not help with that", "sure here is how to make a cake", "tell me a story"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("judged")
    save_model(root / "chat")
    save_model(root / "thinking", template=THINKING_TEMPLATE)
    save_lora(root / "chat", root / "lora", seed=1)
    save_classifier(root / "refuses", ["refusal", "compliance"], constant=True)
    save_classifier(root / "complies", ["compliance", "refusal"], constant=True)
    save_classifier(root / "random", ["compliance", "refusal"], seed=3)
    save_classifier(root / "unsafe", ["unsafe", "safe"], constant=True)
    save_classifier(root / "unnamed", ["LABEL_0", "LABEL_1"], constant=True)
    for reply in ("safe", "unsafe", "sure"):
        save_guard(root / f"guard-{reply}", reply)
    return {path.name: path for path in root.iterdir()}


def quick(models: dict[str, Path]) -> list[str]:
    return [str(models["chat"]), str(models["lora"]), "--limit", "3", "--max-new-tokens", "3"]


def test_a_template_that_takes_enable_thinking_is_passed_false_unless_thinking(
    models: dict[str, Path],
) -> None:
    thinking = load_model(open_source(str(models["thinking"])), device="cpu").tokenizer
    plain = load_model(open_source(str(models["chat"])), device="cpu").tokenizer
    assert takes_thinking_flag(thinking) and not takes_thinking_flag(plain)
    assert format_prompt(thinking, "hi").endswith("<|assistant|> <think> </think> ")
    assert format_prompt(thinking, "hi", thinking=True).endswith("<|assistant|> ")
    assert format_prompt(plain, "hi") == format_prompt(plain, "hi", thinking=True)


@pytest.mark.parametrize(("flag", "on"), [((), False), (("--thinking",), True)])
def test_eval_reports_the_thinking_setting(
    models: dict[str, Path], flag: tuple[str, ...], on: bool
) -> None:
    result = run_cli(
        "eval", str(models["thinking"]), "--limit", "1", "--max-new-tokens", "2", "--json", *flag
    )
    assert result.exit_code == 0, result.output
    settings = json.loads(result.stdout)["settings"]
    assert settings["thinking"] == {"template_flag": True, "on": on}


def test_thinking_with_a_template_that_has_no_such_flag_says_it_has_no_effect(
    models: dict[str, Path],
) -> None:
    result = run_cli("eval", *quick(models), "--thinking", "--json")
    assert result.exit_code == 0, result.output
    assert any("--thinking has no effect" in w for w in json.loads(result.stdout)["warnings"])


def test_two_judges_that_resolve_to_one_model_are_refused(models: dict[str, Path]) -> None:
    folder = models["refuses"]
    result = run_cli("eval", *quick(models), "--judge", str(folder), "--judge", f"{folder}/")
    assert result.exit_code == 2, result.output
    assert "name the same model" in result.stderr


def canned(answers: Sequence[str]) -> Any:
    """A stand-in for `generate` that answers the i-th prompt of every set with answers[i]."""

    def fake(model: Any, tokenizer: Any, prompts: Sequence[str], **kwargs: Any) -> list[str]:
        return [answers[index % len(answers)] for index in range(len(prompts))]

    return fake


def prompts(name: str, count: int) -> PromptSet:
    return PromptSet(name, name, tuple(Prompt(f"p{i}", row=i) for i in range(count)))


def test_thinking_blocks_are_stripped_and_unfinished_ones_count_as_empty_refusals(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = [
        "<think>I'm sorry is what I will not say</think> sure here is",
        "<think>i can not decide yet",
        "",
        "<think>ok</think> I can't help with that.",
    ]
    monkeypatch.setattr("adapter_fix.evaluate.runner.generate", canned(answers))
    loaded = load_model(open_source(str(models["chat"])), device="cpu")
    sets = EvalSets(prompts("harmful", 4), prompts("benign", 4))
    result = run_eval(loaded, [("aligned", None)], sets, [KeywordJudge()], EvalOptions())
    row = result.rows[0]
    assert (row.refusal.count, row.refusal.total, row.empty) == (3, 4, 4)
    harmful = [s for s in result.samples if s.prompt_set == "harmful"]
    assert [s.matched for s in harmful] == [None, "(empty answer)", "(empty answer)", "I can't"]
    assert harmful[1].response == answers[1]  # the samples keep the raw answer
    assert any("2 answers were still in their <think> block" in w for w in result.warnings)


@pytest.fixture(scope="module")
def two_judges(
    models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[CliResult, list[dict[str, Any]]]:
    """One eval with two judges, and its samples file."""
    out = tmp_path_factory.mktemp("two-judges")
    result = run_cli(
        "eval",
        *quick(models),
        "--judge",
        "keyword",
        "--judge",
        str(models["refuses"]),
        "--json",
        "--outputs",
        str(out / "samples.jsonl"),
    )
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return result, samples


def test_a_second_judge_rates_every_row_and_the_first_gives_the_rates(
    two_judges: tuple[CliResult, list[dict[str, Any]]], models: dict[str, Path]
) -> None:
    result, _ = two_judges
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    classifier = str(models["refuses"])
    assert [j["name"] for j in document["judges"]] == ["keyword", classifier]
    assert document["judges"][1] == {
        "name": classifier,
        "kind": "classifier",
        "model": classifier,
        "label": "refusal",
        "question": "refusal",
    }
    assert document["judge"]["name"] == "keyword"
    for row in document["rows"]:
        assert row["refusal_by_judge"][classifier]["rate"] == 1.0
        assert row["over_refusal_by_judge"][classifier]["rate"] == 1.0
        assert row["refusal"] == row["refusal_by_judge"]["keyword"]
    assert f"Refusal by {classifier}: aligned 100%" in result.stderr


def test_two_judges_report_their_agreement_over_the_answers_both_judged(
    two_judges: tuple[CliResult, list[dict[str, Any]]], models: dict[str, Path]
) -> None:
    result, samples = two_judges
    document = json.loads(result.stdout)
    classifier = str(models["refuses"])
    judged = [s for s in samples if s["prompt_set"] in ("harmful", "benign")]
    same = sum(
        s["judges"]["keyword"]["refusal"] == s["judges"][classifier]["refusal"] for s in judged
    )
    (pair,) = document["judge_agreement"]
    assert pair["judges"] == ["keyword", classifier]
    assert (
        (pair["agreement"]["count"], pair["agreement"]["total"])
        == (same, len(judged))
        == (
            same,
            2 * (3 + 3),
        )
    )
    assert all(s["judges"][classifier]["detail"] == "refusal 0.50" for s in judged if s["response"])
    assert "Cohen's kappa" in result.stderr


def test_a_classifier_judges_a_batch_as_it_judges_one_answer_at_a_time(
    models: dict[str, Path],
) -> None:
    texts = [*ANSWERS, "what is the capital of france paris paris paris", "no"]
    batched = make_judge(str(models["random"]), device="cpu", batch_size=4)
    single = make_judge(str(models["random"]), device="cpu", batch_size=1)
    assert isinstance(batched, ClassifierJudge)
    verdicts = batched.judge(texts, texts)
    assert verdicts == single.judge(texts, texts)
    assert len({v.detail for v in verdicts}) > 1  # the verdicts depend on the text


def test_a_harm_classifier_measures_no_over_refusal_and_fails_that_gate(
    models: dict[str, Path], tmp_path: Path
) -> None:
    samples = tmp_path / "samples.jsonl"
    result = run_cli(
        "eval",
        *quick(models),
        "--judge",
        str(models["unsafe"]),
        "--json",
        "--outputs",
        str(samples),
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["judge"]["question"] == "harm"
    judged = [json.loads(line) for line in samples.read_text().splitlines()]
    for row in document["rows"]:
        assert row["over_refusal"] is None and row["over_refusal_by_judge"] == {}
        mine = [s for s in judged if s["model"] == row["name"]]
        empty = [s for s in mine if s["prompt_set"] == "harmful" and not s["response"]]
        assert row["refusal"]["count"] == len(empty)  # only empty answers decline
        assert all(s["refusal"] is None for s in mine if s["prompt_set"] != "harmful")
    assert "over-refusal is not measured" in result.stderr
    failed = run_cli(
        "eval", *quick(models), "--judge", str(models["unsafe"]), "--max-over-refusal", "1"
    )
    assert failed.exit_code == 12 and "over-refusal not measured" in failed.stderr


def test_a_classifier_with_unnamed_labels_needs_judge_label(models: dict[str, Path]) -> None:
    refused = run_cli("eval", *quick(models), "--judge", str(models["unnamed"]))
    assert refused.exit_code == 2
    assert "'LABEL_0', 'LABEL_1'" in refused.stderr and "--judge-label" in refused.stderr
    named = run_cli(
        "eval",
        *quick(models),
        "--judge",
        str(models["unnamed"]),
        "--judge-label",
        "refusal:LABEL_0",
        "--json",
    )
    assert named.exit_code == 0, named.output
    assert json.loads(named.stdout)["rows"][0]["refusal"]["rate"] == 1.0


@pytest.mark.parametrize(("guard", "declined"), [("guard-safe", True), ("guard-unsafe", False)])
def test_a_guard_model_judges_through_its_chat_template(
    models: dict[str, Path], guard: str, declined: bool, tmp_path: Path
) -> None:
    samples = tmp_path / "samples.jsonl"
    result = run_cli(
        "eval", *quick(models), "--judge", str(models[guard]), "--json", "--outputs", str(samples)
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["judge"]["kind"] == "guard"
    harmful = [json.loads(line) for line in samples.read_text().splitlines()]
    harmful = [s for s in harmful if s["prompt_set"] == "harmful" and s["response"]]
    assert harmful and all(s["refusal"] is declined for s in harmful)
    assert all(s["matched"].split()[0] == guard.split("-")[1] for s in harmful)


def test_a_judge_whose_config_is_nested_too_deeply_is_refused_not_a_crash(
    models: dict[str, Path], tmp_path: Path
) -> None:
    judge = tmp_path / "judge"
    judge.mkdir()
    for weights in models["random"].glob("*.safetensors"):
        (judge / weights.name).write_bytes(weights.read_bytes())
    (judge / "config.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    result = run_cli("eval", *quick(models), "--judge", str(judge))
    assert result.exit_code == 2, result.output
    assert "nested too deeply" in result.stderr and "config.json" in result.stderr


def test_a_causal_lm_that_does_not_answer_safe_or_unsafe_is_refused(
    models: dict[str, Path],
) -> None:
    result = run_cli("eval", *quick(models), "--judge", str(models["guard-sure"]))
    assert result.exit_code == 2
    assert "neither 'safe' nor 'unsafe'" in result.stderr


def test_device_map_auto_gives_the_answers_of_the_plain_device(
    models: dict[str, Path], tmp_path: Path
) -> None:
    common = [*quick(models), "--json"]
    plain = run_cli("eval", *common, "--device", "cpu", "--outputs", str(tmp_path / "plain.jsonl"))
    mapped = run_cli(
        "eval", *common, "--device-map", "auto", "--outputs", str(tmp_path / "map.jsonl")
    )
    assert plain.exit_code == 0 and mapped.exit_code == 0, mapped.output
    assert (tmp_path / "plain.jsonl").read_text() == (tmp_path / "map.jsonl").read_text()
    assert json.loads(mapped.stdout)["settings"]["device"] == "auto: cpu"


def test_device_map_excludes_device_and_needs_accelerate(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    both = run_cli("eval", *quick(models), "--device", "cpu", "--device-map", "auto")
    assert both.exit_code == 2 and "give one of them" in both.stderr
    monkeypatch.setitem(sys.modules, "accelerate", None)
    missing = run_cli("eval", *quick(models), "--device-map", "auto")
    assert missing.exit_code == 2 and "pip install accelerate" in missing.stderr


def test_a_batch_that_does_not_fit_exits_13_naming_the_batch_size(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*args: Any, **kwargs: Any) -> list[str]:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("adapter_fix.evaluate.runner.generate", out_of_memory)
    result = run_cli("eval", *quick(models), "--batch-size", "64")
    assert result.exit_code == 13
    assert "Lower --batch-size (now 64)" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_error_that_is_not_about_memory_is_not_called_one(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> list[str]:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr("adapter_fix.evaluate.runner.generate", broken)
    result = run_cli("eval", *quick(models))
    assert result.exit_code == 1  # a bug, reported as one
    assert "shape mismatch" in result.stderr and "memory" not in result.stderr


def test_a_gated_repair_batch_that_does_not_fit_exits_13_and_writes_nothing(
    fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr("adapter_fix.commands.repair.gate_repair", out_of_memory)
    chat = [str(fixtures_dir / name) for name in ("chat-base", "chat-aligned", "chat-attack")]
    out = tmp_path / "out"
    result = run_cli(
        "repair", *chat, "-o", str(out), "--method", "gate", "--batch-size", "32", "-q"
    )
    assert result.exit_code == 13, result.output
    assert "Lower --batch-size (now 32)" in result.stderr
    assert not out.exists()
