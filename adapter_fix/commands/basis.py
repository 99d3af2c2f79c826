"""`adapter-fix basis`: the safety subspace of every chosen module, computed once, saved to reuse.

The module stream (adapter_fix/engine.py) reads BASE and ALIGNED one module
at a time, one module ahead, and takes each displacement's truncated SVD,
`--workers` modules at once; the writer (io/basis.py) appends each to the
current shard in module order. Which modules: those of
an adapter (`--like`), every linear layer (`all-linear`), or a regex over
module names. Each subspace is kept in the orientation the checkpoint stores
the weight, so one basis serves adapters of any layout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from adapter_fix import __version__
from adapter_fix.commands import ProgressBar
from adapter_fix.engine import SUBSPACE, Target, WeightPair, module_stream
from adapter_fix.errors import IncompatibleModelsError, InvalidAdapterError
from adapter_fix.io.adapter import LoraAdapter, load_adapter
from adapter_fix.io.basis import FORMAT, FORMAT_VERSION, BasisWriter
from adapter_fix.io.checkpoint import FLOAT_WEIGHT_DTYPES, Checkpoint
from adapter_fix.io.keymap import WeightLayout, to_runtime
from adapter_fix.io.outputs import OutputSet, atomic_directory
from adapter_fix.io.sources import Source, local_paths
from adapter_fix.options import ALL_LINEAR, BasisOptions
from adapter_fix.report.formats import json_text
from adapter_fix.results import BasisResult, Clock, ModuleResult

# 2-D weights that are not linear layers a LoRA targets by `all-linear`: embeddings, and the
# output head, which PEFT's all-linear leaves out too.
NOT_LINEAR = re.compile(
    r"(^|\.)(lm_head|embed_out|embed_tokens|embed_in|embed_positions|wte|wpe|word_embeddings|"
    r"position_embeddings|token_type_embeddings|shared)$"
)


def basis_targets(
    base: Checkpoint, *, like: LoraAdapter | None, modules: str = ALL_LINEAR
) -> list[Target]:
    """The weights a basis covers, in the checkpoint's orientation (headers only).

    With `like`, the adapter's modules, keyed by the weight name the adapter
    asks for; else every 2-D float weight (by run-time name, io/keymap.py)
    whose module name is not an embedding or the output head (`all-linear`),
    or whose module name matches the regex `modules` in full.
    """
    layout = WeightLayout.of(base)
    if like is not None:
        targets: dict[str, Target] = {}
        for module in like.modules:
            if module.expert is not None:
                raise InvalidAdapterError(
                    f"module {module.name!r} is one expert of a 3-D parameter; a basis does not "
                    "cover expert parameters yet. Repair this adapter from BASE and ALIGNED.",
                    path=like.config_path,
                    key=module.key_a,
                )
            stored = layout.weight(base, module.weight_key)
            targets[module.weight_key] = Target(module.name, module.weight_key, stored.shape)
        return list(targets.values())
    pattern = None if modules == ALL_LINEAR else re.compile(modules)
    found = []
    for key in base:
        name, expert, _ = to_runtime(key, layout.rules)
        module = name.removesuffix(".weight")
        if expert is not None or not name.endswith(".weight") or len(layout.plain[name]) != 1:
            continue
        if pattern is None and NOT_LINEAR.search(module):
            continue
        if pattern is not None and pattern.fullmatch(module) is None:
            continue
        info = base.info(key)
        if len(info.shape) == 2 and info.dtype in FLOAT_WEIGHT_DTYPES:
            found.append(Target(module, name, (info.shape[0], info.shape[1])))
    if not found:
        raise IncompatibleModelsError(
            f"no 2-D float weight of BASE matches --modules {modules!r}.",
            path=base.source.identity,
        )
    return found


def build_basis(
    weights: WeightPair,
    targets: list[Target],
    options: BasisOptions,
    out: Path,
    *,
    force: bool = False,
    on_module: Callable[[ModuleResult, int], None] | None = None,
) -> BasisResult:
    """Compute each target's subspace and write the basis to `out`, atomically."""
    clock = Clock()
    config = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tool": {"name": "adapter-fix", "version": __version__},
        **weights.inputs,
        "parameters": options.parameters(),
        "dtype": options.dtype,
    }
    rows: list[ModuleResult] = []
    stream = module_stream(
        targets, weights, frozenset({SUBSPACE}), options.subspace, clock, workers=options.workers
    )
    with atomic_directory(out, force=force) as staging:
        writer = BasisWriter(staging, config, "", shard_bytes=options.shard_bytes)
        for data in stream:
            subspace = data.subspace
            assert subspace is not None  # SUBSPACE was asked for
            with clock.measure("write_s"):
                writer.add(
                    data.target.weight_key,
                    subspace.left,
                    subspace.singular_values,
                    subspace.right,
                    displacement_norm=data.displacement_norm,
                    aligned_norm=data.aligned_norm,
                    captured_energy=subspace.captured_energy,
                )
            row = ModuleResult(data.target.name, "weight", data.target.shape, 0, 0.0)
            row.action = "computed" if data.no_signal is None else "no signal"
            row.reason = data.no_signal
            row.subspace_rank = subspace.rank
            row.captured_energy = subspace.captured_energy
            row.subspace_method = subspace.method
            row.displacement_norm = data.displacement_norm
            rows.append(row)
            del data, subspace
            if on_module is not None:
                on_module(row, weights.weights_read())
        with clock.measure("write_s"):
            writer.card = model_card(config, rows)
            writer.finish()
    result = BasisResult(options, weights.inputs, rows, clock.now(), str(out.resolve()))
    return result


def run(
    base: Source,
    aligned: Source,
    like: Source | None,
    options: BasisOptions,
    out: Path,
    *,
    report: Path | None = None,
    force: bool = False,
    progress: ProgressBar,
) -> BasisResult:
    """`adapter-fix basis`: the targets (those of the adapter `like`, or by `options.modules`),
    their subspaces written to `out`, and the JSON report."""
    outputs = OutputSet(
        folder=out,
        reports=[report] if report else [],
        inputs=local_paths([base, aligned, *([like] if like is not None else [])]),
        force=force,
    )
    outputs.check()
    weights = WeightPair(Checkpoint.open(base, "BASE"), Checkpoint.open(aligned, "ALIGNED"))
    adapter = load_adapter(like) if like is not None else None
    if adapter is not None:
        options = replace(options, like=adapter.source.identity, modules="like")
    targets = basis_targets(weights.base, like=adapter, modules=options.modules)
    with progress(len(targets)) as bar, outputs:
        result = build_basis(weights, targets, options, out, force=force, on_module=bar.advance)
        for path in outputs.reports:
            outputs.write_report(path, json_text(result))
    return result


def model_card(config: dict[str, Any], rows: list[ModuleResult]) -> str:
    """A short Hub model card: what the basis is, where it came from, how to use it."""
    ranks = [row.subspace_rank for row in rows] or [0]
    energies = [row.captured_energy for row in rows if row.subspace_rank] or [0.0]
    parameters = json.dumps(config["parameters"], sort_keys=True)
    return f"""---
library_name: adapter-fix
tags:
- adapter-fix
- safety-basis
- lora
---

# Safety basis

The alignment displacement `D = W_aligned - W_base` of {len(rows)} modules, as
truncated SVDs `D ~ U_k S_k V_k^T`, computed by adapter-fix {config["tool"]["version"]}.

- BASE: `{config["base"]}`
- ALIGNED: `{config["aligned"]}`
- parameters: `{parameters}`
- stored rank k per module: min {min(ranks)}, max {max(ranks)}; captured energy
  sum(S_k^2) / ||D||_F^2: min {min(energies):.4f}, max {max(energies):.4f}

Use it in place of BASE and ALIGNED (only this basis and the adapter are read):

    adapter-fix check --basis THIS_REPO ADAPTER
    adapter-fix repair --basis THIS_REPO ADAPTER -o REPAIRED

Format ({config["format"]} version {config["version"]}): per module, keyed by the
checkpoint's weight name `W`, tensors `W.U`, `W.S`, `W.V` (in the orientation the
checkpoint stores `W`), `W.displacement_norm`, `W.aligned_norm`,
`W.captured_energy`; provenance in `basis_config.json` and in every shard's metadata.
"""
