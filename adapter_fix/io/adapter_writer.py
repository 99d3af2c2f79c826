"""Writing a repaired adapter: the new factors put back in PEFT's layout, the folder written
atomically (config, weights, companion files, reports), then verified.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from adapter_fix.errors import (
    PICKLE_SUFFIXES,
)
from adapter_fix.io.adapter import LoraAdapter, LoraModule
from adapter_fix.io.lora_keys import CONFIG_NAME, WEIGHTS_NAME, lora_scaling
from adapter_fix.io.outputs import atomic_directory
from adapter_fix.io.sources import Source
from adapter_fix.io.writer import Entry, verify_safetensors, write_safetensors


def assemble_factors(
    adapter: LoraAdapter,
    new_factors: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None, int]],
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The tensors and rank patterns to write, from new factors per module name.

    `new_factors[name]` is `(lora_a, lora_b, rank)` in PEFT's stored
    orientation, a factor left None when unchanged. Plain modules map to
    their keys; the experts of one parameter are put back into the fused
    tensors in PEFT's layout. Experts written at different ranks
    (`--output-rank exact`) are zero-padded to the largest, with `B` rescaled
    so `s(R) B' A'` is each expert's update; the parameter then gets one
    rank. Returns `(replacements by key, new rank by pattern name)`.
    """
    replacements: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    experts: dict[str, list[LoraModule]] = {}
    for module in adapter.modules:
        lora_a, lora_b, rank = new_factors.get(module.name, (None, None, module.rank))
        if module.expert is not None:
            experts.setdefault(module.target, []).append(module)
            continue
        if lora_a is not None:
            replacements[module.key_a] = lora_a
        if lora_b is not None:
            replacements[module.key_b] = lora_b
        if rank != module.rank:
            ranks[module.pattern_name] = rank
    for target, group in experts.items():
        news = [new_factors.get(m.name, (None, None, m.rank)) for m in group]
        if all(a is None and b is None for a, b, _ in news):
            continue
        rank = max(r for _, _, r in news)
        first = group[0]
        fused_a = adapter.weights.read(first.key_a)
        fused_b = adapter.weights.read(first.key_b)
        count = first.num_experts
        lora_a = torch.zeros((rank * count, fused_a.shape[1]), dtype=fused_a.dtype)
        lora_b = torch.zeros((fused_b.shape[0], rank * count), dtype=fused_b.dtype)
        use_rslora = adapter.use_rslora
        for module, (new_a, new_b, new_rank) in zip(group, news, strict=True):
            e, r = module.expert, module.rank
            assert e is not None
            old_a = fused_a[e * r : (e + 1) * r]
            old_b = fused_b[:, e::count]
            part_a = old_a if new_a is None else new_a
            part_b = old_b if new_b is None else new_b
            if new_rank != rank:
                ratio = lora_scaling(module.alpha, new_rank, use_rslora) / lora_scaling(
                    module.alpha, rank, use_rslora
                )
                part_b = (part_b.float() * ratio).to(part_b.dtype)
            lora_a[e * rank : e * rank + new_rank] = part_a
            lora_b[:, e : e + new_rank * count : count] = part_b
        replacements[first.key_a] = lora_a
        replacements[first.key_b] = lora_b
        if rank != first.rank:
            ranks[target] = rank
    return replacements, ranks


COMPANION_SKIP_SUFFIXES = (
    *PICKLE_SUFFIXES,
    ".safetensors",
    ".gguf",
    ".h5",
    ".msgpack",
    ".onnx",
)


def companion_files(source: Source) -> list[str]:
    """The adapter folder's other top-level files (model card, tokenizer files) to copy.

    Weights of any format, hidden files and subfolders (checkpoints, .git) are
    left out, so a Hub adapter repository costs only small downloads.
    """
    return [
        name
        for name in source.list_files()
        if "/" not in name
        and not name.startswith(".")
        and name not in (CONFIG_NAME, WEIGHTS_NAME)
        and not name.endswith(COMPANION_SKIP_SUFFIXES)
    ]


def write_adapter(
    adapter: LoraAdapter,
    out: Path,
    *,
    replacements: Mapping[str, torch.Tensor],
    ranks: Mapping[str, int],
    metadata: dict[str, str],
    extra_files: Mapping[str, Callable[[], str]],
    force: bool,
) -> None:
    """Write the adapter with `replacements` to `out`, atomically, and verify it.

    Keys, key order and dtypes are the input's; a replaced tensor is cast to
    its key's dtype, every other tensor is copied byte for byte. `ranks` gives
    modules whose rank changed (`--output-rank exact`): they get full-name
    `rank_pattern` / `alpha_pattern` entries, placed first and winning over
    older entries for the same name, since PEFT takes the first pattern that
    matches. `extra_files` are rendered last (the report carries the timings).
    """
    header = adapter.weights.header(WEIGHTS_NAME)
    entries: list[Entry] = [
        (key, replacements[key].to(info.torch_dtype).contiguous())
        if key in replacements
        else (key, info)
        for key, info in header.tensors.items()
    ]
    config = json.loads(adapter.config_path.read_text())
    if ranks:
        alphas = {module.pattern_name: module.alpha for module in adapter.modules}
        for name, values in (
            ("rank_pattern", ranks),
            ("alpha_pattern", {m: alphas[m] for m in ranks}),
        ):
            older = config.get(name) or {}
            config[name] = {**values, **{k: v for k, v in older.items() if k not in values}}
    companions = companion_files(adapter.source)
    with atomic_directory(out, force=force) as staging:
        for name in companions:
            path = adapter.source.fetch(name)
            if path is not None:
                shutil.copyfile(path, staging / name)
        write_safetensors(staging / WEIGHTS_NAME, entries, metadata)
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        verify_safetensors(staging / WEIGHTS_NAME, entries)
        for name, render in extra_files.items():
            (staging / name).write_text(render())
