"""What the machine offers that changes how fast a dtype runs: the CPU's flags."""

from __future__ import annotations

import functools
from pathlib import Path

BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""x86 CPU flags (Linux `/proc/cpuinfo`) of native bfloat16 dot products: with one, a
bfloat16 product runs 1.9-2.6x faster than float32 (one thread, 14336 x 4096 by 52
columns: 46 / 58 ms for `D X` / `D^T Y` against 119 / 112 ms), so the randomized SVD takes
its range-finding products in bfloat16 (`math/subspace.py`, `safety_subspace`'s
`sketch_dtype`)."""


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The x86 CPU flags of `cpuinfo` (read from `/proc/cpuinfo` when None); None where it
    lists none (not Linux, or not x86: nothing can be said)."""
    if cpuinfo is None:
        cpuinfo = _cpuinfo()
    lines = [line for line in cpuinfo.splitlines() if line.startswith("flags")]
    if not lines:
        return None
    return {flag for line in lines for flag in line.partition(":")[2].split()}


def native_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has native bfloat16 dot products (`BFLOAT16_CPU_FLAGS`)."""
    return bool((cpu_flags(cpuinfo) or set()).intersection(BFLOAT16_CPU_FLAGS))


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux
        return ""
