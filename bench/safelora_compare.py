"""Safe LoRA: our factored candidate against the dense formulation of the reference code.

The reference implementation of Safe LoRA (Hsu et al., NeurIPS 2024) builds,
per module, the `m x m` matrix `C = D D^T / ||D||_F`, then `B~ = C @ B` and
the cosine between the flattened `B~ @ A` and `B @ A`, rounded to 5
decimals. Ours (`adapter_fix.math.solve.safelora_candidate`) computes the same
candidate as `D (D^T B) / ||D||_F` and the cosine from `r x r` Gram
matrices, never forming anything `m x m` or `m x n`.

Each measurement runs in a fresh process (`--worker`): the inputs are
allocated, the peak-RSS counter is reset (`/proc/self/clear_refs`), one call
runs, and the peak RSS above the resident size before the call is its peak
memory. A fresh process matters: a child's `ru_maxrss` starts at its
parent's peak (the kernel carries it over at exec), so it cannot be read from
inside a large parent.

    python bench/safelora_compare.py                    # every llama-3-8b shape
    python bench/safelora_compare.py --worker dense 14336 4096
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

LORA_RANK = 16
LLAMA_3_8B_SHAPES = {
    "q_proj, o_proj": (4096, 4096),
    "k_proj, v_proj": (1024, 4096),
    "gate_proj, up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}


def dense_reference(
    lora_b: torch.Tensor, lora_a: torch.Tensor, displacement: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """The reference code's computation: `C = D D^T / ||D||`, `B~ = C B`, dense cosine."""
    projection = torch.mm(displacement, displacement.t()) / torch.norm(displacement)
    projected_b = torch.mm(projection, lora_b)
    projected_update = torch.mm(projected_b, lora_a)
    original_update = torch.mm(lora_b, lora_a)
    cosine = torch.nn.functional.cosine_similarity(
        projected_update.reshape(1, -1), original_update.reshape(1, -1)
    )
    return projected_b, round(float(cosine), 5)


def factored_formula(
    lora_b: torch.Tensor, lora_a: torch.Tensor, displacement: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """METHOD.md §5 written out: `D (D^T B) / ||D||`, cosine from `r x r` Grams.

    Stands in for `adapter_fix.math.solve.safelora_candidate` while solve.py does not exist.
    """
    projected_b = displacement @ (displacement.T @ lora_b)
    projected_b /= torch.linalg.vector_norm(displacement)
    gram_a = lora_a @ lora_a.T
    inner = torch.trace(projected_b.T @ lora_b @ gram_a)
    projected_norm = torch.trace(projected_b.T @ projected_b @ gram_a).sqrt()
    original_norm = torch.trace(lora_b.T @ lora_b @ gram_a).sqrt()
    return projected_b, round(float(inner / (projected_norm * original_norm)), 5)


def ours() -> tuple[Callable[..., tuple[torch.Tensor, float]], str]:
    """`adapter_fix.math.solve.safelora_candidate` when the package has it, else the formula."""
    try:
        from adapter_fix.math.solve import safelora_candidate
    except ImportError:
        return factored_formula, "formula (adapter_fix.math.solve not importable)"

    def call(
        lora_b: torch.Tensor, lora_a: torch.Tensor, displacement: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        candidate = safelora_candidate(lora_b, lora_a, displacement)
        return candidate.projected_b, float(candidate.similarity)

    return call, "adapter_fix.math.solve.safelora_candidate"


def _memory_mb() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) of this process, MB."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
        )
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(impl: str, rows: int, cols: int, repeats: int) -> dict[str, Any]:
    """One implementation on one shape, in this (fresh) process: time and peak memory."""
    function, name = (dense_reference, "dense reference") if impl == "dense" else ours()
    generator = torch.Generator().manual_seed(0)
    warm = torch.randn(256, 256, generator=generator)
    torch.mm(warm, warm)  # start the BLAS thread pool outside the measurement
    displacement = torch.randn(rows, cols, generator=generator)
    lora_b = torch.randn(rows, LORA_RANK, generator=generator) * 0.01
    lora_a = torch.randn(LORA_RANK, cols, generator=generator) / math.sqrt(cols)
    exact_reset = _reset_peak()
    before, _ = _memory_mb()
    started = time.perf_counter()
    projected_b, similarity = function(lora_b, lora_a, displacement)
    times = [time.perf_counter() - started]
    _, peak = _memory_mb()
    del projected_b
    for _ in range(repeats - 1):
        started = time.perf_counter()
        function(lora_b, lora_a, displacement)
        times.append(time.perf_counter() - started)
    check = function(lora_b[:64, :4], lora_a[:4, :96], displacement[:64, :96])
    _, exact = factored_formula(lora_b.double(), lora_a.double(), displacement.double())
    return {
        "impl": name,
        "shape": [rows, cols],
        "time_s": statistics.median(times),
        "times_s": times,
        "peak_mb": max(peak - before, 0.0),
        "inputs_mb": (displacement.numel() + lora_b.numel() + lora_a.numel()) * 4 / 2**20,
        "exact_peak": exact_reset,
        "similarity": similarity,
        "similarity_float64": exact,
        "check_projected_b": check[0].flatten()[:8].tolist(),
    }


def measure(impl: str, rows: int, cols: int, repeats: int) -> dict[str, Any]:
    """Run `worker` in a fresh interpreter and return its JSON."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, str(rows)]
    command += [str(cols), "--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def compare(shapes: dict[str, tuple[int, int]], repeats: int = 5) -> list[dict[str, Any]]:
    """Dense and ours on each shape: time, peak memory, their ratios, and agreement."""
    rows = []
    for label, (m, n) in shapes.items():
        dense = measure("dense", m, n, 1)
        factored = measure("ours", m, n, repeats)
        # Similarities are checked against float64: the dense float32 formulation is itself
        # off by up to ~1e-2 on these shapes (C's rounding, then a cosine over m * n entries).
        agree = abs(factored["similarity"] - factored["similarity_float64"]) <= 2e-5 and all(
            math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-7)
            for x, y in zip(dense["check_projected_b"], factored["check_projected_b"], strict=True)
        )
        rows.append(
            {
                "label": label,
                "shape": (m, n),
                "dense": dense,
                "ours": factored,
                "speedup": dense["time_s"] / factored["time_s"],
                "memory_ratio": dense["peak_mb"] / max(factored["peak_mb"], 0.01),
                "agree": agree,
                "dense_similarity_error": abs(dense["similarity"] - dense["similarity_float64"]),
                "ours_similarity_error": abs(
                    factored["similarity"] - factored["similarity_float64"]
                ),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "ROWS", "COLS"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.worker:
        impl, rows, cols = args.worker
        print(json.dumps(worker(impl, int(rows), int(cols), args.repeats)))
        return
    for row in compare(LLAMA_3_8B_SHAPES, args.repeats):
        dense, factored = row["dense"], row["ours"]
        print(
            f"{row['label']:<20} {row['shape'][0]}x{row['shape'][1]}: "
            f"dense {dense['time_s']:.3f} s / {dense['peak_mb']:.1f} MB, "
            f"ours {factored['time_s'] * 1e3:.2f} ms / {factored['peak_mb']:.1f} MB, "
            f"{row['speedup']:.0f}x faster, {row['memory_ratio']:.0f}x less memory, "
            f"agree={row['agree']}"
        )


if __name__ == "__main__":
    main()
