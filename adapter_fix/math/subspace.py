"""The safety subspace of one module: a truncated SVD of the alignment displacement.

METHOD.md §1. For `D = W_a - W_b` (`m x n`) this finds `D ~ U_k S_k V_k^T` with
`k` the smallest rank whose squared singular values hold a fraction `energy` of
`||D||_F^2` (capped at `max_rank`), or a fixed `rank`. Small matrices get the
exact LAPACK SVD; large ones a seeded randomized SVD (Halko, Martinsson &
Tropp, "Finding structure with randomness: probabilistic algorithms for
constructing approximate matrix decompositions", SIAM Review 53(2), 2011:
Algorithm 4.4, randomized subspace iteration, followed by Algorithm 5.1,
direct SVD). When `k` is chosen by energy, the sketch grows a block at a time
(Martinsson & Voronin 2016), doubling `k` (or more, where the spectrum shows
that more directions are needed) until `energy` is met or the cap is hit;
`||D||_F^2` is computed exactly, so the captured fraction is known at every
step. On a CPU with native bfloat16 arithmetic the products that only look for
`D`'s range run in bfloat16 (`sketch_dtype`); the product that forms the basis
and the projection onto it stay in float32.

Pure math: imports torch and the standard library only.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

EXACT_BELOW = 512
"""Default cut-over: the exact SVD is used when `min(m, n) < EXACT_BELOW`.

Below it the exact SVD is optimal and cheap in absolute terms (best of 3 on 2
CPU cores, float32, `energy=0.9`: 0.03 s for 256 x 1024, 0.05 s for
384 x 1536, 0.17 s for 512 x 2048), so a seed-dependent approximation buys
nothing that matters. Above it the exact cost grows as `m n min(m, n)` while
the randomized one grows as `m n k`: 0.4 s against 0.08 s at 768 x 3072,
1.4 s against 0.2 to 0.9 s at 1024 x 4096, and 83 s against 1.4 s for a
4096 x 14336 MLP weight (bench/svd_bench.py).
"""

OVERSAMPLING = 20
"""Extra sketch columns beyond `k`.

Halko et al. §4.2 find 5 to 10 enough for fast-decaying spectra; weight
displacements decay slowly, and 20 cut the energy shortfall at `k = 16..32`
tenfold (to ~1e-4) for ~7% more cost at `k = 128`.
"""

POWER_ITERATIONS = 2
"""Subspace iterations (Halko et al. §4.5).

Each costs two more passes over `D`; 2 keeps the energy shortfall at the same
`k` near 1e-3 or below except on noise-dominated (flat) spectra.
"""

INITIAL_RANK = 32
"""First `k` tried when it is chosen by energy; at least doubled until `energy` is met or the
cap is hit.

Growing only adds the new sketch columns (and one small SVD per step), but
each step costs `2q + 2` passes over `D`, and on large weights a pass costs
about the same whatever the sketch's width below ~100 columns: the products
are bound by reading `D` (one thread, 14336 x 4096: 71 ms for 16 columns,
132 ms for 52, 262 ms for 148; bench/README.md, "Workers"). So the first
sketch is wide enough that a displacement needing up to 32 directions takes
one step: at 16, the benchmark's modules (k = 18-19 at `energy=0.9`) took
two, and the subspace cost 24% more; a displacement needing 16 or fewer
pays ~25% more than it would at 16.
"""


RELATIVE_TOLERANCE = 1e-6
"""A displacement with `||D||_F <= RELATIVE_TOLERANCE * ||W_a||_F` has no safety signal."""


def module_seed(global_seed: int, module_name: str) -> int:
    """A per-module seed, stable across processes, platforms and Python hash seeds.

    The first 8 bytes of `sha256(f"{global_seed}:{module_name}")`, masked to 63
    bits so it fits any signed 64-bit seed (torch, numpy).
    """
    digest = hashlib.sha256(f"{global_seed}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


@dataclass(frozen=True)
class Subspace:
    """The safety subspace `D ~ U_k S_k V_k^T` of one `m x n` displacement.

    `left` and `right` are float64 with orthonormal columns to float64
    precision (re-orthonormalised after a float32 SVD), on the displacement's
    device. `captured_energy` is `sum(singular_values**2) / ||D||_F^2`, which is
    exactly `||U_k^T D V_k||_F^2 / ||D||_F^2` for these bases even when the
    randomized SVD computed them: its singular values are those of `U_k^T D`.
    With no signal, `rank` is 0 and the bases are `m x 0` and `n x 0`.
    """

    left: torch.Tensor
    """`U_k`, `m x k`, float64, orthonormal columns."""
    right: torch.Tensor
    """`V_k`, `n x k`, float64, orthonormal columns."""
    singular_values: torch.Tensor
    """`k`, float64, descending."""
    rank: int
    """`k` (0 when there is no signal)."""
    captured_energy: float
    """Kept `sum sigma^2 / ||D||_F^2`, in `[0, 1]` (0.0 when there is no signal)."""
    displacement_norm: float
    """`||D||_F`."""
    no_signal_reason: str | None
    """Why the module has no safety signal (then `rank == 0`); None when it has one."""
    method: str
    """`"exact"` (LAPACK SVD), `"randomized"` (Halko et al. 2011), `"basis"` (chosen within a
    stored basis, `subspace_from_basis`), or `"none"` without signal."""

    @property
    def has_signal(self) -> bool:
        """Whether the displacement gives a subspace to repair toward."""
        return self.no_signal_reason is None


def safety_subspace(
    displacement: torch.Tensor,
    *,
    energy: float = 0.9,
    max_rank: int = 128,
    rank: int | None = None,
    seed: int = 0,
    reference_norm: float | None = None,
    displacement_norm: float | None = None,
    relative_tolerance: float = RELATIVE_TOLERANCE,
    exact_below: int = EXACT_BELOW,
    oversampling: int = OVERSAMPLING,
    power_iterations: int = POWER_ITERATIONS,
    sketch_dtype: torch.dtype | None = None,
) -> Subspace:
    """The rank-`k` safety subspace of `displacement` (`D`, `m x n`, any float dtype).

    Computed in float32 (float64 when `D` is float64) on `D`'s device; the
    bases come back float64. Deterministic bit for bit for the same input,
    seed, device and thread count: the Gaussian sketch is drawn on the CPU from
    a `torch.Generator` seeded with `seed`, whatever the device.

    Args:
        displacement: `D = W_a - W_b`, `m x n`. Must be finite.
        energy: `tau` in `(0, 1]`; `k` is the smallest rank with captured energy
            `>= tau`. Higher keeps more directions: a larger subspace, more cost.
        max_rank: cap on `k` (also capped at `min(m, n)`). The randomized cost
            is linear in it.
        rank: fix `k` instead of choosing it by energy (capped at `min(m, n)`).
        seed: seed of the randomized sketch (see `module_seed`). Unused by the
            exact SVD.
        reference_norm: `||W_a||_F`; a displacement with
            `||D||_F <= relative_tolerance * reference_norm` has no signal.
            None: only an exactly zero displacement has none.
        displacement_norm: `||D||_F` when the caller has it already (computed
            while reading `D`, as `frobenius_norm` would), saving a pass over `D`.
        relative_tolerance: see `reference_norm`.
        exact_below: use the exact SVD when `min(m, n) < exact_below` (see
            `EXACT_BELOW`); also used whenever the sketch would be as wide as
            `min(m, n)`. 0 forces the randomized SVD.
        oversampling: sketch columns beyond `k`. More lowers the chance that the
            sketch misses a top direction (failure probability decays
            exponentially in it, Halko et al. §10) at a cost linear in `k + p`.
        power_iterations: subspace iterations `q`. Each one costs two more
            passes over `D` (a pass is `2 m n (k + p)` flops) and sharpens the
            approximation as `(sigma_{k+p+1} / sigma_k)^(2q+1)`; 0 is fine for a
            fast-decaying spectrum, noise-heavy spectra need 1 or 2.
        sketch_dtype: a lower precision (bfloat16) for the products that only find `D`'s
            range: the first sketch and every power iteration's but the last product
            `D @ X`, converted a block at a time (`low_precision_product`). The
            last product forming `Q` and `Q^T D` stay in `D`'s precision, so the
            singular values and captured energy are exact for the `Q` found, and the
            next product damps the rounding of the earlier ones as the iteration
            does any error outside the top directions (bench/README.md, "The
            bfloat16 sketch": within 8e-5 of the float32 subspace on decaying spectra,
            7e-3 to 2.6e-2 on flat ones, where two seeds differ by 0.7-1). None: `D`'s dtype
            throughout.

    Returns:
        The `Subspace`; rank 0 with `no_signal_reason` set when `D` is zero or
        negligible.

    Raises:
        ValueError: on a non-2-D or non-finite `D`, or an argument out of range.
    """
    _check_arguments(displacement, energy, max_rank, rank, relative_tolerance, exact_below)
    if oversampling < 0 or power_iterations < 0:
        raise ValueError(
            f"oversampling ({oversampling}) and power_iterations ({power_iterations}) must be >= 0"
        )
    work_dtype = torch.float64 if displacement.dtype == torch.float64 else torch.float32
    matrix = displacement.to(work_dtype)
    rows, cols = matrix.shape
    norm = frobenius_norm(matrix) if displacement_norm is None else displacement_norm
    if not math.isfinite(norm):
        raise ValueError("the displacement holds NaN or Inf values")
    reason = no_signal_reason(norm, reference_norm, relative_tolerance)
    if reason is not None:
        return _empty(rows, cols, norm, reason, matrix.device)

    total_energy = norm * norm
    smaller = min(rows, cols)
    cap = min(rank if rank is not None else max_rank, smaller)
    sketch = _RangeSketch(matrix, seed, power_iterations, sketch_dtype)
    method = "randomized"
    attempt = cap if rank is not None else min(INITIAL_RANK, cap)
    while True:
        if smaller < exact_below or attempt + oversampling >= smaller:
            method = "exact"
            left, values, right = _exact_svd(matrix)
            attempt = cap
        else:
            sketch.extend_to(attempt + oversampling)
            left, values, right = sketch.svd()
        cumulative = torch.cumsum(values[:attempt].double().square(), 0) / total_energy
        if rank is not None:
            chosen = attempt
            break
        reached = torch.nonzero(cumulative >= energy)
        if len(reached):
            chosen = int(reached[0]) + 1
            break
        if attempt == cap:
            chosen = cap
            break
        attempt = _next_attempt(attempt, cap, energy - float(cumulative[-1]), values, total_energy)
    return Subspace(
        left=_orthonormal_float64(left[:, :chosen]),
        right=_orthonormal_float64(right[:, :chosen]),
        singular_values=values[:chosen].double(),
        rank=chosen,
        captured_energy=min(1.0, float(cumulative[chosen - 1])),
        displacement_norm=norm,
        no_signal_reason=None,
        method=method,
    )


def _next_attempt(
    attempt: int, cap: int, unmet: float, values: torch.Tensor, total_energy: float
) -> int:
    """The next `k` to try when `attempt` directions hold `unmet` too little of `||D||^2`.

    Twice `attempt`, or more where the spectrum says so: the directions past
    `attempt` hold at most `sigma_attempt^2` each (singular values descend), so
    at least `unmet ||D||^2 / sigma_attempt^2` more are needed. On a flat tail
    (a noise floor under `energy`) that jumps to the cap at once instead of
    doubling through it; each extension costs `2q + 2` passes over `D`, which
    cost about the same whatever the sketch's width (bench/README.md, "Workers").
    """
    smallest = float(values[attempt - 1]) ** 2
    needed = math.ceil(unmet * total_energy / smallest) if smallest > 0 else cap
    return min(max(2 * attempt, attempt + needed), cap)


NORM_BLOCK = 2**14


def storage_order(matrix: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """`(matrix^T, True)` when `matrix` is a transposed view of contiguous storage (its rows
    are then read as stored), else `(matrix, False)`."""
    if not matrix.is_contiguous() and matrix.T.is_contiguous():
        return matrix.T, True
    return matrix, False


def largest_angle_sine(first: torch.Tensor, second: torch.Tensor) -> float:
    """The sine of the largest principal angle between the spans of two bases with
    orthonormal columns (`d x k` each): 0 for the same span, 1 when a direction of one is
    orthogonal to the other."""
    cosines = torch.linalg.svdvals(first.T @ second).clamp(max=1.0)
    return float((1.0 - cosines.min() ** 2).clamp(min=0.0).sqrt())


def frobenius_norm(matrix: torch.Tensor) -> float:
    """`||matrix||_F`, as float32 norms of `NORM_BLOCK`-entry blocks summed in float64.

    torch's float32 norm of a whole 4096 x 14336 matrix was 0.5% off, enough to
    misstate the captured energy; per-block norms stay within ~1e-7 relative.
    All blocks are one batched call over a view, so the cost is one pass. A
    transposed view is read in its storage order (the norm does not change).
    """
    matrix = storage_order(matrix)[0]
    flat = matrix.contiguous().reshape(-1)
    whole = flat.numel() - flat.numel() % NORM_BLOCK
    norms = torch.linalg.vector_norm(flat[:whole].view(-1, NORM_BLOCK), dim=1)
    squares = norms.double().square().sum()
    if whole < flat.numel():
        squares += torch.linalg.vector_norm(flat[whole:]).double().square()
    if not math.isfinite(float(squares)) and flat.dtype != torch.float64:
        # A float32 sum of squares overflows from entries near 1e19 on: redo it in float64,
        # so only NaN or Inf entries make the norm non-finite (a rare path: no cost otherwise).
        return frobenius_norm(flat.double())
    return math.sqrt(float(squares))


LOW_BLOCK_ENTRIES = 2**20
"""Entries of `D` converted at a time by `low_precision_product`: 2 MiB of bfloat16 (256
rows of a 4096-wide weight), which stays in cache between the conversion and the product."""


def low_precision_product(
    matrix: torch.Tensor, other: torch.Tensor, dtype: torch.dtype, *, transposed: bool = False
) -> torch.Tensor:
    """`matrix @ other` (`m x l`; `other` is `n x l`), or `matrix^T @ other` (`n x l`;
    `other` is `m x l`) when `transposed`, with both factors rounded to `dtype` and each
    block's product rounded to `dtype` too (what a `dtype` product returns on the CPU),
    returned in `matrix`'s dtype. `matrix` is `m x n`.

    `matrix` is converted `LOW_BLOCK_ENTRIES` at a time, in its storage order, into one
    reused buffer, and each block's product is taken at once: no copy of the whole
    matrix is made (half its memory, and a conversion that cost more than the blocks'),
    and the blocks' products are summed in `matrix`'s dtype, in a fixed order.
    """
    stored, flipped = storage_order(matrix)
    matrix, transposed = stored, transposed != flipped  # walk the rows as they are stored
    rows, cols = matrix.shape
    step = max(1, LOW_BLOCK_ENTRIES // max(cols, 1))
    buffer = torch.empty(min(step, rows), cols, dtype=dtype, device=matrix.device)
    narrow = other.to(dtype)
    if transposed:
        result = torch.zeros(cols, other.shape[1], dtype=matrix.dtype, device=matrix.device)
    else:
        result = torch.empty(rows, other.shape[1], dtype=matrix.dtype, device=matrix.device)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        block = buffer[: stop - start]
        block.copy_(matrix[start:stop])
        if transposed:
            result += block.T @ narrow[start:stop]
        else:
            result[start:stop] = block @ narrow
    return result


def _check_arguments(
    displacement: torch.Tensor,
    energy: float,
    max_rank: int,
    rank: int | None,
    relative_tolerance: float,
    exact_below: int,
) -> None:
    if displacement.ndim != 2 or not displacement.is_floating_point():
        raise ValueError(
            f"the displacement must be a 2-D float tensor, got {displacement.ndim}-D "
            f"{displacement.dtype}"
        )
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if max_rank < 1 or (rank is not None and rank < 1):
        raise ValueError(f"max_rank ({max_rank}) and rank ({rank}) must be >= 1")
    if relative_tolerance < 0 or exact_below < 0:
        raise ValueError(
            f"relative_tolerance ({relative_tolerance}) and exact_below ({exact_below}) "
            "must be >= 0"
        )


def no_signal_reason(
    norm: float, reference_norm: float | None, relative_tolerance: float = RELATIVE_TOLERANCE
) -> str | None:
    """Why a displacement of norm `norm` gives no subspace (zero, or negligible against
    `reference_norm` = `||W_a||_F`), or None when it has a signal."""
    if norm == 0.0:
        return "the displacement is zero (base and aligned weights are identical)"
    if reference_norm is not None and norm <= relative_tolerance * reference_norm:
        return (
            f"the displacement is negligible (||D||_F = {norm:.3g} <= "
            f"{relative_tolerance:g} x ||W_a||_F = {relative_tolerance * reference_norm:.3g})"
        )
    return None


def _empty(rows: int, cols: int, norm: float, reason: str, device: torch.device) -> Subspace:
    return Subspace(
        left=torch.zeros(rows, 0, dtype=torch.float64, device=device),
        right=torch.zeros(cols, 0, dtype=torch.float64, device=device),
        singular_values=torch.zeros(0, dtype=torch.float64, device=device),
        rank=0,
        captured_energy=0.0,
        displacement_norm=norm,
        no_signal_reason=reason,
        method="none",
    )


def _exact_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin LAPACK SVD: `U` (`m x p`), `S` (`p`), `V` (`n x p`), `p = min(m, n)`."""
    left, values, right_t = torch.linalg.svd(matrix, full_matrices=False)
    return left, values, right_t.T


class _RangeSketch:
    """An orthonormal basis `Q` (`m x l`) of `D`'s dominant range, and `Q^T D` (`l x n`).

    Halko et al. (2011) Algorithm 4.4 (randomized subspace iteration), grown a
    block at a time as in Martinsson & Voronin (2016, "A randomized blocked
    algorithm for efficiently computing rank-revealing factorizations of
    matrices", SIAM J. Sci. Comput. 38(5), randQB_b): each new block runs its
    power iterations on the residual `(I - Q Q^T) D`, so growing from `l` to
    `l'` columns costs what `l' - l` columns cost, not a restart.
    """

    def __init__(
        self,
        matrix: torch.Tensor,
        seed: int,
        power_iterations: int,
        sketch_dtype: torch.dtype | None = None,
    ) -> None:
        self.matrix = matrix
        self.sketch_dtype = None if sketch_dtype == matrix.dtype else sketch_dtype
        self.power_iterations = power_iterations
        self.basis = matrix.new_zeros(matrix.shape[0], 0)
        self.projected = matrix.new_zeros(0, matrix.shape[1])
        self.generator = torch.Generator().manual_seed(seed)

    def extend_to(self, width: int) -> None:
        """Add `width - l` columns to `Q` (and rows to `Q^T D`)."""
        matrix, basis, projected = self.matrix, self.basis, self.projected
        count = width - basis.shape[1]
        # Drawn on the CPU so the sketch, hence the result, does not depend on the device.
        sketch = torch.randn(matrix.shape[1], count, generator=self.generator, dtype=matrix.dtype)
        sketch = sketch.to(matrix.device)
        iterations = self.power_iterations
        block = torch.linalg.qr(
            self._times(sketch, low=iterations > 0) - basis @ (projected @ sketch)
        ).Q
        for iteration in range(iterations):
            co_block = torch.linalg.qr(
                self._times(block, transposed=True) - projected.T @ (basis.T @ block)
            ).Q
            last = iteration == iterations - 1
            block = torch.linalg.qr(
                self._times(co_block, low=not last) - basis @ (projected @ co_block)
            ).Q
        # One QR of [Q, block] keeps Q orthonormal even where the residual is numerically 0.
        block = torch.linalg.qr(torch.cat([basis, block], 1)).Q[:, basis.shape[1] :]
        self.basis = torch.cat([basis, block], 1)
        self.projected = torch.cat([projected, block.T @ matrix], 0)

    def _times(
        self, other: torch.Tensor, *, transposed: bool = False, low: bool = True
    ) -> torch.Tensor:
        """`D @ other` (`m x l`, `other` `n x l`), or `D^T @ other` (`n x l`, `other`
        `m x l`) when `transposed`, in `D`'s dtype; with `low` and a `sketch_dtype`, taken
        in that dtype (`low_precision_product`)."""
        if self.sketch_dtype is None or not low:
            return (self.matrix.T if transposed else self.matrix) @ other
        return low_precision_product(self.matrix, other, self.sketch_dtype, transposed=transposed)

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Halko et al. Algorithm 5.1: `U` (`m x l`), `S` (`l`), `V` (`n x l`) of `Q Q^T D`.

        The SVD of the wide `Q^T D` goes through a QR of its transpose, several
        times faster than LAPACK's SVD of a `l x n` matrix.
        """
        co_basis, triangle = torch.linalg.qr(self.projected.T)
        small_left, values, small_right_t = torch.linalg.svd(triangle.T)
        return self.basis @ small_left, values, co_basis @ small_right_t.T


def _orthonormal_float64(basis: torch.Tensor) -> torch.Tensor:
    """`basis` (`d x k`) in float64 with columns orthonormal to float64 precision.

    A float32 SVD gives columns orthonormal only to ~1e-6, which would make the
    F/H/O components of METHOD.md §2 overlap at that level. The QR keeps the
    span; fixing the signs of `R`'s diagonal keeps each column next to its input.
    """
    orthonormal, triangular = torch.linalg.qr(basis.double())
    signs = torch.where(torch.diagonal(triangular) < 0, -1.0, 1.0).to(orthonormal)
    return orthonormal * signs


def subspace_from_basis(
    left: torch.Tensor,
    values: torch.Tensor,
    right: torch.Tensor,
    *,
    displacement_norm: float,
    energy: float = 0.9,
    max_rank: int = 128,
    rank: int | None = None,
    reference_norm: float | None = None,
    relative_tolerance: float = RELATIVE_TOLERANCE,
) -> tuple[Subspace, bool]:
    """The safety subspace chosen, as `safety_subspace` would, within a stored truncated SVD.

    `left` is `U_K` (`m x K`), `values` `S_K` (`K`, descending), `right` `V_K`
    (`n x K`), any float dtype; `displacement_norm` is the exact `||D||_F`, so the
    captured energy `sum(S_k^2) / ||D||_F^2` is exact for the stored values. `k`
    is the smallest rank reaching `energy` (capped at `max_rank` and `K`), or
    `rank` capped at `K`. The bases are re-orthonormalised in float64 (a
    bfloat16 basis is orthonormal only to ~1e-2).

    Returns:
        `(subspace, reached)`: `reached` is False when the stored values cannot
        give what was asked (the energy, or a rank above `K`); `k` is then `K`.
    """
    _check_arguments(left, energy, max_rank, rank, relative_tolerance, 0)
    rows, cols, held = left.shape[0], right.shape[0], values.shape[0]
    if left.shape[1] != held or right.shape[1] != held:
        raise ValueError(
            f"basis shapes do not chain: U {tuple(left.shape)}, S {tuple(values.shape)}, "
            f"V {tuple(right.shape)}"
        )
    reason = no_signal_reason(displacement_norm, reference_norm, relative_tolerance)
    if reason is None and held == 0:
        reason = "the basis holds no direction for this module"
    if reason is not None:
        return _empty(rows, cols, displacement_norm, reason, left.device), True
    values = values.double()
    cumulative = torch.cumsum(values.square(), 0) / displacement_norm**2
    if rank is not None:
        chosen, reached = min(rank, held), rank <= held
    else:
        hits = torch.nonzero(cumulative >= energy)
        cap = min(max_rank, held)
        chosen = min(int(hits[0]) + 1, cap) if len(hits) else cap
        reached = bool(len(hits)) or cap < held
    subspace = Subspace(
        left=_orthonormal_float64(left[:, :chosen]),
        right=_orthonormal_float64(right[:, :chosen]),
        singular_values=values[:chosen],
        rank=chosen,
        captured_energy=min(1.0, float(cumulative[chosen - 1])),
        displacement_norm=displacement_norm,
        no_signal_reason=None,
        method="basis",
    )
    return subspace, reached
