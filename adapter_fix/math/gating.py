"""Attribution-guided gating (METHOD.md §8.4): the pure parts, no model and no I/O.

A *unit* is what one gate switches: a module's whole update, or one rank-1
component of it. Each unit carries two integrated-gradient attributions,
`margin` (its share of the refusal margin `mu(g) - mu(0)`; negative when the
update lowers the margin, i.e. erodes refusals) and `task` (its share of the
task loss `tau(g) - tau(0)`; negative when the update helps the task).
The descent search's step and stress rules are here too (`descent_step`,
`partial_change`), and the basis its components are taken in (`separating_basis`,
`in_basis`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adapter_fix.math.solve import as_factored, to_lora_factors


@dataclass(frozen=True)
class Attribution:
    """One unit's integrated gradients: `margin` = IG(mu), `task` = IG(tau)."""

    margin: float
    task: float

    @property
    def harm(self) -> float:
        """How much refusal margin the unit removes (positive when it erodes refusals)."""
        return -self.margin

    @property
    def task_help(self) -> float:
        """How much task loss the unit removes; switching it off costs about this much."""
        return -self.task


def integrated_gradient(gradients: Sequence[float], gate: float) -> float:
    """IG along the straight path `0 -> gate` from gradients taken at `s * gate`.

    The gradients are taken at the midpoints `s = (i - 1/2) / S`, `i = 1..S`
    (error O(1/S^2), against O(1/S) for the right endpoints); IG is
    `(gate / S) * sum_i df/dg(s_i * gate)`, and its sum over units approximates
    `f(g) - f(0)` (completeness), exactly for linear `f`.
    """
    if not gradients:
        raise ValueError("integrated gradients need at least one step")
    return gate * math.fsum(gradients) / len(gradients)


def rank_one_factors(lora_b: Tensor, lora_a: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """The same update `s B A` with its rank-1 components as factor columns.

    `lora_b` is `m x r`, `lora_a` is `r x n`; returns `(B', A')` of the same
    shapes with `s B' A' = s B A` (up to rounding) and column `i` of `B'` times
    row `i` of `A'` the `i`-th singular component (descending; zero-padded when
    the update's rank is below `r`). Gating a column of `B'` removes exactly one
    component, and the written adapter keeps its rank and config.
    """
    factors = to_lora_factors(
        as_factored(lora_b, lora_a, scaling),
        rank=lora_b.shape[1],
        output_scaling=lambda _rank: scaling,
    )
    return factors.lora_b, factors.lora_a


def separating_basis(harmful: Tensor, other: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """The basis of a LoRA layer's inner space (`z = A x`, `r` wide) that separates the
    activity on harmful prompts from that on the others: the generalized eigenvectors of
    `(harmful, other)`.

    `harmful` and `other` are second moments `E[z z^T]` `(r, r)` (symmetric, positive
    semi-definite); `ridge` (> 0) is added to `other`'s diagonal as a share of its mean
    eigenvalue, so a direction the other prompts never use does not divide by zero.
    Returns `(V, lam)`: `V` `(r, r)` with `V^T (other + ridge) V = I` and
    `V^T harmful V = diag(lam)`, `lam` `(r,)` ascending: unit `i` is `lam_i` times as
    active on harmful prompts as on the others. Computed in float64.
    """
    if ridge <= 0:
        raise ValueError(f"the ridge must be positive, got {ridge}")
    harmful, other = harmful.double(), other.double()
    size = other.shape[0]
    shift = ridge * max(float(torch.trace(other)) / size, torch.finfo(torch.float64).tiny)
    cholesky = torch.linalg.cholesky(other + shift * torch.eye(size, dtype=torch.float64))
    inverse = torch.linalg.inv(cholesky)
    whitened = inverse @ harmful @ inverse.T
    lam, vectors = torch.linalg.eigh((whitened + whitened.T) / 2)
    return inverse.T @ vectors, lam


def in_basis(lora_b: Tensor, lora_a: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """The same update `B A` written in the inner basis `V` (`separating_basis`):
    `(B V^-T, V^T A)`, shapes `(m, r)` and `(r, n)` as given, float64. Row `i` of the new
    `A` reads the input along unit `i`; gating column `i` of the new `B` switches that unit."""
    basis = basis.double()
    return lora_b.double() @ torch.linalg.inv(basis).T, basis.T @ lora_a.double()


def candidates(
    attributions: Sequence[Attribution | None], *, min_harm_share: float = 0.0
) -> list[int]:
    """Units that erode refusals enough to be worth switching off, in unit order.

    `attributions[i]` is None for a unit already off (or not gateable). A
    candidate has `harm > 0` and at least `min_harm_share` of the total
    positive harm: units of noise-sized harm are ignored, whatever their task
    help (with many units, hundreds of them would otherwise go off for
    nothing).
    """
    harms = [a.harm if a is not None else 0.0 for a in attributions]
    total = math.fsum(h for h in harms if h > 0)
    return [
        index for index, harm in enumerate(harms) if harm > 0 and harm >= min_harm_share * total
    ]


def priority_order(attributions: Sequence[Attribution | None], units: Sequence[int]) -> list[int]:
    """`units` in the order to switch them off: most harm per unit of task help first.

    The task help is floored at the candidates' mean positive task help, so a
    unit that does not help the task is not put first for that alone: among
    such units the larger harm goes first, and a unit of large harm and some
    task help still comes before one of small harm and none. Ties keep unit
    order, so the order is deterministic.
    """
    chosen = [(index, attributions[index]) for index in units]
    helps = [max(a.task_help, 0.0) for _, a in chosen if a is not None]
    floor = math.fsum(helps) / len(helps) if helps else 0.0
    floor = floor if floor > 0 else 1.0  # no unit helps the task: order by harm alone

    def key(item: tuple[int, Attribution | None]) -> tuple[float, int]:
        index, attribution = item
        if attribution is None:
            raise ValueError(f"unit {index} has no attribution")
        return (-attribution.harm / (max(attribution.task_help, 0.0) + floor), index)

    return [index for index, _ in sorted(chosen, key=key)]


def search_prefix(
    count: int,
    *,
    refusal: Callable[[int], float],
    task_kept: Callable[[int], float],
    target: float,
    floor: float,
) -> int:
    """How many units, taken in priority order, one round switches off, by bisection on
    measurements.

    `refusal(k)` and `task_kept(k)` measure the model with the first `k`
    units of the order switched off (refusals grow with `k`, the kept task
    shrinks: the bisection assumes it). Among the `k` whose kept task stays
    at or above `floor`, the answer is the smallest whose refusal share
    reaches `target`, or, when none does, the largest (0 when even the first
    unit costs too much task). The kept task of the count returned is always
    measured (when it is below `floor` after all, the largest is returned).
    Each `k` is measured at most once; about `log2(count)` measurements of
    each kind.
    """
    seen_task: dict[int, float] = {}
    seen_refusal: dict[int, float] = {}

    def keeps(k: int) -> bool:
        if k not in seen_task:
            seen_task[k] = task_kept(k)
        return seen_task[k] >= floor

    def refuses(k: int) -> bool:
        if k not in seen_refusal:
            seen_refusal[k] = refusal(k)
        return seen_refusal[k] >= target

    if count <= 0:
        return 0
    allowed = count
    if not keeps(count):
        low, high = 0, count  # keeps(low) is assumed (no change), keeps(high) failed
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if keeps(middle) else (low, middle)
        allowed = low
    if allowed == 0 or not refuses(allowed):
        return allowed
    low, high = 0, allowed  # refuses(high); refuses(0) is not asked: the round is there for it
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if refuses(middle) else (middle, high)
    # The kept task need not fall with every unit (an exact match on a few prompts): the
    # count returned is one whose kept task was measured at or above the floor.
    return high if keeps(high) else allowed


def restore_order(attributions: Sequence[Attribution | None]) -> list[int]:
    """Units that are off, in the order to give them back (coarse to fine): most task help per
    unit of harm first.

    `attributions[i]` is the attribution of switching unit `i` back ON (None: not a unit
    to restore). Only units that help the task (`task_help > 0`) are candidates. Harm is
    floored at the candidates' mean positive harm, so a unit of no harm is not put first for
    that alone; ties keep unit order.
    """
    chosen = [
        (index, a) for index, a in enumerate(attributions) if a is not None and a.task_help > 0
    ]
    harms = [max(a.harm, 0.0) for _, a in chosen]
    floor = math.fsum(harms) / len(harms) if harms else 0.0
    floor = floor if floor > 0 else 1.0  # no unit harms: order by task help alone
    ranked = sorted(
        chosen, key=lambda item: (-item[1].task_help / (max(item[1].harm, 0.0) + floor), item[0])
    )
    return [index for index, _ in ranked]


def descent_step(
    gates: Tensor, gradient: Tensor, scale: float, *, rate: float, floor: float, ceiling: float
) -> Tensor:
    """One projected gradient step on the gates: `clip(g - rate * grad / scale, floor, ceiling)`.

    `gates` and `gradient` are `(units,)`; `scale` is the largest `|grad|` of the first
    step, so that step moves the steepest gate by `rate` (or to its bound, if nearer) and
    later steps move each gate by `rate` times its gradient over that first largest one. A
    `floor` below 0 lets a unit be negated (task arithmetic's negation), a `ceiling` above 1
    lets it be amplified.
    """
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"the step's scale must be positive and finite, got {scale}")
    return (gates - rate * gradient / scale).clamp(floor, ceiling)


def step_rows(count: int, step: int, chunks: int) -> range:
    """The rows (of `count`) that descent step `step` (from 1) takes its gradient on: every
    `chunks`-th from `(step - 1) % chunks`, so each run of `chunks` steps takes every row once.
    Fewer than `chunks` rows: `count` chunks of one row."""
    if count < 0 or step < 1 or chunks < 1:
        raise ValueError(f"rows need count >= 0, step >= 1, chunks >= 1: {count}, {step}, {chunks}")
    parts = max(min(chunks, count), 1)
    return range((step - 1) % parts, count, parts)


def partial_change(gates: Tensor, share: float) -> Tensor:
    """`1 + share * (g - 1)`: the gates with only `share` of their change from the adapter
    (all 1) applied, `(units,)`. The refusal term is taken there, so refusal must hold with
    part of the repair undone: a margin for prompts phrased unlike the calibration's."""
    return 1 + share * (gates - 1)
