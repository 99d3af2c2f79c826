"""A PEFT LoRA adapter: its config, its modules, and reading their factors.

The key grammar and scaling rules it applies are io/lora_keys.py's; writing
a repaired adapter is io/adapter_writer.py's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapter_fix.display import printable
from adapter_fix.errors import (
    InvalidAdapterError,
    SourceNotFoundError,
)
from adapter_fix.io.checkpoint import (
    FLOAT_WEIGHT_DTYPES,
    INDEX_NAME,
    SINGLE_NAME,
    Checkpoint,
    TensorInfo,
    refuse_pickles,
)
from adapter_fix.io.jsonfile import JsonError, parse_json
from adapter_fix.io.lora_keys import (
    CONFIG_NAME,
    FACTOR_ROLES,
    WEIGHTS_NAME,
    AdapterKey,
    config_alpha,
    config_rank,
    is_targeted,
    lora_scaling,
)
from adapter_fix.io.safe_regex import UnsafePatternError, compile_pattern
from adapter_fix.io.sources import Source

# peft wraps a module once per targeted parameter (`target_parameters`), nesting each new
# wrapper around the last as `base_layer`, in the order the module registers its parameters.
BASE_LAYER = ".base_layer"
# The registration order of the parameters transformers' expert and router classes declare.
PARAMETER_ORDER = ("weight", "gate_up_proj", "gate_proj", "up_proj", "down_proj")

# Config fields whose presence changes what a LoRA module computes beyond s * B @ A.
UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA (weight-decomposed LoRA) rescales the merged weight by a magnitude vector",
    "layer_replication": "layer replication shares base weights across layers",
    "use_qalora": "QA-LoRA pools the input before lora_A, so lora_A's width is not the layer's",
}


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module, or one expert of a LoRA on a 3-D expert parameter.

    `shape` is `(m, n)`, the orientation of the update `dW` (METHOD.md,
    Notation): out x in for linear layers, also for `fan_in_fan_out` layers
    whose stored weight is `n x m` (`weight_transposed`), and vocab x dim for
    embeddings, whose update is `(s * B @ A)^T` (`factors_transposed`).

    `target` is the weight the update applies to, as the model names it at
    run time: `<module>.weight`, or `<module>.<parameter>` for peft's
    `target_parameters` (kind "parameter", or "expert" when the parameter is
    3-D). peft stores an expert parameter's factors fused: `lora_A` is
    `(r * experts) x n` with expert `e` in rows `e*r .. e*r+r-1`, `lora_B` is
    `m x (r * experts)` with expert `e` in columns `e, e + experts, ...`
    (`ParamWrapper.get_delta_weight`); `expert` picks one of `num_experts`.
    """

    name: str
    kind: str  # "linear", "conv1d" (fan_in_fan_out), "embedding", "parameter" or "expert"
    key_a: str
    key_b: str
    rank: int  # from the factors' shapes (per expert)
    configured_rank: int  # what r / rank_pattern give it; PEFT loads it only if equal
    alpha: float
    scaling: float
    shape: tuple[int, int]
    dtype: str
    target: str
    expert: int | None = None
    num_experts: int = 1
    bias_key: str | None = None  # lora_bias: `...lora_B.bias`, carried unchanged

    @property
    def weight_transposed(self) -> bool:
        return self.kind == "conv1d"

    @property
    def factors_transposed(self) -> bool:
        return self.kind == "embedding"

    @property
    def weight_key(self) -> str:
        """The run-time name of the weight this module updates."""
        return self.target

    @property
    def stored_experts(self) -> int | None:
        """How many experts the weight holds (`target_parameters`); None for a module's matrix."""
        return self.num_experts if self.kind in PARAMETER_KINDS else None

    @property
    def pattern_name(self) -> str:
        """The name PEFT matches `rank_pattern` / `alpha_pattern` keys against."""
        return self.target if self.kind in PARAMETER_KINDS else self.name


PARAMETER_KINDS = ("parameter", "expert")


@dataclass
class LoraAdapter:
    """A parsed PEFT LoRA adapter: config, modules, and the tensors carried as they are."""

    source: Source
    config: dict[str, Any]
    config_path: Path
    weights: Checkpoint
    modules: list[LoraModule]
    carried_keys: list[str]
    unsupported: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    # The last fused expert factors read: the experts of one parameter come one after another.
    _fused: dict[tuple[str, bool], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def weights_path(self) -> Path:
        return self.weights.header(WEIGHTS_NAME).path

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))


def load_adapter(source: Source) -> LoraAdapter:
    """Parse `adapter_config.json` and the headers of `adapter_model.safetensors`.

    Reads no tensor data. Raises InvalidAdapterError for what is not a LoRA
    adapter PEFT could load; records softer problems in `warnings`.
    """
    config_path = source.fetch(CONFIG_NAME)
    if config_path is None:
        if source.single_file or source.fetch(INDEX_NAME) or source.fetch(SINGLE_NAME):
            # A model given as ADAPTER: validate it (bad index, pickles), then say what it is.
            model = Checkpoint.open(source, "ADAPTER")
            raise InvalidAdapterError(
                f"no {CONFIG_NAME}: this is a model checkpoint ({len(model.keys())} tensors), "
                "not a PEFT adapter. ADAPTER is the folder an adapter's save_pretrained writes.",
                path=source.identity,
            )
        refuse_pickles(source, "ADAPTER")
        raise SourceNotFoundError(
            f"no {CONFIG_NAME}: not a PEFT adapter folder.", path=source.identity
        )
    config = _read_config(config_path)
    if source.fetch(WEIGHTS_NAME) is None:
        refuse_pickles(source, "ADAPTER")
        raise SourceNotFoundError(f"no {WEIGHTS_NAME} next to {CONFIG_NAME}.", path=source.identity)
    weights = Checkpoint.open(source, "ADAPTER", WEIGHTS_NAME)
    modules, carried, warnings = _modules(config, weights)
    unsupported = {name: why for name, why in UNSUPPORTED_FEATURES.items() if config.get(name)}
    if any("lora_magnitude_vector" in key for key in carried):
        unsupported.setdefault("use_dora", UNSUPPORTED_FEATURES["use_dora"])
    if "use_dora" in unsupported:
        warnings.append("DoRA adapter: inspect reports it, but repair does not support DoRA yet.")
    return LoraAdapter(
        source, config, config_path, weights, modules, carried, unsupported, warnings
    )


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = parse_json(path.read_bytes())
    except (OSError, JsonError) as error:
        raise InvalidAdapterError(
            f"cannot parse the adapter config ({error}).", path=path
        ) from None
    if not isinstance(config, dict):
        raise InvalidAdapterError("the adapter config is not a JSON object.", path=path)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise InvalidAdapterError(
            f"peft_type is {config.get('peft_type')!r}; adapter-fix repairs LoRA adapters only.",
            path=path,
        )
    _check_number(path, "r", config.get("r"), integer=True)
    _check_number(path, "lora_alpha", config.get("lora_alpha"), integer=False)
    for name, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            raise InvalidAdapterError(f"{name!r} must be an object.", path=path, key=name)
        for pattern, value in patterns.items():
            _check_regex(path, f"{name}[{pattern!r}]", pattern, as_key=True)
            _check_number(path, f"{name}[{pattern!r}]", value, integer=integer)
    targets = config.get("target_modules")
    if isinstance(targets, str):
        _check_regex(path, "target_modules", targets)
    elif not (
        targets is None or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise InvalidAdapterError(
            f"'target_modules' must be a list of names or a regex, got {targets!r}.",
            path=path,
            key="target_modules",
        )
    return config


# Sane ranges for config numbers: a rank past MAX_RANK or an alpha outside ALPHA_RANGE is a
# broken or hostile config, and would only overflow or underflow in the solve.
MAX_RANK = 65536
ALPHA_RANGE = (1e-6, 1e6)


def _check_number(path: Path, name: str, value: object, *, integer: bool) -> None:
    """A positive number (an int where PEFT needs one) in its sane range, else exit 6."""
    kinds = int if integer else int | float
    if not isinstance(value, kinds) or isinstance(value, bool) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise InvalidAdapterError(
            f"{name} must be {what}, got {printable(repr(value))[:80]}.", path=path, key=name
        )
    low, high = (1, MAX_RANK) if integer else ALPHA_RANGE
    if not low <= value <= high:
        raise InvalidAdapterError(
            f"{name} is {printable(repr(value))[:80]}, outside the sane range {low:g} to "
            f"{high:g}; the config is broken.",
            path=path,
            key=name,
        )


def _check_regex(path: Path, name: str, pattern: str, *, as_key: bool = False) -> None:
    """A pattern PEFT can use and adapter-fix can match in bounded time (io/safe_regex.py)."""
    try:
        re.compile(pattern)
        compile_pattern(rf"(?:.*\.)?(?:{pattern})$" if as_key else pattern)
    except re.error as error:
        raise InvalidAdapterError(
            f"{name} is not a valid regular expression ({error}); PEFT could not use it either.",
            path=path,
            key=name,
        ) from None
    except UnsafePatternError as error:
        raise InvalidAdapterError(
            f"{name} is a regular expression adapter-fix does not evaluate: {error}. Adapters "
            "are untrusted input, so patterns are matched in linear time, which excludes "
            "backtracking-only features; list the module names instead.",
            path=path,
            key=name,
        ) from None


def _modules(
    config: dict[str, Any], weights: Checkpoint
) -> tuple[list[LoraModule], list[str], list[str]]:
    """Pair lora_A / lora_B keys into modules; everything else is carried unchanged."""
    factors: dict[str, dict[str, str]] = {}
    biases: dict[str, str] = {}
    carried: list[str] = []
    names: set[str | None] = set()
    for key in weights:
        parsed = AdapterKey.parse(key)
        if parsed is not None and parsed.suffix == ".bias" and parsed.role == "lora_B":
            biases[parsed.module] = key
            names.add(parsed.adapter_name)
        if parsed is None or parsed.role not in FACTOR_ROLES or parsed.suffix == ".bias":
            carried.append(key)
            continue
        factors.setdefault(parsed.module, {})[parsed.role.removeprefix("lora_")] = key
        names.add(parsed.adapter_name)
    path = weights.header(WEIGHTS_NAME).path
    if len(names) > 1:
        raise InvalidAdapterError(
            f"the file holds several adapters ({', '.join(sorted(map(str, names)))}); "
            "save each adapter to its own folder and repair them one at a time.",
            path=path,
        )
    parameters = _wrapped_parameters(config, factors, path)
    modules: list[LoraModule] = []
    warnings: list[str] = []
    for name, roles in factors.items():
        embedding = "embedding_A" in roles or "embedding_B" in roles
        key_a = roles.get("embedding_A" if embedding else "A")
        key_b = roles.get("embedding_B" if embedding else "B")
        if key_a is None or key_b is None:
            present = ", ".join(sorted(roles.values()))
            raise InvalidAdapterError(
                f"module {name!r} has {present} but not its partner factor (incomplete file).",
                path=path,
                key=present,
            )
        info_a, info_b = weights.info(key_a), weights.info(key_b)
        _check_factors(name, info_a, info_b, path)
        if info_a.dtype != info_b.dtype:
            warnings.append(f"{name}: lora_A is {info_a.dtype} but lora_B is {info_b.dtype}.")
        if name in parameters:
            modules += _parameter_modules(config, parameters[name], info_a, info_b, warnings)
            continue
        rank = info_a.shape[0]
        configured_rank = config_rank(config, name)
        if rank != configured_rank:
            warnings.append(
                f"{name}: the factors have rank {rank} but the config says r={configured_rank}: "
                "PEFT will refuse to load this adapter (size mismatch)."
            )
        if not is_targeted(name, config.get("target_modules")):
            warnings.append(
                f"{name}: not matched by target_modules {config.get('target_modules')!r}; PEFT "
                "creates no LoRA layer there and silently drops these tensors."
            )
        if embedding:
            kind, shape = "embedding", (info_a.shape[1], info_b.shape[0])
        else:
            kind = "conv1d" if config.get("fan_in_fan_out") else "linear"
            shape = (info_b.shape[0], info_a.shape[1])
        alpha = config_alpha(config, name)
        modules.append(
            LoraModule(
                name=name,
                kind=kind,
                key_a=key_a,
                key_b=key_b,
                rank=rank,
                configured_rank=configured_rank,
                alpha=alpha,
                scaling=lora_scaling(alpha, rank, bool(config.get("use_rslora"))),
                shape=shape,
                dtype=info_a.dtype,
                target=f"{name}.weight",
                bias_key=biases.get(name),
            )
        )
    return modules, carried, warnings


def _check_factors(name: str, info_a: TensorInfo, info_b: TensorInfo, path: Path) -> None:
    if len(info_a.shape) != 2 or len(info_b.shape) != 2:
        raise InvalidAdapterError(
            f"module {name!r} has factors of shape {list(info_a.shape)} and "
            f"{list(info_b.shape)}; only linear and embedding LoRA (2-D factors) are "
            "supported, not convolution LoRA.",
            path=path,
            key=info_a.key,
        )
    if info_a.shape[0] == 0:
        raise InvalidAdapterError(
            f"module {name!r} has factors of rank 0 (shapes {list(info_a.shape)} and "
            f"{list(info_b.shape)}): no update, and PEFT refuses r = 0. Remove the module's "
            "factors or export the adapter again.",
            path=path,
            key=info_a.key,
        )
    if info_a.shape[0] != info_b.shape[1]:
        raise InvalidAdapterError(
            f"module {name!r}: lora_A has rank {info_a.shape[0]} but lora_B has rank "
            f"{info_b.shape[1]}; the factors do not multiply.",
            path=path,
            key=info_b.key,
        )
    for info in (info_a, info_b):
        if info.dtype not in FLOAT_WEIGHT_DTYPES:
            raise InvalidAdapterError(
                f"module {name!r}: factor dtype {info.dtype} is not a float LoRA factor "
                "(F16, BF16, F32 or F64); quantized adapters are not supported.",
                path=path,
                key=info.key,
            )


def parameter_candidates(
    config: Mapping[str, Any], module: str, *, named_only: bool = False
) -> list[str]:
    """The parameters of `module` that `target_parameters` can name, in registration order.

    PEFT wraps `<module>.<parameter>` when it equals or ends with an entry at a
    dot boundary. Entries naming the module (`experts.down_proj`) are used
    when any does; otherwise bare parameter names (`down_proj`), unless
    `named_only`.
    """
    named: list[str] = []
    bare: list[str] = []
    for entry in config.get("target_parameters") or []:
        owner, _, parameter = str(entry).rpartition(".")
        if not owner:
            bare.append(parameter)
        elif module == owner or module.endswith(f".{owner}"):
            named.append(parameter)
    found = list(dict.fromkeys(named or ([] if named_only else bare)))
    known = [p for p in PARAMETER_ORDER if p in found]
    return known + [p for p in found if p not in known]


def _wrapped_parameters(
    config: Mapping[str, Any], factors: Mapping[str, Mapping[str, str]], path: Path
) -> dict[str, str]:
    """Adapter module paths that are peft `ParamWrapper`s -> their `<module>.<parameter>`.

    A module with `k` parameters targeted is wrapped `k` times; the innermost
    wrapper (the most `.base_layer` segments) holds the first parameter in
    registration order. A module PEFT also targets as a whole cannot be one
    (PEFT refuses that combination). Under `all-linear`, which may target any
    module, a module wrapped once is a `ParamWrapper` only when an entry names
    it (`experts.down_proj`, not a bare `down_proj`).
    """
    if not config.get("target_parameters"):
        return {}
    targets = config.get("target_modules")
    all_linear = targets == "all-linear"
    by_module: dict[str, list[str]] = {}
    for name in factors:
        module = name.replace(BASE_LAYER, "")
        if BASE_LAYER in name or all_linear or not is_targeted(module, targets):
            by_module.setdefault(module, []).append(name)
    wrapped: dict[str, str] = {}
    for module, paths in by_module.items():
        nested = any(BASE_LAYER in p for p in paths)
        candidates = parameter_candidates(config, module, named_only=all_linear and not nested)
        if not candidates:
            continue
        paths.sort(key=lambda p: p.count(BASE_LAYER), reverse=True)
        if len(candidates) != len(paths):
            if len(paths) == 1 and BASE_LAYER not in paths[0] and len(candidates) > 1:
                raise InvalidAdapterError(
                    f"module {module!r}: which of its parameters the LoRA factors target is "
                    f"ambiguous; target_parameters candidates: {', '.join(candidates)}.",
                    path=path,
                    key=paths[0],
                )
            if len(candidates) < len(paths):
                raise InvalidAdapterError(
                    f"module {module!r} is wrapped {len(paths)} times but target_parameters "
                    f"names only {', '.join(candidates)} for it.",
                    path=path,
                    key=paths[0],
                )
        for path_name, parameter in zip(paths, candidates, strict=False):
            wrapped[path_name] = f"{module}.{parameter}"
    return wrapped


def _parameter_modules(
    config: Mapping[str, Any],
    target: str,
    info_a: TensorInfo,
    info_b: TensorInfo,
    warnings: list[str],
) -> list[LoraModule]:
    """One LoraModule per expert of a `target_parameters` LoRA (one for a 2-D parameter)."""
    configured_rank = config_rank(config, target)
    rows = info_a.shape[0]
    rank, experts = configured_rank, rows // configured_rank
    if rows % configured_rank:
        warnings.append(
            f"{target}: lora_A has {rows} rows, not a multiple of r={configured_rank}: PEFT "
            "will refuse to load this adapter (size mismatch)."
        )
        rank, experts = rows, 1
    alpha = config_alpha(config, target)
    scaling = lora_scaling(alpha, rank, bool(config.get("use_rslora")))
    return [
        LoraModule(
            name=f"{target}[{expert}]" if experts > 1 else target,
            kind="expert" if experts > 1 else "parameter",
            key_a=info_a.key,
            key_b=info_b.key,
            rank=rank,
            configured_rank=configured_rank,
            alpha=alpha,
            scaling=scaling,
            shape=(info_b.shape[0], info_a.shape[1]),
            dtype=info_a.dtype,
            target=target,
            expert=expert if experts > 1 else None,
            num_experts=experts,
        )
        for expert in range(experts)
    ]


def read_factors(
    adapter: LoraAdapter, module: LoraModule, *, finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, A)` in `dW` orientation: `dW = s * B @ A`, `m x r` and `r x n`.

    An expert's factors are its slices of the fused ones (see LoraModule);
    the fused tensors of the last parameter read are kept, so the experts of
    one parameter cost one read.
    """
    if module.expert is None:
        lora_a = adapter.weights.read(module.key_a, finite=finite)
        lora_b = adapter.weights.read(module.key_b, finite=finite)
        if module.factors_transposed:
            return lora_a.T, lora_b.T
        return lora_b, lora_a
    wanted = {(module.key_a, finite), (module.key_b, finite)}
    if set(adapter._fused) != wanted:
        adapter._fused.clear()
        for key, checked in wanted:
            adapter._fused[(key, checked)] = adapter.weights.read(key, finite=checked)
    rank, expert = module.rank, module.expert
    lora_a = adapter._fused[(module.key_a, finite)][expert * rank : (expert + 1) * rank]
    lora_b = adapter._fused[(module.key_b, finite)][:, expert :: module.num_experts]
    return lora_b, lora_a
