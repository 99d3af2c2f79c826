"""The repair, as pure functions on LoRA factors (METHOD.md §2-§5).

An update is always kept factored, `X = s L R` with `L` (`m x q`) and `R`
(`q x n`), `q` a small multiple of the LoRA rank `r`: no function here builds an
`m x n` (or `m x m`) matrix, so each costs `O((m + n) q^2)` beyond the
products with the subspace bases. Everything is float64.

Norms of factored products go through the triangular factors of two thin QRs,
`||L R||_F = ||R_L R_R^T||_F` with `L = Q_L R_L`, `R^T = Q_R R_R`. It is as
cheap as the Gram form `trace((L^T L)(R R^T))` of METHOD.md §2 and, unlike it,
does not square the rounding error: the norm of a difference of nearly equal
updates (the relative change at a small strength) stays accurate to ~1e-16
instead of ~1e-8. Inner products (cosines) use the Gram form, whose error is
already ~1e-16 relative to the norms.

Pure math: imports torch, numpy, the standard library and `subspace` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy
import torch

from adapter_fix.math.subspace import Subspace, frobenius_norm

Tensor = torch.Tensor


@dataclass(frozen=True)
class FactoredUpdate:
    """An update `X = scaling * left @ right`, never formed densely."""

    left: Tensor
    """`m x q`, float64."""
    right: Tensor
    """`q x n`, float64."""
    scaling: float


@dataclass(frozen=True)
class Decomposition:
    """`dW = s B A` split against a subspace into `F + H + O` (METHOD.md §2).

    `F = s b_in a_in`, `H = s (b_in a_out + b_out a_in)`, `O = s b_out a_out`.
    The `rho_*` are each component's share of `||F||^2 + ||H||^2 + ||O||^2`
    (which is `||dW||_F^2`, the components being orthogonal), so they sum to 1
    to rounding; all three are 0 when `dW == 0`.
    """

    scaling: float
    b_in: Tensor
    """`U (U^T B)`, `m x r`, float64."""
    b_out: Tensor
    """`B - b_in`, `m x r`, float64."""
    a_in: Tensor
    """`(A V) V^T`, `r x n`, float64."""
    a_out: Tensor
    """`A - a_in`, `r x n`, float64."""
    update_norm: float
    """`||dW||_F`."""
    rho_full: float
    """`rho_F = ||F||^2 / ||dW||^2`."""
    rho_partial: float
    """`rho_H = ||H||^2 / ||dW||^2`."""
    rho_off: float
    """`rho_O = ||O||^2 / ||dW||^2`."""
    lora_b: Tensor
    """`B`, `m x r`, float64 (so `csulora` at strength 0 returns `dW` bit for bit)."""
    lora_a: Tensor
    """`A`, `r x n`, float64."""


@dataclass(frozen=True)
class UpdateComparison:
    """How a repaired update `X` compares with the original `dW`, without a subspace."""

    norm: float
    """`||X||_F`."""
    relative_change: float
    """`||X - dW||_F / ||dW||_F` (0.0 when `dW == 0`)."""
    cosine: float
    """`<dW, X>_F / (||dW|| ||X||)`; 1.0 when both are zero, 0.0 when exactly one is."""


@dataclass(frozen=True)
class UpdateMetrics:
    """How a repaired update `X` compares with the original `dW` (METHOD.md §6)."""

    norm: float
    """`||X||_F`."""
    relative_change: float
    """`||X - dW||_F / ||dW||_F` (0.0 when `dW == 0`)."""
    cosine: float
    """`<dW, X>_F / (||dW|| ||X||)`; 1.0 when both are zero, 0.0 when exactly one is."""
    rho_full: float
    """`rho_F` of `X` against the same subspace."""
    rho_partial: float
    """`rho_H` of `X`."""
    rho_off: float
    """`rho_O` of `X`."""


@dataclass(frozen=True)
class LoraFactors:
    """New LoRA factors with `output_scaling(rank) * lora_b @ lora_a` the (truncated) update."""

    lora_b: Tensor
    """`m x r'`, float64."""
    lora_a: Tensor
    """`r' x n`, float64."""
    rank: int
    """`r'`."""
    truncation_residual: float
    """`||X - X_r'||_F / ||X||_F` (0.0 when nothing was truncated, or when `X == 0`)."""


@dataclass(frozen=True)
class SafeLoraCandidate:
    """Safe LoRA's projection of one module (Hsu et al. 2024), before selection."""

    similarity: float
    """Cosine between flattened `B~ A` and `B A`, rounded to 5 decimals."""
    projected_b: Tensor
    """`B~ = D (D^T B) / ||D||_F`, `m x r`, float64."""


def as_factored(lora_b: Tensor, lora_a: Tensor, scaling: float) -> FactoredUpdate:
    """`dW = scaling * lora_b @ lora_a` (`m x r`, `r x n`, any float dtype) as float64 factors."""
    if lora_b.ndim != 2 or lora_a.ndim != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(
            f"LoRA factors do not chain: B is {tuple(lora_b.shape)}, A is {tuple(lora_a.shape)}"
        )
    return FactoredUpdate(lora_b.double(), lora_a.double(), float(scaling))


def factored_norm(update: FactoredUpdate) -> float:
    """`||s L R||_F` of a factored update (`m x q`, `q x n`), through two thin QRs."""
    return _product_norm(update.left.double(), update.right.double(), update.scaling)


def decompose(lora_b: Tensor, lora_a: Tensor, scaling: float, subspace: Subspace) -> Decomposition:
    """Split `dW = scaling * lora_b @ lora_a` into its F/H/O components against `subspace`.

    `lora_b` is `m x r`, `lora_a` is `r x n` (any float dtype; computed in
    float64), `subspace.left` is `m x k`, `subspace.right` is `n x k`. A
    subspace without signal (`k = 0`) puts the whole update in `O`.
    """
    update = as_factored(lora_b, lora_a, scaling)
    b, a, s = update.left, update.right, update.scaling
    left = subspace.left.to(device=b.device, dtype=torch.float64)
    right = subspace.right.to(device=b.device, dtype=torch.float64)
    if left.shape[0] != b.shape[0] or right.shape[0] != a.shape[1]:
        raise ValueError(
            f"update {b.shape[0]} x {a.shape[1]} does not match the subspace "
            f"{left.shape[0]} x {right.shape[0]}"
        )
    b_in = left @ (left.T @ b)
    a_in = (a @ right) @ right.T
    b_out, a_out = b - b_in, a - a_in
    # The column spaces of b_in and b_out are orthogonal (so are the row spaces of a_in and
    # a_out): each product's norm comes from the four r x r triangles of one QR per factor,
    # and ||H||^2 splits into its two orthogonal terms. Four thin QRs instead of eight.
    r_b_in, r_b_out = _triangle(b_in), _triangle(b_out)
    r_a_in, r_a_out = _triangle(a_in.T), _triangle(a_out.T)
    full = _core_norm(r_b_in, r_a_in, s) ** 2
    partial = _core_norm(r_b_in, r_a_out, s) ** 2 + _core_norm(r_b_out, r_a_in, s) ** 2
    off = _core_norm(r_b_out, r_a_out, s) ** 2
    total = full + partial + off
    rho = (full / total, partial / total, off / total) if total > 0 else (0.0, 0.0, 0.0)
    return Decomposition(
        scaling=s,
        b_in=b_in,
        b_out=b_out,
        a_in=a_in,
        a_out=a_out,
        update_norm=math.sqrt(total),
        rho_full=rho[0],
        rho_partial=rho[1],
        rho_off=rho[2],
        lora_b=b,
        lora_a=a,
    )


def csulora(decomposition: Decomposition, strength: float) -> tuple[FactoredUpdate, float, float]:
    """The closest safe update `X* = F + a_H H + a_O O` (METHOD.md §3).

    `a_H = 1 / (1 + strength rho_H)`, `a_O = 1 / (1 + strength rho_O)`. In
    factored form `X* = s L M`, `L = [b_in, b_out]` (`m x 2r`),
    `M = [[a_in + a_H a_out], [a_H a_in + a_O a_out]]` (`2r x n`). When both
    factors are 1 (strength 0, or no H and O) it returns `dW`'s own factors, so
    strength 0 gives back `dW` exactly.

    Returns:
        `(X*, a_H, a_O)`.
    """
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"strength must be a finite number >= 0, got {strength}")
    a_partial = 1.0 / (1.0 + strength * decomposition.rho_partial)
    a_off = 1.0 / (1.0 + strength * decomposition.rho_off)
    d = decomposition
    if a_partial == 1.0 and a_off == 1.0:
        return FactoredUpdate(d.lora_b, d.lora_a, d.scaling), a_partial, a_off
    left = torch.cat([d.b_in, d.b_out], 1)
    right = torch.cat([d.a_in + a_partial * d.a_out, a_partial * d.a_in + a_off * d.a_out], 0)
    return FactoredUpdate(left, right, d.scaling), a_partial, a_off


def project(decomposition: Decomposition) -> FactoredUpdate:
    """Hard projection `X = F = s b_in a_in` (`m x r`, `r x n`): the `strength -> inf` limit."""
    return FactoredUpdate(decomposition.b_in, decomposition.a_in, decomposition.scaling)


def compare_updates(
    original: FactoredUpdate, repaired: FactoredUpdate, *, repaired_norm: float | None = None
) -> UpdateComparison:
    """`||X||`, `||X - dW|| / ||dW||` and cosine(`dW`, `X`) for `X = repaired`, `dW = original`.

    Both `m x n`, in factored form; no subspace is needed (Safe LoRA without one).
    `repaired_norm` is `||X||` when the caller has it already.
    """
    original = as_factored(original.left, original.right, original.scaling)
    repaired = as_factored(repaired.left, repaired.right, repaired.scaling)
    original_norm = _product_norm(original.left, original.right, original.scaling)
    if repaired_norm is None:
        repaired_norm = _product_norm(repaired.left, repaired.right, repaired.scaling)
    difference_norm = _product_norm(
        torch.cat([repaired.scaling * repaired.left, -original.scaling * original.left], 1),
        torch.cat([repaired.right, original.right], 0),
        1.0,
    )
    if original_norm > 0 and repaired_norm > 0:
        inner = (
            original.scaling
            * repaired.scaling
            * _trace_of_product(original.left.T @ repaired.left, repaired.right @ original.right.T)
        )
        cosine = max(-1.0, min(1.0, inner / (original_norm * repaired_norm)))
    else:
        cosine = 1.0 if original_norm == repaired_norm else 0.0
    return UpdateComparison(
        norm=repaired_norm,
        relative_change=difference_norm / original_norm if original_norm > 0 else 0.0,
        cosine=cosine,
    )


def update_metrics(
    original: FactoredUpdate, repaired: FactoredUpdate, subspace: Subspace
) -> UpdateMetrics:
    """Compare `X = repaired` with `dW = original` (same `m x n`), all in factored form."""
    parts = decompose(repaired.left, repaired.right, repaired.scaling, subspace)
    comparison = compare_updates(original, repaired, repaired_norm=parts.update_norm)
    return UpdateMetrics(
        norm=comparison.norm,
        relative_change=comparison.relative_change,
        cosine=comparison.cosine,
        rho_full=parts.rho_full,
        rho_partial=parts.rho_partial,
        rho_off=parts.rho_off,
    )


def alignment_reversal(
    update: FactoredUpdate, displacement: Tensor, *, displacement_norm: float | None = None
) -> float:
    """`u = -<dW, D>_F / ||D||_F^2`: the share of the alignment displacement `dW` undoes.

    `dW = s L R` (`m x q`, `q x n`), `D` is `m x n` (nonzero). `u = 1` means
    `dW` adds `-D` (the update erases the alignment along `D`), `u = 0` that it
    is orthogonal to `D`, `u < 0` that it reinforces it. Computed as
    `-s sum(L * (D R^T)) / ||D||^2`: `O(m n q)`, no `m x n` product is formed.
    `displacement_norm` is `||D||_F` when the caller has it (a pass over `D` saved).
    """
    work_dtype = torch.float64 if displacement.dtype == torch.float64 else torch.float32
    matrix = displacement.to(work_dtype)
    norm = frobenius_norm(matrix) if displacement_norm is None else displacement_norm
    if norm == 0:
        raise ValueError("the reversal needs a nonzero displacement")
    projected = (matrix @ update.right.T.to(device=matrix.device, dtype=work_dtype)).double()
    inner = update.scaling * float((update.left.double() * projected.to(update.left.device)).sum())
    return -inner / norm**2


def basis_reversal(update: FactoredUpdate, subspace: Subspace) -> float:
    """`u_k = -tr(U_k^T dW V_k S_k) / sum(S_k^2)`: the reversal of `D_k = U_k S_k V_k^T` alone.

    The same measure as `alignment_reversal` taken against the subspace's
    truncated displacement (equal to it when the subspace captures all of
    `||D||^2`). `dW = s L R`; costs `O((m + n) q k)`. 0.0 without signal.
    """
    if subspace.rank == 0:
        return 0.0
    left = subspace.left.to(device=update.left.device, dtype=torch.float64)
    right = subspace.right.to(device=update.left.device, dtype=torch.float64)
    values = subspace.singular_values.to(device=update.left.device, dtype=torch.float64)
    core = (left.T @ update.left.double()) @ (update.right.double() @ right)
    inner = update.scaling * float(core.diagonal() @ values)
    return -inner / float(values.square().sum())


def update_spectrum(update: FactoredUpdate) -> Tensor:
    """Singular values of `X = s L R`, float64, descending, `min(m, n, q)` of them."""
    return torch.linalg.svdvals(_core_values(update))


def largest_singular_value(update: FactoredUpdate) -> float:
    """`sigma_1` of `X = s L R` (0.0 for an empty update).

    It bounds every entry of `X` and the norm of `X x` for a unit `x`: when it
    is below a dtype's largest finite value, `X` merged or applied in that
    dtype cannot overflow; above it, it is expected to.
    """
    values = update_spectrum(update)
    return float(values[0]) if values.numel() else 0.0


def effective_rank(singular_values: Tensor) -> float:
    """Roy & Vetterli (2007): exp of the entropy of the normalised singular values.

    singular_values: `(q,)`, non-negative. 0.0 when all are zero; `q` when all are equal.
    """
    total = singular_values.sum()
    if total <= 0:
        return 0.0
    shares = singular_values[singular_values > 0] / total
    return float(torch.exp(-(shares * shares.log()).sum()))


def to_lora_factors(
    update: FactoredUpdate,
    *,
    rank: int | None,
    output_scaling: Callable[[int], float],
    tolerance: float = 1e-12,
) -> LoraFactors:
    """Refactor `X = s L R` (`m x q`, `q x n`) into LoRA factors (METHOD.md §4).

    QR of `L` and of `R^T`, SVD of the small core. Singular values at or below
    `tolerance * sigma_max` are rounding noise and count as zero (they are
    neither kept nor part of the residual).

    Args:
        update: the update `X`.
        rank: `r'` for a best rank-`r'` approximation (Eckart-Young), zero-padded
            when `X`'s numerical rank is lower, so the factors are always
            `m x r'` and `r' x n` (a drop-in replacement); None keeps every
            singular value above the tolerance (at least one).
        output_scaling: the scaling PEFT applies to a module of rank `r'`
            (`alpha / r'` or `alpha / sqrt(r')`); it is divided out, so
            `output_scaling(r') * lora_b @ lora_a` is the truncated `X`.
        tolerance: relative threshold for numerical zeros.

    Each kept `sigma_i / output_scaling(r')` is split evenly (its square root on
    each side); each left singular vector's largest-magnitude entry is made
    positive (the first such entry on a tie), so the output is deterministic.
    """
    if rank is not None and rank < 1:
        raise ValueError(f"the output rank must be >= 1, got {rank}")
    left_basis, right_basis, core = _core(update)
    core_left, values, core_right_t = torch.linalg.svd(core, full_matrices=False)
    numerical = int((values > tolerance * values[0]).sum())
    kept = min(numerical, rank) if rank is not None else max(1, numerical)
    output_rank = rank if rank is not None else kept
    scale = float(output_scaling(output_rank))
    if not (math.isfinite(scale) and scale != 0):
        raise ValueError(f"output_scaling({output_rank}) = {scale} cannot be divided out")
    energies = values[:numerical].square()
    total = float(energies.sum())
    residual = math.sqrt(float(energies[kept:].sum()) / total) if total > 0 else 0.0

    singular_left = left_basis @ core_left[:, :kept]
    singular_right = right_basis @ core_right_t[:kept].T
    peaks = singular_left.abs().argmax(0, keepdim=True)
    signs = torch.where(singular_left.gather(0, peaks) < 0, -1.0, 1.0).to(singular_left)
    root = (values[:kept] / abs(scale)).sqrt()
    lora_b = singular_left.new_zeros(singular_left.shape[0], output_rank)
    lora_a = singular_right.new_zeros(output_rank, singular_right.shape[0])
    lora_b[:, :kept] = singular_left * (signs * root * math.copysign(1.0, scale))
    lora_a[:kept] = (singular_right * (signs * root)).T
    return LoraFactors(lora_b, lora_a, output_rank, residual)


def safelora_candidate(
    lora_b: Tensor,
    lora_a: Tensor,
    displacement: Tensor,
    *,
    displacement_norm: float | None = None,
    reduced: Tensor | None = None,
) -> SafeLoraCandidate:
    """Safe LoRA's projected `B~ = C B`, `C = D D^T / ||D||_F`, and its similarity.

    `lora_b` is `m x r`, `lora_a` is `r x n`, `displacement` is `D`, `m x n`
    (nonzero); `displacement_norm` is `||D||_F` when the caller has it (the
    stream takes it while reading `D`), saving a pass over `D`; so does
    `reduced`, `D^T B` (`n x r`) when the caller has it. `B~` is
    computed as `D (D^T B) / ||D||_F` in float32 (float64 for a float64 `D`),
    never forming `C` (`m x m`). The similarity is the cosine
    between flattened `B~ A` and `B A`, by Gram matrices, rounded with
    `numpy.round(., 5)`; 0.0 when either is zero (torch's `cosine_similarity`,
    which the reference uses, clamps the denominator the same way).

    Matched against the public reference (IBM/SafeLoRA `model.py`,
    `SafeLoRA.get_aligned_matrix` and `projected_weighted`): `C` is
    `torch.mm(vec, vec.t()) / torch.norm(vec)` with `vec = W_aligned - W_base`;
    the module's new `B` is `torch.mm(C, B)` and `A` is untouched; the
    similarity is `numpy.round(cosine_similarity((C B A).reshape(1, -1),
    (B A).reshape(1, -1)).item(), 5)`, without the LoRA scaling (it cancels).
    """
    b = lora_b.double()
    a = lora_a.double()
    if displacement.shape != (b.shape[0], a.shape[1]) or b.shape[1] != a.shape[0]:
        raise ValueError(
            f"displacement {tuple(displacement.shape)} does not match B {tuple(b.shape)} "
            f"and A {tuple(a.shape)}"
        )
    norm = frobenius_norm(displacement) if displacement_norm is None else displacement_norm
    if norm == 0:
        raise ValueError("Safe LoRA needs a nonzero displacement: C = D D^T / ||D||_F")
    work_dtype = torch.float64 if displacement.dtype == torch.float64 else torch.float32
    matrix = displacement.to(work_dtype)
    if reduced is None:
        reduced = matrix.T @ b.to(device=matrix.device, dtype=work_dtype)
    else:
        reduced = reduced.to(device=matrix.device, dtype=work_dtype)
    projected_b = (matrix @ reduced).to(device=b.device, dtype=torch.float64) / norm
    return _safelora_similarity(b, a, projected_b)


def safelora_candidate_from_subspace(
    lora_b: Tensor, lora_a: Tensor, subspace: Subspace
) -> SafeLoraCandidate:
    """Safe LoRA with `D` replaced by its truncation `D_k = U_k S_k V_k^T` (a basis file).

    `C ~ D_k D_k^T / ||D||_F = U_k S_k^2 U_k^T / ||D||_F`, with the exact
    `||D||_F` the subspace records, so `B~ = U_k (S_k^2 (U_k^T B)) / ||D||_F`
    (`m x r`, float64). An approximation of `safelora_candidate`: exact when
    the subspace captures all of `||D||^2`, and missing the directions past
    `k` otherwise (they carry `1 - captured_energy` of it).
    """
    b = lora_b.double()
    a = lora_a.double()
    if subspace.rank == 0 or subspace.displacement_norm == 0:
        raise ValueError("Safe LoRA needs a subspace with signal: C = U S^2 U^T / ||D||_F")
    left = subspace.left.to(device=b.device, dtype=torch.float64)
    values = subspace.singular_values.to(device=b.device, dtype=torch.float64)
    projected_b = left @ (values.square()[:, None] * (left.T @ b)) / subspace.displacement_norm
    return _safelora_similarity(b, a, projected_b)


def _safelora_similarity(b: Tensor, a: Tensor, projected_b: Tensor) -> SafeLoraCandidate:
    """The candidate `B~` with the reference's rounded cosine of flattened `B~ A` and `B A`."""
    row_gram = a @ a.T
    inner = _trace_of_product(projected_b.T @ b, row_gram)
    projected_norm_sq = _trace_of_product(projected_b.T @ projected_b, row_gram)
    original_norm_sq = _trace_of_product(b.T @ b, row_gram)
    if projected_norm_sq > 0 and original_norm_sq > 0:
        cosine = inner / math.sqrt(projected_norm_sq * original_norm_sq)
    else:
        cosine = 0.0
    return SafeLoraCandidate(float(numpy.round(cosine, 5)), projected_b)


def safelora_select(
    similarities: Mapping[str, float],
    *,
    select: str = "number",
    number: int = 10,
    threshold: float = 0.5,
) -> set[str]:
    """The modules Safe LoRA projects, given each module's rounded similarity.

    `"number"`: every module whose similarity is at most the `number`-th lowest
    value (ties included; every module when there are fewer). `"threshold"`:
    every module with similarity `<= threshold`.

    Matched against IBM/SafeLoRA `model.py` (`SafeLoRA.__init__`): for
    `number` it takes `thrs = numpy.sort(cos)[:num_proj_layers][-1]` and
    projects every layer with `cos <= thrs`; for `threshold`, `cos <= threshold`.
    """
    if select == "number":
        if number < 1:
            raise ValueError(f"the number of Safe LoRA modules must be >= 1, got {number}")
        if not similarities:
            return set()
        cutoff = sorted(similarities.values())[:number][-1]
    elif select == "threshold":
        cutoff = threshold
    else:
        raise ValueError(f"Safe LoRA selection must be 'number' or 'threshold', got {select!r}")
    return {name for name, similarity in similarities.items() if similarity <= cutoff}


def _core(update: FactoredUpdate) -> tuple[Tensor, Tensor, Tensor]:
    """`(Q_L, Q_R, C)` with `X = Q_L C Q_R^T`: `Q_L` `m x a`, `Q_R` `n x b`, `C` `a x b`.

    From thin QRs `L = Q_L R_L`, `R^T = Q_R R_R`: `C = s R_L R_R^T`, so `X`
    and `C` share singular values and `||X||_F = ||C||_F`.
    """
    left_basis, left_triangle = torch.linalg.qr(update.left.double())
    right_basis, right_triangle = torch.linalg.qr(update.right.double().T)
    return left_basis, right_basis, update.scaling * (left_triangle @ right_triangle.T)


def _core_values(update: FactoredUpdate) -> Tensor:
    """`C` of `_core` alone: the triangular factors only (`mode="r"`), no `Q` is formed."""
    left_triangle = torch.linalg.qr(update.left.double(), mode="r").R
    right_triangle = torch.linalg.qr(update.right.double().T, mode="r").R
    return update.scaling * (left_triangle @ right_triangle.T)


def _triangle(matrix: Tensor) -> Tensor:
    """`R` of the thin QR of `matrix` (`d x q`, float64): `q x q`, `||matrix y|| = ||R y||`."""
    return torch.linalg.qr(matrix, mode="r").R


def _core_norm(left_triangle: Tensor, right_triangle: Tensor, scaling: float) -> float:
    """`||s L R||_F` from `L`'s and `R^T`'s QR triangles."""
    return abs(scaling) * float(torch.linalg.matrix_norm(left_triangle @ right_triangle.T))


def _product_norm(left: Tensor, right: Tensor, scaling: float) -> float:
    """`||scaling * left @ right||_F` for `left` `m x q`, `right` `q x n`."""
    return float(torch.linalg.matrix_norm(_core_values(FactoredUpdate(left, right, scaling))))


def _trace_of_product(first: Tensor, second: Tensor) -> float:
    """`trace(first @ second)` for `first` `a x b`, `second` `b x a`, without the product."""
    return float((first * second.T).sum())
