"""Randomized vs exact SVD for the safety subspace, on one Llama-3-8B MLP-sized displacement.

Builds a 4096 x 14336 float32 displacement with a decaying spectrum (rank-512
signal, `sigma_i = exp(-i / 50)`, plus Gaussian noise at 20% of its Frobenius
norm), then:

- times `safety_subspace` with the randomized SVD (Halko, Martinsson & Tropp
  2011) at the defaults (`energy=0.9`, `max_rank=128`), which picks `k`;
- computes the exact spectrum as the eigenvalues of the float64 Gram matrix
  `D D^T` (exact to ~1e-16 relative in the energies, and the cheapest exact
  route: a lower bound on any exact SVD's cost, so the speed-up is understated);
- prints the captured energy of both at the same `k`, and the time ratio;
- times the bfloat16 sketch (`sketch_dtype`, what a CPU with native bfloat16 runs) and
  prints how far its subspace is from the float32 one at the same seed, beside how far
  two float32 seeds' are from each other (the method's own spread).

`--full-svd` also times the exact path of `safety_subspace` itself (LAPACK
`torch.linalg.svd`), about two minutes on 2 cores.

    .venv/bin/python bench/svd_bench.py [--full-svd]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from adapter_fix.math.subspace import frobenius_norm, largest_angle_sine, safety_subspace

ROWS, COLS = 4096, 14336
SIGNAL_RANK = 512
DECAY = 50.0
NOISE = 0.2
T = TypeVar("T")


def displacement(seed: int) -> torch.Tensor:
    """`(U * sigma) @ V^T + noise`, `ROWS x COLS`, float32."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(ROWS, SIGNAL_RANK, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(COLS, SIGNAL_RANK, generator=generator)).Q
    values = torch.exp(-torch.arange(SIGNAL_RANK, dtype=torch.float32) / DECAY)
    signal = (left * values) @ right.T
    noise = torch.randn(ROWS, COLS, generator=generator)
    return signal.add_(noise, alpha=NOISE * float(signal.norm()) / float(noise.norm()))


def best_of(
    repeats: int, function: Callable[..., T], *args: Any, **kwargs: Any
) -> tuple[list[T], list[float]]:
    """Every result and wall time of `repeats` calls; report the least (noise only adds)."""
    results, seconds = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        results.append(function(*args, **kwargs))
        seconds.append(time.perf_counter() - start)
    return results, seconds


def exact_spectrum(matrix: torch.Tensor) -> torch.Tensor:
    """Every `sigma_i^2` of `matrix`, descending: eigenvalues of its float64 Gram matrix."""
    wide = matrix.double()
    return torch.linalg.eigvalsh(wide @ wide.T).flip(0).clamp_min(0)


def seconds_text(seconds: list[float]) -> str:
    return f"{min(seconds):6.2f} s (best of {len(seconds)}, worst {max(seconds):.2f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-svd", action="store_true", help="also time torch.linalg.svd")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each method")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    matrix = displacement(args.seed)
    total = frobenius_norm(matrix) ** 2
    print(f"displacement {ROWS} x {COLS} float32, {torch.get_num_threads()} threads")

    runs, randomized_s = best_of(
        args.repeats, safety_subspace, matrix, seed=args.seed, exact_below=0
    )
    randomized = runs[0]
    identical = all(
        torch.equal(run.left, randomized.left) and torch.equal(run.right, randomized.right)
        for run in runs
    )
    k = randomized.rank
    spectra, exact_s = best_of(args.repeats, exact_spectrum, matrix)
    cumulative = torch.cumsum(spectra[0], 0) / total
    exact_captured = float(cumulative[k - 1])
    exact_k = int(torch.nonzero(cumulative >= 0.9)[0]) + 1

    print(
        f"randomized SVD  k={k}  captured={randomized.captured_energy:.6f}  "
        f"{seconds_text(randomized_s)}; same seed, bit-identical bases: {identical}"
    )
    print(
        f"exact spectrum  k={k}  captured={exact_captured:.6f}  {seconds_text(exact_s)}; "
        f"eigvalsh of float64 D D^T, whose own k for energy 0.9 is {exact_k}"
    )
    print(
        f"captured-energy agreement at k={k}: "
        f"|difference| = {abs(exact_captured - randomized.captured_energy):.2e}"
    )
    print(
        f"time ratio randomized / exact spectrum = {min(randomized_s) / min(exact_s):.3f} "
        f"({min(exact_s) / min(randomized_s):.1f}x faster)"
    )
    fast_runs, fast_s = best_of(
        args.repeats,
        safety_subspace,
        matrix,
        seed=args.seed,
        exact_below=0,
        sketch_dtype=torch.bfloat16,
    )
    fast = fast_runs[0]
    other_seed = safety_subspace(matrix, seed=args.seed + 1, exact_below=0)
    both = min(fast.rank, randomized.rank, other_seed.rank)
    print(
        f"bfloat16 sketch k={fast.rank}  captured={fast.captured_energy:.6f}  "
        f"{seconds_text(fast_s)}: {min(randomized_s) / min(fast_s):.2f}x the float32 "
        f"sketch's speed; largest principal-angle sine to the float32 subspace "
        f"{largest_angle_sine(fast.left[:, :both], randomized.left[:, :both]):.1e} (left) "
        f"{largest_angle_sine(fast.right[:, :both], randomized.right[:, :both]):.1e} (right); "
        f"float32 seed {args.seed} vs {args.seed + 1}: "
        f"{largest_angle_sine(other_seed.left[:, :both], randomized.left[:, :both]):.1e}"
    )
    if args.full_svd:
        full, full_s = best_of(1, safety_subspace, matrix, rank=k, exact_below=ROWS + 1)
        print(
            f"exact SVD       k={k}  captured={full[0].captured_energy:.6f}  "
            f"{seconds_text(full_s)}; torch.linalg.svd, the exact path of safety_subspace"
        )
        print(
            f"time ratio randomized / exact SVD = {min(randomized_s) / full_s[0]:.4f} "
            f"({full_s[0] / min(randomized_s):.0f}x faster)"
        )


if __name__ == "__main__":
    main()
