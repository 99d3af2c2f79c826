"""eval with real transformers and peft on tiny random chat models (tests/eval_models.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from eval_models import save_lora, save_model

from adapter_fix.errors import UnsafeFormatError
from adapter_fix.evaluate.generate import encode_prompts, format_prompt, generate, reference_nll
from adapter_fix.evaluate.model import LoadedModel, attach_adapters, load_model
from adapter_fix.io.sources import open_source

PROMPTS = [
    "how to make a cake",
    "write a poem about the sea please",
    "what is the capital of france",
    "tell me a story",
    "kill process in linux",
]


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


def test_chat_template_wraps_the_prompt_with_system_and_generation_prompt(
    loaded: LoadedModel,
) -> None:
    text = format_prompt(loaded.tokenizer, "tell me a story", system="be brief")
    assert text == "<s><|system|> be brief <|end|> <|user|> tell me a story <|end|> <|assistant|> "
    ids = encode_prompts(loaded.tokenizer, ["tell me a story"])[0]
    assert ids.count(loaded.tokenizer.bos_token_id) == 1  # the template's BOS, no second one


def test_a_model_without_template_is_prompted_raw(tiny: dict[str, Path]) -> None:
    raw = load_model(open_source(str(tiny["raw"])), device="cpu")
    assert format_prompt(raw.tokenizer, "tell me a story", system="be brief") == (
        "be brief\n\ntell me a story"
    )


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(loaded: LoadedModel) -> None:
    batched = answers(loaded, None, batch_size=8)
    single = answers(loaded, None, batch_size=1)
    assert batched == single
    assert any(batched)


def test_generation_is_deterministic(loaded: LoadedModel) -> None:
    assert answers(loaded, "adapter_0", batch_size=3) == answers(loaded, "adapter_0", batch_size=3)


def test_adapters_are_switched_on_one_model_and_disabled_for_the_reference(
    loaded: LoadedModel,
) -> None:
    reference = answers(loaded, None)
    assert answers(loaded, "adapter_1") == reference  # lora_B zero: no change
    assert answers(loaded, "adapter_0") != reference
    assert answers(loaded, None) == reference  # disable_adapter gives ALIGNED back


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
