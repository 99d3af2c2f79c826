"""PEFT's LoRA key grammar and scaling rules, in one place.

Mirrors PEFT's own rules (peft/tuners/lora): scaling is `lora_alpha / r`, or
`lora_alpha / sqrt(r)` with `use_rslora`; `rank_pattern` / `alpha_pattern`
keys match a module name the way `peft.utils.other.get_pattern_key` does
(the first key, in config order, that matches the end of the name at a dot
boundary); `target_modules` matches the way `check_target_module_exists` does.
A key `AdapterKey.parse` splits, `format` puts back together (tested to round-trip).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from adapter_fix.errors import (
    IncompatibleModelsError,
)
from adapter_fix.io.keymap import prefix_candidates
from adapter_fix.io.safe_regex import compile_pattern

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
FACTOR_ROLES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
ROLES = (*FACTOR_ROLES, "lora_magnitude_vector")

ADAPTER_KEY = re.compile(
    r"^(?P<prefix>base_model\.model\.)?(?P<module>.+?)\.(?P<role>" + "|".join(ROLES) + r")"
    r"(?:\.(?P<adapter>(?!(?:weight|bias)$)[^.]+))?(?P<suffix>\.(?:weight|bias))?$"
)


@dataclass(frozen=True)
class AdapterKey:
    """One tensor key of a PEFT adapter file, split into its parts.

    `base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight` is
    prefix `base_model.model.`, module `model.layers.0.mlp.up_proj`, role
    `lora_A`, adapter name `default`, suffix `.weight`; `lora_bias` adds
    `...lora_B.bias` keys (suffix `.bias`).
    """

    module: str
    role: str
    prefix: str = PEFT_PREFIX
    adapter_name: str | None = None
    suffix: str = ".weight"

    @classmethod
    def parse(cls, key: str) -> AdapterKey | None:
        """The parts of a LoRA key; None for a key that is no LoRA factor, bias or magnitude."""
        match = ADAPTER_KEY.match(key)
        if match is None:
            return None
        return cls(
            module=match["module"],
            role=match["role"],
            prefix=match["prefix"] or "",
            adapter_name=match["adapter"],
            suffix=match["suffix"] or "",
        )

    def format(self) -> str:
        """The key string; `AdapterKey.parse(k).format() == k` for every LoRA key."""
        adapter = f".{self.adapter_name}" if self.adapter_name else ""
        return f"{self.prefix}{self.module}.{self.role}{adapter}{self.suffix}"

    @property
    def base_weight_key(self) -> str:
        """The key of the weight this LoRA factor updates, as the base model names it."""
        return f"{self.module}.weight"

    @classmethod
    def from_base_weight_key(cls, weight_key: str, role: str, **parts: Any) -> AdapterKey:
        """The inverse of `base_weight_key` for a given role (and optional prefix/name/suffix)."""
        if not weight_key.endswith(".weight"):
            raise ValueError(f"not a weight key: {weight_key!r}")
        return cls(module=weight_key[: -len(".weight")], role=role, **parts)


def resolve_weight_key(wanted: str, available: Collection[str], label: str) -> str:
    """The checkpoint key of the weight named `wanted`, tolerating a different key prefix.

    An exact match wins. Otherwise a checkpoint key that is a
    dot-boundary suffix of it (a checkpoint saved without the task head's
    prefix, e.g. GPT-2's `h.0.attn.c_attn.weight` for `transformer.h.0...`),
    or that ends with it (a checkpoint with an extra prefix). More than one
    candidate is an error that lists them.
    """
    if wanted in available:
        return wanted
    candidates = prefix_candidates(wanted, available)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise IncompatibleModelsError(
            f"{label} has no weight {wanted!r} (nor the same name with another prefix) for the "
            "adapter's module. Is this the model the adapter was trained on?",
            key=wanted,
        )
    raise IncompatibleModelsError(
        f"{label}: the adapter's weight {wanted!r} is ambiguous; candidates: "
        f"{', '.join(candidates)}.",
        key=wanted,
    )


def pattern_key(patterns: Collection[str], module: str) -> str | None:
    """The first pattern matching `module` as PEFT's `get_pattern_key` does, or None."""
    for pattern in patterns:
        if compile_pattern(rf"(?:.*\.)?(?:{pattern})$").fullmatch(module):
            return pattern
    return None


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def config_rank(config: Mapping[str, Any], module: str) -> int:
    """The rank PEFT gives `module`: its `rank_pattern` entry, else `r`."""
    patterns: Mapping[str, int] = config.get("rank_pattern") or {}
    key = pattern_key(patterns, module)
    return int(patterns[key]) if key is not None else int(config["r"])


def config_alpha(config: Mapping[str, Any], module: str) -> float:
    """The alpha PEFT gives `module`: its `alpha_pattern` entry, else `lora_alpha`."""
    patterns: Mapping[str, float] = config.get("alpha_pattern") or {}
    key = pattern_key(patterns, module)
    return float(patterns[key]) if key is not None else float(config["lora_alpha"])


def is_targeted(module: str, target_modules: str | Collection[str] | None) -> bool:
    """Whether PEFT's `check_target_module_exists` would put a LoRA layer on `module`."""
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return True
        return compile_pattern(target_modules).fullmatch(module)
    return any(module == t or module.endswith(f".{t}") for t in target_modules)
