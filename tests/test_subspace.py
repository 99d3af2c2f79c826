"""The safety subspace (METHOD.md §1): energy selection, exact vs randomized SVD, no signal."""

from __future__ import annotations

import math

import numpy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adapter_fix.math.subspace as subspace_module
from adapter_fix.math.subspace import (
    frobenius_norm,
    largest_angle_sine,
    low_precision_product,
    module_seed,
    safety_subspace,
)


def with_spectrum(rows: int, cols: int, values: list[float], seed: int = 0) -> torch.Tensor:
    """A float64 `rows x cols` matrix with exactly the given singular values."""
    generator = torch.Generator().manual_seed(seed)
    count = len(values)
    left = torch.linalg.qr(torch.randn(rows, count, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(cols, count, generator=generator, dtype=torch.float64)).Q
    return (left * torch.tensor(values, dtype=torch.float64)) @ right.T


def low_rank_plus_noise(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A float32 displacement with an exponentially decaying spectrum under Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    signal_rank = min(rows, cols) // 2
    decay = torch.exp(-torch.arange(signal_rank, dtype=torch.float64) / 12.0).tolist()
    signal = with_spectrum(rows, cols, decay, seed).float()
    noise = torch.randn(rows, cols, generator=generator)
    return signal + noise * (0.1 * signal.norm() / noise.norm())


def smallest_rank_reaching(values: torch.Tensor, total: float, energy: float) -> int:
    cumulative = torch.cumsum(values.double().square(), 0) / total
    return int(torch.nonzero(cumulative >= energy)[0]) + 1


def test_module_seed_is_a_stable_int63_hash_of_seed_and_name() -> None:
    name = "model.layers.0.self_attn.q_proj"
    assert module_seed(0, name) == 5976411218850630258
    assert module_seed(1, name) == 2687324997080395371
    assert module_seed(0, name + "x") != module_seed(0, name)
    assert all(0 <= module_seed(seed, name) < 2**63 for seed in range(50))


@pytest.mark.parametrize("reference_norm", [None, 0.0, 3.0])
def test_zero_displacement_has_no_signal_and_no_nan(reference_norm: float | None) -> None:
    subspace = safety_subspace(torch.zeros(5, 7), reference_norm=reference_norm)
    assert not subspace.has_signal
    assert subspace.no_signal_reason is not None
    assert subspace.rank == 0
    assert subspace.method == "none"
    assert subspace.captured_energy == 0.0
    assert subspace.displacement_norm == 0.0
    assert subspace.left.shape == (5, 0)
    assert subspace.right.shape == (7, 0)
    assert subspace.singular_values.shape == (0,)


def test_displacement_negligible_against_the_aligned_norm_has_no_signal() -> None:
    displacement = torch.full((6, 4), 1e-9, dtype=torch.float64)
    negligible = safety_subspace(displacement, reference_norm=1.0, relative_tolerance=1e-6)
    assert not negligible.has_signal
    assert "negligible" in (negligible.no_signal_reason or "")
    assert math.isclose(negligible.displacement_norm, 1e-9 * math.sqrt(24), rel_tol=1e-12)
    assert safety_subspace(displacement).has_signal
    assert safety_subspace(displacement, reference_norm=1e-4).has_signal


@settings(max_examples=40, deadline=None)
@given(energy=st.floats(min_value=0.01, max_value=0.999))
def test_energy_selection_picks_the_smallest_rank_reaching_the_energy(energy: float) -> None:
    values = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.25], dtype=torch.float64)
    displacement = with_spectrum(12, 20, values.tolist())
    subspace = safety_subspace(displacement, energy=energy)
    total = float(values.square().sum())
    expected = smallest_rank_reaching(values, total, energy)
    assert subspace.method == "exact"
    assert subspace.rank == expected
    assert subspace.captured_energy >= energy
    torch.testing.assert_close(subspace.singular_values, values[:expected], rtol=1e-12, atol=0)


def test_randomized_energy_selection_grows_k_and_picks_the_smallest_rank() -> None:
    values = [0.93**index for index in range(120)]
    displacement = with_spectrum(300, 500, values).float()
    total = sum(value * value for value in values)
    for energy, expected in ((0.5, 5), (0.9, 16), (0.99, 32), (0.999, 48)):
        assert smallest_rank_reaching(torch.tensor(values), total, energy) == expected
        subspace = safety_subspace(displacement, energy=energy, exact_below=0)
        assert subspace.method == "randomized"
        assert subspace.rank == expected


def test_energy_that_cannot_be_reached_stops_at_max_rank() -> None:
    displacement = low_rank_plus_noise(200, 300)
    for exact_below in (0, 10_000):
        subspace = safety_subspace(displacement, energy=1.0, max_rank=24, exact_below=exact_below)
        assert subspace.rank == 24
        assert subspace.captured_energy < 1.0


@pytest.mark.parametrize("exact_below", [0, 10_000])
def test_rank_fixes_k_and_is_capped_at_the_smaller_dimension(exact_below: int) -> None:
    displacement = low_rank_plus_noise(150, 200)
    fixed = safety_subspace(displacement, rank=7, energy=0.01, max_rank=2, exact_below=exact_below)
    assert fixed.rank == 7
    assert fixed.left.shape == (150, 7) and fixed.right.shape == (200, 7)
    capped = safety_subspace(displacement[:, :9], rank=50)
    assert capped.rank == 9
    assert capped.method == "exact"
    assert math.isclose(capped.captured_energy, 1.0, rel_tol=1e-6)


def test_randomized_matches_exact_captured_energy_at_the_same_rank() -> None:
    displacement = low_rank_plus_noise(300, 900)
    for rank in (4, 16, 40):
        exact = safety_subspace(displacement, rank=rank, exact_below=10_000)
        randomized = safety_subspace(displacement, rank=rank, exact_below=0, seed=3)
        assert (exact.method, randomized.method) == ("exact", "randomized")
        assert abs(exact.captured_energy - randomized.captured_energy) < 1e-3


def test_captured_energy_is_what_the_bases_capture() -> None:
    displacement = low_rank_plus_noise(256, 384)
    subspace = safety_subspace(displacement, exact_below=0)
    matrix = displacement.double()
    captured = subspace.left.T @ matrix @ subspace.right
    total = float(matrix.norm()) ** 2
    assert math.isclose(float(captured.norm()) ** 2 / total, subspace.captured_energy, rel_tol=1e-5)
    assert math.isclose(
        float(subspace.singular_values.square().sum()) / total,
        subspace.captured_energy,
        rel_tol=1e-6,  # ||D||_F is summed from float32 block norms (frobenius_norm)
    )
    assert bool((subspace.singular_values[:-1] >= subspace.singular_values[1:]).all())


@pytest.mark.parametrize("exact_below", [0, 10_000])
def test_bases_of_a_float32_displacement_are_float64_orthonormal(exact_below: int) -> None:
    subspace = safety_subspace(low_rank_plus_noise(200, 260), exact_below=exact_below)
    for basis in (subspace.left, subspace.right):
        assert basis.dtype == torch.float64
        identity = torch.eye(subspace.rank, dtype=torch.float64)
        torch.testing.assert_close(basis.T @ basis, identity, rtol=0, atol=1e-13)


def test_same_seed_gives_bit_identical_bases() -> None:
    displacement = low_rank_plus_noise(220, 330)
    first = safety_subspace(displacement, seed=11, exact_below=0)
    second = safety_subspace(displacement.clone(), seed=11, exact_below=0)
    other = safety_subspace(displacement, seed=12, exact_below=0)
    assert first.method == "randomized"
    assert torch.equal(first.left, second.left)
    assert torch.equal(first.right, second.right)
    assert torch.equal(first.singular_values, second.singular_values)
    assert first.captured_energy == second.captured_energy
    assert not torch.equal(first.left, other.left)


def test_bfloat16_sketch_finds_the_float32_subspace() -> None:
    displacement = low_rank_plus_noise(600, 900)
    full = safety_subspace(displacement, exact_below=0, seed=4)
    fast = safety_subspace(displacement, exact_below=0, seed=4, sketch_dtype=torch.bfloat16)
    assert fast.method == full.method == "randomized"
    assert fast.rank == full.rank
    # The last product and Q^T D are float32: the energy is exact for the Q found.
    assert abs(fast.captured_energy - full.captured_energy) < 1e-6
    torch.testing.assert_close(fast.singular_values, full.singular_values, rtol=1e-5, atol=0)
    assert largest_angle_sine(fast.left, full.left) < 1e-3
    assert largest_angle_sine(fast.right, full.right) < 1e-3
    again = safety_subspace(displacement, exact_below=0, seed=4, sketch_dtype=torch.bfloat16)
    assert torch.equal(again.left, fast.left)
    assert not torch.equal(fast.left, full.left)  # the bfloat16 products were taken


def test_bfloat16_sketch_grows_like_the_float32_one() -> None:
    """A sketch grown in several steps (each new block's products against the residual
    `(I - Q Q^T) D`), with one or two power iterations."""
    displacement = low_rank_plus_noise(600, 800, seed=2)
    for iterations in (1, 2):
        full = safety_subspace(
            displacement, exact_below=0, energy=0.99, power_iterations=iterations
        )
        fast = safety_subspace(
            displacement,
            exact_below=0,
            energy=0.99,
            power_iterations=iterations,
            sketch_dtype=torch.bfloat16,
        )
        assert full.rank > 32  # past INITIAL_RANK: the sketch was extended
        assert fast.rank == full.rank
        assert abs(fast.captured_energy - full.captured_energy) < 1e-6
        # The noise floor's last directions are loosely determined: compare the top half.
        top = full.rank // 2
        assert largest_angle_sine(fast.left[:, :top], full.left[:, :top]) < 1e-3


def test_largest_angle_sine_of_spans() -> None:
    basis = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64)).Q
    rotated = basis @ torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert largest_angle_sine(basis, rotated) < 1e-7
    other = torch.eye(6, dtype=torch.float64)[:, :2]
    orthogonal = torch.eye(6, dtype=torch.float64)[:, 2:4]
    assert largest_angle_sine(other, orthogonal) == pytest.approx(1.0)


def test_bfloat16_sketch_without_power_iterations_is_all_float32() -> None:
    """With `q = 0` the one product forms `Q`, so it is taken in `D`'s precision."""
    displacement = low_rank_plus_noise(520, 700)
    full = safety_subspace(displacement, exact_below=0, power_iterations=0)
    fast = safety_subspace(
        displacement, exact_below=0, power_iterations=0, sketch_dtype=torch.bfloat16
    )
    assert torch.equal(fast.left, full.left)
    assert torch.equal(fast.singular_values, full.singular_values)


def test_float64_displacement_is_decomposed_in_float64() -> None:
    displacement = with_spectrum(30, 40, [3.0, 2.0, 1.0, 1e-3], seed=5)
    subspace = safety_subspace(displacement, rank=4)
    expected = numpy.linalg.svd(displacement.numpy(), compute_uv=False)[:4]
    numpy.testing.assert_allclose(subspace.singular_values.numpy(), expected, rtol=1e-12)


def test_sketch_as_wide_as_the_matrix_falls_back_to_the_exact_svd() -> None:
    subspace = safety_subspace(low_rank_plus_noise(40, 60), rank=30, exact_below=0)
    assert subspace.method == "exact"


@pytest.mark.parametrize("transpose", [False, True])
def test_frobenius_norm_is_accurate_to_float64_within_1e7(transpose: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(1500, 1100, generator=generator) * 0.01 + 0.02
    expected = numpy.linalg.norm(matrix.numpy().astype(numpy.float64))
    view = matrix.T if transpose else matrix
    assert math.isclose(frobenius_norm(view), expected, rel_tol=1e-7)


@pytest.mark.parametrize(
    ("displacement", "arguments"),
    [
        (torch.tensor([[1.0, float("nan")]]), {}),
        (torch.tensor([[1.0, float("inf")]]), {}),
        (torch.ones(3), {}),
        (torch.ones(3, 3, dtype=torch.int64), {}),
        (torch.ones(3, 3), {"energy": 0.0}),
        (torch.ones(3, 3), {"energy": 1.5}),
        (torch.ones(3, 3), {"max_rank": 0}),
        (torch.ones(3, 3), {"rank": 0}),
        (torch.ones(3, 3), {"power_iterations": -1}),
    ],
)
def test_invalid_displacement_or_arguments_are_refused(
    displacement: torch.Tensor, arguments: dict[str, float]
) -> None:
    with pytest.raises(ValueError):
        safety_subspace(displacement, **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("stored_transposed", [False, True])
def test_low_precision_product_is_the_product_of_the_rounded_factors(
    transposed: bool, stored_transposed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subspace_module, "LOW_BLOCK_ENTRIES", 64)  # several blocks, one short
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(37, 20, generator=generator)
    if stored_transposed:
        matrix = torch.randn(20, 37, generator=generator).T
    other = torch.randn(20 if not transposed else 37, 3, generator=generator)
    product = low_precision_product(matrix, other, torch.bfloat16, transposed=transposed)
    rounded = (matrix.T if transposed else matrix).bfloat16().double()
    expected = rounded @ other.bfloat16().double()
    assert product.dtype == torch.float32
    assert product.shape == expected.shape
    # Each block's product is rounded to bfloat16 once, then summed in float32.
    torch.testing.assert_close(product.double(), expected, rtol=2e-2, atol=2e-2)
    assert not torch.allclose(
        product.double(),
        (matrix.T if transposed else matrix).double() @ other.double(),
        rtol=1e-5,
        atol=1e-5,
    )
