"""The objectives that score a model on prompts (evaluate/objectives.py): the refusal margin and
the task loss, teacher-forced, batch by batch, logits only where they score."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from conftest import tiny_llama_config

from adapter_fix.errors import UsageError
from adapter_fix.evaluate import objectives
from adapter_fix.evaluate.objectives import (
    Scored,
    first_difference,
    greedy_matches,
    margin_rows,
    pass_memory,
    refusal_margins,
    scored_logprobs,
    shared_prefix,
    token_nll,
    with_stop,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from adapter_fix.evaluate.generate import reference_ids, sequence_logprobs  # noqa: E402
from adapter_fix.methods.gate import (  # noqa: E402
    Calibration,
    GatedModel,
    GateOptions,
    _shape,
    check_memory,
    generation_batch,
    memory_needed,
)

PROMPTS = [[1, 5, 7], [2, 4, 6, 8, 9], [3, 3], [7, 1, 2, 9], [11]]
REFUSALS = [[12, 13, 14], [12, 13, 15, 5], [12, 20], [30, 31], [12, 13]]
COMPLIANCES = [[12, 22, 23, 24], [16, 17], [12, 20, 21], [30, 31], [25]]


def test_a_reference_ends_with_the_first_stop_token_and_adds_no_special_tokens():
    calls = []

    def tokenizer(text: str, add_special_tokens: bool) -> dict[str, list[int]]:
        calls.append(add_special_tokens)
        return {"input_ids": [ord(c) for c in text]}

    assert reference_ids(tokenizer, "ab", [2, 7]) == [97, 98, 2]
    assert reference_ids(tokenizer, "ab", []) == [97, 98]
    assert calls == [False, False]


def test_first_difference_and_margin_rows_score_from_where_the_starts_differ():
    assert first_difference([1, 2, 3], [1, 2, 4]) == 2
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert first_difference([5], [6]) == 0
    rows = margin_rows([[9, 9]], [[1, 2, 3, 4]], [[1, 5, 6]], window=2)
    assert rows == [Scored([9, 9, 1, 2, 3], 2), Scored([9, 9, 1, 5, 6], 2)]
    short = margin_rows([[9]], [[1, 2]], [[1, 7, 8, 9]], window=3)
    assert short == [Scored([9, 1, 2], 1), Scored([9, 1, 7, 8, 9], 3)]
    assert margin_rows([[9]], [[4]], [[4]], window=2) == [Scored([9, 4], 0), Scored([9, 4], 0)]
    one = margin_rows([[9, 9], [8]], [[1, 2, 3], [4]], [[1, 5], [4]], window=1)
    assert one == [Scored([9, 9, 1, 2], 1, versus=5), Scored([8, 4], 0)]


def test_with_stop_appends_the_stop_token_only_to_answers_that_ended():
    assert with_stop([1, 2], [5], generated=4) == [1, 2, 5]
    assert with_stop([1, 2, 3, 4], [5], generated=4) == [1, 2, 3, 4]
    assert with_stop([1], [], generated=4) == [1]


@pytest.mark.model
def test_scored_logprobs_left_padded_equal_full_logits_unpadded(lora_model):
    model, _names = lora_model
    rows = [Scored([*p, *r], len(r)) for p, r in zip(PROMPTS, REFUSALS, strict=True)]
    with torch.no_grad():
        batched = scored_logprobs(model, rows, pad=0)
        alone = torch.cat(
            [sequence_logprobs(model, [p], [r], 0) for p, r in zip(PROMPTS, REFUSALS, strict=True)]
        )
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


SYSTEM = [3, 9, 4, 1, 6, 2, 8, 5, 7, 10]  # a chat template's shared system turn


def test_shared_prefix_is_the_common_unscored_start_of_two_or_more_rows():
    rows = [Scored([*SYSTEM, *p, *r], len(r)) for p, r in zip(PROMPTS, REFUSALS, strict=True)]
    assert shared_prefix(rows) == len(SYSTEM)
    assert shared_prefix(rows[:1]) == 0
    assert shared_prefix([Scored(SYSTEM, 3), Scored(SYSTEM, 3)]) == 0  # below the minimum
    assert shared_prefix([*rows, Scored([*SYSTEM[:9], 0, 1], 1)]) == 9
    assert shared_prefix([*rows, Scored([*SYSTEM[:7], 0], 1)]) == 0


@pytest.mark.model
def test_a_shared_prefix_computed_once_gives_each_rows_own_values_and_gradients(lora_model):
    model, names = lora_model
    gated = GatedModel(model, names, "module")
    rows = [Scored([*SYSTEM, *p, *r], len(r)) for p, r in zip(PROMPTS, REFUSALS, strict=True)]
    gated.set_values(torch.linspace(0.2, 0.9, len(gated.values())))
    scored_logprobs(model, rows, pad=0).sum().backward()
    shared, shared_gradients = scored_logprobs(model, rows, pad=0).detach(), gated.gradients()
    gated.set_values(torch.linspace(0.2, 0.9, len(gated.values())))
    alone = torch.cat([scored_logprobs(model, [row], pad=0) for row in rows])
    alone.sum().backward()
    torch.testing.assert_close(shared, alone.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared_gradients, gated.gradients(), rtol=1e-4, atol=1e-6)
    gated.remove()


@pytest.mark.model
def test_the_output_layer_gets_a_contiguous_input_with_the_same_values_and_gradients(
    lora_model,
):
    model, names = lora_model
    gated = GatedModel(model, names, "module")
    rows = [Scored([*SYSTEM, *p, *r], len(r)) for p, r in zip(PROMPTS, REFUSALS, strict=True)]
    seen: list[bool] = []
    head = model.get_output_embeddings()
    pre_hooks = dict(head._forward_pre_hooks)
    record = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    try:
        gated.set_values(torch.linspace(0.2, 0.9, len(gated.values())))
        scored_logprobs(model, rows, pad=0).sum().backward()
        hooked, hooked_gradients = scored_logprobs(model, rows, pad=0).detach(), gated.gradients()
        assert seen and all(seen)
        assert dict(head._forward_pre_hooks) == pre_hooks  # the pass took its hook away
        # The same pass without the hook (what transformers hands the head: a strided slice).
        seen.clear()
        gated.set_values(torch.linspace(0.2, 0.9, len(gated.values())))
        no_hook = mock.patch.object(
            objectives, "contiguous_head", lambda _model: contextlib.nullcontext()
        )
        with no_hook:
            plain = scored_logprobs(model, rows, pad=0)
        plain.sum().backward()
        assert not all(seen)
        torch.testing.assert_close(hooked, plain.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hooked_gradients, gated.gradients(), rtol=1e-5, atol=1e-7)
    finally:
        record.remove()
        gated.remove()


@pytest.mark.model
def test_greedy_matches_is_what_greedy_generation_writes(lora_model):
    model, _names = lora_model
    prompts = [[*SYSTEM, *p] for p in PROMPTS]
    with torch.no_grad():
        written = [
            model.generate(
                input_ids=torch.tensor([p]), max_new_tokens=4, do_sample=False, pad_token_id=0
            )[0, len(p) :].tolist()
            for p in prompts
        ]
    rows = [Scored([*p, *w], len(w)) for p, w in zip(prompts, written, strict=True)]
    assert greedy_matches(model, rows, pad=0, batch_size=2) == [True] * len(rows)
    # Change the last written token: greedy decoding would not write that.
    other = [Scored([*r.tokens[:-1], (r.tokens[-1] + 1) % 40], r.scored) for r in rows]
    assert greedy_matches(model, other, pad=0, batch_size=3) == [False] * len(rows)


@pytest.mark.model
def test_refusal_margin_is_refusal_minus_compliance_over_the_window(lora_model):
    model, _names = lora_model
    margins = refusal_margins(model, PROMPTS, REFUSALS, COMPLIANCES, window=2, pad=0, batch_size=8)
    with torch.no_grad():
        # Prompt 0 differs at position 1: tokens 1-2 of each start.
        refusal = sequence_logprobs(model, [PROMPTS[0] + [12]], [[13, 14]], 0)
        compliance = sequence_logprobs(model, [PROMPTS[0] + [12]], [[22, 23]], 0)
    assert float(margins[0]) == pytest.approx(float(refusal - compliance), abs=1e-5)
    assert float(margins[3]) == 0.0  # the same start: nothing to score


@pytest.mark.model
def test_a_one_token_margin_from_one_row_equals_the_two_row_margin(lora_model):
    model, _names = lora_model
    # One row per prompt: the refusal token against the compliance token where they differ.
    one = refusal_margins(model, PROMPTS, REFUSALS, COMPLIANCES, window=1, pad=0, batch_size=2)
    with torch.no_grad():
        for index, (p, r, c) in enumerate(zip(PROMPTS, REFUSALS, COMPLIANCES, strict=True)):
            d = first_difference(r, c)
            if d >= min(len(r), len(c)):
                assert float(one[index]) == 0.0
                continue
            prefix = [p + r[:d]]
            expected = sequence_logprobs(model, prefix, [[r[d]]], 0) - sequence_logprobs(
                model, prefix, [[c[d]]], 0
            )
            assert float(one[index]) == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.model
@pytest.mark.parametrize("objective", ["margin", "margin-1", "task"])
def test_gradients_accumulated_per_batch_equal_one_big_batchs(lora_model, objective):
    model, names = lora_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gated = GatedModel(model, names, "module")
    try:
        values = torch.linspace(0.2, 0.9, len(names))

        def run(batch_size: int) -> tuple[float, torch.Tensor]:
            gated.set_values(values)
            if objective.startswith("margin"):
                value = float(
                    refusal_margins(
                        model,
                        PROMPTS,
                        REFUSALS,
                        COMPLIANCES,
                        window=1 if objective == "margin-1" else 3,
                        pad=0,
                        batch_size=batch_size,
                        backward=True,
                    ).mean()
                )
            else:
                value = token_nll(
                    model, PROMPTS, COMPLIANCES, pad=0, batch_size=batch_size, backward=True
                )
            return value, gated.gradients()

        one_value, one_batch = run(len(PROMPTS))
        value, per_batch = run(2)
        assert value == pytest.approx(one_value, abs=1e-5)
        assert torch.count_nonzero(one_batch) > 0
        torch.testing.assert_close(per_batch, one_batch, atol=1e-5, rtol=1e-4)
    finally:
        gated.remove()
        model.load_state_dict(state)


def test_pass_memory_grows_with_the_batch_and_only_the_scored_logits():
    shape = dict(hidden=576, intermediate=1536, layers=30, heads=9, vocab=49152, element_bytes=4)
    small = pass_memory(rows=8, length=100, scored=2, gradients=True, **shape)
    double = pass_memory(rows=16, length=100, scored=2, gradients=True, **shape)
    assert double.total == 2 * small.total
    assert small.logits == 8 * 3 * 49152 * 4 * 3
    assert pass_memory(rows=8, length=100, scored=2, gradients=False, **shape).total < small.total


@pytest.mark.model
def test_check_memory_refuses_a_batch_that_does_not_fit_and_names_batch_size(lora_model):
    model, _names = lora_model
    calibration = Calibration(harmful=PROMPTS, benign=PROMPTS)
    options = GateOptions(batch_size=8)
    estimate = check_memory(model, calibration, options, available=None)
    assert check_memory(model, calibration, options, available=estimate.total) == estimate
    with pytest.raises(UsageError, match=r"--batch-size [34]\b"):
        check_memory(model, calibration, options, available=estimate.total // 2)


@pytest.mark.model
def test_generation_batch_fills_the_memory_of_one_gradient_pass():
    # Deep enough that a gradient pass (every layer's activations kept) outweighs generation
    # (two layers' worth and the key/value cache), as in any real chat model.
    model = transformers.LlamaForCausalLM(tiny_llama_config(layers=16))
    calibration = Calibration(harmful=[[1, 2, 3, 4]] * 50, benign=[[5, 6]] * 3)
    options = GateOptions(batch_size=2, max_new_tokens=4)
    rows = generation_batch(model, calibration, options)
    # Generation keeps no activations for backward: many more rows fit than with gradients...
    assert rows > options.batch_size
    # ...and the bigger the gradient pass allowed, the bigger the generation batch.
    assert generation_batch(model, calibration, GateOptions(batch_size=8, max_new_tokens=4)) > rows
    assert memory_needed(model, calibration, options).total > 0


@pytest.mark.model
def test_the_memory_estimate_covers_the_descent_searchs_refusal_pass():
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    # Short refusal starts and task answers: the descent's 4 scored tokens per row dominate.
    calibration = Calibration(
        harmful=[[1, 2, 3, 4]] * 8, benign=[], task=[[5, 6]] * 8, task_references=[[7]] * 8
    )
    order = memory_needed(model, calibration, GateOptions(batch_size=4, max_new_tokens=1))
    descent = memory_needed(
        model, calibration, GateOptions(batch_size=4, max_new_tokens=1, search="descent")
    )
    refusal = pass_memory(rows=4, length=8, scored=4, gradients=True, **_shape(model))
    assert descent.total >= refusal.total > order.total
