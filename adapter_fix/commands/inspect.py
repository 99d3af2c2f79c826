"""`adapter-fix inspect`: what is in an adapter, module by module, with warnings."""

from __future__ import annotations

import math

import torch

from adapter_fix.io.adapter import LoraAdapter, LoraModule, load_adapter, read_factors
from adapter_fix.io.checkpoint import DTYPES, is_finite
from adapter_fix.io.locate import open_source
from adapter_fix.io.sources import HubOptions
from adapter_fix.math.solve import as_factored, effective_rank, update_spectrum
from adapter_fix.results import InspectResult, ModuleSummary


def run(spec: str, hub: HubOptions) -> InspectResult:
    """`adapter-fix inspect SPEC`: open the adapter (a path or a Hub id) and summarise it."""
    return inspect_adapter(load_adapter(open_source(spec, hub)))


def factor_warnings(adapter: LoraAdapter) -> list[str]:
    """inspect's warnings from the config and the LoRA factors alone (what `repair` shows):
    carried tensors, which can be large (a 1 GB `lm_head`), are not read."""
    warnings = list(adapter.warnings)
    for module in adapter.modules:
        _summarise(adapter, module, warnings)
    return warnings


def inspect_adapter(adapter: LoraAdapter) -> InspectResult:
    """Read the adapter's factors (small) and summarise them; reads no model weights."""
    warnings = list(adapter.warnings)
    modules = [_summarise(adapter, module, warnings) for module in adapter.modules]
    for key in adapter.carried_keys:
        if not is_finite(adapter.weights.read(key, finite=False)):
            warnings.append(f"{key}: holds NaN or Inf values.")
    weights = adapter.weights
    infos = [weights.info(key) for key in weights]
    config = adapter.config
    summary = {
        "source": adapter.source.identity,
        "peft_type": config.get("peft_type"),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "scaling_rule": "lora_alpha / sqrt(r) (rsLoRA)" if adapter.use_rslora else "lora_alpha / r",
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
        "target_modules": config.get("target_modules"),
        "target_parameters": config.get("target_parameters") or [],
        "lora_bias": bool(config.get("lora_bias")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
        "modules_to_save": config.get("modules_to_save") or [],
        "unsupported_features": adapter.unsupported,
        "module_count": len(modules),
        "tensor_count": len(infos),
        "parameter_count": sum(info.numel for info in infos),
        "dtypes": sorted({info.dtype for info in infos}),
        "file": str(adapter.weights_path),
        "file_size": adapter.weights_path.stat().st_size,
        "carried_keys": adapter.carried_keys,
    }
    return InspectResult(summary, modules, warnings)


def _summarise(adapter: LoraAdapter, module: LoraModule, warnings: list[str]) -> ModuleSummary:
    lora_b, lora_a = read_factors(adapter, module, finite=False)
    finite = is_finite(lora_a) and is_finite(lora_b)
    if finite:
        spectrum = update_spectrum(as_factored(lora_b, lora_a, module.scaling))
        norm = float(spectrum.square().sum().sqrt())
        effective = effective_rank(spectrum)
        top, limit = float(spectrum.max()), torch.finfo(DTYPES[module.dtype]).max
        if not (math.isfinite(norm) and top <= limit):
            finite = False
            warnings.append(
                f"{module.name}: the update s B A reaches {top:.3g} (its largest singular "
                f"value), beyond the largest {module.dtype} ({limit:.3g}): applied or merged "
                f"in {module.dtype} it overflows to Inf."
            )
    else:
        warnings.append(f"{module.name}: lora_A or lora_B holds NaN or Inf values.")
        norm, effective = None, None
    if norm == 0.0:
        warnings.append(f"{module.name}: the update is all zero (lora_A or lora_B is zero).")
    return ModuleSummary(
        name=module.name,
        kind=module.kind,
        shape=module.shape,
        rank=module.rank,
        alpha=module.alpha,
        scaling=module.scaling,
        dtype=module.dtype,
        update_norm=norm,
        effective_rank=effective,
        finite=finite,
        target=module.weight_key,
        expert=module.expert,
        num_experts=module.num_experts,
        lora_bias=module.bias_key,
    )
