"""The module stream: what every command over BASE/ALIGNED (or a basis) iterates.

For each target module, in order, `module_stream` yields a `ModuleData`: the
LoRA factors in `dW` orientation and, as the consumer needs them, the
alignment displacement `D = W_a - W_b` and/or its safety subspace. The
subspace comes from one of two `SubspaceSource`s:

- `WeightPair`: BASE and ALIGNED, streamed; only the two weights of the module
  are read, and the subspace is a (randomized) SVD of `D` (METHOD.md §1);
- `BasisSource`: a basis file (`adapter-fix basis`); only the module's stored
  `U_K, S_K, V_K` are read, and `k` is chosen within them.

Modules are independent, so `workers` of them are processed at once, each on
its own thread (torch releases the GIL in its kernels): the read, the SVD and
the consumer's per-module work (`process`) run there, and results come back
in module order. Memory stays bounded by `workers` modules' weights whatever
the depth. One worker reads one module ahead on a reader thread, so the read
of module `i + 1` overlaps the SVD and solve of module `i` (two modules in
memory); several workers overlap reads and computations among themselves.

Every worker runs torch on one thread. Workers times threads then never
exceeds the cores when `workers` does not, and a module's math runs on one
thread whatever `workers` is, so the output is the same bytes for any
`--workers` (MKL's products and QRs give different last bits on different
thread counts). The SVD runs only when the consumer needs the subspace: Safe
LoRA needs the displacement alone and never pays for one.
"""

from __future__ import annotations

import math
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from adapter_fix.errors import IncompatibleModelsError, NonFiniteError, UsageError
from adapter_fix.hardware import native_bfloat16
from adapter_fix.io.adapter import LoraAdapter, LoraModule, read_factors
from adapter_fix.io.basis import Basis, BasisEntry
from adapter_fix.io.checkpoint import DTYPES, FLOAT_WEIGHT_DTYPES, Checkpoint, TensorInfo
from adapter_fix.io.keymap import StoredWeight, WeightLayout, read_rows
from adapter_fix.io.sources import Source
from adapter_fix.math.solve import as_factored, largest_singular_value
from adapter_fix.math.subspace import (
    Subspace,
    frobenius_norm,
    module_seed,
    no_signal_reason,
    safety_subspace,
    subspace_from_basis,
)
from adapter_fix.options import SubspaceSettings
from adapter_fix.results import Clock

SUBSPACE = "subspace"
DISPLACEMENT = "displacement"
REDUCED = "reduced"
"""`D^T B` (Safe LoRA's first product), taken while `D` is read: one pass over `D` fewer."""
MAX_DEFAULT_WORKERS = 8
"""The default `--workers` is the usable cores, at most this: each worker holds one module
(a Llama-3-8B MLP displacement is 235 MB in float32), so the cap keeps the default's memory
near 2 GB on a large machine; more is one flag away."""

Result = TypeVar("Result")

SKETCH_DTYPE_VARIABLE = "ADAPTER_FIX_SKETCH_DTYPE"
"""Environment variable: `float32` keeps the sketch in float32 on any machine (to reproduce
the bytes of a machine without native bfloat16); unset or `auto`: the machine decides."""


def sketch_dtype(device: str, cpuinfo: str | None = None) -> torch.dtype | None:
    """The randomized SVD's sketch dtype on `device`: bfloat16 on a CPU with native bfloat16
    arithmetic (`hardware.BFLOAT16_CPU_FLAGS` among `cpuinfo`'s flags, read from
    `/proc/cpuinfo` when None), else None (float32 throughout: elsewhere bfloat16 products
    are emulated and slower); None whenever `SKETCH_DTYPE_VARIABLE` is `float32`. Fixed by
    the machine, so a machine's output stays the same bytes run to run.

    Raises:
        UsageError: `SKETCH_DTYPE_VARIABLE` is set to something else than `auto` or
            `float32` (exit 2, before any output is written: outputs are renamed into
            place at the end).
    """
    setting = os.environ.get(SKETCH_DTYPE_VARIABLE, "auto")
    if setting not in ("auto", "float32"):
        raise UsageError(
            f"{SKETCH_DTYPE_VARIABLE} is {setting!r}: it must be `auto` (bfloat16 on a CPU "
            "with native bfloat16 arithmetic, float32 elsewhere) or `float32` (float32 "
            "everywhere)."
        )
    if device != "cpu" or setting == "float32":
        return None
    return torch.bfloat16 if native_bfloat16(cpuinfo) else None


def default_workers() -> int:
    """`min(cores this process may run on, MAX_DEFAULT_WORKERS)`, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


@dataclass(frozen=True)
class Target:
    """One module the stream visits: the weight it reads and the orientation it works in.

    `shape` is `(m, n)` in the orientation the consumer works in (`dW`'s for an
    adapter module); `transposed` says the checkpoint stores the weight as
    `n x m` (GPT-2 `Conv1D`). `module` is the LoRA module when there is one.
    """

    name: str
    weight_key: str
    shape: tuple[int, int]
    transposed: bool = False
    module: LoraModule | None = None

    @classmethod
    def of(cls, module: LoraModule) -> Target:
        return cls(module.name, module.weight_key, module.shape, module.weight_transposed, module)

    @property
    def stored_shape(self) -> tuple[int, int]:
        m, n = self.shape
        return (n, m) if self.transposed else (m, n)


@dataclass
class ModuleData:
    """What the stream yields for one module (everything in the target's orientation)."""

    target: Target
    lora_b: torch.Tensor | None
    """`B`, `m x r`, the adapter's dtype (None without an adapter)."""
    lora_a: torch.Tensor | None
    """`A`, `r x n`: `dW = s B A`."""
    displacement_norm: float
    """`||D||_F`, exact (also from a basis)."""
    aligned_norm: float
    """`||W_a||_F`."""
    no_signal: str | None
    """Why the module has no safety signal, or None."""
    displacement: torch.Tensor | None = None
    """`D`, `m x n` float32, when the consumer needs it and the source has it."""
    reduced: torch.Tensor | None = None
    """`D^T B`, `n x r` float32, when the consumer needs it (`REDUCED`) and the source has `D`."""
    subspace: Subspace | None = None
    """When the consumer needs it, or the source is a basis (it costs nothing there)."""
    note: str | None = None
    """What the source could not give as asked (a basis short of the requested energy)."""


class SubspaceSource(ABC):
    """Where displacements and subspaces come from; `load` runs on the read-ahead thread."""

    inputs: dict[str, str]
    provides_displacement: bool

    @abstractmethod
    def plan(self, target: Target) -> Any:
        """Check the target against the source from headers only (fail fast, before any read);
        return what `load` needs."""

    @abstractmethod
    def load(self, target: Target, plan: Any, lora_b: torch.Tensor | None = None) -> Any:
        """Read the module's data (the expensive I/O); with `lora_b` (`B`, `m x r`), a source
        that reads `D` also takes `D^T B` on the way."""

    @abstractmethod
    def complete(
        self, target: Target, loaded: Any, settings: SubspaceSettings, needs: frozenset[str]
    ) -> ModuleData:
        """Turn what `load` read into the module's data (the SVD runs here, on the main thread)."""

    @abstractmethod
    def weights_read(self) -> int:
        """How many tensors were read so far (progress)."""

    def finish(self) -> None:  # noqa: B027 (a hook: most sources have nothing to check)
        """Check what only the whole stream shows, once every target was loaded."""


@dataclass
class _Displacement:
    displacement: torch.Tensor
    aligned_norm: float
    displacement_norm: float
    file: Path
    """ALIGNED's file holding the weight (for messages)."""
    reduced: torch.Tensor | None = None


class WeightPair(SubspaceSource):
    """BASE and ALIGNED checkpoints, streamed: `D` and its SVD per module."""

    provides_displacement = True

    def __init__(self, base: Checkpoint, aligned: Checkpoint) -> None:
        self.base, self.aligned = base, aligned
        self.inputs = {"base": base.source.identity, "aligned": aligned.source.identity}
        self.compared: list[tuple[TensorInfo, TensorInfo]] = []
        """BASE's and ALIGNED's weight for each target planned, in target order (plans are
        made on one thread before any read; the loads finish in any order)."""
        self.any_displacement = False
        """Whether any of them differs between BASE and ALIGNED."""

    def plan(self, target: Target) -> tuple[StoredWeight, StoredWeight]:
        """The target's weight as BASE and ALIGNED store it (io/keymap.py), shapes checked."""
        module = target.module
        expert, experts = (module.expert, module.stored_experts) if module else (None, None)
        base_weight, aligned_weight = (
            WeightLayout.of(checkpoint).weight(
                checkpoint,
                target.weight_key,
                expert=expert,
                experts=experts,
                transposed=target.transposed,
            )
            for checkpoint in (self.base, self.aligned)
        )
        base_info, aligned_info = base_weight.parts[0], aligned_weight.parts[0]
        base_key, aligned_key = base_weight.key, aligned_weight.key
        if base_info.file == aligned_info.file:
            raise IncompatibleModelsError(
                "BASE and ALIGNED are the same file, so the alignment displacement is zero. "
                "BASE is the pretrained model, ALIGNED the chat model the adapter was trained on.",
                path=base_info.file,
                key=base_key,
            )
        for info in (*base_weight.parts, *aligned_weight.parts):
            check_weight_dtype(info)
        if base_weight.shape != aligned_weight.shape:
            raise IncompatibleModelsError(
                f"BASE has shape {list(base_weight.shape)} but ALIGNED has "
                f"{list(aligned_weight.shape)} for this weight: they are not the same "
                "architecture.",
                path=aligned_info.file,
                key=aligned_key,
            )
        # A transposed expert parameter (io/keymap.py TRANSPOSED_EXPERTS) stores `n x m` too.
        m, n = target.shape
        stored_shape = (n, m) if base_weight.transposed else (m, n)
        if base_weight.shape != stored_shape:
            hint = (
                " The stored weight is the transpose: set fan_in_fan_out in the adapter config?"
                if base_weight.shape == stored_shape[::-1] and expert is None
                else ""
            )
            what = f"adapter module {target.name!r} ({module.kind})" if module else target.name
            raise IncompatibleModelsError(
                f"the weight has shape {list(base_weight.shape)} but {what} needs "
                f"{list(stored_shape)}.{hint}",
                path=base_info.file,
                key=base_key,
            )
        self.compared.append((base_info, aligned_info))
        return base_weight, aligned_weight

    def load(
        self,
        target: Target,
        plan: tuple[StoredWeight, StoredWeight],
        lora_b: torch.Tensor | None = None,
    ) -> _Displacement:
        """`D = W_a - W_b` (float32, target orientation), `||W_a||_F`, `||D||_F`, and with
        `lora_b` (`B`, `m x r`) `D^T B` (`n x r`, float32).

        Both weights stream in cache-sized row blocks straight into `D`, and the
        norms are taken block by block while the block is hot: the read costs
        what reading the bytes costs; so is `D^T B`, block by block, which saves
        Safe LoRA a pass over `D` from memory. NaN or Inf in either weight makes a
        norm non-finite; only then are the weights read whole, to name the one at
        fault.
        """
        base_weight, aligned_weight = plan
        base, aligned = self.base, self.aligned
        displacement = torch.empty(aligned_weight.shape, dtype=torch.float32)
        aligned_squares = displacement_squares = 0.0
        left = None if lora_b is None else lora_b.to(torch.float32)
        # Stored rows are D's rows (m), or, for a transposed weight, D^T's (n).
        reduced = None if left is None else left.new_zeros(target.shape[1], left.shape[1])

        def subtract(rows: slice, block: torch.Tensor) -> None:
            nonlocal displacement_squares
            part = displacement[rows]
            part.sub_(block)
            displacement_squares += frobenius_norm(part) ** 2
            if left is not None and reduced is not None:
                if base_weight.transposed:
                    reduced[rows] = part @ left
                else:
                    reduced.addmm_(part.T, left[rows])

        if _same_blocks(aligned_weight, base_weight):
            # Block by block from both files, so each block of D is still in cache when the
            # base is subtracted: D is written to memory once, not written and read again.
            pairs = zip(
                read_rows(aligned, aligned_weight, INTERLEAVED_BLOCK_BYTES),
                read_rows(base, base_weight, INTERLEAVED_BLOCK_BYTES),
                strict=True,
            )
            for (rows, block), (_, base_block) in pairs:
                part = displacement[rows]
                part.copy_(block)
                aligned_squares += frobenius_norm(part) ** 2
                subtract(rows, base_block)
        else:  # different dtypes or layouts: the blocks would not line up
            for rows, block in read_rows(aligned, aligned_weight):
                part = displacement[rows]
                part.copy_(block)
                aligned_squares += frobenius_norm(part) ** 2
            for rows, block in read_rows(base, base_weight):
                subtract(rows, block)
        if not (math.isfinite(aligned_squares) and math.isfinite(displacement_squares)):
            for checkpoint, weight in ((aligned, aligned_weight), (base, base_weight)):
                for key in weight.keys:
                    checkpoint.read(key)  # raises NonFiniteError naming file and key
            info = aligned_weight.parts[0]
            raise NonFiniteError(
                "both weights are finite but W_aligned - W_base overflows float32 (the "
                "precision the displacement is computed in): their values are far beyond "
                "those of a trained model. Check BASE and ALIGNED (a broken export?).",
                path=info.file,
                key=info.key,
            )
        if displacement_squares > 0:
            self.any_displacement = True
        if base_weight.transposed:
            displacement = displacement.T
        return _Displacement(
            displacement,
            math.sqrt(aligned_squares),
            math.sqrt(displacement_squares),
            aligned_weight.parts[0].file,
            reduced,
        )

    def complete(
        self,
        target: Target,
        loaded: _Displacement,
        settings: SubspaceSettings,
        needs: frozenset[str],
    ) -> ModuleData:
        data = ModuleData(
            target,
            None,
            None,
            displacement_norm=loaded.displacement_norm,
            aligned_norm=loaded.aligned_norm,
            no_signal=no_signal_reason(loaded.displacement_norm, loaded.aligned_norm),
            displacement=loaded.displacement if DISPLACEMENT in needs else None,
            reduced=loaded.reduced if REDUCED in needs else None,
        )
        if SUBSPACE in needs:
            data.subspace = _svd(target, loaded, settings)
        return data

    def weights_read(self) -> int:
        return len(self.base.reads) + len(self.aligned.reads)

    def finish(self) -> None:
        """Refuse ALIGNED equal to BASE on every weight compared: a copy of BASE given as
        ALIGNED (the same file is refused in `plan`). Only the weights the run reads are
        compared, so this is decided from their displacements, all exactly zero."""
        if self.compared and not self.any_displacement:
            base, aligned = self.compared[0]
            raise IncompatibleModelsError(
                f"ALIGNED equals BASE: there is no alignment to protect. All "
                f"{len(self.compared)} weights read are identical in BASE ({base.file}) and "
                f"ALIGNED ({aligned.file}), so every displacement W_aligned - W_base is zero. "
                "ALIGNED must be the aligned (chat) model the adapter was trained on, BASE the "
                "pretrained model it was aligned from: is one a copy of the other?",
                path=aligned.file,
                key=aligned.key,
            )


INTERLEAVED_BLOCK_BYTES = 1 << 20
"""Row blocks of 1 MiB when BASE and ALIGNED are read side by side: 2 MiB of float32 `D`,
small enough to stay in a core's cache between the copy and the subtraction."""


def _same_blocks(first: StoredWeight, second: StoredWeight) -> bool:
    """Whether the two weights are read in the same row blocks (same parts, shapes, dtypes)."""
    return [(info.shape, info.dtype) for info in first.parts] == [
        (info.shape, info.dtype) for info in second.parts
    ]


def _svd(target: Target, loaded: _Displacement, settings: SubspaceSettings) -> Subspace:
    subspace = safety_subspace(
        loaded.displacement.to(settings.device),
        energy=settings.energy,
        max_rank=settings.max_rank,
        rank=settings.rank,
        seed=module_seed(settings.seed, target.name),
        reference_norm=loaded.aligned_norm,
        displacement_norm=loaded.displacement_norm,
        sketch_dtype=sketch_dtype(settings.device),
    )
    if not (
        math.isfinite(subspace.captured_energy)
        and bool(torch.isfinite(subspace.singular_values).all())
    ):
        raise NonFiniteError(
            f"module {target.name!r}: the SVD of the finite displacement W_aligned - W_base "
            "gave NaN or Inf (an overflow in float32): the weights are far beyond a trained "
            "model's. Check BASE and ALIGNED (a broken export?).",
            path=loaded.file,
            key=target.weight_key,
        )
    if settings.device == "cpu":
        return subspace
    return replace(
        subspace,
        left=subspace.left.cpu(),
        right=subspace.right.cpu(),
        singular_values=subspace.singular_values.cpu(),
    )


def check_update_range(
    adapter: LoraAdapter, module: LoraModule, lora_b: torch.Tensor, lora_a: torch.Tensor
) -> None:
    """Refuse a module whose finite factors make an update `s B A` (`m x r`, `r x n`) beyond
    the adapter dtype's range: PEFT's forward pass or a merge overflows to Inf, and so would
    repaired factors stored in that dtype. One small SVD (`r x r`): negligible beside a read."""
    limit = torch.finfo(DTYPES[module.dtype]).max
    top = largest_singular_value(as_factored(lora_b, lora_a, module.scaling))
    if not top <= limit:
        raise NonFiniteError(
            f"module {module.name!r}: the factors are finite, but the update s B A they make "
            f"reaches {top:.3g} (its largest singular value), beyond the largest {module.dtype} "
            f"({limit:.3g}): applied or merged in {module.dtype} it overflows to Inf, and so "
            "would its repaired factors. Its factors are far beyond a trained adapter's (a "
            "diverged fine-tune or a broken export?).",
            path=adapter.weights_path,
            key=module.key_b,
        )


def check_weight_dtype(info: TensorInfo) -> None:
    """Refuse a weight that is not a plain float tensor (quantized: needs its scales)."""
    if info.dtype not in FLOAT_WEIGHT_DTYPES:
        raise IncompatibleModelsError(
            f"the weight is {info.dtype}, not a float16/bfloat16/float32/float64 weight: "
            "quantized checkpoints (int8, FP8 with scales) must be dequantized first.",
            path=info.file,
            key=info.key,
        )


class BasisSource(SubspaceSource):
    """A basis file: each module's stored `U_K, S_K, V_K`; `k` chosen within them."""

    provides_displacement = False

    def __init__(self, basis: Basis) -> None:
        self.basis = basis
        self.inputs = {"basis": basis.checkpoint.source.identity, **basis.provenance()}

    def plan(self, target: Target) -> str:
        """The basis's name for the target's weight; its stored shape must be the target's."""
        if target.module is not None and target.module.expert is not None:
            raise IncompatibleModelsError(
                f"module {target.name!r} is one expert of a 3-D parameter; a basis does not "
                "cover expert parameters yet. Use BASE and ALIGNED for this adapter.",
                path=self.basis.checkpoint.source.identity,
                key=target.weight_key,
            )
        key = self.basis.resolve(target.weight_key, target.name)
        stored = self.basis.weight_shape(key)
        if stored != target.stored_shape:
            raise IncompatibleModelsError(
                f"the basis holds module {target.name!r} with weight shape {list(stored)} but "
                f"the adapter needs {list(target.stored_shape)}: the basis was built for another "
                "model.",
                path=self.basis.checkpoint.source.identity,
                key=key,
            )
        return key

    def load(self, target: Target, plan: str, lora_b: torch.Tensor | None = None) -> Any:
        return self.basis.read(plan)  # no D here, so no D^T B

    def complete(
        self, target: Target, loaded: Any, settings: SubspaceSettings, needs: frozenset[str]
    ) -> ModuleData:
        left, right = loaded.left, loaded.right
        if target.transposed:  # stored as the checkpoint stores W: swap to dW's orientation
            left, right = right, left
        with one_thread():
            subspace, reached = self._choose(left, right, loaded, settings)
        note = None
        if not reached:
            wanted = f"rank {settings.rank}" if settings.rank else f"energy {settings.energy:g}"
            note = (
                f"the basis holds {subspace.rank} directions ({subspace.captured_energy:.1%} of "
                f"||D||^2), short of the requested {wanted}: using all of them"
            )
        return ModuleData(
            target,
            None,
            None,
            displacement_norm=loaded.displacement_norm,
            aligned_norm=loaded.aligned_norm,
            no_signal=subspace.no_signal_reason,
            subspace=replace(
                subspace,
                left=subspace.left.cpu(),
                right=subspace.right.cpu(),
                singular_values=subspace.singular_values.cpu(),
            ),
            note=note,
        )

    def weights_read(self) -> int:
        return len(self.basis.checkpoint.reads)

    @staticmethod
    def _choose(
        left: torch.Tensor, right: torch.Tensor, loaded: BasisEntry, settings: SubspaceSettings
    ) -> tuple[Subspace, bool]:
        return subspace_from_basis(
            left.to(settings.device),
            loaded.values.to(settings.device),
            right.to(settings.device),
            displacement_norm=loaded.displacement_norm,
            energy=settings.energy,
            max_rank=settings.max_rank,
            rank=settings.rank,
            reference_norm=loaded.aligned_norm,
        )


def subspace_source(sources: Sequence[Source]) -> SubspaceSource:
    """The stream's source: a basis (one source), or BASE and ALIGNED (headers and index only)."""
    if len(sources) == 1:
        return BasisSource(Basis.open(sources[0]))
    return WeightPair(Checkpoint.open(sources[0], "BASE"), Checkpoint.open(sources[1], "ALIGNED"))


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the per-module factored math on one torch thread.

    It is thin QRs (`m x r`), `r x r` products and SVDs: too small to split,
    and on two threads each call waits for a thread hand-off. Measured on a
    4096 x 14336 module with r = 16 while other processes used the cores:
    `to_lora_factors` took 258 ms on two threads, 9 ms on one (bench/README.md,
    "The solve"). Inside `map_modules` every worker runs on one thread already;
    this keeps the same math on one thread when a caller runs it on its own
    thread (bench/engine_bench.py's solve figure), so it gives the same bytes.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def module_stream(
    targets: Sequence[Target],
    source: SubspaceSource,
    needs: frozenset[str],
    settings: SubspaceSettings,
    clock: Clock,
    *,
    adapter: LoraAdapter | None = None,
    read_ahead: bool = True,
    workers: int | None = 1,
) -> Iterator[ModuleData]:
    """Yield each target's `ModuleData` in order (`map_modules` with nothing to process)."""
    return map_modules(
        targets,
        source,
        needs,
        settings,
        clock,
        _unchanged,
        adapter=adapter,
        read_ahead=read_ahead,
        workers=workers,
    )


def _unchanged(data: ModuleData) -> ModuleData:
    return data


def map_modules(
    targets: Sequence[Target],
    source: SubspaceSource,
    needs: frozenset[str],
    settings: SubspaceSettings,
    clock: Clock,
    process: Callable[[ModuleData], Result],
    *,
    adapter: LoraAdapter | None = None,
    read_ahead: bool = True,
    workers: int | None = None,
) -> Iterator[Result]:
    """Yield `process(data)` for each target's `ModuleData`, in the targets' order.

    `needs` holds `SUBSPACE`, `DISPLACEMENT` and/or `REDUCED`: the SVD runs only
    for `SUBSPACE` (a basis source always gives its subspace, which costs
    nothing), `D` is kept only for `DISPLACEMENT` and `D^T B` taken only for
    `REDUCED` (never from a basis, which has no `D`).
    Every target is checked against the source from headers before any data is
    read, so a mismatch fails in milliseconds. With `adapter`, each module's
    factors are read with its weights.

    `workers` modules (None: `default_workers()`) are read, completed and
    processed at once, on threads running torch on one thread each; `process`
    must not share mutable state between modules. Memory holds `workers`
    modules; with one worker and `read_ahead`, the next module is read on a
    reader thread while this one is processed (two in memory), and without,
    it is read in line (same results, no overlap). Timings are summed over
    threads, so with several workers a phase can exceed `total_s`;
    `read_wait_s` is the time a worker waited for the reader thread.
    """
    plans = [source.plan(target) for target in targets]
    if not targets:
        return
    count = max(1, workers if workers is not None else default_workers())
    stopping = threading.Event()
    # read_factors keeps the last fused expert tensors it read (io/adapter.py), so workers take
    # turns; the factors are small, the weights (read outside the lock) are not.
    factors_lock = threading.Lock()

    def load(index: int) -> tuple[Any, tuple[torch.Tensor, torch.Tensor] | None]:
        target = targets[index]
        with clock.measure("read_s"):
            factors = None
            if adapter is not None and target.module is not None:
                with factors_lock:
                    factors = read_factors(adapter, target.module)
                check_update_range(adapter, target.module, *factors)
            lora_b = factors[0] if factors is not None and REDUCED in needs else None
            loaded = source.load(target, plans[index], lora_b)
        return loaded, factors

    def work(index: int, read: Future[Any] | None) -> Result | None:
        if stopping.is_set():
            return None
        if read is None:
            loaded, factors = load(index)
        else:
            with clock.measure("read_wait_s"):
                loaded, factors = read.result()
        if stopping.is_set():
            return None
        target = targets[index]
        with clock.measure("subspace_s"):
            data = source.complete(target, loaded, settings, needs)
        del loaded
        if factors is not None:
            data.lora_b, data.lora_a = factors
        return process(data)

    # One worker reads the next module on a reader thread while it computes this one. Several
    # workers each read their own module: their reads and computations interleave by
    # themselves, and a reader ahead of them would only add a module to memory and a busy
    # thread beyond the cores.
    readers = _single_threaded_pool(1, "adapter-fix-read") if read_ahead and count == 1 else None
    computers = _single_threaded_pool(count, "adapter-fix-work")
    window = count + 1 if readers is not None else count
    pending: dict[int, Future[Result | None]] = {}

    def submit(index: int) -> None:
        if index < len(targets):
            read = readers.submit(load, index) if readers is not None else None
            pending[index] = computers.submit(work, index, read)

    try:
        for index in range(min(window, len(targets))):
            submit(index)
        for index in range(len(targets)):
            result = pending.pop(index).result()
            submit(index + window)
            yield result  # type: ignore[misc]  # None only once stopping
            del result
        source.finish()
    finally:
        stopping.set()
        for pool in (computers, readers):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def _single_threaded_pool(threads: int, name: str) -> ThreadPoolExecutor:
    """`threads` threads, each running torch on one thread (engine docstring: why)."""
    return ThreadPoolExecutor(
        threads, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(1,)
    )
