"""The basis file format: per-module truncated SVDs of `D = W_aligned - W_base`.

A basis is a folder (or a Hub repo) laid out like a safetensors model, so it
is read with the same lazy `Checkpoint` (one tensor at a time, shards fetched
on first use):

    basis_config.json                  format, version, BASE / ALIGNED identity, parameters
    model.safetensors                  or model-0000i-of-0000N.safetensors + the index below
    model.safetensors.index.json       only when sharded
    README.md                          a model card, so the basis can sit on the Hub

For each module, keyed by the checkpoint's weight key `W` (e.g.
`model.layers.0.self_attn.q_proj.weight`), in the orientation the checkpoint
stores `W` (`m x n`, as `D` is stored):

    W.U                  `m x K`, float32 or bfloat16 (`--dtype`), orthonormal columns
    W.S                  `K`, float64, descending singular values
    W.V                  `n x K`, like `W.U`
    W.displacement_norm  0-d float64, `||D||_F` (exact, so any `k <= K`'s energy is exact)
    W.aligned_norm       0-d float64, `||W_aligned||_F`
    W.captured_energy    0-d float64, `sum(S^2) / ||D||_F^2` for all `K`

`K = 0` records a module whose displacement has no signal. Every shard's
safetensors metadata carries the same provenance as `basis_config.json`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapter_fix.errors import (
    CorruptCheckpointError,
    IncompatibleModelsError,
    SourceNotFoundError,
)
from adapter_fix.io.checkpoint import (
    FLOAT_WEIGHT_DTYPES,
    INDEX_NAME,
    SINGLE_NAME,
    Checkpoint,
    TensorInfo,
    dtype_name,
)
from adapter_fix.io.jsonfile import JsonError, parse_json
from adapter_fix.io.lora_keys import resolve_weight_key
from adapter_fix.io.sources import Source
from adapter_fix.io.writer import write_safetensors

CONFIG_NAME = "basis_config.json"
CARD_NAME = "README.md"
FORMAT = "adapter-fix/basis"
FORMAT_VERSION = 1
FIELDS = ("U", "S", "V", "displacement_norm", "aligned_norm", "captured_energy")
BASIS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_SHARD_BYTES = 2 << 30


@dataclass(frozen=True)
class BasisEntry:
    """One module's stored subspace, in the checkpoint's orientation of its weight."""

    left: torch.Tensor
    """`U_K`, `m x K`, as stored (float32 or bfloat16)."""
    values: torch.Tensor
    """`S_K`, `K`, float64."""
    right: torch.Tensor
    """`V_K`, `n x K`."""
    displacement_norm: float
    aligned_norm: float
    captured_energy: float


class Basis:
    """An opened basis: its config, and each module's entry read on demand."""

    def __init__(self, checkpoint: Checkpoint, config: dict[str, Any]) -> None:
        self.checkpoint = checkpoint
        self.config = config
        self.weight_keys = [key.removesuffix(".U") for key in checkpoint if key.endswith(".U")]

    @classmethod
    def open(cls, source: Source) -> Basis:
        """Open a basis folder or Hub repo (its config and index; no tensor data)."""
        config_path = source.fetch(CONFIG_NAME)
        if config_path is None:
            raise SourceNotFoundError(
                f"no {CONFIG_NAME}: this is not an adapter-fix basis. Build one with "
                "`adapter-fix basis BASE ALIGNED -o BASIS`.",
                path=source.identity,
            )
        try:
            config = parse_json(config_path.read_bytes())
        except (OSError, JsonError):
            raise CorruptCheckpointError(
                f"{CONFIG_NAME} is not valid JSON.", path=config_path
            ) from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise CorruptCheckpointError(
                f"{CONFIG_NAME} does not describe an {FORMAT} file.", path=config_path
            )
        if config.get("version") != FORMAT_VERSION:
            raise CorruptCheckpointError(
                f"basis format version {config.get('version')!r}; this adapter-fix reads "
                f"version {FORMAT_VERSION}. Rebuild the basis with this version.",
                path=config_path,
            )
        return cls(Checkpoint.open(source, "BASIS"), config)

    def provenance(self) -> dict[str, str]:
        """The BASE and ALIGNED the basis was computed from."""
        return {"base": str(self.config.get("base")), "aligned": str(self.config.get("aligned"))}

    def resolve(self, weight_key: str, module: str) -> str:
        """The basis's key for `weight_key` (prefixes tolerated as for checkpoints)."""
        try:
            return resolve_weight_key(weight_key, self.weight_keys, "BASIS")
        except IncompatibleModelsError:
            raise IncompatibleModelsError(
                f"the basis has no entry for module {module!r} (weight {weight_key!r}): it was "
                "built for other modules or another model. Rebuild it with --like ADAPTER or "
                "--modules all-linear.",
                path=self.checkpoint.source.identity,
                key=weight_key,
            ) from None

    def weight_shape(self, key: str) -> tuple[int, int]:
        """The stored shape `m x n` of the module's weight, from the headers alone."""
        left, right = self.checkpoint.info(f"{key}.U"), self.checkpoint.info(f"{key}.V")
        values = self.checkpoint.info(f"{key}.S")
        if (
            len(left.shape) != 2
            or len(right.shape) != 2
            or values.shape != (left.shape[1],)
            or right.shape[1] != left.shape[1]
        ):
            raise CorruptCheckpointError(
                f"basis entry shapes do not chain: U {list(left.shape)}, S {list(values.shape)}, "
                f"V {list(right.shape)}.",
                path=left.file,
                key=f"{key}.U",
            )
        for name in FIELDS:
            info = self.checkpoint.info(f"{key}.{name}")
            if info.dtype not in FLOAT_WEIGHT_DTYPES:
                raise CorruptCheckpointError(
                    f"basis entry {name} is {info.dtype}; a basis holds float tensors only.",
                    path=info.file,
                    key=info.key,
                )
        for name in FIELDS[3:]:
            scalar = self.checkpoint.info(f"{key}.{name}")
            if scalar.numel != 1:
                raise CorruptCheckpointError(
                    f"basis entry {name} must be one number, it has shape {list(scalar.shape)}.",
                    path=scalar.file,
                    key=scalar.key,
                )
        return left.shape[0], right.shape[0]

    def read(self, key: str) -> BasisEntry:
        """One module's entry (NaN or Inf is an error naming file and key)."""
        tensors = {name: self._read(f"{key}.{name}") for name in FIELDS}
        entry = BasisEntry(
            left=tensors["U"],
            values=tensors["S"].double(),
            right=tensors["V"],
            displacement_norm=float(tensors["displacement_norm"]),
            aligned_norm=float(tensors["aligned_norm"]),
            captured_energy=float(tensors["captured_energy"]),
        )
        problem = _inconsistency(entry)
        if problem is not None:
            raise CorruptCheckpointError(
                f"basis entry {problem}: the basis is corrupt. Rebuild it with "
                "`adapter-fix basis BASE ALIGNED -o BASIS`.",
                path=self.checkpoint.info(f"{key}.S").file,
                key=f"{key}.S",
            )
        return entry

    def _read(self, key: str) -> torch.Tensor:
        """A tensor whose finiteness is checked by one sum (a NaN or Inf makes it non-finite;
        the entries are bounded, so a finite tensor cannot overflow it): a fraction of the
        cost of an elementwise scan, which dominated reading a basis."""
        tensor = self.checkpoint.read(key, finite=False)
        if not math.isfinite(float(tensor.sum())):
            self.checkpoint.read(key)  # raises NonFiniteError naming file and key
        return tensor


def _inconsistency(entry: BasisEntry) -> str | None:
    """What makes a stored entry impossible as an SVD of `D`, or None: singular values
    negative, increasing, or holding more than `||D||_F^2`; negative norms; a captured
    energy outside [0, 1]; K values with no positive one."""
    values = entry.values
    energy = float(values.square().sum())
    total = entry.displacement_norm**2
    slack = 1e-3 * total + 1e-30  # stored in float32 / bfloat16 next to an exact norm
    if entry.displacement_norm < 0 or entry.aligned_norm < 0:
        return "displacement_norm or aligned_norm is negative"
    if values.numel() and (bool((values < 0).any()) or float(values[0]) <= 0):
        return "S holds a negative value or no positive one"
    if bool((values[1:] > values[:-1] * (1 + 1e-6)).any()):
        return "S is not in descending order"
    if energy > total + slack:
        return f"S holds sum(S^2) = {energy:.4g} > ||D||_F^2 = {total:.4g}"
    if not -1e-6 <= entry.captured_energy <= 1 + 1e-6:
        return f"captured_energy {entry.captured_energy:.4g} is outside [0, 1]"
    return None


class BasisWriter:
    """Writes a basis into a staging folder, module by module, in bounded memory.

    Each module's tensors are appended to the current shard's spill file as
    they come (the safetensors header needs every shape first); `finish` then
    writes each shard as header + data copied from its spill, names the shards
    once their count is known, and writes the index, config and model card. A
    shard is closed when the next module would take it past `shard_bytes`.
    """

    def __init__(
        self, staging: Path, config: Mapping[str, Any], card: str, *, shard_bytes: int
    ) -> None:
        self.staging = staging
        self.config = dict(config)
        self.card = card
        self.shard_bytes = shard_bytes
        self.dtype = BASIS_DTYPES[str(config["dtype"])]
        self.shards: list[tuple[Path, list[tuple[str, TensorInfo]]]] = []
        self.modules = 0

    def add(
        self,
        weight_key: str,
        left: torch.Tensor,
        values: torch.Tensor,
        right: torch.Tensor,
        *,
        displacement_norm: float,
        aligned_norm: float,
        captured_energy: float,
    ) -> None:
        """Append one module: `left` `m x K`, `values` `K`, `right` `n x K` (any float dtype)."""
        tensors = {
            "U": left.to(self.dtype),
            "S": values.to(torch.float64),
            "V": right.to(self.dtype),
            "displacement_norm": torch.tensor(displacement_norm, dtype=torch.float64),
            "aligned_norm": torch.tensor(aligned_norm, dtype=torch.float64),
            "captured_energy": torch.tensor(captured_energy, dtype=torch.float64),
        }
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if not self.shards or (
            self.shards[-1][1] and _spill_size(self.shards[-1][0]) + size > self.shard_bytes
        ):
            self.shards.append((self.staging / f".spill-{len(self.shards):05d}", []))
        spill, entries = self.shards[-1]
        with spill.open("ab") as handle:
            for name in FIELDS:
                tensor = tensors[name].contiguous()
                offset = handle.tell()
                data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
                handle.write(data)
                info = TensorInfo(
                    f"{weight_key}.{name}",
                    dtype_name(tensor.dtype),
                    tuple(tensor.shape),
                    spill,
                    offset,
                    len(data),
                )
                entries.append((info.key, info))
        self.modules += 1

    def finish(self) -> None:
        """Write the shards, the index when sharded, the config and the model card."""
        metadata = {"adapter_fix.basis": json.dumps(self.config, sort_keys=True)}
        count = len(self.shards)
        names = (
            [SINGLE_NAME]
            if count <= 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        weight_map: dict[str, str] = {}
        total = 0
        for name, (spill, entries) in zip(names, self.shards, strict=False):
            write_safetensors(self.staging / name, entries, metadata)
            os.remove(spill)
            for key, info in entries:
                weight_map[key] = name
                total += info.nbytes
        if not self.shards:
            write_safetensors(self.staging / SINGLE_NAME, [], metadata)
        if count > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        config = {**self.config, "modules": self.modules}
        (self.staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (self.staging / CARD_NAME).write_text(self.card)


def _spill_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0
