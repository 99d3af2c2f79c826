"""The check's measures and the basis's math against dense float64 computations: the alignment
reversal, its within-basis form, Safe LoRA from a basis, and `k` chosen within a stored basis."""

from __future__ import annotations

import pytest
import torch

from adapter_fix.math.solve import (
    FactoredUpdate,
    alignment_reversal,
    basis_reversal,
    safelora_candidate,
    safelora_candidate_from_subspace,
)
from adapter_fix.math.subspace import safety_subspace, subspace_from_basis


def random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def problem(seed: int = 0) -> tuple[torch.Tensor, FactoredUpdate]:
    displacement = random(24, 40, seed=seed)
    update = FactoredUpdate(random(24, 3, seed=seed + 1), random(3, 40, seed=seed + 2), 1.7)
    return displacement, update


def dense(update: FactoredUpdate) -> torch.Tensor:
    return update.scaling * update.left @ update.right


def test_reversal_equals_minus_the_dense_inner_product_over_the_displacement_energy() -> None:
    displacement, update = problem()
    expected = -float((dense(update) * displacement).sum() / displacement.square().sum())
    assert alignment_reversal(update, displacement) == pytest.approx(expected, rel=1e-12)


def test_an_update_that_adds_minus_d_has_reversal_one_and_plus_d_minus_one() -> None:
    displacement = random(8, 6, seed=3)
    u, s, vh = torch.linalg.svd(displacement, full_matrices=False)
    minus_d = FactoredUpdate(-u * s, vh, 1.0)
    assert alignment_reversal(minus_d, displacement) == pytest.approx(1.0, rel=1e-12)
    plus_d = FactoredUpdate(u * s, vh, 1.0)
    assert alignment_reversal(plus_d, displacement) == pytest.approx(-1.0, rel=1e-12)


@pytest.mark.parametrize("rank", [1, 5, 24])
def test_basis_reversal_is_the_reversal_of_the_truncated_displacement(rank: int) -> None:
    displacement, update = problem(seed=4)
    subspace = safety_subspace(displacement, rank=rank)
    truncated = subspace.left @ torch.diag(subspace.singular_values) @ subspace.right.T
    expected = -float((dense(update) * truncated).sum() / truncated.square().sum())
    assert basis_reversal(update, subspace) == pytest.approx(expected, rel=1e-10)
    if rank == 24:  # the whole displacement: the two measures agree
        assert basis_reversal(update, subspace) == pytest.approx(
            alignment_reversal(update, displacement), rel=1e-10
        )


def test_safelora_from_a_full_basis_equals_safelora_from_the_displacement() -> None:
    displacement, update = problem(seed=5)
    full = safety_subspace(displacement, rank=24)
    exact = safelora_candidate(update.left, update.right, displacement)
    approximate = safelora_candidate_from_subspace(update.left, update.right, full)
    assert torch.allclose(approximate.projected_b, exact.projected_b, atol=1e-10)
    assert approximate.similarity == exact.similarity


def test_safelora_from_a_truncated_basis_uses_u_s2_ut_over_the_full_norm() -> None:
    displacement, update = problem(seed=6)
    subspace = safety_subspace(displacement, rank=4)
    left, values = subspace.left, subspace.singular_values
    c = left @ torch.diag(values.square()) @ left.T / displacement.norm()
    candidate = safelora_candidate_from_subspace(update.left, update.right, subspace)
    assert torch.allclose(candidate.projected_b, c @ update.left, atol=1e-10)


def test_k_from_a_stored_basis_is_what_the_svd_would_choose_within_it() -> None:
    displacement = random(30, 20, seed=7)
    stored = safety_subspace(displacement, energy=0.99)
    direct = safety_subspace(displacement, energy=0.6)
    chosen, reached = subspace_from_basis(
        stored.left,
        stored.singular_values,
        stored.right,
        displacement_norm=stored.displacement_norm,
        energy=0.6,
    )
    assert reached and chosen.rank == direct.rank and chosen.method == "basis"
    assert chosen.captured_energy == pytest.approx(direct.captured_energy, rel=1e-12)
    assert torch.allclose(chosen.left.abs(), direct.left.abs(), atol=1e-8)


def test_a_basis_short_of_the_energy_or_rank_gives_all_it_holds_and_says_so() -> None:
    displacement = random(30, 20, seed=8)
    stored = safety_subspace(displacement, rank=3)
    arguments = (stored.left, stored.singular_values, stored.right)
    norm = stored.displacement_norm
    chosen, reached = subspace_from_basis(*arguments, displacement_norm=norm, energy=0.99)
    assert not reached and chosen.rank == 3
    assert chosen.captured_energy == pytest.approx(stored.captured_energy)
    chosen, reached = subspace_from_basis(*arguments, displacement_norm=norm, rank=5)
    assert not reached and chosen.rank == 3
    chosen, reached = subspace_from_basis(*arguments, displacement_norm=norm, rank=2)
    assert reached and chosen.rank == 2


def test_a_bfloat16_basis_is_made_orthonormal_again() -> None:
    stored = safety_subspace(random(64, 48, seed=9), rank=8)
    chosen, _ = subspace_from_basis(
        stored.left.bfloat16(),
        stored.singular_values,
        stored.right.bfloat16(),
        displacement_norm=stored.displacement_norm,
        rank=8,
    )
    identity = torch.eye(8, dtype=torch.float64)
    assert torch.allclose(chosen.left.T @ chosen.left, identity, atol=1e-12)
    assert torch.allclose(chosen.right.T @ chosen.right, identity, atol=1e-12)


def test_a_module_without_signal_in_the_basis_has_rank_zero() -> None:
    chosen, reached = subspace_from_basis(
        torch.zeros(5, 0), torch.zeros(0), torch.zeros(4, 0), displacement_norm=0.0
    )
    assert reached and chosen.rank == 0 and not chosen.has_signal
