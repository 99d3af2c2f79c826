"""Attribution-guided gating of a LoRA update (METHOD.md §8.4), on the running model.

ALIGNED is loaded once with the adapter on it (peft). Each LoRA linear layer
gets a gate on its update through a forward hook on `lora_A`: a scalar (unit
`module`) or one value per rank-1 component (unit `component`, after the
layer's factors are rewritten as their singular components, same update).
Gradients are taken with respect to the gates only: every weight is frozen,
no optimizer state exists, so memory is inference plus one batch's
activations (the objectives in evaluate/objectives.py back-propagate batch
by batch and form logits only where they score).

Calibration uses only the harmful prompts ALIGNED itself refuses. Each
round: integrated gradients of the refusal margin `mu` and of the task loss
`tau` along `s * g`, the candidates ordered by harm per unit of task help
(math/gating.py: noise-sized harms ignored), then a bisection over how many
of that order to switch off, measured by teacher-forced greedy checks (the
task's exact match, ALIGNED's refusal start), and one generation with the
refusal judge for the round's refusal rate. A round that refuses no more
prompts than before is undone (its task cost bought nothing). Rounds stop
when the rate reaches the target, when even the first unit costs too much
task, when a round is undone, or after `rounds`.

`search="descent"` replaces the rounds by projected gradient descent on every
gate at once (`_descend`), from ALIGNED (every gate 0) or from the adapter
(every gate 1, and a gate may then negate its unit); a gate may amplify its
unit. The refusal term asks for ALIGNED's refusal start with part of the
adapter's update added back, and from ALIGNED a compliance term there makes
the adapter's own answer starts on the harmful prompts it does not refuse
unlikely; the task term asks for the references at the gates shrunk; each step
takes its gradient on a share of the prompts, in turn; the checkpoint refusing
most within the task budget, and over-refusing the benign calibration prompts
at most `DESCENT_OVER_REFUSAL_SLACK` more than ALIGNED, is kept.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from adapter_fix.errors import IncompatibleModelsError, UsageError
from adapter_fix.evaluate.generate import generate_ids
from adapter_fix.evaluate.judges.base import visible_answer
from adapter_fix.evaluate.objectives import (
    MemoryEstimate,
    Scored,
    batched_logprobs,
    first_difference,
    forward_rows,
    greedy_matches,
    pass_memory,
    refusal_margins,
    scored_logprobs,
    token_nll,
    with_stop,
)
from adapter_fix.io.adapter import LoraAdapter, read_factors
from adapter_fix.io.checkpoint import DTYPES
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
from adapter_fix.math.solve import as_factored, compare_updates, factored_norm
from adapter_fix.methods.base import Outcome
from adapter_fix.options import (
    DESCENT_CHECK_EVERY,
    DESCENT_OVER_REFUSAL_SLACK,
    DESCENT_PRESETS,
    GATE_UNITS,
    GateOptions,
)
from adapter_fix.results import ModuleResult

# `--search descent` (bench/README.md, "A margin on the refusal side too"; chosen on the
# testbed; each start's settings are `DESCENT_PRESETS`, in options.py): the first step
# moves its steepest gate by the start's `rate` (stopping at its bounds), later steps move
# each gate by its gradient over the first step's largest, times `rate`; a gate stays
# within `[floor, ceiling]` (below 0 it negates its unit, above 1 it amplifies it).
# The refusal term is taken with the start's `refusal_share` of the gates' change from the
# adapter (refusal must hold with part of the adapter's update added back), the task term
# at DESCENT_TASK_SCALE times the gates (the task must survive the remaining update
# shrunk): margins for prompts phrased unlike the calibration files.
DESCENT_TASK_SCALE = 0.6
DESCENT_START_TOKENS = 4
"""Tokens of ALIGNED's refusal start whose NLL the refusal term is."""
DESCENT_BENIGN_WEIGHT = 1.0
"""Weight of the benign term (the adapter's own answer starts, `DESCENT_START_TOKENS` tokens,
on the benign calibration prompts it does not refuse, at the task's stressed gates) against
the refusal term's 1, whatever the start's task weight: the search must keep answering what
the adapter answers."""
DESCENT_COMPLIANCE_CHUNKS = 10
"""The compliance term (the start's `compliance_weight`) takes each step's gradient on one
in DESCENT_COMPLIANCE_CHUNKS of its rows, in turn (`step_rows`): half the refusal term's
share. On the testbed's attack-mix (one run each) it refused as much of the second tuning
split as the refusal term's share did, and the repair took 261 s against 290 s; the same
default took 299 s in a later session, so the saving is within the machine's drift
between runs (bench/README.md, "Making the adapter's own compliance unlikely", "Session
20"). A twentieth refused one prompt fewer there."""
SEPARATION_RIDGE = 1e-3
"""`separating_basis`'s ridge on the other prompts' moment, as a share of its mean eigenvalue."""
SEPARATION_TOLERANCE = 1e-3
"""Largest relative error `|B'A' - BA| / |BA|` a layer's rewrite in the separating basis may
carry in the layer's dtype and in the adapter file's; a layer over it keeps its singular
components."""
DESCENT_CHUNKS = 5
"""Each step's gradient is taken on one in DESCENT_CHUNKS of the harmful and of the task
prompts, in turn (`step_rows`): stochastic steps at a fifth of a full step's cost. On the
testbed's attack-mix, 30 steps on a third of the prompts reached the calibration refusals
and the held-out rows of 30 full steps, and 40 on a fifth the same within a prompt or two
(bench/README.md, "The descent search at its defaults")."""


@dataclass(frozen=True)
class Calibration:
    """Token ids of the calibration data (each prompt already in the chat template).

    `harmful` prompts measure refusals; `task` prompts with `task_references`
    give the task loss; without references, `benign` prompts give the KL
    estimate of METHOD.md §8.4 (the adapted model's own outputs).
    """

    harmful: list[list[int]]
    benign: list[list[int]]
    task: list[list[int]] = field(default_factory=list)
    task_references: list[list[int]] = field(default_factory=list)


@dataclass
class GateLayer:
    """One gated LoRA layer: its name (the adapter's module name) and gate values."""

    name: str
    rank: int
    gates: Tensor  # shape (1,) for a module gate, (r,) for component gates
    handle: Any = None
    components: bool = False
    """Whether the layer's factors were rewritten as its rank-1 components (one gate each)."""


@dataclass
class Round:
    """One round's attribution, choice and measurement."""

    index: int
    switched_off: list[str]
    predicted_margin_gain: float
    predicted_task_cost: float
    margin: float | None
    """The mean refusal margin at the round's gates (None at a descent checkpoint, which
    spends no pass on it: it selects by the measured refusal rate and kept task)."""
    task_loss: float | None
    """The task loss at the round's gates (None at a descent checkpoint, as `margin`)."""
    task_kept: float | None
    refusal_rate: float
    refusals: int
    prompts: int
    seconds: float
    restored: list[str] = field(default_factory=list)
    """Units switched back on (the coarse-to-fine step: components of modules switched off)."""
    undone: bool = False
    """The round refused no more prompts than before it, so its units were switched back on
    (the task it cost bought nothing) and the repair stopped."""
    steps: int = 0
    """`--search descent`: the gradient steps taken so far (this round is a checkpoint after
    them; the predicted gain and cost are then 0, no prediction being made, and
    `switched_off` lists every unit off at the checkpoint, not only those since the last).
    0 for the order search."""
    negated: list[str] = field(default_factory=list)
    """`--search descent`: units whose gate is below -0.05 (turned round, not only off)."""
    amplified: int = 0
    """`--search descent`: how many gates are above 1.05 (their unit amplified)."""
    over_refusals: int = 0
    """`--search descent`: how many of the benign calibration prompts the adapter answers
    the checkpoint refuses (of `benign_prompts`)."""
    benign_prompts: int = 0
    """`--search descent`: the benign calibration prompts the adapter answers (0: none given
    or none answered, nothing measured)."""


@dataclass
class GateOutcome:
    """What the gated repair decided: per layer gate values and attributions, per round."""

    layers: list[GateLayer]
    attributions: dict[str, list[Attribution]]
    rounds: list[Round]
    aligned_refusal_rate: float
    """ALIGNED's refusal rate on every harmful calibration prompt."""
    refused_by_aligned: int
    """The harmful calibration prompts ALIGNED refuses: the only ones calibrated on."""
    original_refusal_rate: float
    """The adapter's refusal rate on the prompts ALIGNED refuses (so are the rates below)."""
    refusal_rate: float
    """The calibration refusal rate at the chosen gates."""
    target_met: bool
    stop_reason: str
    task_objective: str
    task_loss_adapter: float
    """`tau(1)`: the task loss with the whole update."""
    task_loss_without_update: float
    """`tau(0)`: with every gate off (ALIGNED)."""
    task_budget: float | None
    """How far `tau` may rise above `tau(1)` when no task score measures the kept task (first
    order): `task_budget * (tau(0) - tau(1))`; None when the measured score is the guard."""
    task_score_adapter: float
    """Exact match on the calibration task prompts with the whole update (with references;
    without: agreement with the adapter's own outputs, 1 by construction)."""
    task_score_without_update: float
    task_kept: float | None
    """`(score(g) - score(0)) / (score(1) - score(0))` at the chosen gates, measured; None
    when the score shows no gain of the adapter over ALIGNED (nothing to measure against)."""
    seconds: float
    setup_seconds: float
    """Before the first round: ALIGNED's and the adapter's answers, the task scores."""
    search: str = "order"
    """The search that ran (`options.search`, `auto` resolved)."""
    separated_layers: int = 0
    """`--search descent` with component units: the layers whose units were taken in the
    separating basis (`GatedModel.separate`); the others keep their singular components."""
    benign_answers_kept: int = 0
    """`--search descent`: the benign calibration prompts whose answer starts the benign
    term keeps (those the adapter does not refuse)."""


class GatedModel:
    """A peft model whose LoRA linear layers carry gates (forward hooks on `lora_A`)."""

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        unit: str,
        saved_dtypes: dict[str, torch.dtype] | None = None,
    ) -> None:
        """`saved_dtypes`: per adapter module name, the dtype its factors are written in
        (the adapter file's), where it differs from the dtype they run in."""
        if unit not in GATE_UNITS:
            raise ValueError(f"gate unit must be one of {GATE_UNITS}, got {unit!r}")
        self.model = model
        self.saved_dtypes = saved_dtypes or {}
        self.unit = unit
        self.layers: list[GateLayer] = []
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for name in names:
            layer = _lora_layer(model, name)
            lora_a = layer.lora_A[layer.active_adapters[0]]
            # On the layer's device: a gate elsewhere would copy (and synchronize) per forward.
            gate = torch.ones(1, dtype=lora_a.weight.dtype, device=lora_a.weight.device)
            gated = GateLayer(name, lora_a.weight.shape[0], gate)
            gated.handle = lora_a.register_forward_hook(_gate_hook(gated))
            self.layers.append(gated)
            if unit == "component":
                self.split(len(self.layers) - 1)

    def split(self, index: int) -> None:
        """Rewrite layer `index`'s factors as its rank-1 components (same update), each with
        its own gate, all at the layer's current (module) gate value."""
        gated = self.layers[index]
        if gated.components:
            return
        layer = _lora_layer(self.model, gated.name)
        adapter = layer.active_adapters[0]
        lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
        with torch.no_grad():
            new_b, new_a = rank_one_factors(
                lora_b.weight.double(), lora_a.weight.double(), layer.scaling[adapter]
            )
            lora_b.weight.copy_(new_b.to(lora_b.weight.dtype))
            lora_a.weight.copy_(new_a.to(lora_a.weight.dtype))
        gated.gates = gated.gates.detach().expand(gated.rank).clone()
        gated.components = True

    def inner_moments(self, rows: Sequence[Sequence[int]], *, pad: int, batch: int) -> list[Tensor]:
        """Per layer (in `layers` order), the second moment `E[z z^T]` `(r, r)`, float64 on
        the CPU, of its inner activations `z` (`lora_A`'s output, after the gates: call it
        with every gate at 1 for the adapter's own) over every token of `rows` (token ids),
        one batch at a time and with no gradient (`forward_rows`: a chat template's shared
        prefix runs once per batch and counts for every row of it)."""
        sums = [torch.zeros(layer.rank, layer.rank, dtype=torch.float64) for layer in self.layers]
        seen: list[Tensor | None] = [None] * len(self.layers)
        tokens = 0

        def recorder(index: int) -> Callable[[nn.Module, Any, Tensor], None]:
            def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
                seen[index] = output.detach()

            return hook

        def counted(mask: Tensor, copies: int) -> None:
            nonlocal tokens
            tokens += copies * int(mask.sum())
            for index, output in enumerate(seen):
                if output is not None and copies:
                    inner = output[mask.bool().to(output.device)].double().cpu()
                    sums[index] += copies * (inner.T @ inner)
                seen[index] = None

        handles = []
        for index, gated in enumerate(self.layers):
            layer = _lora_layer(self.model, gated.name)
            lora_a = layer.lora_A[layer.active_adapters[0]]
            handles.append(lora_a.register_forward_hook(recorder(index)))
        try:
            for start in range(0, len(rows), batch):
                forward_rows(self.model, rows[start : start + batch], pad, counted)
        finally:
            for handle in handles:
                handle.remove()
        return [total / max(tokens, 1) for total in sums]

    def separate(self, harmful: Sequence[Tensor], other: Sequence[Tensor]) -> int:
        """Rewrite each component layer's factors in the basis that separates its inner
        activity on harmful prompts from that on the others (`separating_basis` of the
        layer's `harmful` and `other` moments, `inner_moments`): same update, one gate per
        new unit, at the layer's current gate values (call it with every gate at 1). A layer
        whose rewrite would change its update by more than `SEPARATION_TOLERANCE` in its
        dtype or the one it is written in (`saved_dtypes`), or would not be finite, keeps
        its singular components. Returns how many layers were rewritten."""
        rewritten = 0
        for gated, moment_h, moment_o in zip(self.layers, harmful, other, strict=True):
            if not gated.components:
                continue
            layer = _lora_layer(self.model, gated.name)
            adapter = layer.active_adapters[0]
            lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            basis, _ = separating_basis(moment_h, moment_o, SEPARATION_RIDGE)
            # On the CPU, where the moments and so the basis are (the layer may be on a GPU).
            old_b, old_a = lora_b.detach().cpu().double(), lora_a.detach().cpu().double()
            wide_b, wide_a = in_basis(old_b, old_a, basis)
            new_b, new_a = wide_b.to(lora_b.dtype), wide_a.to(lora_a.dtype)
            # Checked in the coarser of the dtype it runs in and the one it is written in.
            coarse = max(
                (lora_b.dtype, self.saved_dtypes.get(gated.name, lora_b.dtype)),
                key=lambda dtype: torch.finfo(dtype).eps,
            )
            update = old_b @ old_a
            rounded = wide_b.to(coarse).double() @ wide_a.to(coarse).double()
            error = torch.linalg.matrix_norm(rounded - update)
            if not bool(error <= SEPARATION_TOLERANCE * torch.linalg.matrix_norm(update)):
                continue  # over the tolerance, or not finite
            with torch.no_grad():
                lora_b.copy_(new_b)
                lora_a.copy_(new_a)
            rewritten += 1
        return rewritten

    def units(self) -> list[tuple[int, int]]:
        """Every gate as `(layer index, position)`, in layer order."""
        return [(i, j) for i, layer in enumerate(self.layers) for j in range(len(layer.gates))]

    def _device(self) -> torch.device:
        """Where the gate vectors of `values()` and `gradients()` live: the first layer's."""
        return self.layers[0].gates.device if self.layers else torch.device("cpu")

    def values(self) -> Tensor:
        """All gate values as one vector `(units,)`, in `units()` order."""
        device = self._device()
        return torch.cat([layer.gates.detach().to(device) for layer in self.layers])

    def set_values(self, values: Tensor) -> None:
        """Set the gates from one vector `(units,)` (each layer's part a leaf that collects
        gradients, on the device its gates were made on: the layer's)."""
        offset = 0
        for layer in self.layers:
            size = len(layer.gates)
            part = values[offset : offset + size].detach().to(layer.gates)  # device and dtype
            layer.gates = part.clone().requires_grad_(True)
            offset += size

    def gradients(self) -> Tensor:
        """The gates' accumulated gradients `(units,)`, in `units()` order (0 where none)."""
        device = self._device()
        return torch.cat(
            [
                (
                    layer.gates.grad
                    if layer.gates.grad is not None
                    else torch.zeros_like(layer.gates)
                ).to(device)
                for layer in self.layers
            ]
        )

    def remove(self) -> None:
        for layer in self.layers:
            if layer.handle is not None:
                layer.handle.remove()
                layer.handle = None

    def factors(self, layer: GateLayer) -> tuple[Tensor, Tensor]:
        """`(B, A)` of a layer as it runs (after the component rewrite), gates not applied:
        `(out, r)` and `(r, in)`, on the CPU (where adapters are written) whatever device the
        model runs on."""
        module = _lora_layer(self.model, layer.name)
        adapter = module.active_adapters[0]
        return (
            module.lora_B[adapter].weight.detach().cpu(),
            module.lora_A[adapter].weight.detach().cpu(),
        )

    def gate_values(self, layer: GateLayer) -> Tensor:
        """A layer's gate values, detached, on the CPU: `(1,)` for a module gate, `(r,)` for
        component gates."""
        return layer.gates.detach().cpu()


def _gate_hook(layer: GateLayer) -> Callable[[nn.Module, Any, Tensor], Tensor]:
    def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> Tensor:
        return output * layer.gates.to(device=output.device, dtype=output.dtype)

    return hook


def _lora_layer(model: nn.Module, name: str) -> Any:
    """The peft LoRA layer of adapter module `name` (`model.layers.0.self_attn.q_proj`)."""
    for prefix in ("base_model.model.", ""):
        try:
            layer = model.get_submodule(prefix + name)
        except AttributeError:
            continue
        if hasattr(layer, "lora_A"):
            return layer
    raise IncompatibleModelsError(
        f"peft put no LoRA layer at module {name!r} of ALIGNED, so it cannot be gated. "
        "Was the adapter trained on another model?",
        key=name,
    )


def gate_repair(
    gated: GatedModel,
    calibration: Calibration,
    options: GateOptions,
    *,
    judge_refusals: Callable[[Sequence[Sequence[int]], list[str]], list[bool]],
    decode: Callable[[list[int]], str],
    pad_id: int,
    stop_ids: Sequence[int],
    on_round: Callable[[Round], None] | None = None,
) -> GateOutcome:
    """Choose the gates of `gated` (see the module docstring); the model is left gated.

    The refusal rate is measured with greedy generation of
    `options.max_new_tokens` tokens and `judge_refusals(prompts, answers)` on
    the decoded answers, on the harmful calibration prompts ALIGNED itself
    refuses (measured first, with the adapter disabled): on the others the
    margin would reward compliance.
    """
    started = time.perf_counter()
    model = gated.model
    batch = options.batch_size
    generation = generation_batch(model, calibration, options)

    def generate(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        answers = generate_ids(
            model,
            prompts,
            pad=pad_id,
            stops=stop_ids,
            max_new_tokens=options.max_new_tokens,
            batch_size=generation,
        )
        return [with_stop(answer, stop_ids, options.max_new_tokens) for answer in answers]

    def refusals(prompts: Sequence[Sequence[int]], outputs: Sequence[list[int]]) -> list[bool]:
        return judge_refusals(prompts, [decode(tokens) for tokens in outputs])

    with model.disable_adapter():
        aligned_outputs = generate(calibration.harmful)
    aligned_refused = refusals(calibration.harmful, aligned_outputs)
    aligned_rate = _share(aligned_refused)
    if aligned_rate == 0:
        raise UsageError(
            f"ALIGNED refuses none of the {len(aligned_refused)} harmful calibration prompts "
            "under this judge, so there is no refusal to restore: check --harmful and "
            "--refusal-patterns (the phrases must match how ALIGNED refuses)."
        )
    kept_prompts = [i for i, refused in enumerate(aligned_refused) if refused]
    harmful = [calibration.harmful[i] for i in kept_prompts]
    refusal_starts = [aligned_outputs[i] for i in kept_prompts]
    target = options.target_refusal

    task_objective, task_prompts, task_targets, baseline = _task_data(
        gated, calibration, generate, pad_id=pad_id, batch_size=batch
    )

    def task_loss(backward: bool = False) -> float:
        nll = token_nll(
            model, task_prompts, task_targets, pad=pad_id, batch_size=batch, backward=backward
        )
        return nll - baseline

    task_rows = [
        Scored([*prompt, *target_ids], len(target_ids))
        for prompt, target_ids in zip(task_prompts, task_targets, strict=True)
    ]

    def task_score() -> float:
        """Greedy exact match of the task answers with the targets (references, or the g = 1
        outputs), teacher-forced (`greedy_matches`: the outcome of greedy generation)."""
        return _share(
            greedy_matches(model, task_rows, pad=pad_id, batch_size=batch, stops=stop_ids)
        )

    # What the judge calls a refusal, as early as it does: the shortest start of ALIGNED's
    # answer judged a refusal. A model whose greedy answer begins with it refuses (a keyword
    # judge finds the phrase in any answer that begins so), which one teacher-forced pass
    # tells (`greedy_matches`): the round's search measures that share at each try and
    # generation measures the rate once per round.
    def refusal_starts_judged(
        prompts: Sequence[Sequence[int]], starts: Sequence[list[int]]
    ) -> list[bool]:
        """The judge's verdicts on answer starts; an empty start is none (a judge that counts
        an empty answer as a refusal would otherwise count any first token)."""
        texts = [decode(tokens) for tokens in starts]
        verdicts = judge_refusals(prompts, texts)
        return [
            bool(visible_answer(text)) and verdict
            for text, verdict in zip(texts, verdicts, strict=True)
        ]

    refusal_rows = _refusal_rows(harmful, refusal_starts, refusal_starts_judged)

    def refusal_share() -> float:
        matches = greedy_matches(model, refusal_rows, pad=pad_id, batch_size=batch, stops=stop_ids)
        # A start with nothing to write (an empty refusal) tells nothing: not a refusal here.
        return _share([m and r.scored > 0 for m, r in zip(matches, refusal_rows, strict=True)])

    outputs = generate(harmful)
    adapter_outputs = outputs
    refused = refusals(harmful, outputs)
    original_rate = _share(refused)
    attributions: dict[str, list[Attribution]] = {}
    rounds: list[Round] = []
    gated.set_values(torch.zeros_like(gated.values()))
    task_off, score_off = task_loss(), task_score()
    gated.set_values(torch.ones_like(gated.values()))
    task_on, score_on = task_loss(), task_score()
    measurable = score_on > score_off
    task_gap = max(task_off - task_on, 0.0)

    def kept_task() -> float | None:
        """METHOD.md §9's kept task on the calibration task set: 1 = the adapter, 0 = ALIGNED;
        None when the score sees no gain of the adapter over ALIGNED to keep (then the
        first-order estimate stands in, and the report says so)."""
        if not measurable:
            return None
        return (task_score() - score_off) / (score_on - score_off)

    rate = original_rate
    kept: float | None = 1.0 if measurable else None
    measured_task = task_on
    stop_reason = f"rounds exhausted ({options.rounds})"
    setup_seconds = time.perf_counter() - started
    search = options.search
    separated_layers = 0
    benign_rows: tuple[list[list[int]], list[list[int]]] = ([], [])
    if search == "auto":  # descent guards the task by its measured gain: none, no descent
        search = "descent" if calibration.task_references and measurable else "order"
    if search == "descent" and measurable and original_rate < target:
        # The benign term's rows, and the basis the descent's units are taken in (a descent
        # without a task gain to guard stops, one the adapter does not need takes no step:
        # `_descend`).
        benign_answers = generate(calibration.benign) if calibration.benign else []
        judged = refusal_starts_judged(calibration.benign, benign_answers) if benign_answers else []
        for prompt, answer, refused_ in zip(
            calibration.benign, benign_answers, judged, strict=True
        ):
            if not refused_ and answer[:DESCENT_START_TOKENS]:
                benign_rows[0].append(list(prompt))
                benign_rows[1].append(answer[:DESCENT_START_TOKENS])
        if gated.unit == "component":
            separated_layers = _separate(
                gated,
                harmful=[[*p, *a] for p, a in zip(harmful, adapter_outputs, strict=True)],
                others=[
                    [[*p, *t] for p, t in zip(task_prompts, task_targets, strict=True)],
                    [[*p, *a] for p, a in zip(calibration.benign, benign_answers, strict=True)],
                ],
                pad=pad_id,
                batch=batch,
            )
        setup_seconds = time.perf_counter() - started
    if search == "descent":
        rounds, rate, kept, stop_reason = _descend(
            gated,
            options,
            refusal=(harmful, [start[:DESCENT_START_TOKENS] for start in refusal_starts]),
            compliance=_compliance_rows(harmful, refusal_starts, adapter_outputs, refused),
            task=(task_prompts, task_targets),
            benign=benign_rows,
            measure_refusals=lambda: refusals(harmful, generate(harmful)),
            measure_over_refusals=lambda: refusals(benign_rows[0], generate(benign_rows[0])),
            kept_task=kept_task,
            start_rate=original_rate,
            pad_id=pad_id,
            on_round=on_round,
        )
    else:
        for index in range(1, options.rounds + 1):
            round_started = time.perf_counter()
            if rate >= target:
                stop_reason = (
                    "target met" if rounds else "the adapter already refuses at the target"
                )
                break
            # Compliance starts: what the gated model answers now, on prompts it does not refuse.
            complied = [i for i, r in enumerate(refused) if not r]
            margin = functools.partial(
                _mean_margin,
                model,
                [harmful[i] for i in complied],
                [refusal_starts[i] for i in complied],
                [outputs[i] for i in complied],
                window=options.margin_tokens,
                pad=pad_id,
                batch_size=batch,
            )
            current = gated.values()
            margin_ig = _integrated_gradients(gated, margin, current, options.steps)
            task_ig = _integrated_gradients(gated, task_loss, current, options.steps)
            unit_attributions = [
                Attribution(m, t) if g > 0 else None
                for m, t, g in zip(
                    margin_ig.tolist(), task_ig.tolist(), current.tolist(), strict=True
                )
            ]
            _record(gated, unit_attributions, attributions)
            order = priority_order(
                unit_attributions,
                candidates(unit_attributions, min_harm_share=options.min_harm_share),
            )
            if not order:
                stop_reason = "no unit left that lowers the refusal margin"
                break
            # Without a task score, the first-order estimate of the kept task stands in.
            costs = itertools.accumulate(
                (max(unit_attributions[u].task_help, 0.0) for u in order), initial=0.0
            )
            first_order = [
                1.0 - (measured_task - task_on + cost) / task_gap if task_gap > 0 else 1.0
                for cost in costs
            ]
            count = search_prefix(
                len(order),
                refusal=functools.partial(
                    _measure_at, gated, current, order, lambda _: refusal_share()
                ),
                task_kept=functools.partial(
                    _measure_at,
                    gated,
                    current,
                    order,
                    functools.partial(_kept, kept_task, first_order),
                ),
                target=target,
                floor=1.0 - options.task_budget,
            )
            _switch_off(gated, current, order, count)
            if count == 0:
                gated.set_values(current)
                stop_reason = "task budget spent: each unit tried would cost more task than allowed"
                break
            chosen = order[:count]
            taken = [unit_attributions[u] for u in chosen]
            before = (outputs, refused, rate, measured_task, kept)
            outputs = generate(harmful)
            refused = refusals(harmful, outputs)
            rate = _share(refused)
            measured_task = task_loss()
            kept = kept_task()
            units = gated.units()
            undone = sum(refused) <= sum(before[1])
            round_ = Round(
                index=index,
                switched_off=[_unit_name(gated, units[u]) for u in chosen],
                predicted_margin_gain=sum(a.harm for a in taken if a is not None),
                predicted_task_cost=sum(max(a.task_help, 0.0) for a in taken if a is not None),
                margin=margin(),
                task_loss=measured_task,
                task_kept=kept,
                refusal_rate=rate,
                refusals=sum(refused),
                prompts=len(refused),
                seconds=time.perf_counter() - round_started,
                undone=undone,
            )
            rounds.append(round_)
            stop_reason = f"rounds exhausted ({options.rounds})"
            if on_round is not None:
                on_round(round_)
            if undone:  # task given up for no refusal: keep the gates as they were, and stop
                gated.set_values(current)
                outputs, refused, rate, measured_task, kept = before
                stop_reason = (
                    f"round {index} restored no refusal within the task budget, so it was undone"
                )
                break
        else:
            if rate >= target:
                stop_reason = "target met"
        if options.refine and rate >= target:
            refine_started = time.perf_counter()
            against_adapter = functools.partial(
                _mean_margin,
                model,
                harmful,
                refusal_starts,
                adapter_outputs,
                window=options.margin_tokens,
                pad=pad_id,
                batch_size=batch,
            )
            answers: list[list[list[int]]] = []

            def measure() -> float:
                answers[:] = [generate(harmful)]
                return _share(refusals(harmful, answers[0]))

            refined = refine_components(
                gated,
                options,
                margin=against_adapter,
                task_loss=task_loss,
                measure=measure,
                target=target,
            )
            if refined is not None:
                outputs = answers[0]
                refused = refusals(harmful, outputs)
                rate = _share(refused)
                kept = kept_task()
                units = gated.units()
                taken = [a for a in refined.values() if a is not None]
                rounds.append(
                    Round(
                        index=len(rounds) + 1,
                        switched_off=[],
                        predicted_margin_gain=-sum(a.harm for a in taken),
                        predicted_task_cost=-sum(max(a.task_help, 0.0) for a in taken),
                        margin=against_adapter(),
                        task_loss=task_loss(),
                        task_kept=kept,
                        refusal_rate=rate,
                        refusals=sum(refused),
                        prompts=len(refused),
                        seconds=time.perf_counter() - refine_started,
                        restored=[_unit_name(gated, units[u]) for u in refined],
                    )
                )
                stop_reason += f"; then {len(refined)} component(s) given back"
                if on_round is not None:
                    on_round(rounds[-1])
    for layer in gated.layers:
        layer.gates = layer.gates.detach()
    if options.search == "auto" and search == "order":
        stop_reason = (
            "--search auto ran the order search (the task score sees no gain of the adapter "
            f"over ALIGNED for descent to guard): {stop_reason}"
        )
    return GateOutcome(
        layers=gated.layers,
        attributions=attributions,
        rounds=rounds,
        aligned_refusal_rate=aligned_rate,
        refused_by_aligned=len(kept_prompts),
        original_refusal_rate=original_rate,
        refusal_rate=rate,
        target_met=rate >= target,
        stop_reason=stop_reason,
        task_objective=task_objective,
        task_loss_adapter=task_on,
        task_loss_without_update=task_off,
        task_budget=None if measurable else options.task_budget * task_gap,
        task_score_adapter=score_on,
        task_score_without_update=score_off,
        task_kept=kept,
        seconds=time.perf_counter() - started,
        setup_seconds=setup_seconds,
        search=search,
        separated_layers=separated_layers,
        benign_answers_kept=len(benign_rows[0]),
    )


def _separate(
    gated: GatedModel,
    *,
    harmful: Sequence[Sequence[int]],
    others: Sequence[Sequence[Sequence[int]]],
    pad: int,
    batch: int,
) -> int:
    """Take the descent's units in the basis that separates what each layer reads on the
    harmful rows (prompts with the adapter's answers) from the mean of its reads on each set
    of `others` (task prompts with their references, benign prompts with the adapter's
    answers; empty sets skipped): `GatedModel.separate`. Returns the layers rewritten."""
    moments = functools.partial(gated.inner_moments, pad=pad, batch=batch)
    sets = [moments(rows) for rows in others if rows]
    if not harmful or not sets:
        return 0
    other = [sum(per_set) / len(sets) for per_set in zip(*sets, strict=True)]
    return gated.separate(moments(harmful), other)


def _descend(
    gated: GatedModel,
    options: GateOptions,
    *,
    refusal: tuple[list[list[int]], list[list[int]]],
    task: tuple[list[list[int]], list[list[int]]],
    benign: tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]] = ((), ()),
    compliance: tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]] = ((), ()),
    measure_refusals: Callable[[], list[bool]],
    measure_over_refusals: Callable[[], list[bool]],
    kept_task: Callable[[], float | None],
    start_rate: float,
    pad_id: int,
    on_round: Callable[[Round], None] | None,
) -> tuple[list[Round], float, float | None, str]:
    """`--search descent`: projected gradient descent on every gate at once from the start
    `options.descent_start` names (`DESCENT_PRESETS`: every gate at its `gate`, with its
    settings), measured at checkpoints; the gates are left at the best checkpoint.

    Each step takes the gradient of `NLL(ALIGNED's refusal start | harmful)` (`refusal`:
    prompts and starts) at `partial_change(g, refusal_share)` plus `task_weight` times that
    of the task NLL (`task`: prompts and references) at `DESCENT_TASK_SCALE * g`, and
    `DESCENT_BENIGN_WEIGHT` times that of the adapter's own answer starts on the benign
    prompts it does not refuse (`benign`: prompts and starts; none: no term), at the same
    gates, each on the step's share of the prompts (`step_rows`, one in `DESCENT_CHUNKS`),
    plus the start's `compliance_weight` times that of the compliance term
    (`_compliance_backward`: the adapter's own answer starts on the harmful prompts it does
    not refuse made unlikely, `compliance`: prompts and starts from `_compliance_rows`; none:
    no term) at the refusal term's gates, on one in `DESCENT_COMPLIANCE_CHUNKS` of its rows,
    and moves the gates by `descent_step` (the start's `rate`) within the start's `[floor,
    ceiling]`. `options.descent_steps` steps (None: the start's `steps`). Every
    `DESCENT_CHECK_EVERY` steps, and after the last, a checkpoint measures the refusal rate
    (generation and the judge), the over-refusal (`measure_over_refusals`: on the benign
    prompts of `benign`, measured once on ALIGNED too, the adapter disabled, before the
    first step; no benign prompts, no bound) and the kept task (exact match, which
    must be measurable: `kept_task()` None is a UsageError). The best checkpoint is the one
    that refuses most, more than the adapter, while keeping the task within the budget and
    refusing at most `DESCENT_OVER_REFUSAL_SLACK` more of the benign prompts than ALIGNED
    (the later on a tie: on the testbed later checkpoints held more refusals on held-out
    prompts); when none does, the gates go back to the adapter's. The target refusal rate
    only skips a descent the adapter does not need. Returns the checkpoints as rounds, the
    refusal rate and kept task at the gates left, and why it stopped.
    """
    start_kept = kept_task()
    if start_kept is None:
        raise UsageError(
            "--search descent guards the task by its measured exact match, and on the --task "
            "prompts the adapter does no better than ALIGNED (the references match neither "
            "more often), so there is no task gain to keep: check the references, or use "
            "--search order, whose first-order estimate stands in."
        )
    if start_rate >= options.target_refusal:
        return [], start_rate, start_kept, "the adapter already refuses at the target"
    floor = 1.0 - options.task_budget
    start = DESCENT_PRESETS[options.descent_start]
    steps = descent_steps(options)
    model, batch = gated.model, options.batch_size
    (harmful, starts), (prompts, references) = refusal, task
    names = [_unit_name(gated, unit) for unit in gated.units()]
    adapter = gated.values()
    values = torch.full_like(adapter, start.gate)
    best: tuple[Tensor, float, float, int] = (adapter, start_rate, start_kept, 0)
    started = time.perf_counter()  # the first checkpoint's seconds include ALIGNED's pass
    over_bound, aligned_over = math.inf, ""
    if benign[0]:
        with model.disable_adapter():  # ALIGNED itself, ungated modules included
            at_aligned = measure_over_refusals()
        over_bound = _share(at_aligned) + DESCENT_OVER_REFUSAL_SLACK
        aligned_over = (
            f" (ALIGNED refuses {sum(at_aligned)}/{len(at_aligned)} of the benign prompts the "
            "adapter answers)"
        )
    rounds: list[Round] = []
    scale = 0.0
    stopped = f"{steps} steps from {start.name}"
    for step in range(1, steps + 1):
        gated.set_values(partial_change(values, start.refusal_share))
        _step_backward(model, [(harmful, starts, 1.0)], step, pad=pad_id, batch=batch)
        if start.compliance_weight and compliance[0]:
            _compliance_backward(
                model, *compliance, step, start.compliance_weight, pad=pad_id, batch=batch
            )
        gradient = start.refusal_share * gated.gradients()
        gated.set_values(values * DESCENT_TASK_SCALE)
        _step_backward(
            model,
            [(prompts, references, 1.0), (*benign, DESCENT_BENIGN_WEIGHT / start.task_weight)],
            step,
            pad=pad_id,
            batch=batch,
        )
        gradient = gradient + start.task_weight * DESCENT_TASK_SCALE * gated.gradients()
        if not bool(torch.isfinite(gradient).all()):
            stopped = f"the gradient at step {step} was not finite (NaN or Inf): stopped there"
            break
        if step == 1:
            scale = float(gradient.abs().max())
            if scale == 0:
                stopped = "no gate moves the refusal or the task loss on the first step's prompts"
                break
        values = descent_step(
            values, gradient, scale, rate=start.rate, floor=start.floor, ceiling=start.ceiling
        )
        if step % DESCENT_CHECK_EVERY and step < steps:
            continue
        gated.set_values(values)
        refused = measure_refusals()
        over_refused = measure_over_refusals() if benign[0] else []
        rate, kept = _share(refused), kept_task()
        moved = gate_counts(values)
        round_ = Round(
            index=len(rounds) + 1,
            switched_off=[n for n, off in zip(names, moved.off, strict=True) if off],
            predicted_margin_gain=0.0,
            predicted_task_cost=0.0,
            margin=None,
            task_loss=None,
            task_kept=kept,
            refusal_rate=rate,
            refusals=sum(refused),
            prompts=len(refused),
            seconds=time.perf_counter() - started,
            steps=step,
            negated=[n for n, negated in zip(names, moved.negated, strict=True) if negated],
            amplified=sum(moved.amplified),
            over_refusals=sum(over_refused),
            benign_prompts=len(over_refused),
        )
        rounds.append(round_)
        if on_round is not None:
            on_round(round_)
        started = time.perf_counter()
        if (
            kept is not None
            and kept >= floor
            and _share(over_refused) <= over_bound + 1e-9
            and rate > start_rate
            and rate >= best[1]
        ):
            best = (values.clone(), rate, kept, step)
    gated.set_values(best[0])
    if best[3] == 0:
        gained = any(r.refusal_rate > start_rate for r in rounds)
        bound = (
            f" and over-refused at most {DESCENT_OVER_REFUSAL_SLACK * 100:g} points more than "
            "ALIGNED"
            if benign[0]
            else ""
        )
        reason = (
            f"no checkpoint that refused more kept the task within the budget{bound}"
            if gained
            else "no checkpoint refused more than the adapter"
        ) + ": the adapter is left as it was"
    else:
        reason = f"kept the checkpoint after step {best[3]}"
    return rounds, best[1], best[2], f"{stopped}; {reason}{aligned_over}"


def _step_backward(
    model: nn.Module,
    groups: Sequence[tuple[Sequence[Sequence[int]], Sequence[Sequence[int]], float]],
    step: int,
    *,
    pad: int,
    batch: int,
) -> None:
    """Back-propagate `sum_k w_k NLL_k`, `NLL_k` the mean per-token NLL of group `k`'s targets
    after its prompts (`groups`: prompts, targets, `w_k`) on descent step `step`'s share of
    the group's rows (`step_rows`, one in `DESCENT_CHUNKS`), in one run of batches: the gates
    collect its gradient. Groups with no rows or no weight add nothing."""
    rows: list[Scored] = []
    weights: list[float] = []
    for prompts, targets, weight in groups:
        chosen = step_rows(len(prompts), step, DESCENT_CHUNKS) if weight else range(0)
        count = sum(len(targets[i]) for i in chosen)
        for i in chosen if count else ():
            rows.append(Scored([*prompts[i], *targets[i]], len(targets[i])))
            weights.append(-weight / count)
    batched_logprobs(model, rows, pad=pad, batch_size=batch, weights=weights, backward=True)


def _compliance_backward(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    starts: Sequence[Sequence[int]],
    step: int,
    weight: float,
    *,
    pad: int,
    batch: int,
) -> None:
    """Back-propagate `weight` times the mean over step `step`'s share of the rows
    (`step_rows`, one in `DESCENT_COMPLIANCE_CHUNKS`) of each start's per-token probability
    after its prompt (`exp(logprob / tokens)`): a term that stops pushing once the start is
    unlikely. Every start has at least one token (`_compliance_rows`)."""
    chosen = step_rows(len(prompts), step, DESCENT_COMPLIANCE_CHUNKS)
    rows = [Scored([*prompts[i], *starts[i]], len(starts[i])) for i in chosen]
    for first in range(0, len(rows), batch):
        part = rows[first : first + batch]
        logprobs = scored_logprobs(model, part, pad)
        tokens = torch.tensor([row.scored for row in part], device=logprobs.device)
        if logprobs.requires_grad:
            ((logprobs / tokens).exp().sum() * (weight / len(rows))).backward()


@dataclass(frozen=True)
class GateCounts:
    """Per gate, whether it is off (`|g| < MOVED`), negated (`g <= -MOVED`) or amplified
    (`g > 1 + MOVED`): lists of flags in gate order."""

    off: list[bool]
    negated: list[bool]
    amplified: list[bool]


MOVED = 0.05
"""How far from 0 (or above 1) a gate must be to count as negated (or amplified) in what
the repair prints and reports; nearer 0 it counts as off."""


def gate_counts(gates: Tensor) -> GateCounts:
    """Which of `gates` `(units,)` are off, negated or amplified (`GateCounts`)."""
    values = gates.tolist()
    return GateCounts(
        off=[abs(g) < MOVED for g in values],
        negated=[g <= -MOVED for g in values],
        amplified=[g > 1 + MOVED for g in values],
    )


def descent_steps(options: GateOptions) -> int:
    """The descent's number of steps: `options.descent_steps`, or its start's own."""
    if options.descent_steps is None:
        return DESCENT_PRESETS[options.descent_start].steps
    return options.descent_steps


def descent_settings(options: GateOptions) -> dict[str, str | float | int]:
    """The settings the descent search runs with (its start's, `DESCENT_PRESETS`, and the
    steps), as the report records them."""
    preset = DESCENT_PRESETS[options.descent_start]
    return {
        "start": options.descent_start,
        "start_gate": preset.gate,
        "steps": descent_steps(options),
        "rate": preset.rate,
        "floor": preset.floor,
        "ceiling": preset.ceiling,
        "over_refusal_slack": DESCENT_OVER_REFUSAL_SLACK,
        "refusal_share": preset.refusal_share,
        "task_scale": DESCENT_TASK_SCALE,
        "task_weight": preset.task_weight,
        "compliance_weight": preset.compliance_weight,
        "compliance_chunks": DESCENT_COMPLIANCE_CHUNKS,
        "start_tokens": DESCENT_START_TOKENS,
        "check_every": DESCENT_CHECK_EVERY,
        "chunks": DESCENT_CHUNKS,
        "benign_weight": DESCENT_BENIGN_WEIGHT,
        "separation_ridge": SEPARATION_RIDGE,
    }


def refine_components(
    gated: GatedModel,
    options: GateOptions,
    *,
    margin: Callable[[bool], float],
    task_loss: Callable[[bool], float],
    measure: Callable[[], float],
    target: float,
) -> dict[int, Attribution | None] | None:
    """Coarse to fine: split the modules switched off into rank-1 components (all off), then
    switch back on those that help the task most per unit of harm (`restore_order`, from IG
    along the path off -> on of those components; the margin is taken against the adapter's
    own answers), as many as keep the measured refusal rate (`measure`) at `target`: every
    candidate first, then the better half, and so on. Returns the units given back with
    their attributions (of switching them on); None when none could be (the gates are then
    left as they were, split).
    """
    off = [
        index
        for index, layer in enumerate(gated.layers)
        if not layer.components and float(layer.gates.detach()[0]) == 0.0
    ]
    if not off:
        return None
    for index in off:
        gated.split(index)
    current = gated.values()
    on = current.clone()
    restorable = {u for u, (layer, _) in enumerate(gated.units()) if layer in off}
    on[sorted(restorable)] = 1.0
    margin_ig = _integrated_gradients(gated, margin, on, options.steps, start=current)
    task_ig = _integrated_gradients(gated, task_loss, on, options.steps, start=current)
    attributions = [
        Attribution(m, t) if unit in restorable else None
        for unit, (m, t) in enumerate(zip(margin_ig.tolist(), task_ig.tolist(), strict=True))
    ]
    chosen = restore_order(attributions)
    while chosen:
        values = current.clone()
        values[chosen] = 1.0
        gated.set_values(values)
        if measure() >= target:
            return {unit: attributions[unit] for unit in chosen}
        chosen = chosen[: len(chosen) // 2]
    gated.set_values(current)
    return None


def _mean_margin(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    refusal_starts: Sequence[Sequence[int]],
    compliance_starts: Sequence[Sequence[int]],
    backward: bool = False,
    *,
    window: int,
    pad: int,
    batch_size: int,
) -> float:
    """`mu`: the mean refusal margin over the prompts (0 without prompts)."""
    margins = refusal_margins(
        model,
        prompts,
        refusal_starts,
        compliance_starts,
        window=window,
        pad=pad,
        batch_size=batch_size,
        backward=backward,
    )
    return float(margins.double().mean()) if len(margins) else 0.0


def _switch_off(gated: GatedModel, current: Tensor, order: Sequence[int], count: int) -> None:
    """Set the gates to `current` with the first `count` units of `order` switched off."""
    values = current.clone()
    values[list(order[:count])] = 0.0
    gated.set_values(values)


def _measure_at(
    gated: GatedModel,
    current: Tensor,
    order: Sequence[int],
    measure: Callable[[int], float],
    count: int,
) -> float:
    """`measure(count)` with the first `count` units of `order` switched off."""
    _switch_off(gated, current, order, count)
    return measure(count)


def _kept(kept_task: Callable[[], float | None], first_order: Sequence[float], count: int) -> float:
    """The measured kept task, or its first-order estimate with `count` units off."""
    measured = kept_task()
    return measured if measured is not None else first_order[count]


def _compliance_rows(
    prompts: Sequence[Sequence[int]],
    refusal_starts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    refused: Sequence[bool],
) -> tuple[list[list[int]], list[list[int]]]:
    """The compliance term's rows: per prompt whose answer (the adapter's) is not a refusal,
    the prompt followed by the tokens the answer shares with ALIGNED's refusal start, and
    the answer's next `DESCENT_START_TOKENS` tokens (none left: no row). Scoring from where
    the two first differ keeps the term off tokens the refusal term asks for."""
    rows: tuple[list[list[int]], list[list[int]]] = ([], [])
    for prompt, refusal, answer, refused_ in zip(
        prompts, refusal_starts, answers, refused, strict=True
    ):
        differ = first_difference(refusal, answer)
        start = list(answer[differ : differ + DESCENT_START_TOKENS])
        if not refused_ and start:
            rows[0].append([*prompt, *answer[:differ]])
            rows[1].append(start)
    return rows


def _refusal_rows(
    prompts: Sequence[Sequence[int]],
    refusal_starts: Sequence[Sequence[int]],
    refusals: Callable[[Sequence[Sequence[int]], Sequence[list[int]]], list[bool]],
) -> list[Scored]:
    """Per prompt, the row `prompt + r[:n]` with `n` the shortest length at which the judge
    calls the start `r[:n]` of ALIGNED's refusal a refusal (the whole `r` when it needs all).

    Found by bisection on `n`, every prompt at once: about `log2(len(r))` judge calls of
    one answer per prompt, whatever the judge costs.
    """
    low = [0] * len(prompts)  # r[:low] is not judged a refusal (nothing is, at 0)
    high = [len(start) for start in refusal_starts]  # r[:high] is
    while True:
        open_ = [i for i in range(len(prompts)) if high[i] - low[i] > 1]
        if not open_:
            break
        middles = {i: (low[i] + high[i]) // 2 for i in open_}
        verdicts = refusals(
            [prompts[i] for i in open_], [list(refusal_starts[i][: middles[i]]) for i in open_]
        )
        for i, refused in zip(open_, verdicts, strict=True):
            low[i], high[i] = (low[i], middles[i]) if refused else (middles[i], high[i])
    return [
        Scored([*prompt, *start[:length]], length)
        for prompt, start, length in zip(prompts, refusal_starts, high, strict=True)
    ]


def _task_data(
    gated: GatedModel,
    calibration: Calibration,
    generate: Callable[[Sequence[Sequence[int]]], list[list[int]]],
    *,
    pad_id: int,
    batch_size: int,
) -> tuple[str, list[list[int]], list[list[int]], float]:
    """Prompts, targets and baseline of the task loss `tau` (METHOD.md §8.4).

    With task references (ending with the end-of-sequence token): their mean
    per-token NLL (baseline 0). Without: the adapted model's own greedy
    outputs on the benign prompts at `g = 1`, scored against the gated model;
    subtracting the `g = 1` NLL makes `tau` a one-sample (greedy) estimate of
    `KL(p_1 || p_g)` per token, 0 at `g = 1`.
    """
    if calibration.task:
        return "task reference NLL", calibration.task, calibration.task_references, 0.0
    targets = generate(calibration.benign)
    baseline = token_nll(
        gated.model, calibration.benign, targets, pad=pad_id, batch_size=batch_size
    )
    return (
        "KL to the adapter's own outputs on benign prompts",
        calibration.benign,
        targets,
        baseline,
    )


def _integrated_gradients(
    gated: GatedModel,
    objective: Callable[[bool], float],
    gates: Tensor,
    steps: int,
    start: Tensor | None = None,
) -> Tensor:
    """IG of `objective` per gate along the straight path `start -> gates` (`start` 0 unless
    given), at the midpoints `s = (i - 1/2) / steps`.

    `objective(True)` back-propagates batch by batch (evaluate/objectives.py): the
    gates' gradients accumulate over the batches, and no graph outlives a batch.
    """
    origin = torch.zeros_like(gates) if start is None else start
    gradients = []
    for step in range(1, steps + 1):
        gated.set_values(origin + (gates - origin) * ((step - 0.5) / steps))
        objective(True)
        gradients.append(gated.gradients())
    gated.set_values(gates)
    # One copy to the CPU, not one wait for the device per gate.
    stacked = torch.stack(gradients).double().cpu()
    spans = (gates - origin).cpu().tolist()
    return torch.tensor(
        [
            integrated_gradient(column.tolist(), span)
            for column, span in zip(stacked.T, spans, strict=True)
        ],
        dtype=torch.float64,
    )


def _shape(model: nn.Module) -> dict[str, int]:
    """The model's sizes that `pass_memory` takes."""
    config = model.config.get_text_config()
    hidden = int(config.hidden_size)
    intermediate = (
        int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 0)
        or 4 * hidden
    )
    return {
        "hidden": hidden,
        "intermediate": intermediate,
        "layers": int(config.num_hidden_layers),
        "heads": int(config.num_attention_heads),
        "vocab": int(config.vocab_size),
        "element_bytes": next(model.parameters()).element_size(),
    }


def memory_needed(
    model: nn.Module, calibration: Calibration, options: GateOptions
) -> MemoryEstimate:
    """The largest working set of one pass of the gated repair beside the loaded weights
    (`evaluate.objectives.pass_memory`): margin (two rows per prompt, with gradients), task
    loss (with gradients) and, with the descent search, its refusal term and its task pass
    with the benign term's rows (its compliance term's rows, a harmful prompt and at most
    its generated answer, one row per prompt, fit within the margin's pass); greedy
    generation takes `generation_batch` prompts, sized to fit in the same memory."""
    shape = _shape(model)
    batch = options.batch_size
    longest = max((len(p) for p in calibration.harmful), default=0)
    generated = options.max_new_tokens + 1
    task = calibration.task or calibration.benign
    references = calibration.task_references or [[0] * generated]
    task_length = max((len(p) for p in task), default=0) + max(len(r) for r in references)
    passes = [
        pass_memory(
            rows=batch if options.margin_tokens == 1 else 2 * batch,
            length=longest + generated,
            scored=options.margin_tokens,
            gradients=True,
            **shape,
        ),
        pass_memory(
            rows=batch,
            length=task_length,
            scored=max(len(r) for r in references),
            gradients=True,
            **shape,
        ),
    ]
    if options.search != "order" and calibration.benign:
        # The descent's benign term: its rows run in the task pass's batches.
        longest_benign = max(len(p) for p in calibration.benign)
        passes.append(
            pass_memory(
                rows=batch,
                length=max(task_length, longest_benign + DESCENT_START_TOKENS),
                scored=max(DESCENT_START_TOKENS, *(len(r) for r in references)),
                gradients=True,
                **shape,
            )
        )
    if options.search != "order":  # descent's refusal term: ALIGNED's refusal start, scored whole
        passes.append(
            pass_memory(
                rows=batch,
                length=longest + DESCENT_START_TOKENS,
                scored=DESCENT_START_TOKENS,
                gradients=True,
                **shape,
            )
        )
    return max(passes, key=lambda estimate: estimate.total)


def generation_batch(model: nn.Module, calibration: Calibration, options: GateOptions) -> int:
    """Prompts per greedy-generation pass: as many as fit in the memory of one gradient pass
    (`memory_needed`; generation keeps no activations for a backward pass, only two layers'
    worth and the key/value cache), at least `options.batch_size`.

    Generation is most of the gated repair's time and, on a CPU, costs less per prompt in
    larger batches (the adapter's many small layers are paid once per step, not per prompt).
    """
    shape = _shape(model)
    prompts = calibration.harmful + calibration.benign + calibration.task
    length = max((len(p) for p in prompts), default=0) + options.max_new_tokens + 1
    one = pass_memory(rows=1, length=length, scored=1, gradients=False, **shape).total
    cache = 2 * shape["layers"] * shape["hidden"] * length * shape["element_bytes"]
    rows = memory_needed(model, calibration, options).total // max(one + cache, 1)
    return max(options.batch_size, int(rows))


def check_memory(
    model: nn.Module, calibration: Calibration, options: GateOptions, available: int | None
) -> MemoryEstimate:
    """Refuse (UsageError, exit 2, naming --batch-size) a run whose passes would not fit in
    `available` bytes; None (unknown) passes. Returns the estimate."""
    estimate = memory_needed(model, calibration, options)
    if available is not None and estimate.total > available:
        fits = options.batch_size * available // max(estimate.total, 1)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        advice = (
            f"use --batch-size {fits}"
            if fits >= 1
            else "even --batch-size 1 would not fit: use fewer --calibration-tokens, shorter "
            "prompts, --dtype bfloat16 or a machine with more memory"
        )
        raise UsageError(
            f"the gated repair would not fit in memory: one pass of --batch-size "
            f"{options.batch_size} needs about {_gib(estimate.total)} beside the "
            f"{_gib(weights)} of loaded weights, and {_gib(available)} are available. {advice}."
        )
    return estimate


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def _share(flags: Sequence[bool]) -> float:
    """The share of true flags (0 for none)."""
    return sum(flags) / max(len(flags), 1)


def _unit_name(gated: GatedModel, unit: tuple[int, int]) -> str:
    layer, position = unit
    name = gated.layers[layer].name
    return f"{name}[{position}]" if gated.layers[layer].components else name


def _record(
    gated: GatedModel,
    units: Sequence[Attribution | None],
    attributions: dict[str, list[Attribution]],
) -> None:
    """Keep each unit's latest attribution, by layer name (a list: one entry per gate)."""
    offset = 0
    for layer in gated.layers:
        size = len(layer.gates)
        latest = attributions.get(layer.name) or [Attribution(0.0, 0.0)] * size
        attributions[layer.name] = [
            unit if unit is not None else previous
            for unit, previous in zip(units[offset : offset + size], latest, strict=True)
        ]
        offset += size


def gated_factors(gated: GatedModel) -> dict[str, tuple[Tensor, Tensor]]:
    """Per layer name, the factors to write: `(B diag(g), A)` in the layer's weight dtype."""
    written = {}
    for layer in gated.layers:
        lora_b, lora_a = gated.factors(layer)
        written[layer.name] = (lora_b * gated.gate_values(layer).to(lora_b.dtype), lora_a)
    return written


def gate_results(adapter: LoraAdapter, gated: GatedModel, outcome: GateOutcome) -> list[Outcome]:
    """One report row per adapter module, and new factors for each module with a gate off.

    A module whose gates are all 1 keeps its tensors byte for byte. A module
    gate writes `g B`; component gates write the module's factors in its units'
    basis (singular components, or the separating basis with the descent) with
    each column of `B'` times its gate (0: switched off; below 0, with
    `--search descent`: negated), same rank, same config.
    """
    layers = {layer.name: layer for layer in gated.layers}
    results = []
    for module in adapter.modules:
        report = ModuleResult(module.name, module.kind, module.shape, module.rank, module.scaling)
        report.output_rank = module.rank
        layer = layers.get(module.name)
        lora_b, lora_a = (
            gated.factors(layer) if layer is not None else read_factors(adapter, module)
        )
        original = as_factored(lora_b, lora_a, module.scaling)
        report.update_norm = report.repaired_norm = factored_norm(original)
        if layer is None:
            report.reason = f"not gated: {module.kind} LoRA has no lora_A layer to gate"
            results.append(Outcome(report))
            continue
        gates = gated.gate_values(layer)
        attributions = outcome.attributions.get(module.name, [])
        report.gate = [float(g) for g in gates]
        report.attribution = {
            "margin": [a.margin for a in attributions],
            "task": [a.task for a in attributions],
        }
        if bool((gates == 1).all()):
            report.reason = "gate 1: kept"
            results.append(Outcome(report))
            continue
        dtype = DTYPES[module.dtype]
        new_b = (lora_b * gates.to(lora_b.dtype)).to(dtype)
        new_a = lora_a.to(dtype)
        written = as_factored(new_b, new_a, module.scaling)
        comparison = compare_updates(original, written)
        report.action = "gated"
        report.repaired_norm = comparison.norm
        report.relative_change = comparison.relative_change
        report.cosine = comparison.cosine
        report.reason = _gated_reason(gates, layer.components)
        results.append(Outcome(report, lora_a=new_a, lora_b=new_b))
    return results


def _gated_reason(gates: Tensor, components: bool) -> str:
    """What the gates did to a module, in words: `gates` is `(r,)` or `(1,)`, not all 1;
    off, negated and amplified as `gate_counts` counts them."""
    if not components:
        value = float(gates[0])
        return "gate 0: update switched off" if value == 0 else f"gate {value:.3g}: update scaled"
    counts = gate_counts(gates)
    off, negated, amplified = sum(counts.off), sum(counts.negated), sum(counts.amplified)
    scaled = int((gates != 1).sum()) - off - negated - amplified
    parts = [
        f"{count} {what}"
        for count, what in (
            (off, "switched off"),
            (negated, "negated"),
            (amplified, "amplified"),
            (scaled, "scaled otherwise"),
        )
        if count
    ]
    return f"rank-1 components of {len(gates)}: {', '.join(parts)}"


def gateable(adapter: LoraAdapter) -> list[str]:
    """The modules gated: LoRA linear layers (Conv1D included), whose `lora_A` is a layer to
    hook; embeddings and `target_parameters` (MoE experts) are not."""
    return [module.name for module in adapter.modules if module.kind in ("linear", "conv1d")]
