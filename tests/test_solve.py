"""The repair in factored form (METHOD.md §2-§5, §7) against dense float64 computations."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter_fix.math.solve import (
    FactoredUpdate,
    as_factored,
    csulora,
    decompose,
    effective_rank,
    project,
    safelora_candidate,
    safelora_select,
    to_lora_factors,
    update_metrics,
    update_spectrum,
)
from adapter_fix.math.subspace import Subspace

TOLERANCE = 1e-8


@dataclass(frozen=True)
class Problem:
    """A random update `dW = s B A` and a random rank-`k` subspace, with dense projectors."""

    lora_b: torch.Tensor
    lora_a: torch.Tensor
    scaling: float
    subspace: Subspace

    @property
    def update(self) -> torch.Tensor:
        return self.scaling * self.lora_b.double() @ self.lora_a.double()

    def projectors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(P, Q, P', Q')` as dense float64 matrices."""
        left, right = self.subspace.left, self.subspace.right
        output = left @ left.T
        inner = right @ right.T
        return output, inner, torch.eye(len(output)) - output, torch.eye(len(inner)) - inner

    def components(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(Pi_F, Pi_H, Pi_O)` of a dense `m x n` matrix."""
        p, q, p_out, q_out = self.projectors()
        return p @ matrix @ q, p @ matrix @ q_out + p_out @ matrix @ q, p_out @ matrix @ q_out


def make_subspace(left: torch.Tensor, right: torch.Tensor) -> Subspace:
    rank = left.shape[1]
    return Subspace(
        left=left,
        right=right,
        singular_values=torch.ones(rank, dtype=torch.float64),
        rank=rank,
        captured_energy=1.0 if rank else 0.0,
        displacement_norm=1.0,
        no_signal_reason=None if rank else "test: no signal",
        method="exact",
    )


def random_problem(
    rows: int, cols: int, lora_rank: int, rank: int, seed: int, scaling: float = 1.5
) -> Problem:
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    left = torch.linalg.qr(normal(rows, rank)).Q
    right = torch.linalg.qr(normal(cols, rank)).Q
    dtype = torch.float32 if seed % 2 else torch.float64
    factors = normal(rows, lora_rank).to(dtype), normal(lora_rank, cols).to(dtype)
    return Problem(*factors, scaling, make_subspace(left, right))


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    rows = draw(st.integers(1, 12))
    cols = draw(st.integers(1, 12))
    return random_problem(
        rows,
        cols,
        lora_rank=draw(st.integers(1, 4)),
        rank=draw(st.integers(0, min(rows, cols))),
        seed=draw(st.integers(0, 2**31)),
        scaling=draw(st.sampled_from([0.25, 1.0, 2.0, -1.5])),
    )


def dense(update: FactoredUpdate) -> torch.Tensor:
    return update.scaling * update.left @ update.right


def squared_norm(matrix: torch.Tensor) -> float:
    return float(matrix.norm()) ** 2


def assert_dense_close(actual: torch.Tensor, expected: torch.Tensor, scale: float) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=TOLERANCE * max(scale, 1.0))


@settings(max_examples=60, deadline=None)
@given(problem=problems())
def test_factored_components_and_energies_equal_the_dense_decomposition(problem: Problem) -> None:
    parts = decompose(problem.lora_b, problem.lora_a, problem.scaling, problem.subspace)
    update = problem.update
    full, partial, off = problem.components(update)
    norm = float(update.norm())
    s = problem.scaling
    assert_dense_close(s * parts.b_in @ parts.a_in, full, norm)
    assert_dense_close(s * (parts.b_in @ parts.a_out + parts.b_out @ parts.a_in), partial, norm)
    assert_dense_close(s * parts.b_out @ parts.a_out, off, norm)
    assert math.isclose(parts.update_norm, norm, rel_tol=TOLERANCE)
    total = squared_norm(update)
    for rho, component in zip(
        (parts.rho_full, parts.rho_partial, parts.rho_off), (full, partial, off), strict=True
    ):
        assert rho == pytest.approx(squared_norm(component) / total, abs=TOLERANCE)
    assert parts.rho_full + parts.rho_partial + parts.rho_off == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(problem=problems(), strength=st.floats(0.0, 1e3))
def test_csulora_equals_the_dense_closed_form(problem: Problem, strength: float) -> None:
    parts = decompose(problem.lora_b, problem.lora_a, problem.scaling, problem.subspace)
    solution, a_partial, a_off = csulora(parts, strength)
    assert a_partial == 1.0 / (1.0 + strength * parts.rho_partial)
    assert a_off == 1.0 / (1.0 + strength * parts.rho_off)
    full, partial, off = problem.components(problem.update)
    expected = full + a_partial * partial + a_off * off
    assert_dense_close(dense(solution), expected, float(problem.update.norm()))
    assert solution.left.shape[1] in (problem.lora_b.shape[1], 2 * problem.lora_b.shape[1])


@settings(max_examples=40, deadline=None)
@given(problem=problems())
def test_project_equals_the_dense_fully_aligned_component(problem: Problem) -> None:
    parts = decompose(problem.lora_b, problem.lora_a, problem.scaling, problem.subspace)
    full, _, _ = problem.components(problem.update)
    assert_dense_close(dense(project(parts)), full, float(problem.update.norm()))


@settings(max_examples=40, deadline=None)
@given(problem=problems(), strength=st.floats(0.0, 100.0))
def test_update_metrics_equal_dense_metrics(problem: Problem, strength: float) -> None:
    original = as_factored(problem.lora_b, problem.lora_a, problem.scaling)
    parts = decompose(problem.lora_b, problem.lora_a, problem.scaling, problem.subspace)
    repaired = csulora(parts, strength)[0]
    metrics = update_metrics(original, repaired, problem.subspace)
    before, after = dense(original), dense(repaired)
    assert metrics.norm == pytest.approx(float(after.norm()), rel=TOLERANCE)
    expected_change = float((after - before).norm() / before.norm())
    assert metrics.relative_change == pytest.approx(expected_change, abs=TOLERANCE)
    cosine = float((before * after).sum() / (before.norm() * after.norm()))
    assert metrics.cosine == pytest.approx(cosine, abs=TOLERANCE)
    total = squared_norm(after)
    for rho, component in zip(
        (metrics.rho_full, metrics.rho_partial, metrics.rho_off),
        problem.components(after),
        strict=True,
    ):
        assert rho == pytest.approx(squared_norm(component) / total, abs=TOLERANCE)


@settings(max_examples=30, deadline=None)
@given(problem=problems())
def test_update_spectrum_equals_the_dense_singular_values(problem: Problem) -> None:
    update = as_factored(problem.lora_b, problem.lora_a, problem.scaling)
    expected = torch.linalg.svdvals(problem.update)
    spectrum = update_spectrum(update)
    size = min(len(spectrum), len(expected))
    assert_dense_close(spectrum[:size], expected[:size], float(expected[0]))
    assert float(spectrum[size:].abs().sum()) + float(expected[size:].sum()) < TOLERANCE


def test_strength_zero_returns_the_update_exactly() -> None:
    problem = random_problem(9, 7, lora_rank=3, rank=2, seed=4)
    parts = decompose(problem.lora_b, problem.lora_a, problem.scaling, problem.subspace)
    solution, a_partial, a_off = csulora(parts, 0.0)
    assert (a_partial, a_off) == (1.0, 1.0)
    assert torch.equal(solution.left, problem.lora_b.double())
    assert torch.equal(solution.right, problem.lora_a.double())
    assert solution.scaling == problem.scaling


def test_update_inside_the_subspace_is_unchanged() -> None:
    problem = random_problem(10, 8, lora_rank=2, rank=3, seed=6)
    generator = torch.Generator().manual_seed(1)
    lora_b = problem.subspace.left @ torch.randn(3, 2, generator=generator, dtype=torch.float64)
    lora_a = torch.randn(2, 3, generator=generator, dtype=torch.float64) @ problem.subspace.right.T
    parts = decompose(lora_b, lora_a, 2.0, problem.subspace)
    assert parts.rho_full == pytest.approx(1.0, abs=1e-12)
    update = 2.0 * lora_b @ lora_a
    for strength in (0.5, 10.0, 1e6):
        assert_dense_close(dense(csulora(parts, strength)[0]), update, float(update.norm()))
    assert_dense_close(dense(project(parts)), update, float(update.norm()))


@pytest.mark.parametrize("strength", [0.3, 1.0, 7.0, 250.0])
def test_update_outside_the_subspace_is_scaled_by_one_over_one_plus_lambda(
    strength: float,
) -> None:
    # Coordinate subspace and factors with zero rows/columns there: B_in and A_in are exactly 0.
    subspace = make_subspace(
        torch.eye(9, dtype=torch.float64)[:, :3], torch.eye(7, dtype=torch.float64)[:, :2]
    )
    generator = torch.Generator().manual_seed(2)
    lora_b = torch.randn(9, 4, generator=generator, dtype=torch.float64)
    lora_a = torch.randn(4, 7, generator=generator, dtype=torch.float64)
    lora_b[:3] = 0.0
    lora_a[:, :2] = 0.0
    parts = decompose(lora_b, lora_a, 0.5, subspace)
    assert (parts.rho_full, parts.rho_partial, parts.rho_off) == (0.0, 0.0, 1.0)
    solution, a_partial, a_off = csulora(parts, strength)
    assert (a_partial, a_off) == (1.0, 1.0 / (1.0 + strength))
    update = 0.5 * lora_b @ lora_a
    exact = update / (1.0 + strength)
    torch.testing.assert_close(dense(solution), exact, rtol=0, atol=1e-15 * float(update.norm()))


def test_update_outside_a_rotated_subspace_is_scaled_by_one_over_one_plus_lambda() -> None:
    problem = random_problem(11, 9, lora_rank=3, rank=4, seed=8)
    left, right = problem.subspace.left, problem.subspace.right
    lora_b = (torch.eye(11, dtype=torch.float64) - left @ left.T) @ problem.lora_b.double()
    lora_a = problem.lora_a.double() @ (torch.eye(9, dtype=torch.float64) - right @ right.T)
    parts = decompose(lora_b, lora_a, 1.0, problem.subspace)
    update = lora_b @ lora_a
    for strength in (0.5, 3.0, 40.0):
        solution, _, a_off = csulora(parts, strength)
        assert a_off == pytest.approx(1.0 / (1.0 + strength), rel=1e-12)
        assert_dense_close(dense(solution), update / (1.0 + strength), float(update.norm()))


@settings(max_examples=40, deadline=None)
@given(problem=problems(), strength=st.floats(0.01, 1e4))
def test_csulora_zeroes_the_objective_gradient_on_the_free_components(
    problem: Problem, strength: float
) -> None:
    parts = decompose(problem.lora_b, problem.lora_a, problem.scaling, problem.subspace)
    solution = dense(csulora(parts, strength)[0])
    update = problem.update
    _, partial, off = problem.components(solution)
    gradient = 2 * (solution - update) + 2 * strength * (
        parts.rho_partial * partial + parts.rho_off * off
    )
    full_of_solution = problem.components(solution)[0]
    _, gradient_partial, gradient_off = problem.components(gradient)
    scale = float(update.norm()) * (1.0 + strength)
    assert_dense_close(gradient_partial, torch.zeros_like(update), scale)
    assert_dense_close(gradient_off, torch.zeros_like(update), scale)
    assert_dense_close(full_of_solution, problem.components(update)[0], float(update.norm()))


@settings(max_examples=40, deadline=None)
@given(
    problem=problems(),
    strengths=st.lists(st.floats(0.0, 1e6), min_size=2, max_size=6).map(sorted),
)
def test_off_subspace_energy_never_grows_as_strength_grows(
    problem: Problem, strengths: list[float]
) -> None:
    original = as_factored(problem.lora_b, problem.lora_a, problem.scaling)
    parts = decompose(problem.lora_b, problem.lora_a, problem.scaling, problem.subspace)
    off_energies, partial_energies = [], []
    for strength in strengths:
        metrics = update_metrics(original, csulora(parts, strength)[0], problem.subspace)
        off_energies.append(metrics.rho_off * metrics.norm**2)
        partial_energies.append(metrics.rho_partial * metrics.norm**2)
    slack = 1e-12 * parts.update_norm**2
    for energies in (off_energies, partial_energies):
        assert all(later <= earlier + slack for earlier, later in itertools.pairwise(energies))


@settings(max_examples=40, deadline=None)
@given(problem=problems(), strength=st.sampled_from([1e2, 1e6, 1e10]))
def test_project_is_the_limit_of_csulora_as_strength_grows(
    problem: Problem, strength: float
) -> None:
    parts = decompose(problem.lora_b, problem.lora_a, problem.scaling, problem.subspace)
    distance = float((dense(csulora(parts, strength)[0]) - dense(project(parts))).norm())
    # ||a_c c|| = sqrt(rho_c) ||dW|| / (1 + lam rho_c) <= ||dW|| / (2 sqrt(lam)) for c in {H, O}.
    assert distance <= parts.update_norm * (1.0 / math.sqrt(strength) + 1e-12)


def test_subspace_without_signal_puts_the_whole_update_off_subspace() -> None:
    problem = random_problem(6, 5, lora_rank=2, rank=0, seed=3)
    parts = decompose(problem.lora_b, problem.lora_a, problem.scaling, problem.subspace)
    assert (parts.rho_full, parts.rho_partial, parts.rho_off) == (0.0, 0.0, 1.0)


def test_zero_update_has_zero_energies_and_neutral_metrics() -> None:
    problem = random_problem(6, 5, lora_rank=2, rank=2, seed=3)
    zero_b = torch.zeros(6, 2)
    parts = decompose(zero_b, problem.lora_a, 1.0, problem.subspace)
    assert (parts.update_norm, parts.rho_full, parts.rho_partial, parts.rho_off) == (0, 0, 0, 0)
    zero = as_factored(zero_b, problem.lora_a, 1.0)
    nonzero = as_factored(problem.lora_b, problem.lora_a, 1.0)
    both_zero = update_metrics(zero, zero, problem.subspace)
    assert (both_zero.norm, both_zero.relative_change, both_zero.cosine) == (0.0, 0.0, 1.0)
    assert update_metrics(nonzero, zero, problem.subspace).cosine == 0.0
    assert update_metrics(nonzero, zero, problem.subspace).relative_change == pytest.approx(1.0)
    assert update_metrics(zero, nonzero, problem.subspace).cosine == 0.0


def test_relative_change_of_a_refactored_identical_update_is_zero_to_rounding() -> None:
    problem = random_problem(40, 30, lora_rank=4, rank=3, seed=2)
    original = as_factored(problem.lora_b, problem.lora_a, 2.0)
    same = FactoredUpdate(original.left * 4.0, original.right * 0.25, 2.0)
    metrics = update_metrics(original, same, problem.subspace)
    assert metrics.relative_change < 1e-14
    assert metrics.cosine == pytest.approx(1.0, abs=1e-15)


def test_negative_strength_is_refused() -> None:
    problem = random_problem(4, 4, lora_rank=1, rank=1, seed=0)
    parts = decompose(problem.lora_b, problem.lora_a, 1.0, problem.subspace)
    for strength in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            csulora(parts, strength)


def test_mismatched_shapes_are_refused() -> None:
    problem = random_problem(6, 5, lora_rank=2, rank=2, seed=3)
    with pytest.raises(ValueError):
        decompose(problem.lora_b[:5], problem.lora_a, 1.0, problem.subspace)
    with pytest.raises(ValueError):
        as_factored(problem.lora_b, problem.lora_a[:1], 1.0)


# --- back to LoRA factors (METHOD.md §4) ---


def alpha_over_rank(rank: int) -> float:
    return 16.0 / rank


@settings(max_examples=50, deadline=None)
@given(problem=problems(), strength=st.floats(0.0, 50.0), output_rank=st.integers(1, 6))
def test_keep_gives_the_best_rank_r_approximation_and_its_residual(
    problem: Problem, strength: float, output_rank: int
) -> None:
    parts = decompose(problem.lora_b, problem.lora_a, problem.scaling, problem.subspace)
    solution = csulora(parts, strength)[0]
    factors = to_lora_factors(solution, rank=output_rank, output_scaling=alpha_over_rank)
    rows, cols = problem.update.shape
    assert factors.lora_b.shape == (rows, output_rank)
    assert factors.lora_a.shape == (output_rank, cols)
    assert factors.rank == output_rank
    target = dense(solution)
    left, values, right_t = torch.linalg.svd(target, full_matrices=False)
    best = (left[:, :output_rank] * values[:output_rank]) @ right_t[:output_rank]
    written = alpha_over_rank(output_rank) * factors.lora_b @ factors.lora_a
    norm = float(values.norm())
    assert_dense_close(written, best, norm)
    residual = float(values[output_rank:].norm()) / norm if norm > 0 else 0.0
    assert factors.truncation_residual == pytest.approx(residual, abs=TOLERANCE)


@settings(max_examples=50, deadline=None)
@given(problem=problems(), strength=st.floats(0.0, 50.0))
def test_exact_output_rank_reconstructs_the_update(problem: Problem, strength: float) -> None:
    parts = decompose(problem.lora_b, problem.lora_a, problem.scaling, problem.subspace)
    solution = csulora(parts, strength)[0]
    factors = to_lora_factors(solution, rank=None, output_scaling=alpha_over_rank)
    target = dense(solution)
    written = alpha_over_rank(factors.rank) * factors.lora_b @ factors.lora_a
    assert_dense_close(written, target, float(target.norm()))
    assert factors.truncation_residual == 0.0
    numerical_rank = int(torch.linalg.matrix_rank(target, rtol=1e-12))
    assert factors.rank == max(1, numerical_rank)
    assert factors.rank <= 2 * problem.lora_b.shape[1]


@pytest.mark.parametrize(
    "output_scaling",
    [lambda rank: 16.0 / rank, lambda rank: 16.0 / math.sqrt(rank), lambda rank: -2.0],
    ids=["alpha/r", "rslora", "negative"],
)
def test_output_scaling_is_divided_out_and_singular_values_split_evenly(
    output_scaling: Callable[[int], float],
) -> None:
    problem = random_problem(12, 9, lora_rank=3, rank=2, seed=5)
    update = as_factored(problem.lora_b, problem.lora_a, problem.scaling)
    factors = to_lora_factors(update, rank=None, output_scaling=output_scaling)
    assert factors.rank == 3
    scale = output_scaling(factors.rank)
    assert_dense_close(scale * factors.lora_b @ factors.lora_a, problem.update, 1.0)
    values = torch.linalg.svdvals(problem.update)[:3] / abs(scale)
    torch.testing.assert_close(factors.lora_b.T @ factors.lora_b, torch.diag(values))
    torch.testing.assert_close(factors.lora_a @ factors.lora_a.T, torch.diag(values))


def test_keep_pads_with_zeros_when_the_numerical_rank_is_lower() -> None:
    generator = torch.Generator().manual_seed(0)
    column = torch.randn(8, 1, generator=generator, dtype=torch.float64)
    row = torch.randn(1, 6, generator=generator, dtype=torch.float64)
    update = FactoredUpdate(torch.cat([column, 2 * column], 1), torch.cat([row, row]), 1.0)
    factors = to_lora_factors(update, rank=4, output_scaling=alpha_over_rank)
    assert factors.lora_b.shape == (8, 4) and factors.lora_a.shape == (4, 6)
    assert torch.count_nonzero(factors.lora_b[:, 1:]) == 0
    assert torch.count_nonzero(factors.lora_a[1:]) == 0
    assert factors.truncation_residual == 0.0
    assert_dense_close(4.0 * factors.lora_b @ factors.lora_a, dense(update), 1.0)


def test_zero_update_gives_zero_factors_and_zero_residual() -> None:
    update = FactoredUpdate(torch.zeros(5, 2), torch.ones(2, 4), 1.0)
    exact = to_lora_factors(update, rank=None, output_scaling=alpha_over_rank)
    kept = to_lora_factors(update, rank=2, output_scaling=alpha_over_rank)
    assert exact.rank == 1 and kept.rank == 2
    for factors in (exact, kept):
        assert torch.count_nonzero(factors.lora_b) + torch.count_nonzero(factors.lora_a) == 0
        assert factors.truncation_residual == 0.0


def test_factors_are_deterministic_with_a_positive_peak_in_each_column_of_b() -> None:
    problem = random_problem(10, 7, lora_rank=3, rank=2, seed=9)
    update = as_factored(problem.lora_b, problem.lora_a, problem.scaling)
    flipped = FactoredUpdate(-update.left, -update.right, update.scaling)
    first = to_lora_factors(update, rank=2, output_scaling=alpha_over_rank)
    again = to_lora_factors(update, rank=2, output_scaling=alpha_over_rank)
    other_signs = to_lora_factors(flipped, rank=2, output_scaling=alpha_over_rank)
    assert torch.equal(first.lora_b, again.lora_b) and torch.equal(first.lora_a, again.lora_a)
    torch.testing.assert_close(first.lora_b, other_signs.lora_b, rtol=0, atol=1e-12)
    torch.testing.assert_close(first.lora_a, other_signs.lora_a, rtol=0, atol=1e-12)
    peaks = first.lora_b.gather(0, first.lora_b.abs().argmax(0, keepdim=True))
    assert bool((peaks > 0).all())


# --- Safe LoRA (METHOD.md §5) ---


def test_safelora_on_a_hand_built_case_matches_c_equal_d_d_transpose_over_norm() -> None:
    displacement = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    lora_b = torch.tensor([[1.0], [1.0]])
    lora_a = torch.tensor([[1.0, 0.0]])
    candidate = safelora_candidate(lora_b, lora_a, displacement)
    # C = diag(9, 16) / 5, so B~ = (1.8, 3.2); cos = 5 / (sqrt(1.8^2 + 3.2^2) sqrt(2)) = 0.962964...
    torch.testing.assert_close(
        candidate.projected_b, torch.tensor([[1.8], [3.2]], dtype=torch.float64)
    )
    assert candidate.similarity == 0.96296


@settings(max_examples=40, deadline=None)
@given(problem=problems())
def test_safelora_candidate_equals_the_dense_reference_computation(problem: Problem) -> None:
    generator = torch.Generator().manual_seed(problem.lora_b.shape[0])
    rows, cols = problem.update.shape
    displacement = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    candidate = safelora_candidate(problem.lora_b, problem.lora_a, displacement)
    projection = displacement @ displacement.T / displacement.norm()
    projected_b = projection @ problem.lora_b.double()
    assert_dense_close(candidate.projected_b, projected_b, float(projected_b.norm()))
    lora_a = problem.lora_a.double()
    cosine = torch.nn.functional.cosine_similarity(
        (projected_b @ lora_a).reshape(1, -1), (problem.lora_b.double() @ lora_a).reshape(1, -1)
    )
    assert candidate.similarity == pytest.approx(float(numpy.round(cosine.item(), 5)), abs=1e-5)


def test_safelora_similarity_of_a_zero_update_is_zero_and_a_zero_displacement_is_refused() -> None:
    displacement = torch.eye(3)
    assert safelora_candidate(torch.zeros(3, 1), torch.ones(1, 3), displacement).similarity == 0.0
    with pytest.raises(ValueError):
        safelora_candidate(torch.ones(3, 1), torch.ones(1, 3), torch.zeros(3, 3))


def test_safelora_number_selection_includes_ties_at_the_cutoff() -> None:
    similarities = {"a": 0.1, "b": 0.2, "c": 0.2, "d": 0.3, "e": 0.9}
    assert safelora_select(similarities, number=1) == {"a"}
    assert safelora_select(similarities, number=2) == {"a", "b", "c"}
    assert safelora_select(similarities, number=3) == {"a", "b", "c"}
    assert safelora_select(similarities, number=4) == {"a", "b", "c", "d"}
    assert safelora_select(similarities, number=10) == set(similarities)
    assert safelora_select({}, number=10) == set()


def test_safelora_threshold_selection_is_inclusive() -> None:
    similarities = {"x": 0.5, "y": 0.50001, "z": -0.2}
    assert safelora_select(similarities, select="threshold", threshold=0.5) == {"x", "z"}


def test_safelora_selection_refuses_unknown_rules() -> None:
    with pytest.raises(ValueError):
        safelora_select({"a": 0.1}, select="top")
    with pytest.raises(ValueError):
        safelora_select({"a": 0.1}, number=0)


def test_effective_rank_counts_equal_singular_values_and_is_zero_for_zero() -> None:
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)) == pytest.approx(3.0)
    assert effective_rank(torch.tensor([1.0, 0.0], dtype=torch.float64)) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(4, dtype=torch.float64)) == 0.0
