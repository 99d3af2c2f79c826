"""Attribution-guided gating (METHOD.md §8.4): the pure parts, no model and no I/O.

A *unit* is what one gate switches: a module's whole update, or one rank-1
component of it. Each unit carries two integrated-gradient attributions,
`margin` (its share of the refusal margin `mu(g) - mu(0)`; negative when the
update lowers the margin, i.e. erodes refusals) and `task` (its share of the
task loss `tau(g) - tau(0)`; negative when the update helps the task).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Selection:
    """The units one round switches off (in the order chosen), and their predicted effect."""

    switched_off: tuple[int, ...]
    predicted_margin_gain: float
    predicted_task_cost: float


def select_units(
    attributions: Sequence[Attribution | None],
    *,
    budget: float,
    epsilon: float = 1e-9,
) -> Selection:
    """Greedy choice of units to switch off, most harm per unit of task help first.

    `attributions[i]` is None for a unit already off (or not gateable). A
    candidate erodes refusals (`harm > 0`). Candidates are taken in order of
    `harm / max(task_help, epsilon)`, a unit that does not help the task (ratio
    infinite) first; each costs `max(task_help, 0)`, and a candidate is taken
    only while the summed cost stays within `budget` (a candidate that does not
    fit is passed over, so cheaper ones later in the order still can be). Ties
    keep unit order, so the choice is deterministic. `switched_off` lists the chosen
    units in that order (most harm per unit of task help first).
    """
    candidates = [
        (index, attribution)
        for index, attribution in enumerate(attributions)
        if attribution is not None and attribution.harm > 0
    ]

    def priority(item: tuple[int, Attribution]) -> tuple[float, int]:
        index, attribution = item
        return (-attribution.harm / max(attribution.task_help, epsilon), index)

    chosen: list[int] = []
    gain = cost = 0.0
    for index, attribution in sorted(candidates, key=priority):
        unit_cost = max(attribution.task_help, 0.0)
        if cost + unit_cost > budget:
            continue
        chosen.append(index)
        gain += attribution.harm
        cost += unit_cost
    return Selection(tuple(chosen), gain, cost)
