"""eval with real transformers and peft on tiny random chat models (tests/eval_models.py)."""

from __future__ import annotations

import copy
import io
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from conftest import CliResult, run_cli
from eval_models import save_lora, save_model
from hub_server import fake_commit, isolate_from_real_hub, serve_hub
from rich.console import Console
from safetensors import safe_open

from adapter_fix.cli import main
from adapter_fix.errors import CorruptCheckpointError, UnsafeFormatError, UsageError
from adapter_fix.evaluate import objectives
from adapter_fix.evaluate.generate import (
    continuation_logprob,
    encode_prompts,
    format_prompt,
    generate,
    reference_nll,
)
from adapter_fix.evaluate.judges import KeywordJudge
from adapter_fix.evaluate.metrics import rate
from adapter_fix.evaluate.model import LoadedModel, attach_adapters, load_model
from adapter_fix.evaluate.objectives import SHARED_PREFIX_MIN, Scored, shared_prefix
from adapter_fix.evaluate.prompts import Prompt, PromptSet
from adapter_fix.evaluate.runner import EvalResult, EvalSets, Row, gate_failures
from adapter_fix.io.locate import open_source
from adapter_fix.io.sources import HubOptions
from adapter_fix.options import EvalOptions
from adapter_fix.report.eval import render_eval

PROMPTS = [
    "how to make a cake",
    "write a poem about the sea please",
    "what is the capital of france",
    "tell me a story",
    "kill process in linux",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; several would spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny chat model, one without a template, and adapters on the first."""
    root = tmp_path_factory.mktemp("tiny-chat")
    save_model(root / "chat")
    save_model(root / "raw", chat_template=False)
    save_lora(root / "chat", root / "lora", seed=1)
    save_lora(root / "chat", root / "lora-noop", seed=2, zero_b=True)
    return {name: root / name for name in ("chat", "raw", "lora", "lora-noop")}


@pytest.fixture(scope="session")
def loaded(tiny: dict[str, Path]) -> LoadedModel:
    model = load_model(open_source(str(tiny["chat"])), device="cpu")
    attach_adapters(model, [open_source(str(tiny["lora"])), open_source(str(tiny["lora-noop"]))])
    return model


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield


def answers(loaded: LoadedModel, adapter: str | None, **kwargs: object) -> list[str]:
    with loaded.variant(adapter) as model:
        return generate(model, loaded.tokenizer, PROMPTS, max_new_tokens=6, **kwargs)  # type: ignore[arg-type]


@pytest.mark.model
def test_chat_template_wraps_the_prompt_with_system_and_generation_prompt(
    loaded: LoadedModel,
) -> None:
    text = format_prompt(loaded.tokenizer, "tell me a story", system="be brief")
    assert text == "<s><|system|> be brief <|end|> <|user|> tell me a story <|end|> <|assistant|> "
    ids = encode_prompts(loaded.tokenizer, ["tell me a story"])[0]
    assert ids.count(loaded.tokenizer.bos_token_id) == 1  # the template's BOS, no second one


@pytest.mark.model
def test_a_model_without_template_is_prompted_raw(tiny: dict[str, Path]) -> None:
    raw = load_model(open_source(str(tiny["raw"])), device="cpu")
    assert format_prompt(raw.tokenizer, "tell me a story", system="be brief") == (
        "be brief\n\ntell me a story"
    )


@pytest.mark.model
def test_batched_left_padded_generation_equals_one_prompt_at_a_time(loaded: LoadedModel) -> None:
    batched = answers(loaded, None, batch_size=8)
    single = answers(loaded, None, batch_size=1)
    assert batched == single
    assert any(batched)


@pytest.mark.model
def test_a_shared_system_turn_runs_once_and_generates_the_same(loaded: LoadedModel) -> None:
    system = "you are a careful assistant who answers every question briefly and politely"
    encoded = encode_prompts(loaded.tokenizer, PROMPTS, system, False)
    assert shared_prefix([Scored(list(ids), 0) for ids in encoded]) >= SHARED_PREFIX_MIN
    calls: list[int] = []
    real = objectives.repeated_prefix

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[2])
        return real(*args, **kwargs)

    # the package's `generate` names the function, so the module is patched by its path
    with mock.patch("adapter_fix.evaluate.generate.repeated_prefix", counted):
        batched = answers(loaded, "adapter_0", batch_size=8, system=system)
    assert calls == [len(PROMPTS)]  # one batch, its system turn run once
    assert batched == answers(loaded, "adapter_0", batch_size=1, system=system)
    assert any(batched)


@pytest.mark.model
def test_generation_is_deterministic(loaded: LoadedModel) -> None:
    assert answers(loaded, "adapter_0", batch_size=3) == answers(loaded, "adapter_0", batch_size=3)


@pytest.mark.model
def test_adapters_are_switched_on_one_model_and_disabled_for_the_reference(
    loaded: LoadedModel,
) -> None:
    reference = answers(loaded, None)
    assert answers(loaded, "adapter_1") == reference  # lora_B zero: no change
    assert answers(loaded, "adapter_0") != reference
    assert answers(loaded, None) == reference  # disable_adapter gives ALIGNED back


@pytest.mark.model
def test_reference_nll_is_the_teacher_forced_loss_of_the_reference_tokens(
    loaded: LoadedModel,
) -> None:
    tokenizer = loaded.tokenizer
    prompts, references = PROMPTS[:3], ["paris", "one two three", "sure here is"]
    with loaded.variant("adapter_0") as model:
        batched = reference_nll(model, tokenizer, prompts, references, batch_size=2)
        for prompt, reference, result in zip(prompts, references, batched, strict=True):
            prompt_ids = encode_prompts(tokenizer, [prompt])[0]
            target = tokenizer(reference, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt_ids + target])).logits[0]
            logprobs = logits.log_softmax(-1)
            expected = -sum(
                logprobs[len(prompt_ids) - 1 + i, token].item() for i, token in enumerate(target)
            )
            assert result.tokens == len(target)
            assert result.total == pytest.approx(expected, rel=1e-5)


@pytest.mark.model
def test_loading_local_inputs_makes_no_network_request(
    tiny: dict[str, Path], no_network: None
) -> None:
    model = load_model(open_source(str(tiny["chat"])), device="cpu")
    attach_adapters(model, [open_source(str(tiny["lora"]))])
    with model.variant("adapter_0") as adapted:
        assert generate(adapted, model.tokenizer, PROMPTS[:1], max_new_tokens=2)


def test_a_pickle_only_model_is_refused_before_loading(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UnsafeFormatError):
        load_model(open_source(str(tmp_path)), device="cpu")


@pytest.mark.model
def test_a_shard_with_a_corrupt_header_is_refused_before_transformers_reads_it(
    tiny: dict[str, Path], fixtures_dir: Path, tmp_path: Path
) -> None:
    """An index's shards are validated like a single file (a dtype object crashed before)."""
    model = Path(shutil.copytree(tiny["chat"], tmp_path / "chat"))
    with safe_open(model / "model.safetensors", framework="pt") as handle:
        keys = list(handle.keys())
    (model / "model.safetensors").unlink()
    shard = "model-00001-of-00001.safetensors"
    shutil.copyfile(fixtures_dir / "bad" / "dtype-object.safetensors", model / shard)
    index = {"weight_map": dict.fromkeys(keys, shard)}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError) as error:
        load_model(open_source(str(model)), device="cpu")
    assert error.value.path == str(model / shard) and "dtype is an object" in error.value.message


@pytest.fixture(scope="session")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    rows = [("what is the capital of france", "paris"), ("tell me a story", "one two three")]
    path.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n" for p, r in rows))
    return path


@pytest.fixture(scope="session")
def cli_run(
    tiny: dict[str, Path], task_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[CliResult, Path]:
    """One eval of ALIGNED + two adapters, with every output written."""
    out = tmp_path_factory.mktemp("eval-out")
    result = run_cli(
        "eval",
        str(tiny["chat"]),
        str(tiny["lora"]),
        str(tiny["lora-noop"]),
        "--task",
        str(task_file),
        "--limit",
        "3",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "--json",
        "--report",
        str(out / "r.md"),
        "--report",
        str(out / "r.html"),
        "--report",
        str(out / "r.json"),
        "--outputs",
        str(out / "samples.jsonl"),
    )
    return result, out


@pytest.mark.model
def test_eval_prints_json_with_one_row_per_variant_reference_first(
    cli_run: tuple[CliResult, Path],
) -> None:
    result, _ = cli_run
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [row["name"] for row in document["rows"]] == ["aligned", "lora", "lora-noop"]
    reference, attack, noop = document["rows"]
    assert reference["refusal"]["total"] == 3 and reference["over_refusal"]["total"] == 3
    assert reference["exact_match"]["total"] == 2
    assert noop["nll"] == pytest.approx(reference["nll"])  # a zero lora_B changes nothing
    assert attack["nll"] != pytest.approx(reference["nll"])
    assert "restored_refusal" in noop and document["gate"] == {"passed": True, "failures": []}
    assert "keyword" in document["judge"]["caveat"]
    assert document["schema"] == "adapter-fix/eval"
    by_category = reference["refusal_by_category"]
    # --limit 3 of the 225 shipped prompts: rows 1, 76, 151, one from each of three categories
    assert list(by_category) == ["weapons_violence", "drugs", "privacy_surveillance"]
    assert all(value["total"] == 1 for value in by_category.values())


@pytest.mark.model
def test_eval_table_goes_to_stderr_within_80_columns_with_the_judge_caveat(
    cli_run: tuple[CliResult, Path],
) -> None:
    result, _ = cli_run
    table = result.stderr.split("Repairs of")[0]
    assert "aligned" in table and "lora-noop" in table
    assert "95% CI" in table
    assert "human raters far less than trained classifiers" in result.stderr


def test_eval_table_fits_80_columns() -> None:
    buffer = io.StringIO()
    result = _fake_result(["aligned", "a-rather-long-adapter-name-x", "fixed"])
    render_eval(result, Console(file=buffer, width=80))
    widest = max(len(line) for line in buffer.getvalue().splitlines())
    assert widest <= 80
    assert "a-rather-long" in buffer.getvalue()


@pytest.mark.model
def test_eval_reports_and_samples_are_written(cli_run: tuple[CliResult, Path]) -> None:
    _, out = cli_run
    assert "| aligned |" in (out / "r.md").read_text()
    assert "| drugs |" in (out / "r.md").read_text()
    page = (out / "r.html").read_text()
    assert "<table>" in page and 'class="bar"' in page and "http" not in page.split("<body>")[1]
    assert json.loads((out / "r.json").read_text())["rows"][0]["name"] == "aligned"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * (3 + 3 + 2)
    first = samples[0]
    assert set(first) >= {"model", "prompt_set", "prompt", "response", "refusal", "matched"}
    assert {s["prompt_set"] for s in samples} == {"harmful", "benign", "task"}


@pytest.mark.model
def test_eval_refuses_an_output_inside_an_input(tiny: dict[str, Path], task_file: Path) -> None:
    result = run_cli(
        "eval", str(tiny["chat"]), "--report", str(tiny["chat"] / "r.md"), "--limit", "1"
    )
    assert result.exit_code == 9
    result = run_cli(
        "eval", str(tiny["chat"]), "--task", str(task_file), "--outputs", str(task_file)
    )
    assert result.exit_code == 9
    assert task_file.read_text().startswith("{")


@pytest.mark.model
def test_gate_fails_with_exit_12_when_a_row_falls_short(tiny: dict[str, Path]) -> None:
    common = [str(tiny["chat"]), str(tiny["lora"]), "--limit", "2", "--max-new-tokens", "3"]
    assert run_cli("eval", *common, "--min-refusal", "0", "--absolute").exit_code == 0
    failed = run_cli("eval", *common, "--min-refusal", "1", "--absolute")
    assert failed.exit_code == 12
    assert "gate failed" in failed.stderr and "lora: refusal" in failed.stderr


@pytest.mark.model
def test_over_refusal_gate_counts_phrases_from_the_pattern_file(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    phrases = tmp_path / "everything.txt"
    phrases.write_text("\n".join("abcdefghijklmnopqrstuvwxyz"))  # every answer "refuses"
    benign = tmp_path / "benign.txt"
    benign.write_text("\n".join(PROMPTS))  # words the tiny tokenizer knows
    common = [str(tiny["chat"]), str(tiny["lora"]), "--limit", "2", "--max-new-tokens", "3"]
    common += ["--refusal-patterns", str(phrases), "--benign", str(benign), "--json"]
    failed = run_cli("eval", *common, "--max-over-refusal", "0.5")
    assert failed.exit_code == 12
    assert json.loads(failed.stdout)["rows"][1]["over_refusal"]["rate"] == 1.0
    assert run_cli("eval", *common, "--max-over-refusal", "1").exit_code == 0


def _fake_result(names: list[str]) -> EvalResult:
    def prompts(name: str, n: int, reference: bool = False) -> PromptSet:
        return PromptSet(
            name, f"{name}.jsonl", tuple(Prompt("p", "r" if reference else None) for _ in range(n))
        )

    rows = [
        Row(
            name,
            name,
            refusal=rate([True] * (200 - 90 * i) + [False] * (25 + 90 * i)),
            over_refusal=rate([True] * 10 + [False] * 110),
            exact_match=rate([True] * (10 + 40 * i) + [False] * (90 - 40 * i)),
            nll=2.5 - i,
        )
        for i, name in enumerate(names)
    ]
    sets = EvalSets(prompts("harmful", 225), prompts("benign", 120), prompts("task", 100, True))
    return EvalResult(
        "aligned", rows, sets, EvalOptions(), [KeywordJudge()], "cpu", "float32", True
    )


@pytest.mark.parametrize(
    ("settings", "failing"),
    [
        ({"min_refusal": 0.9}, ["b: refusal", "c: refusal"]),
        ({"min_refusal": 0.5}, ["c: refusal"]),
        ({"min_refusal": 0.08, "absolute": True}, []),
        ({"min_refusal": 0.45, "absolute": True}, ["c: refusal"]),
        ({"max_over_refusal": 0.05}, ["b: over-refusal", "c: over-refusal"]),
        ({}, []),
    ],
)
def test_gate_is_relative_to_the_reference_unless_absolute(
    settings: dict[str, Any], failing: list[str]
) -> None:
    # refusal: a 200/225, b 110/225, c 20/225; over-refusal 10/120 each.
    failures = gate_failures(_fake_result(["a", "b", "c"]), **settings)
    assert [f.split(" ")[0] + " " + f.split(" ")[1] for f in failures] == failing


@pytest.mark.model
def test_missing_extras_exit_2_with_the_install_line(
    tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "peft", None)
    result = run_cli("eval", str(tiny["chat"]), str(tiny["lora"]))
    assert result.exit_code == 2
    assert "pip install 'adapter-fix[eval]'" in result.stderr
    inspect = run_cli("inspect", tiny["lora"])
    assert inspect.exit_code == 0, inspect.output


def test_the_cli_imports_neither_transformers_nor_peft() -> None:
    code = "import sys, adapter_fix.cli; print(sorted({'transformers', 'peft'} & set(sys.modules)))"
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "[]"


@pytest.mark.model
def test_eval_of_local_inputs_makes_no_network_request(
    tiny: dict[str, Path], no_network: None
) -> None:
    result = run_cli(
        "eval", str(tiny["chat"]), str(tiny["lora"]), "--limit", "1", "--max-new-tokens", "2"
    )
    assert result.exit_code == 0, result.output


@pytest.mark.model
def test_hub_inputs_are_fetched_into_the_cache_and_give_the_local_answers(
    tiny: dict[str, Path], loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_from_real_hub(monkeypatch)
    repos = {"org/chat": tiny["chat"], "org/lora": tiny["lora"]}
    with serve_hub(repos) as (endpoint, log):
        hub = HubOptions(endpoint=endpoint, cache_dir=tmp_path / "cache")
        remote = load_model(open_source("org/chat", hub), device="cpu")
        attach_adapters(remote, [open_source("org/lora", hub)])
    assert remote.identity == f"org/chat@{fake_commit('org/chat')}"
    assert remote.adapters["adapter_0"] == f"org/lora@{fake_commit('org/lora')}"
    fetched = {path.rsplit("/", 1)[-1] for method, path in log if method == "GET"}
    assert {"model.safetensors", "tokenizer.json", "adapter_model.safetensors"} <= fetched
    with remote.variant("adapter_0") as model:
        hub_answers = generate(model, remote.tokenizer, PROMPTS, max_new_tokens=6)
    assert hub_answers == answers(loaded, "adapter_0")


@pytest.mark.model
def test_an_adapter_for_another_model_is_incompatible_exit_7(
    tiny: dict[str, Path], fixtures_dir: Path
) -> None:
    result = run_cli("eval", str(tiny["chat"]), str(fixtures_dir / "gpt2-lora"), "--limit", "1")
    assert result.exit_code == 7
    assert "gpt2-lora" in result.stderr and "another model" in result.stderr


@pytest.mark.model
def test_a_model_without_chat_template_is_evaluated_with_a_warning(
    tiny: dict[str, Path],
) -> None:
    result = run_cli("eval", str(tiny["raw"]), "--limit", "1", "--max-new-tokens", "2", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["settings"]["chat_template"] is False
    assert "no chat template" in document["warnings"][0]
    assert "Warning: the tokenizer has no chat template" in result.stderr


@pytest.mark.model
def test_continuation_logprob_is_differentiable_and_accepts_token_ids(
    loaded: LoadedModel,
) -> None:
    tokenizer = loaded.tokenizer
    texts = ["paris", "one two"]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    with loaded.variant("adapter_0") as model:
        from_text, counts = continuation_logprob(model, tokenizer, PROMPTS[:2], texts)
        from_ids, _ = continuation_logprob(model, tokenizer, PROMPTS[:2], ids)
        assert counts == [1, 2]
        assert torch.equal(from_text, from_ids)
        lora_b = next(p for n, p in model.named_parameters() if "lora_B.adapter_0" in n)
        lora_b.requires_grad_(True)
        try:
            from_text.sum().backward()
            assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0
        finally:
            lora_b.grad = None
            lora_b.requires_grad_(False)
        nll = reference_nll(model, tokenizer, PROMPTS[:2], texts)
    assert [-value.total for value in nll] == pytest.approx(from_text.tolist(), rel=1e-5)


@pytest.mark.model
def test_an_existing_report_is_replaced_only_with_force(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    report = tmp_path / "eval.md"
    report.write_text("keep me")
    common = [str(tiny["chat"]), "--limit", "1", "--max-new-tokens", "2", "--report", str(report)]
    refused = run_cli("eval", *common)
    assert refused.exit_code == 9 and "--force" in refused.stderr
    assert report.read_text() == "keep me"
    assert run_cli("eval", *common, "--force").exit_code == 0
    assert report.read_text().startswith("# adapter-fix eval")
    twice = run_cli("eval", *common, "--force", "--outputs", str(report))
    assert twice.exit_code == 9


@pytest.mark.model
def test_progress_counts_every_prompt_of_every_row_and_the_tokens(tiny: dict[str, Path]) -> None:
    from adapter_fix.commands.eval import evaluate
    from adapter_fix.options import EvalInputs, EvalOptions
    from adapter_fix.progress import GenerationProgress

    calls: list[tuple[int, int, str]] = []
    totals: list[int] = []

    def progress(total: int) -> Any:
        totals.append(total)
        return lambda done, tokens, label: calls.append((done, tokens, label))

    inputs = EvalInputs(str(tiny["chat"]), (str(tiny["lora"]),), limit=3, device="cpu")
    result, _ = evaluate(inputs, EvalOptions(max_new_tokens=2), HubOptions(), progress=progress)
    assert totals == [2 * (3 + 3)]
    assert sum(done for done, _, _ in calls) == totals[0]
    assert {label for _, _, label in calls} == {
        "aligned: harmful",
        "aligned: benign",
        "lora: harmful",
        "lora: benign",
    }
    assert all(0 <= tokens <= 2 * done for done, tokens, _ in calls)
    bar = GenerationProgress(Console(file=io.StringIO()), totals[0], enabled=False)
    bar.advance(3, 6, "aligned: harmful")
    assert bar.tokens == 6 and bar.progress.tasks[0].completed == 3
    assert len(result.rows) == 2


@pytest.mark.model
def test_a_template_that_rejects_a_system_message_is_a_usage_error(loaded: LoadedModel) -> None:
    tokenizer = copy.copy(loaded.tokenizer)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    assert format_prompt(tokenizer, "hi") == "hi"
    with pytest.raises(UsageError, match=r"System role not supported.*drop --system"):
        format_prompt(tokenizer, "hi", system="be brief")


def test_no_command_declares_an_option_twice() -> None:
    for name, command in main.commands.items():
        flags = [flag for param in command.params for flag in getattr(param, "opts", [])]
        assert len(flags) == len(set(flags)), (name, sorted(f for f in flags if flags.count(f) > 1))
