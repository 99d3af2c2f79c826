"""Attribution-guided gating (METHOD.md §8.4): the math, the gates on a real peft model."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import CliResult, run_cli

from adapter_fix.math.gating import (
    Attribution,
    candidates,
    descent_step,
    in_basis,
    integrated_gradient,
    partial_change,
    priority_order,
    rank_one_factors,
    restore_order,
    search_prefix,
    separating_basis,
    step_rows,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import adapter_fix.methods.gate as gate_module  # noqa: E402
from adapter_fix.errors import UsageError  # noqa: E402
from adapter_fix.evaluate.objectives import (  # noqa: E402
    Scored,
    greedy_matches,
    scored_logprobs,
    shared_prefix,
    token_nll,
)
from adapter_fix.methods.gate import (  # noqa: E402
    DESCENT_BENIGN_WEIGHT,
    DESCENT_OVER_REFUSAL_SLACK,
    Calibration,
    GatedModel,
    GateOptions,
    _descend,
    _refusal_rows,
    descent_settings,
    gate_repair,
    gated_factors,
    refine_components,
)
from adapter_fix.options import DESCENT_PRESETS, DESCENT_STARTS  # noqa: E402


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12]])


def _snapshot(model: torch.nn.Module) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The model's state (to put back), and its logits on `IDS` with and without the adapter."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = _logits(model, IDS)
    with model.disable_adapter():
        aligned = _logits(model, IDS)
    return state, adapted, aligned


@pytest.mark.model
@pytest.mark.parametrize("unit", ["module", "component"])
def test_gates_at_one_keep_the_adapter_and_at_zero_remove_it(lora_model, unit):
    model, names = lora_model
    adapted = _logits(model, IDS)
    with model.disable_adapter():
        aligned = _logits(model, IDS)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gated = GatedModel(model, names, unit)
    try:
        torch.testing.assert_close(_logits(model, IDS), adapted, atol=1e-5, rtol=1e-5)
        gated.set_values(torch.zeros_like(gated.values()))
        torch.testing.assert_close(_logits(model, IDS), aligned, atol=1e-6, rtol=1e-6)
    finally:
        gated.remove()
        model.load_state_dict(state)


@pytest.mark.model
def test_gate_gradient_matches_finite_difference(lora_model):
    model, names = lora_model
    gated = GatedModel(model, names, "module")
    try:
        prompts, continuations = [[1, 5, 7], [2, 4]], [[9, 11], [6, 8, 10]]

        def objective(backward: bool = False) -> float:
            return token_nll(model, prompts, continuations, pad=0, batch_size=2, backward=backward)

        values = torch.full((len(names),), 0.5, dtype=torch.float64).float()
        gated.set_values(values)
        objective(backward=True)
        gradient = gated.gradients()
        step = 1e-2
        for unit in (0, len(names) - 1):
            shifted = values.clone()
            shifted[unit] += step
            gated.set_values(shifted)
            up = objective()
            shifted[unit] -= 2 * step
            gated.set_values(shifted)
            down = objective()
            assert gradient[unit] == pytest.approx((up - down) / (2 * step), rel=2e-2, abs=1e-4)
    finally:
        gated.remove()


@pytest.mark.model
def test_integrated_gradients_are_complete_for_the_task_loss(lora_model):
    model, names = lora_model
    gated = GatedModel(model, names, "module")
    try:
        prompts, continuations = [[1, 5, 7], [2, 4]], [[9, 11], [6, 8, 10]]

        def objective(backward: bool = False) -> float:
            return token_nll(model, prompts, continuations, pad=0, batch_size=2, backward=backward)

        steps = 16
        gradients = []
        for step in range(1, steps + 1):
            gated.set_values(torch.full((len(names),), (step - 0.5) / steps))
            objective(backward=True)
            gradients.append(gated.gradients())
        stacked = torch.stack(gradients)
        total = sum(integrated_gradient(stacked[:, u].tolist(), 1.0) for u in range(len(names)))
        gated.set_values(torch.ones(len(names)))
        at_one = objective()
        gated.set_values(torch.zeros(len(names)))
        at_zero = objective()
        assert total == pytest.approx(at_one - at_zero, rel=0.01, abs=1e-4)
    finally:
        gated.remove()


@pytest.mark.model
def test_module_gate_zero_writes_a_zero_update_and_gate_one_the_original(lora_model):
    model, names = lora_model
    gated = GatedModel(model, names, "module")
    try:
        values = torch.ones(len(names))
        values[0] = 0.0
        gated.set_values(values)
        factors = gated_factors(gated)
        lora_b, _ = factors[names[0]]
        assert torch.count_nonzero(lora_b) == 0
        kept_b, kept_a = factors[names[1]]
        original_b, original_a = gated.factors(gated.layers[1])
        assert torch.equal(kept_b, original_b) and torch.equal(kept_a, original_a)
    finally:
        gated.remove()


def test_rank_one_factors_keep_the_update_and_order_components():
    torch.manual_seed(1)
    lora_b, lora_a = torch.randn(12, 4, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    new_b, new_a = rank_one_factors(lora_b, lora_a, 0.5)
    torch.testing.assert_close(0.5 * new_b @ new_a, 0.5 * lora_b @ lora_a, atol=1e-10, rtol=1e-10)
    norms = [float(torch.linalg.norm(new_b[:, i : i + 1] @ new_a[i : i + 1])) for i in range(4)]
    assert norms == sorted(norms, reverse=True)
    singular = torch.linalg.svdvals(0.5 * lora_b @ lora_a)
    assert [0.5 * n for n in norms] == pytest.approx(singular[:4].tolist(), rel=1e-9)


def test_integrated_gradient_is_the_mean_gradient_times_the_gate():
    assert integrated_gradient([1.0, 2.0, 3.0], 0.5) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        integrated_gradient([], 1.0)


def test_priority_takes_most_harm_per_floored_task_help_first():
    attributions = [
        Attribution(margin=-1.0, task=-1.0),  # harm 1, help 1
        Attribution(margin=-3.0, task=-1.0),  # harm 3, help 1: first
        Attribution(margin=2.0, task=-5.0),  # raises the margin: never a candidate
        None,  # already off
        Attribution(margin=-0.5, task=0.2),  # hurts the task too: small harm
    ]
    assert candidates(attributions) == [0, 1, 4]
    # Task help floored at the candidates' mean help (2/3): 1.8, 0.75, 0.6 for units 1, 4, 0.
    assert priority_order(attributions, candidates(attributions)) == [1, 4, 0]


def test_selection_does_not_put_units_of_near_zero_task_help_first_for_that_alone():
    attributions = [
        Attribution(margin=-0.01, task=-1e-12),  # tiny harm, no task help
        Attribution(margin=-0.02, task=0.0),
        Attribution(margin=-5.0, task=-0.5),  # carries the compliance, some task help
    ]
    assert priority_order(attributions, [0, 1, 2]) == [2, 1, 0]


def test_selection_ignores_units_whose_harm_is_below_a_share_of_the_total():
    attributions = [Attribution(-0.004, 0.0), Attribution(-1.0, -0.1), Attribution(-0.1, 0.0)]
    assert candidates(attributions, min_harm_share=0.01) == [1, 2]
    assert candidates(attributions, min_harm_share=0.05) == [1, 2]
    assert candidates(attributions) == [0, 1, 2]


def test_selection_orders_by_harm_when_no_unit_helps_the_task():
    attributions = [Attribution(-1.0, 0.3), Attribution(-2.0, 0.0), Attribution(-1.5, 0.1)]
    assert priority_order(attributions, [0, 1, 2]) == [1, 2, 0]


def _counting(values: list[float]):
    asked: list[int] = []

    def measure(count: int) -> float:
        asked.append(count)
        return values[count]

    return measure, asked


@pytest.mark.parametrize("task_limit", [0, 1, 3, 7, 20])
@pytest.mark.parametrize("refusal_from", [1, 2, 5, 8, 20, 99])
def test_search_takes_the_fewest_units_that_reach_the_target_within_the_task_floor(
    task_limit, refusal_from
):
    count = 20
    # Refusals reach the target from `refusal_from` units on; the task holds up to `task_limit`.
    refusal, refusals_asked = _counting([float(k >= refusal_from) for k in range(count + 1)])
    task, tasks_asked = _counting([1.0 if k <= task_limit else 0.5 for k in range(count + 1)])
    chosen = search_prefix(count, refusal=refusal, task_kept=task, target=1.0, floor=0.9)
    assert chosen == (refusal_from if refusal_from <= task_limit else task_limit)
    # Each count measured once; bisection: about log2(count) measurements of each kind (the
    # task once more: the count returned is always measured).
    assert len(set(refusals_asked)) == len(refusals_asked) <= 1 + math.ceil(math.log2(count))
    assert len(set(tasks_asked)) == len(tasks_asked) <= 2 + math.ceil(math.log2(count))


def test_search_never_returns_a_count_whose_task_was_not_measured_at_the_floor():
    # Exact match on a few prompts need not fall with every unit: here it dips at 3 units.
    task, tasks_asked = _counting([1.0, 1.0, 1.0, 0.85, 0.95, 0.95, 0.95, 0.95, 0.95])
    refusal, _ = _counting([float(k >= 3) for k in range(9)])
    chosen = search_prefix(8, refusal=refusal, task_kept=task, target=1.0, floor=0.9)
    assert chosen == 8 and 3 in tasks_asked  # 3 reaches the target but loses the task


def test_search_with_nothing_to_switch_off_measures_nothing():
    def never(count: int) -> float:
        raise AssertionError("measured")

    assert search_prefix(0, refusal=never, task_kept=never, target=0.9, floor=0.9) == 0


def test_restore_order_gives_back_most_task_help_per_floored_harm_first():
    attributions = [
        None,  # not switched off
        Attribution(margin=-1.0, task=-2.0),  # help 2, harm 1
        Attribution(margin=0.0, task=-0.1),  # help 0.1, no harm: not first for that alone
        Attribution(margin=-4.0, task=-3.0),  # help 3, harm 4
        Attribution(margin=-1.0, task=0.5),  # hurts the task: never given back
    ]
    # Harm floored at the mean harm (5/3): 2/2.67, 0.1/1.67, 3/5.67.
    assert restore_order(attributions) == [1, 3, 2]
    assert restore_order([None, Attribution(0.0, -1.0), Attribution(0.0, -2.0)]) == [2, 1]


@pytest.mark.model
def test_split_keeps_the_update_and_the_gate_value(lora_model):
    model, names = lora_model
    state, adapted, aligned = _snapshot(model)
    gated = GatedModel(model, names, "module")
    try:
        values = torch.ones(len(names))
        values[0] = 0.0
        gated.set_values(values)
        before = _logits(model, IDS)
        gated.split(0)
        assert gated.layers[0].components and len(gated.layers[0].gates) == 4
        torch.testing.assert_close(_logits(model, IDS), before, atol=1e-5, rtol=1e-5)
        gated.set_values(torch.ones_like(gated.values()))
        torch.testing.assert_close(_logits(model, IDS), adapted, atol=1e-5, rtol=1e-5)
        gated.set_values(torch.zeros_like(gated.values()))
        torch.testing.assert_close(_logits(model, IDS), aligned, atol=1e-6, rtol=1e-6)
    finally:
        gated.remove()
        model.load_state_dict(state)


def test_separating_basis_whitens_the_others_and_ranks_units_by_harmful_activity():
    generator = torch.Generator().manual_seed(0)
    others = torch.randn(200, 4, generator=generator, dtype=torch.float64)
    others[:, 2] *= 0.01  # the other prompts barely use direction 2 ...
    harmful = torch.randn(200, 4, generator=generator, dtype=torch.float64)
    harmful[:, 2] *= 10  # ... which the harmful ones use most
    moment_h, moment_o = harmful.T @ harmful / 200, others.T @ others / 200
    basis, lam = separating_basis(moment_h, moment_o, 1e-3)
    shifted = moment_o + 1e-3 * torch.trace(moment_o) / 4 * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(basis.T @ shifted @ basis, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(basis.T @ moment_h @ basis, torch.diag(lam))
    assert bool((lam[1:] >= lam[:-1]).all())
    # The last unit (most harmful activity per unit of the others') reads direction 2.
    reads = basis[:, -1].abs()
    assert int(reads.argmax()) == 2 and float(reads[2]) > 10 * float(reads[[0, 1, 3]].max())
    lora_b = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    lora_a = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    new_b, new_a = in_basis(lora_b, lora_a, basis)
    assert new_b.shape == lora_b.shape and new_a.shape == lora_a.shape
    torch.testing.assert_close(new_b @ new_a, lora_b @ lora_a)
    with pytest.raises(ValueError, match="ridge"):
        separating_basis(moment_h, moment_o, 0.0)


@pytest.mark.model
def test_inner_moments_do_not_depend_on_the_batch(lora_model):
    model, names = lora_model
    gated = GatedModel(model, names, "module")
    rows = [[1, 5, 7, 9], [2, 4, 6, 8, 10, 12], [3, 3]]
    # A chat template's system turn: run once per batch, counted for every row of it.
    template = [11, 3, 8, 2, 9, 4, 13, 6, 1, 7]
    chats = [[*template, 5, 2], [*template, 12, 4, 9], [*template, 3]]
    assert shared_prefix([Scored(row, 0) for row in chats]) == 10
    try:
        whole = gated.inner_moments(rows, pad=0, batch=3)
        one_by_one = gated.inner_moments(rows, pad=0, batch=1)
        chats_shared = gated.inner_moments(chats, pad=0, batch=3)
        chats_whole = gated.inner_moments(chats, pad=0, batch=1)
    finally:
        gated.remove()
    assert len(whole) == len(names) and whole[0].shape == (4, 4)
    pairs = [*zip(whole, one_by_one, strict=True), *zip(chats_shared, chats_whole, strict=True)]
    for a, b in pairs:
        torch.testing.assert_close(a, b)
        assert float(torch.trace(a)) > 0


@pytest.mark.model
def test_separation_keeps_the_update_and_gives_each_new_unit_a_gate(lora_model):
    model, names = lora_model
    state, adapted, aligned = _snapshot(model)
    gated = GatedModel(model, names, "component")
    try:
        harmful = gated.inner_moments([[1, 5, 7, 9, 11]], pad=0, batch=1)
        other = gated.inner_moments([[2, 4, 6, 8, 10, 12]], pad=0, batch=1)
        factors = [tuple(f.clone() for f in gated.factors(layer)) for layer in gated.layers]
        with mock.patch.object(gate_module, "SEPARATION_TOLERANCE", -1.0):
            assert gated.separate(harmful, other) == 0  # every rewrite over the tolerance
        for layer, (lora_b, lora_a) in zip(gated.layers, factors, strict=True):
            assert torch.equal(gated.factors(layer)[0], lora_b)
            assert torch.equal(gated.factors(layer)[1], lora_a)
        with mock.patch.object(gate_module, "SEPARATION_TOLERANCE", 1e-5):
            gated.saved_dtypes = {name: torch.bfloat16 for name in names}
            assert gated.separate(harmful, other) == 0  # written in bfloat16: too coarse
            gated.saved_dtypes = {}
            assert gated.separate(harmful, other) == len(names)  # in float32 it holds
        assert not torch.equal(gated.factors(gated.layers[0])[1], factors[0][1])
        torch.testing.assert_close(_logits(model, IDS), adapted, atol=1e-4, rtol=1e-4)
        values = torch.ones_like(gated.values())
        values[0] = 0.0
        gated.set_values(values)  # one new unit off changes the model, ...
        assert not torch.allclose(_logits(model, IDS), adapted, atol=1e-4)
        gated.set_values(torch.zeros_like(values))  # ... and every one off is ALIGNED
        torch.testing.assert_close(_logits(model, IDS), aligned, atol=1e-6, rtol=1e-6)
    finally:
        gated.remove()
        model.load_state_dict(state)


@pytest.mark.model
def test_the_compliance_term_is_the_mean_per_token_probability_of_the_starts(lora_model):
    """Its gradient is `weight` times that of the mean over the step's rows of
    `exp(logprob / tokens)`: it pushes a likely start down and stops once it is unlikely."""
    model, names = lora_model
    gated = GatedModel(model, names, "component")
    prompts, starts = [[1, 5, 7], [2, 4, 6, 8]], [[30, 31], [32]]
    try:
        with mock.patch.object(gate_module, "DESCENT_COMPLIANCE_CHUNKS", 1):
            gated.set_values(gated.values())
            gate_module._compliance_backward(model, prompts, starts, 1, 0.5, pad=0, batch=2)
            term = gated.gradients()
        gated.set_values(gated.values())
        rows = [Scored([*p, *s], len(s)) for p, s in zip(prompts, starts, strict=True)]
        logprobs = scored_logprobs(model, rows, 0)
        ((logprobs / torch.tensor([2.0, 1.0])).exp().mean() * 0.5).backward()
        by_hand = gated.gradients()
    finally:
        gated.remove()
    torch.testing.assert_close(term, by_hand, atol=1e-6, rtol=1e-5)
    assert float(term.abs().max()) > 0


@pytest.mark.model
def test_a_step_pass_is_the_weighted_sum_of_its_groups_mean_nll(lora_model):
    model, names = lora_model
    gated = GatedModel(model, names, "component")
    task = ([[1, 5, 7], [2, 4, 6, 8]], [[9, 11], [10]])
    benign = ([[3, 3, 5]], [[12, 13, 14]])
    try:
        with mock.patch.object(gate_module, "DESCENT_CHUNKS", 1):  # every row at every step
            gated.set_values(gated.values())  # gates that collect gradients
            gate_module._step_backward(model, [(*task, 1.0), (*benign, 0.25)], 1, pad=0, batch=2)
            together = gated.gradients()
            gated.set_values(gated.values())  # fresh leaves, no gradient
            token_nll(model, *task, pad=0, batch_size=2, backward=True)
            parts = gated.gradients()
            gated.set_values(gated.values())
            token_nll(model, *benign, pad=0, batch_size=2, backward=True)
            parts = parts + 0.25 * gated.gradients()
            gated.set_values(gated.values())
            gate_module._step_backward(model, [(*task, 1.0), (*benign, 0.0)], 1, pad=0, batch=2)
            without = gated.gradients()  # a group with no weight adds nothing
            gated.set_values(gated.values())
            token_nll(model, *task, pad=0, batch_size=2, backward=True)
            task_only = gated.gradients()
    finally:
        gated.remove()
    torch.testing.assert_close(together, parts, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(without, task_only, atol=1e-6, rtol=1e-5)
    assert float(together.abs().max()) > 0


@pytest.mark.model
@pytest.mark.parametrize("refusals_hold", [True, False])
def test_refine_gives_components_back_only_while_refusals_hold(lora_model, refusals_hold):
    model, names = lora_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gated = GatedModel(model, names, "module")
    try:
        prompts, references = [[1, 5, 7], [2, 4]], [[9, 11], [6, 8, 10]]

        def task(backward: bool = False) -> float:
            return token_nll(model, prompts, references, pad=0, batch_size=2, backward=backward)

        def margin(backward: bool = False) -> float:
            return -task(backward)  # any objective with a gradient will do

        values = torch.ones(len(names))
        values[[0, 2]] = 0.0
        gated.set_values(values)
        tries: list[torch.Tensor] = []

        def measure() -> float:
            tries.append(gated.values())
            return 1.0 if refusals_hold else 0.0

        given = refine_components(
            gated, GateOptions(steps=2), margin=margin, task_loss=task, measure=measure, target=0.9
        )
        restorable = {u for u, (layer, _) in enumerate(gated.units()) if layer in (0, 2)}
        if refusals_hold:
            assert given and set(given) <= restorable and len(tries) == 1
            assert all(float(gated.values()[u]) == 1.0 for u in given)
        else:
            assert given is None and len(tries) >= 2
            assert all(float(gated.values()[u]) == 0.0 for u in restorable)
        assert [layer.components for layer in gated.layers[:3]] == [True, False, True]
    finally:
        gated.remove()
        model.load_state_dict(state)


@pytest.mark.model
def test_a_round_that_restores_no_refusal_is_undone_and_stops_the_repair(lora_model):
    model, names = lora_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gated = GatedModel(model, names, "component")
    calls: list[int] = []

    def only_aligned_refuses(prompts, answers):
        # ALIGNED (the first call) refuses everything; nothing the adapter writes is a refusal,
        # so no round can restore one.
        calls.append(len(answers))
        return [len(calls) == 1] * len(answers)

    try:
        outcome = gate_repair(
            gated,
            Calibration(
                harmful=[[1, 5, 7], [2, 4, 6], [3, 9]],
                benign=[],
                task=[[11, 12], [13, 14, 15]],
                task_references=[[20, 21], [22, 23]],
            ),
            GateOptions(steps=1, rounds=3, task_budget=1.0, max_new_tokens=3, batch_size=2),
            judge_refusals=only_aligned_refuses,
            decode=lambda ids: " ".join(map(str, ids)),
            pad_id=0,
            stop_ids=[39],
        )
        # One round ran and switched units off; it bought nothing, so it was undone.
        assert [r.undone for r in outcome.rounds] == [True]
        assert outcome.rounds[0].switched_off
        assert "undone" in outcome.stop_reason
        assert outcome.refusal_rate == outcome.original_refusal_rate == 0.0
        assert bool((gated.values() == 1.0).all())  # the adapter as it was
    finally:
        gated.remove()
        model.load_state_dict(state)


@pytest.mark.model
def test_the_compliance_term_takes_only_the_answers_the_adapter_does_not_refuse(lora_model):
    """An adapter that still refuses a harmful prompt gives it no compliance start: the term
    would otherwise push its refusal down."""
    model, names = lora_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gated = GatedModel(model, names, "component")
    harmful = [[1, 5, 7], [2, 4, 6], [3, 9]]

    calls: list[int] = []

    def judge(prompts, answers):  # ALIGNED (the first call) refuses all; then only the first
        calls.append(len(answers))
        return [len(calls) == 1 or list(p) == harmful[0] for p in prompts]

    captured: dict = {}

    def descend(*_args, **kwargs):
        captured.update(kwargs)
        return [], 0.0, 1.0, "stopped"

    try:
        with mock.patch.object(gate_module, "_descend", descend):
            gate_repair(
                gated,
                Calibration(
                    harmful=harmful,
                    benign=[],
                    task=[[11, 12], [13, 14, 15]],
                    task_references=[[20, 21], [22, 23]],
                ),
                GateOptions(search="descent", max_new_tokens=3, batch_size=2),
                judge_refusals=judge,
                decode=lambda ids: " ".join(map(str, ids)),
                pad_id=0,
                stop_ids=[39],
            )
    finally:
        gated.remove()
        model.load_state_dict(state)
    prompts, starts = captured["compliance"]
    # Not the first prompt: the adapter refuses it. Each row is its prompt, then any tokens
    # the answer shares with ALIGNED's refusal start.
    assert [p[: len(h)] for p, h in zip(prompts, harmful[1:], strict=True)] == harmful[1:]
    assert all(0 < len(start) <= 4 for start in starts)


def test_a_descent_step_moves_the_steepest_gate_by_the_rate_within_the_bounds():
    gates = torch.tensor([1.0, 1.0, 0.2, -0.9])
    gradient = torch.tensor([4.0, -2.0, 0.0, 8.0])
    stepped = descent_step(gates, gradient, 8.0, rate=0.5, floor=-1.0, ceiling=1.2)
    assert torch.allclose(stepped, torch.tensor([0.75, 1.125, 0.2, -1.0]))
    assert float(descent_step(gates, -gradient, 1.0, rate=1, floor=-1, ceiling=1.5)[0]) == 1.5
    for scale in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive and finite"):
            descent_step(gates, gradient, scale, rate=0.5, floor=-1.0, ceiling=1.5)


def test_each_run_of_chunks_steps_takes_every_row_once():
    assert [list(step_rows(7, step, 3)) for step in (1, 2, 3, 4)] == [
        [0, 3, 6],
        [1, 4],
        [2, 5],
        [0, 3, 6],
    ]
    assert [list(step_rows(2, step, 3)) for step in (1, 2, 3)] == [[0], [1], [0]]
    assert list(step_rows(5, 4, 1)) == [0, 1, 2, 3, 4]
    assert list(step_rows(0, 1, 3)) == []
    for count, step, chunks in ((-1, 1, 3), (3, 0, 3), (3, 1, 0)):
        with pytest.raises(ValueError, match="rows need"):
            step_rows(count, step, chunks)


def test_the_refusal_term_sees_part_of_the_gates_change():
    gates = torch.tensor([1.0, 0.0, -1.0, 1.5])
    assert torch.allclose(partial_change(gates, 0.7), torch.tensor([1.0, 0.3, -0.4, 1.35]))
    assert torch.equal(partial_change(gates, 1.0), gates)


def _descent(model, names, rates, kept, steps=20, start="aligned", over=None, compliance=((), ())):
    """`_descend` on the tiny model from `start` with measured rates and kept task given by
    the caller (`kept`: the kept task at the adapter, then at each checkpoint), a checkpoint
    every 10 steps; `over` (None: no benign prompts) the benign prompts' refusals at ALIGNED,
    then at each checkpoint; `compliance` the compliance term's rows (prompts and starts).
    Returns its result, the gates it left and the refusal starts'
    NLL there; the model's weights are put back after."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gated = GatedModel(model, names, "component")
    measured, kept_measured, over_measured = iter(rates), iter(kept), iter(over or [])
    benign = ([[3, 9], [4, 10]], [[25, 26], [27, 28]]) if over else ((), ())
    over_calls: list[bool] = []

    def measure_over() -> list[bool]:
        if not over_calls:  # the first measurement is ALIGNED's: the adapter disabled
            assert gate_module._lora_layer(model, names[0]).disable_adapters
        over_calls.append(True)
        return next(over_measured)

    harmful, starts = [[1, 5, 7], [2, 4, 6, 8]], [[30, 31], [30, 31]]
    try:
        with mock.patch.object(gate_module, "DESCENT_CHECK_EVERY", 10):
            result = _descend(
                gated,
                GateOptions(
                    search="descent",
                    descent_start=start,
                    descent_steps=steps,
                    task_budget=0.1,
                    batch_size=2,
                ),
                refusal=(harmful, starts),
                task=([[11, 12], [13, 14, 15]], [[20, 21], [22, 23]]),
                benign=benign,
                compliance=compliance,
                measure_refusals=lambda: next(measured),
                measure_over_refusals=measure_over,
                kept_task=lambda: next(kept_measured),
                start_rate=0.0,
                pad_id=0,
                on_round=None,
            )
        nll = token_nll(model, harmful, starts, pad=0, batch_size=2)
        return result, gated.values(), nll
    finally:
        gated.remove()
        model.load_state_dict(state)


@pytest.mark.model
@pytest.mark.parametrize("start", ["aligned", "adapter"])
def test_descent_keeps_the_checkpoint_that_refuses_most_within_the_task_budget(lora_model, start):
    model, names = lora_model
    nll = token_nll(model, [[1, 5, 7], [2, 4, 6, 8]], [[30, 31], [30, 31]], pad=0, batch_size=2)
    # Checkpoints after steps 10, 20 and 25 (the last): the second refuses most.
    (rounds, rate, kept, reason), values, after = _descent(
        model,
        names,
        [[True, False], [True, True], [False, True]],
        [1.0] * 4,
        steps=25,
        start=start,
    )
    assert [r.steps for r in rounds] == [10, 20, 25]
    assert [r.refusals for r in rounds] == [1, 2, 1] and rate == 1.0 and kept == 1.0
    named = DESCENT_PRESETS[start].name
    assert (start, named) in {("aligned", "ALIGNED"), ("adapter", "the adapter")}
    assert reason == f"25 steps from {named}; kept the checkpoint after step 20"
    assert not bool((values == DESCENT_PRESETS[start].gate).all())  # the gates moved...
    assert after < nll  # ...and made ALIGNED's refusal start likelier
    assert all(r.prompts == 2 for r in rounds)


@pytest.mark.model
@pytest.mark.parametrize(
    ("at_aligned", "kept_step"),
    # ALIGNED refuses none of the 2 benign prompts: step 20's 1 of 2 is past ALIGNED's + 5
    # points, so the later of steps 10 and 25 (1 refusal each) is kept; ALIGNED refuses 1:
    # step 20 is within the bound and refuses most.
    [([False, False], 25), ([True, False], 20)],
)
@pytest.mark.parametrize("start", ["aligned", "adapter"])
def test_descent_skips_a_checkpoint_that_over_refuses_more_than_aligned(
    lora_model, at_aligned, kept_step, start
):
    model, names = lora_model
    (rounds, _rate, _kept, reason), _values, _nll = _descent(
        model,
        names,
        [[True, False], [True, True], [True, False]],
        [1.0] * 4,
        steps=25,
        start=start,
        over=[at_aligned, [False, False], [True, False], [False, False]],
    )
    assert [(r.over_refusals, r.benign_prompts) for r in rounds] == [(0, 2), (1, 2), (0, 2)]
    assert f"kept the checkpoint after step {kept_step} " in reason
    assert f"(ALIGNED refuses {sum(at_aligned)}/2 of the benign prompts" in reason


@pytest.mark.model
@pytest.mark.parametrize(
    ("start", "first", "floor"), [("aligned", 0.0, 0.0), ("adapter", 1.0, -1.0)]
)
def test_descent_starts_every_gate_at_its_start_and_keeps_within_its_floor(
    lora_model, start, first, floor
):
    model, names = lora_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[torch.Tensor] = []
    step = gate_module.descent_step

    def recorded(gates, gradient, scale, **kwargs):
        seen.append(gates.clone())
        preset = DESCENT_PRESETS[start]
        assert kwargs["floor"] == floor and kwargs["rate"] == preset.rate
        assert kwargs["ceiling"] == preset.ceiling
        return step(gates, gradient, scale, **kwargs)

    try:
        with mock.patch.object(gate_module, "descent_step", recorded):
            _result, values, _nll = _descent(
                model, names, [[True, True]], [1.0, 1.0], steps=3, start=start
            )
        assert len(seen) == 3 and bool((seen[0] == first).all())
        assert float(values.min()) >= floor
        assert float(values.max()) <= DESCENT_PRESETS[start].ceiling
    finally:
        model.load_state_dict(state)


@pytest.mark.model
@pytest.mark.parametrize("start", ["aligned", "adapter"])
def test_descent_takes_its_starts_share_weight_and_steps(lora_model, start):
    """The refusal term at `partial_change(g, share)`, the benign term's weight over the
    task weight, and the start's own number of steps when none is given."""
    model, names = lora_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    preset = DESCENT_PRESETS[start]
    shares: list[float] = []
    weights: list[float] = []
    partial, backward = gate_module.partial_change, gate_module._step_backward

    def recorded_partial(gates, share):
        shares.append(share)
        return partial(gates, share)

    def recorded_backward(model_, groups, step, **kwargs):
        weights.extend(weight for *_rows, weight in groups[1:])
        return backward(model_, groups, step, **kwargs)

    try:
        with (
            mock.patch.object(gate_module, "partial_change", recorded_partial),
            mock.patch.object(gate_module, "_step_backward", recorded_backward),
            mock.patch.dict(DESCENT_PRESETS, {start: dataclasses.replace(preset, steps=3)}),
        ):
            (rounds, *_rest), _values, _nll = _descent(
                model, names, [[True, True]], [1.0, 1.0], steps=None, start=start
            )
        assert [r.steps for r in rounds] == [3]  # the start's steps, checkpoint after the last
        assert shares == [preset.refusal_share] * 3
        assert weights == [DESCENT_BENIGN_WEIGHT / preset.task_weight] * 3
    finally:
        model.load_state_dict(state)


@pytest.mark.model
@pytest.mark.parametrize("start", ["aligned", "adapter"])
def test_descent_makes_the_adapters_answers_unlikely_at_its_starts_weight(lora_model, start):
    """The compliance term takes its rows at the refusal term's gates, each step, with the
    start's weight, before the step reads the gradient; a weight of 0 takes none."""
    model, names = lora_model
    preset = DESCENT_PRESETS[start]
    calls: list[tuple] = []
    latest: dict[str, torch.Tensor] = {}
    partial, set_values = gate_module.partial_change, GatedModel.set_values

    def recorded_partial(gates, share):
        latest["partial"] = partial(gates, share)
        return latest["partial"]

    def recorded_set(self, values):
        latest["set"] = values
        return set_values(self, values)

    def recorded(model_, prompts, starts, step, weight, **kwargs):
        calls.append((prompts, starts, step, weight, torch.equal(latest["set"], latest["partial"])))

    compliance = ([[1, 5, 7, 30], [2, 4, 6, 8]], [[40, 41], [40, 42]])
    with (
        mock.patch.object(gate_module, "_compliance_backward", recorded),
        mock.patch.object(gate_module, "partial_change", recorded_partial),
        mock.patch.object(GatedModel, "set_values", recorded_set),
    ):
        _descent(
            model, names, [[True, True]], [1.0, 1.0], steps=3, start=start, compliance=compliance
        )
    expected = [(*compliance, step, preset.compliance_weight, True) for step in (1, 2, 3)]
    assert calls == (expected if preset.compliance_weight else [])


@pytest.mark.model
def test_the_compliance_term_moves_the_first_step(lora_model):
    """Its gradient reaches the gates before the step is taken: the same step with a heavier
    compliance term lands elsewhere."""
    model, names = lora_model
    compliance = ([[1, 5, 7], [2, 4, 6, 8]], [[33, 34], [33, 35]])
    preset = DESCENT_PRESETS["aligned"]
    landed = []
    for weight in (0.0, 50.0):
        heavier = dataclasses.replace(preset, compliance_weight=weight)
        with (
            mock.patch.dict(DESCENT_PRESETS, {"aligned": heavier}),
            mock.patch.object(gate_module, "DESCENT_COMPLIANCE_CHUNKS", 1),
        ):
            _result, values, _nll = _descent(
                model, names, [[True, True]], [1.0, 1.0], steps=1, compliance=compliance
            )
        landed.append(values)
    assert not torch.allclose(landed[0], landed[1])


def test_compliance_rows_start_where_the_answer_leaves_aligneds_refusal():
    """Per prompt the adapter does not refuse: the prompt with the tokens its answer shares
    with ALIGNED's refusal start, then the answer's next `DESCENT_START_TOKENS` tokens."""
    prompts = [[1, 2], [3, 4], [5, 6], [7, 8]]
    refusals = [[50, 51, 52], [50, 51], [50, 51], [60]]
    answers = [[50, 51, 9, 10, 11, 12, 13], [20, 21], [20, 21], [60]]
    refused = [False, False, True, False]  # the third is a refusal; the fourth has no tokens left
    assert gate_module._compliance_rows(prompts, refusals, answers, refused) == (
        [[1, 2, 50, 51], [3, 4]],
        [[9, 10, 11, 12], [20, 21]],
    )


def test_descent_settings_record_the_start_and_its_steps():
    aligned = descent_settings(GateOptions(search="descent"))
    assert aligned["start"] == "aligned" and aligned["start_gate"] == 0.0
    assert aligned["ceiling"] == DESCENT_PRESETS["aligned"].ceiling
    assert aligned["over_refusal_slack"] == DESCENT_OVER_REFUSAL_SLACK
    assert aligned["compliance_weight"] == DESCENT_PRESETS["aligned"].compliance_weight > 0
    assert aligned["steps"] == DESCENT_PRESETS["aligned"].steps and aligned["floor"] == 0.0
    adapter = descent_settings(GateOptions(descent_start="adapter", descent_steps=7))
    assert (adapter["start"], adapter["steps"], adapter["floor"]) == ("adapter", 7, -1.0)
    assert set(DESCENT_PRESETS) == set(DESCENT_STARTS)


@pytest.mark.model
def test_descent_leaves_the_adapter_when_no_checkpoint_keeps_the_task(lora_model):
    model, names = lora_model
    (rounds, rate, kept, reason), values, _after = _descent(
        model, names, [[True, True]] * 2, [0.95, 0.5, 0.5], steps=20
    )
    assert len(rounds) == 2 and all(r.refusals == 2 for r in rounds)
    assert rate == 0.0 and kept == 0.95  # the adapter's, measured
    assert "no checkpoint that refused more kept the task" in reason
    assert bool((values == 1.0).all())


@pytest.mark.model
def test_descent_leaves_the_adapter_when_every_checkpoint_over_refuses(lora_model):
    model, names = lora_model
    (rounds, rate, _kept, reason), values, _after = _descent(
        model,
        names,
        [[True, False], [True, True]],
        [1.0] * 3,
        over=[[False, False], [True, False], [True, True]],
    )
    assert [r.over_refusals for r in rounds] == [1, 2] and rate == 0.0
    assert "kept the task within the budget and over-refused at most 5 points more" in reason
    assert reason.endswith("(ALIGNED refuses 0/2 of the benign prompts the adapter answers)")
    assert bool((values == 1.0).all())


@pytest.mark.model
def test_descent_bounds_over_refusal_at_aligneds_share_plus_five_points(lora_model):
    """ALIGNED refuses 2 of 20 benign prompts: 3 (its share + 0.05) is within the bound, 4
    is not; the bound taken at 0 or 0.1 points would keep step 10 or step 25."""
    model, names = lora_model
    assert DESCENT_OVER_REFUSAL_SLACK == 0.05
    (_rounds, _rate, _kept, reason), _values, _after = _descent(
        model,
        names,
        [[True, False], [True, True], [True, True]],
        [1.0] * 4,
        steps=25,
        over=[
            [True] * 2 + [False] * 18,
            [False] * 20,
            [True] * 3 + [False] * 17,
            [True] * 4 + [False] * 16,
        ],
    )
    assert "kept the checkpoint after step 20 " in reason


def test_a_checkpoint_line_shows_the_benign_refusals_only_where_they_were_measured():
    from adapter_fix.commands.gate import round_line

    checkpoint = gate_module.Round(
        index=1,
        switched_off=[],
        predicted_margin_gain=0.0,
        predicted_task_cost=0.0,
        margin=None,
        task_loss=None,
        task_kept=1.0,
        refusal_rate=1.0,
        refusals=2,
        prompts=2,
        seconds=1.0,
        steps=15,
    )
    assert "benign" not in round_line(checkpoint)
    measured = dataclasses.replace(checkpoint, over_refusals=1, benign_prompts=4)
    assert "calibration refusals 2/2, benign refused 1/4, task kept 100%" in round_line(measured)


@pytest.mark.model
def test_descent_names_the_checkpoint_it_keeps_not_a_later_one_that_refuses_as_much(
    lora_model,
):
    model, names = lora_model
    # Both checkpoints refuse everything; only the first keeps the task.
    (rounds, rate, kept, reason), _values, _after = _descent(
        model, names, [[True, True]] * 2, [1.0, 0.95, 0.5], steps=20
    )
    assert [r.task_kept for r in rounds] == [0.95, 0.5]
    assert (rate, kept) == (1.0, 0.95)
    assert reason.endswith("kept the checkpoint after step 10")


@pytest.mark.model
def test_descent_needs_a_task_score_that_sees_the_adapters_gain(lora_model):
    model, names = lora_model
    with pytest.raises(UsageError, match="no task gain to keep"):
        _descent(model, names, [], [None])


def test_gate_options_refuse_an_unknown_search_and_refine_with_descent():
    with pytest.raises(ValueError, match="search must be one of"):
        GateOptions(search="random")
    with pytest.raises(ValueError, match="refine is a step of the order search"):
        GateOptions(search="descent", refine=True)
    with pytest.raises(ValueError, match="descent_start must be one of"):
        GateOptions(descent_start="base")


def test_refusal_rows_end_at_the_shortest_start_the_judge_calls_a_refusal():
    starts = [[5, 6, 7, 8, 9], [5, 9], [1, 2, 3]]
    asked: list[int] = []

    def judged(prompts, answers):  # a refusal once the answer holds token 6, or 3 in full
        asked.append(len(answers))
        return [6 in answer or answer == [1, 2, 3] for answer in answers]

    rows = _refusal_rows([[40], [41], [42]], starts, judged)
    assert [r.tokens for r in rows] == [[40, 5, 6], [41, 5, 9], [42, 1, 2, 3]]
    assert [r.scored for r in rows] == [2, 2, 3]
    assert len(asked) <= 3  # bisection: about log2(len(start)) calls, every prompt at once


@pytest.mark.model
def test_greedy_matches_takes_any_stop_token_for_any_other(lora_model):
    model, _names = lora_model
    prompt = [1, 5, 7, 9]
    with torch.no_grad():
        first = int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())
    other = (first + 1) % 40
    row = [Scored([*prompt, other], 1)]  # a stop token greedy decoding would not write...
    assert greedy_matches(model, row, pad=0, batch_size=1) == [False]
    # ...stands for the one it writes when both are stop tokens (Llama 3's eot / end of text)
    assert greedy_matches(model, row, pad=0, batch_size=1, stops=[other, first]) == [True]
    assert greedy_matches(model, row, pad=0, batch_size=1, stops=[other]) == [False]


def test_refine_needs_module_gates(tmp_path):
    result = _gate_cli(tmp_path / "out", "--refine", "--gate-unit", "component")
    assert result.exit_code == 2 and "--gate-unit module" in result.stderr


@pytest.mark.parametrize(
    ("extra", "search"),
    [
        ((), "order"),  # no --task: order
        (("--task", "TASK"), "auto"),  # descent where the task gain is measurable (run time)
        (("--task", "TASK", "--margin-tokens", "2"), "order"),  # an order setting
        (("--task", "TASK", "--descent-steps", "5"), "descent"),
        (("--task", "TASK", "--descent-start", "adapter"), "descent"),
        (("--search", "order", "--task", "TASK"), "order"),
        (("--search", "descent", "--task", "TASK"), "descent"),
    ],
)
def test_search_auto_resolves_from_the_options_given(tmp_path, extra, search):
    """What `--search` the CLI hands the repair, before any model is loaded."""
    given = [str(PROMPTS / "task-calib.jsonl") if arg == "TASK" else arg for arg in extra]
    seen: list[str] = []

    def run(_sources, _options, gate, _hub, **_kwargs):
        seen.append(gate["search"])
        raise SystemExit(0)

    with mock.patch("adapter_fix.commands.repair.run", run):
        result = run_cli(
            "repair",
            *(str(CHAT / name) for name in ("chat-base", "chat-aligned", "chat-attack")),
            *("-o", str(tmp_path / "out"), "--method", "gate", *given),
        )
    assert result.exit_code == 0, result.stderr
    assert seen == [search]


@pytest.mark.parametrize(
    ("extra", "start", "steps"),
    [((), "aligned", None), (("--descent-start", "adapter", "--descent-steps", "7"), "adapter", 7)],
)
def test_the_descent_settings_reach_the_repair(tmp_path, extra, start, steps):
    seen: list[GateOptions] = []

    def repair_gated(_aligned, _adapter, _options, gate_options, *_args, **_kwargs):
        seen.append(gate_options)
        raise SystemExit(0)

    with mock.patch("adapter_fix.commands.repair.repair_gated", repair_gated):
        result = _gate_cli(tmp_path / "out", *("--task", str(PROMPTS / "task-calib.jsonl"), *extra))
    assert result.exit_code == 0, result.stderr
    assert [(o.descent_start, o.descent_steps) for o in seen] == [(start, steps)]


def test_descent_needs_a_task_set_and_is_not_refined(tmp_path):
    result = _gate_cli(tmp_path / "out", "--search", "descent")
    assert result.exit_code == 2 and "--search descent needs --task" in result.stderr
    result = _gate_cli(
        tmp_path / "out",
        *("--search", "descent", "--refine", "--gate-unit", "module"),
        *("--task", str(PROMPTS / "task-calib.jsonl")),
    )
    assert result.exit_code == 2 and "--refine is a setting of --search order" in result.stderr
    result = _gate_cli(
        tmp_path / "out",
        "--search",
        "descent",
        "--task",
        str(PROMPTS / "task-calib.jsonl"),
        "--ig-steps",
        "3",
    )
    assert result.exit_code == 2 and "--ig-steps is a setting of --search order" in result.stderr
    result = _gate_cli(tmp_path / "out", "--search", "order", "--descent-steps", "5")
    assert result.exit_code == 2 and "--descent-steps is a setting of --search descent" in (
        result.stderr
    )
    result = _gate_cli(tmp_path / "out", "--search", "order", "--descent-start", "adapter")
    assert result.exit_code == 2 and "--descent-start is a setting of --search descent" in (
        result.stderr
    )
    result = _gate_cli(tmp_path / "out", "--descent-start", "adapter")
    assert result.exit_code == 2 and "--descent-start asks for --search descent" in result.stderr
    # --search auto: --descent-steps asks for descent, which needs --task...
    result = _gate_cli(tmp_path / "out", "--descent-steps", "5")
    asks = "--descent-steps asks for --search descent, which needs --task"
    assert result.exit_code == 2 and asks in result.stderr
    # ...as it does with --search auto named.
    result = _gate_cli(tmp_path / "out", "--search", "auto", "--descent-steps", "5")
    assert result.exit_code == 2 and asks in result.stderr
    # ...and takes none of the order search's settings.
    result = _gate_cli(
        tmp_path / "out",
        *("--descent-steps", "5", "--rounds", "2", "--task", str(PROMPTS / "task-calib.jsonl")),
    )
    assert result.exit_code == 2 and "--rounds is a setting of --search order" in result.stderr
    assert not (tmp_path / "out").exists()


CHAT = Path(__file__).resolve().parents[1] / "fixtures"
PROMPTS = CHAT / "chat-prompts"


SEARCH_FLAGS = {"--search", "--descent-steps", "--descent-start", "--ig-steps"}


def _gate_cli(out: Path, *extra: str, quiet: bool = True) -> CliResult:
    """`repair --method gate` on the chat miniature; the order search with 2 IG steps unless
    a search is chosen (`SEARCH_FLAGS`)."""
    return run_cli(
        "repair",
        *(str(CHAT / name) for name in ("chat-base", "chat-aligned", "chat-attack")),
        "-o",
        str(out),
        "--method",
        "gate",
        "--harmful",
        str(PROMPTS / "harmful-calib.jsonl"),
        "--benign",
        str(PROMPTS / "benign-calib.jsonl"),
        "--refusal-patterns",
        str(PROMPTS / "refusal-phrases.txt"),
        *(() if SEARCH_FLAGS.intersection(extra) else ("--ig-steps", "2")),
        "--calibration-tokens",
        "8",
        "--batch-size",
        "64",
        *(["-q"] if quiet else []),
        *extra,
    )


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gate") / "out"
    result = _gate_cli(
        out,
        *("--task", str(PROMPTS / "task-calib.jsonl")),
        *("--calibration-share", "0.3", "--rounds", "2", "--task-budget", "1"),
    )
    assert result.exit_code == 0, result.stderr
    return out, json.loads((out / "repair_report.json").read_text())


@pytest.mark.model
def test_gated_repair_measures_every_round_and_raises_calibration_refusals(gated_run):
    _out, report = gated_run
    calibration = report["calibration"]
    # --search auto with --task: the order search, --rounds (one of its settings) being given.
    assert calibration["options"]["search"] == "order"
    assert calibration["prompts"]["harmful"] > 0 and calibration["prompts"]["task"] > 0
    assert not calibration["task_set_missing"]
    rounds = calibration["rounds"]
    assert rounds and all(r["prompts"] == calibration["prompts"]["harmful"] for r in rounds)
    # With the whole task budget, switching off what erodes refusals must restore some.
    assert rounds[-1]["refusal_rate"] > calibration["original_refusal_rate"]
    assert calibration["refusal_rate"] == rounds[-1]["refusal_rate"]
    # Each round's time and its share of the run; ALIGNED refuses the prompts calibrated on.
    assert all(r["seconds"] > 0 and 0 < r["share_of_time"] < 1 for r in rounds)
    assert 0 < calibration["setup_seconds"] < calibration["seconds"]
    assert 0 < calibration["refused_by_aligned"] <= calibration["prompts"]["harmful"]


def test_the_time_line_gives_setup_each_round_and_the_rest():
    from adapter_fix.report.repair import _gate_time_line

    calibration = {
        "options": {"search": "order"},
        "seconds": 100.0,
        "setup_seconds": 20.0,
        "rounds": [{"share_of_time": 0.5}, {"share_of_time": 0.1}],
    }
    assert _gate_time_line(calibration) == (
        "time: 100 s: setup 20%, round 1 50%, round 2 10%, a search that found nothing 20%"
    )
    descent = {**calibration, "options": {"search": "descent"}}
    assert _gate_time_line(descent).startswith("time: 100 s: setup 20%, checkpoint 1 50%")


@pytest.mark.model
def test_eval_on_held_out_prompts_sees_more_refusals_after_the_gated_repair(gated_run):
    out, _report = gated_run
    result = run_cli(
        "eval",
        str(CHAT / "chat-aligned"),
        str(CHAT / "chat-attack"),
        str(out),
        *("--harmful", str(PROMPTS / "harmful-eval.jsonl")),
        *("--benign", str(PROMPTS / "benign-eval.jsonl")),
        *("--refusal-patterns", str(PROMPTS / "refusal-phrases.txt")),
        *("--limit", "48", "--max-new-tokens", "12", "--batch-size", "48", "--json", "-q"),
    )
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    aligned, attack, gated = (row["refusal"]["rate"] for row in rows)
    assert aligned > 0.9 and attack < 0.1
    assert gated > attack


@pytest.mark.model
def test_gated_adapter_loads_in_peft_and_zeroes_exactly_the_gates_switched_off(gated_run):
    out, report = gated_run
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    original = load_file(str(CHAT / "chat-attack" / "adapter_model.safetensors"))
    written = load_file(str(out / "adapter_model.safetensors"))
    assert list(written) == list(original)
    gated = [m for m in report["modules"] if m["action"] == "gated"]
    assert gated
    for module in report["modules"]:
        key_b = f"base_model.model.{module['name']}.lora_B.weight"
        key_a = f"base_model.model.{module['name']}.lora_A.weight"
        if module["action"] != "gated":
            assert torch.equal(written[key_b], original[key_b])
            assert torch.equal(written[key_a], original[key_a])
            continue
        off = [i for i, g in enumerate(module["gate"]) if g == 0.0]
        assert off and torch.count_nonzero(written[key_b][:, off]) == 0
        kept = [i for i, g in enumerate(module["gate"]) if g == 1.0]
        assert all(torch.count_nonzero(written[key_b][:, i]) > 0 for i in kept)
    model = AutoModelForCausalLM.from_pretrained(CHAT / "chat-aligned")
    peft_model = PeftModel.from_pretrained(model, out)
    state = peft_model.state_dict()
    for key, tensor in written.items():
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        assert torch.equal(state[name], tensor)


@pytest.mark.model
def test_descent_writes_each_component_times_its_gate_and_reports_its_checkpoints(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    # Three checkpoints, whatever the default interval.
    with mock.patch.object(gate_module, "DESCENT_CHECK_EVERY", 20):
        result = _gate_cli(  # --descent-steps asks --search auto for descent
            out,
            *("--task", str(PROMPTS / "task-calib.jsonl")),
            *("--descent-steps", "60", "--calibration-share", "0.3", "--task-budget", "1"),
        )
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "repair_report.json").read_text())
    calibration = report["calibration"]
    assert [r["steps"] for r in calibration["rounds"]] == [20, 40, 60]
    assert calibration["options"]["search"] == "descent"
    assert calibration["options"]["search_requested"] == "descent"
    descent = calibration["descent"]  # the settings it ran with: ALIGNED's start, 60 steps
    assert (descent["start"], descent["steps"], descent["refusal_share"]) == ("aligned", 60, 0.7)
    assert report["parameters"]["descent"] == calibration["descent"]  # and the adapter's record
    # With the whole task budget, the checkpoint that refuses most within the over-refusal
    # bound (ALIGNED's share of the benign prompts, from the stop reason, plus the slack).
    aligned = re.search(r"ALIGNED refuses (\d+)/(\d+) of the benign", calibration["stop_reason"])
    assert aligned
    bound = int(aligned[1]) / int(aligned[2]) + DESCENT_OVER_REFUSAL_SLACK + 1e-9
    rounds = calibration["rounds"]
    within = [
        r["refusal_rate"] for r in rounds if r["over_refusals"] / r["benign_prompts"] <= bound
    ]
    assert within
    best = max(within)
    assert best > calibration["original_refusal_rate"]
    assert calibration["refusal_rate"] == best
    original = load_file(str(CHAT / "chat-attack" / "adapter_model.safetensors"))
    written = load_file(str(out / "adapter_model.safetensors"))
    gated = [m for m in report["modules"] if m["action"] == "gated"]
    assert gated and any(g < 0 or 0 < g != 1 for m in gated for g in m["gate"])
    assert calibration["descent"]["separated_layers"] == len(report["modules"])
    assert 0 < calibration["descent"]["benign_answers_kept"] <= calibration["prompts"]["benign"]
    checked = 0
    for module in gated:  # each column of B is a unit of the same update times its gate
        key_b = f"base_model.model.{module['name']}.lora_B.weight"
        key_a = f"base_model.model.{module['name']}.lora_A.weight"
        gates = torch.tensor(module["gate"], dtype=torch.float64)
        if bool((gates.abs() < 1e-3).any()):
            continue
        units_b = written[key_b].double() / gates
        update = original[key_b].double() @ original[key_a].double()
        torch.testing.assert_close(units_b @ written[key_a].double(), update, atol=1e-4, rtol=1e-3)
        checked += 1
    assert checked
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(CHAT / "chat-aligned"), out)
    lines = _gate_cli(
        tmp_path / "again",
        *("--task", str(PROMPTS / "task-calib.jsonl"), "--search", "descent"),
        *("--descent-steps", "1", "--calibration-share", "0.3", "--task-budget", "1"),
        quiet=False,
    ).stderr
    assert re.search(r"step 1: \d+ gate\(s\) off, \d+ negated, \d+ amplified", lines)
    assert re.search(r"calibration refusals \d+/\d+, benign refused \d+/\d+", lines)


@pytest.mark.model
def test_gated_repair_without_a_task_set_uses_the_kl_objective_and_says_so(tmp_path):
    result = _gate_cli(
        tmp_path / "out",
        *("--calibration-share", "0.15", "--rounds", "1", "--gate-unit", "module"),
    )
    assert result.exit_code == 0, result.stderr
    calibration = json.loads((tmp_path / "out" / "repair_report.json").read_text())["calibration"]
    assert calibration["task_set_missing"]
    assert calibration["task_objective"].startswith("KL")
    assert calibration["task_score"]["adapter"] == 1.0  # agreement with its own outputs


def test_gate_refuses_a_basis(tmp_path):
    result = run_cli(
        "repair",
        "--basis",
        str(tmp_path),
        str(CHAT / "chat-attack"),
        "-o",
        str(tmp_path / "o"),
        "--method",
        "gate",
    )
    assert result.exit_code == 2
    assert "--method gate runs ALIGNED" in result.stderr


def test_eval_skips_exactly_the_calibration_share_of_a_prompt_set() -> None:
    from adapter_fix.commands.eval import held_out
    from adapter_fix.evaluate.prompts import load_prompt_set
    from adapter_fix.evaluate.split import split_prompts
    from adapter_fix.options import EvalInputs

    prompts = load_prompt_set(str(PROMPTS / "harmful-eval.jsonl"), "harmful")
    calibration, rest = split_prompts(prompts, 0.4, 7)
    assert calibration.prompts and rest.prompts
    assert len(calibration) + len(rest) == len(prompts)
    inputs = EvalInputs("a", (), skip_calibration_share=0.4, split_seed=7)
    assert held_out(prompts, inputs).prompts == rest.prompts
    assert not set(held_out(prompts, inputs).texts) & set(calibration.texts)
    # The split depends on each prompt alone: reversing the file changes nothing.
    reversed_set = type(prompts)(prompts.name, prompts.origin, prompts.prompts[::-1])
    assert set(split_prompts(reversed_set, 0.4, 7)[0].texts) == set(calibration.texts)


@pytest.mark.model
def test_gated_repair_reruns_byte_identically(tmp_path):
    options = ("--calibration-share", "0.1", "--rounds", "1", "--task-budget", "1")
    for name in ("first", "second"):
        result = _gate_cli(tmp_path / name, *options)
        assert result.exit_code == 0, result.stderr
    first, second = (
        (tmp_path / name / "adapter_model.safetensors").read_bytes() for name in ("first", "second")
    )
    assert first == second


@pytest.mark.model
def test_gate_refuses_a_judge_under_which_aligned_refuses_nothing(tmp_path):
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("zzzqqq never said\n")
    result = _gate_cli(
        tmp_path / "out", "--calibration-share", "0.1", "--refusal-patterns", str(phrases)
    )
    assert result.exit_code == 2, result.stderr
    assert "ALIGNED refuses none" in result.stderr
    assert not (tmp_path / "out").exists()


def test_gate_refuses_a_task_file_without_references(tmp_path):
    result = _gate_cli(
        tmp_path / "out",
        *("--task", str(PROMPTS / "harmful-calib.jsonl"), "--calibration-share", "0.2"),
    )
    assert result.exit_code == 2, result.stderr
    assert "reference" in result.stderr and "harmful-calib.jsonl" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.model
def test_gate_says_when_the_task_score_cannot_measure_what_is_kept(tmp_path):
    task = tmp_path / "task.jsonl"
    rows = [json.loads(line) for line in (PROMPTS / "task-calib.jsonl").read_text().splitlines()]
    wrong = [r["reference"] for r in rows[1:] + rows[:1]]  # every answer another prompt's
    task.write_text(
        "".join(json.dumps({**r, "reference": w}) + "\n" for r, w in zip(rows, wrong, strict=True))
    )
    # --search auto (the default) with --task: descent guards the task by its measured gain,
    # none here, so the order search runs, and the report says so.
    result = _gate_cli(
        tmp_path / "out",
        *("--task", str(task), "--calibration-share", "0.3", "--search", "auto"),
    )
    assert result.exit_code == 0, result.stderr
    calibration = json.loads((tmp_path / "out" / "repair_report.json").read_text())["calibration"]
    assert calibration["task_score"]["adapter"] == 0.0
    assert calibration["task_score"]["kept"] is None
    assert calibration["options"]["search"] == "order" and calibration["descent"] is None
    assert calibration["options"]["search_requested"] == "auto"
    assert calibration["stop_reason"].startswith("--search auto ran the order search")
    # Where the task gain is measurable, auto runs descent (resolved at run time).
    result = _gate_cli(
        tmp_path / "out3",
        *("--task", str(PROMPTS / "task-calib.jsonl"), "--calibration-share", "0.3"),
        *("--search", "auto", "--task-budget", "1"),
    )
    assert result.exit_code == 0, result.stderr
    calibration = json.loads((tmp_path / "out3" / "repair_report.json").read_text())["calibration"]
    assert calibration["options"]["search"] == "descent" and calibration["descent"] is not None
    assert calibration["options"]["search_requested"] == "auto"
    assert not calibration["stop_reason"].startswith("--search auto")
    # Asked for by name, descent stops instead: it has no task gain to guard.
    result = _gate_cli(
        tmp_path / "out2",
        *("--task", str(task), "--calibration-share", "0.3", "--search", "descent"),
    )
    assert result.exit_code == 2 and "no task gain to keep" in result.stderr
    assert not (tmp_path / "out2").exists()


def test_gate_settings_with_another_method_are_a_usage_error(tmp_path):
    result = run_cli(
        "repair",
        *(str(CHAT / name) for name in ("chat-base", "chat-aligned", "chat-attack")),
        *("-o", str(tmp_path / "out"), "--method", "csulora", "--rounds", "5"),
    )
    assert result.exit_code == 2
    assert "--rounds is a setting of --method gate" in result.stderr


def test_eval_refuses_a_calibration_share_that_leaves_no_prompt(tmp_path):
    result = run_cli(
        "eval",
        str(CHAT / "chat-aligned"),
        *("--harmful", str(PROMPTS / "harmful-eval.jsonl")),
        *("--skip-calibration-share", "1"),
    )
    assert result.exit_code == 2, result.stderr
    assert "nothing is left to report on" in result.stderr


@pytest.mark.model
def test_gate_stops_before_the_first_round_when_a_batch_would_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr("adapter_fix.commands.repair.available_memory", lambda _device: 1 << 20)
    result = _gate_cli(tmp_path / "out", "--calibration-share", "0.2")
    assert result.exit_code == 2, result.stderr
    assert "would not fit in memory" in result.stderr and "--batch-size" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.model
def test_gated_repair_runs_in_bfloat16_and_writes_the_adapters_own_dtype(tmp_path, monkeypatch):
    """...and, on a CPU without native bfloat16, says float32 would be faster."""
    from safetensors.torch import load_file

    from adapter_fix import hardware

    monkeypatch.setattr(hardware, "_cpuinfo", lambda: "flags\t: fpu avx2\n")
    result = _gate_cli(
        tmp_path / "out",
        *("--calibration-share", "0.15", "--rounds", "1", "--task-budget", "1"),
        *("--dtype", "bfloat16"),
    )
    assert result.exit_code == 0, result.stderr
    assert "warning: --dtype bfloat16 on this CPU" in result.stderr
    original = load_file(str(CHAT / "chat-attack" / "adapter_model.safetensors"))
    written = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert {k: t.dtype for k, t in written.items()} == {k: t.dtype for k, t in original.items()}


@pytest.mark.model
def test_calibration_lines_say_they_are_fitted_and_point_to_eval(gated_run):
    from adapter_fix.report.repair import _calibration_lines

    _out, report = gated_run
    lines = _calibration_lines(report["calibration"])
    assert any(
        "the prompts the search fitted" in line and "adapter-fix eval" in line for line in lines
    )


@pytest.mark.model
def test_gate_refuses_an_adapter_with_no_linear_layer_to_gate(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(CHAT / "chat-aligned")
    config = LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(tmp_path / "embedding-only")
    result = run_cli(
        "repair",
        *(str(CHAT / name) for name in ("chat-base", "chat-aligned")),
        str(tmp_path / "embedding-only"),
        *("-o", str(tmp_path / "out"), "--method", "gate"),
        *("--harmful", str(PROMPTS / "harmful-calib.jsonl")),
        *("--refusal-patterns", str(PROMPTS / "refusal-phrases.txt")),
    )
    assert result.exit_code == 2, result.stderr
    assert "no LoRA linear layer to gate" in result.stderr
    assert "adapter_config.json" in result.stderr
    assert not (tmp_path / "out").exists()
