"""Where a module's weight lives in a checkpoint: key layouts, fused experts, tied embeddings.

An adapter names weights the way the model names them at run time
(`model.language_model.layers.0.self_attn.q_proj.weight`,
`model.layers.0.mlp.experts.gate_up_proj`), while `save_pretrained` writes
many architectures in an older layout (`language_model.model.layers.0...`,
`model.layers.0.block_sparse_moe.experts.3.w1.weight`, no `lm_head` when the
head is tied to the embedding). `transformers` converts one into the other
with per-architecture rules when it loads a checkpoint
(`transformers/conversion_mapping.py`: `WeightRenaming`, and `WeightConverter`
with `MergeModulelist(dim=0)` / `Concatenate(dim=1)` for experts). This
module holds those rules as one table, `RULES`, applied in one place, in both
directions: `to_runtime` (checkpoint key -> run-time name, what loading does)
and `to_checkpoint` (the inverse, what saving does).

Resolution of a run-time name against a checkpoint, in order: the name
through the architecture's rules (identity where it has none); the name as
a stored key verbatim (an adapter trained when transformers used the saved
layout, e.g. Mixtral's per-expert `experts.3.w1` modules); the same name with the
base model's prefix added or removed (transformers' `base_model_prefix`
rule, e.g. GPT-2's `h.0...` for `transformer.h.0...`); for a tied output
head, the input embedding it is tied to. More than one candidate at any step
is an error that lists them.

I/O only: reads headers and `config.json`, never tensor data except through
`read_rows`.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from adapter_fix.errors import CorruptCheckpointError, IncompatibleModelsError
from adapter_fix.io.checkpoint import Checkpoint, TensorInfo, read_info_rows

CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class Rename:
    """transformers' `WeightRenaming`: `checkpoint` becomes `runtime` in a key.

    Both are plain strings; with `anchored` they must start the key, else they
    match at a dot boundary anywhere. `keep` lists what may follow the
    checkpoint string for the rule *not* to fire (a negative lookahead in
    transformers, e.g. Qwen2-VL's `^model(?!\\.(language_model|visual))`).
    """

    checkpoint: str
    runtime: str
    anchored: bool = True
    keep: tuple[str, ...] = ()

    def forward(self, key: str) -> str:
        return _rename(key, self.checkpoint, self.runtime, self.anchored, self.keep)

    def reverse(self, key: str) -> str:
        return _rename(key, self.runtime, self.checkpoint, self.anchored, ())


@dataclass(frozen=True)
class StackExperts:
    """transformers' expert `WeightConverter`: per-expert 2-D weights -> one 3-D parameter.

    Checkpoint keys `<container>.experts.<e>.<part>.weight` for each name in
    `parts` are concatenated along rows (`Concatenate(dim=1)` of the stacked
    tensor) and stacked over experts (`MergeModulelist(dim=0)`) into the
    run-time parameter `<container>.experts.<target>`, shape
    `experts x sum(part rows) x in`.
    """

    parts: tuple[str, ...]
    target: str

    def match(self, key: str) -> tuple[str, int, int] | None:
        """`(run-time parameter, expert, part index)` of a per-expert checkpoint key, or None."""
        found = _EXPERT_KEY.match(key)
        if found is None or found["part"] not in self.parts:
            return None
        runtime = f"{found['container']}.{self.target}"
        return runtime, int(found["expert"]), self.parts.index(found["part"])

    def checkpoint_key(self, runtime: str, expert: int, part: int) -> str:
        """The inverse of `match`."""
        container = runtime.removesuffix(f".{self.target}")
        return f"{container}.{expert}.{self.parts[part]}.weight"


_EXPERT_KEY = re.compile(
    r"^(?P<container>(?:.+\.)?experts)\.(?P<expert>\d+)\.(?P<part>[^.]+)\.weight$"
)

Rule = Rename | StackExperts

_LLAVA = (
    Rename("language_model.lm_head.", "lm_head."),
    Rename("language_model.model.", "model.language_model."),
    Rename("vision_tower.", "model.vision_tower."),
    # A CLIP / SigLIP tower saved by transformers 4 (most Hub checkpoints) nests its weights
    # under `vision_model.`; transformers 5 drops it (`CLIPVisionModel`: PrefixChange).
    Rename("model.vision_tower.vision_model.", "model.vision_tower."),
    Rename("multi_modal_projector.", "model.multi_modal_projector."),
)
_LLAVA_NEXT = (*_LLAVA, Rename("image_newline", "model.image_newline"))
_QWEN2_VL = (
    Rename("visual.", "model.visual."),
    Rename("model.", "model.language_model.", keep=("language_model.", "visual.")),
)
_MIXTRAL = (
    Rename(".block_sparse_moe.", ".mlp.", anchored=False),
    StackExperts(("w1", "w3"), "gate_up_proj"),
    StackExperts(("w2",), "down_proj"),
)
_QWEN2_MOE = (
    StackExperts(("gate_proj", "up_proj"), "gate_up_proj"),
    StackExperts(("down_proj",), "down_proj"),
)
_PHIMOE = (
    Rename(".block_sparse_moe.", ".mlp.", anchored=False),
    Rename(".gate.weight", ".router.weight", anchored=False),
    StackExperts(("w1", "w3"), "gate_up_proj"),
    StackExperts(("w2",), "down_proj"),
)

# transformers 5.x `conversion_mapping.py`, by `model_type` (its `_MODEL_TO_CONVERSION_PATTERN`
# aliases included), for the architectures whose saved layout differs from the run-time one.
RULES: dict[str, tuple[Rule, ...]] = {
    **dict.fromkeys(
        (
            "llava",
            "aria",
            "paligemma",
            "aya_vision",
            "got_ocr2",
            "gemma3",
            "internvl",
            "vipllava",
            "mistral3",
        ),
        _LLAVA,
    ),
    **dict.fromkeys(("llava_next", "llava_next_video", "llava_onevision"), _LLAVA_NEXT),
    **dict.fromkeys(("qwen2_vl", "qwen2_5_vl"), _QWEN2_VL),
    **dict.fromkeys(("mixtral", "minimax"), _MIXTRAL),
    **dict.fromkeys(
        (
            "qwen2_moe",
            "qwen3_moe",
            "olmoe",
            "flex_olmo",
            "deepseek_v2",
            "deepseek_v3",
            "dots1",
            "ernie4_5_moe",
            "glm4_moe",
            "hunyuan_v1_moe",
            "qwen3_next",
        ),
        _QWEN2_MOE,
    ),
    "phimoe": _PHIMOE,
}

# Expert classes declared `use_experts_implementation(is_transposed=True)`: 3-D parameters
# stored `experts x in x out` instead of `experts x out x in`.
TRANSPOSED_EXPERTS = frozenset({"gpt_oss", "aria", "openai_privacy_filter"})

# Input embeddings an output head can be tied to (transformers' `_tied_weights_keys` targets).
_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|shared|embed_in)\.weight$")
_OUTPUT_HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out)\.weight$")


def prefix_candidates(name: str, available: Collection[str]) -> list[str]:
    """Weights that are `name` with the base model's prefix removed or added (sorted).

    transformers loads a checkpoint saved without the task head's prefix
    (GPT-2's `h.0.attn.c_attn.weight` for `transformer.h.0...`) or with an
    extra one; a dot-boundary suffix either way is that rule without knowing
    the prefix.
    """
    return sorted(
        key
        for key in available
        if key.endswith(".weight") and (name.endswith(f".{key}") or key.endswith(f".{name}"))
    )


def _rename(key: str, old: str, new: str, anchored: bool, keep: tuple[str, ...]) -> str:
    if anchored:
        if not key.startswith(old) or key[len(old) :].startswith(keep):
            return key
        return new + key[len(old) :]
    return key.replace(old, new, 1)


def to_runtime(key: str, rules: tuple[Rule, ...]) -> tuple[str, int | None, int | None]:
    """A checkpoint key as the model names it at run time, as transformers loads it.

    Every `Rename` fires in order, then at most one `StackExperts`. Returns
    `(name, expert, part)`; `expert` and `part` are None unless the key is
    one expert's slice of a stacked parameter.
    """
    for rule in rules:
        if isinstance(rule, Rename):
            key = rule.forward(key)
    for rule in rules:
        if isinstance(rule, StackExperts) and (found := rule.match(key)) is not None:
            return found
    return key, None, None


def to_checkpoint(
    name: str, rules: tuple[Rule, ...], expert: int | None = None, part: int = 0
) -> str:
    """The inverse of `to_runtime`: the key `save_pretrained` writes for a run-time name.

    A stacked expert parameter needs `expert` (and `part`, the index of the
    concatenated per-expert weight).
    """
    if expert is not None:
        stacker = next(
            (r for r in rules if isinstance(r, StackExperts) and name.endswith(f".{r.target}")),
            None,
        )
        if stacker is not None:
            name = stacker.checkpoint_key(name, expert, part)
    for rule in reversed(rules):
        if isinstance(rule, Rename):
            name = rule.reverse(name)
    return name


@dataclass(frozen=True)
class StoredWeight:
    """One 2-D matrix of a checkpoint, as stored: a tensor, or one expert of a 3-D one.

    `parts` are concatenated along rows (Mixtral's `w1` and `w3` make one
    expert's `gate_up_proj`); each is a whole 2-D tensor, or the `expert`-th
    matrix of a 3-D tensor (a positioned read of that matrix alone). `shape`
    is the stored `rows x cols`; `transposed` says it is the transpose of the
    `out x in` orientation of the update (GPT-2 `Conv1D`, transposed experts).
    """

    parts: tuple[TensorInfo, ...]
    shape: tuple[int, int]
    transposed: bool = False

    @property
    def key(self) -> str:
        """A key naming the weight in messages (the first part's)."""
        return self.parts[0].key

    @property
    def keys(self) -> list[str]:
        return [info.key for info in self.parts]


@dataclass
class WeightLayout:
    """A checkpoint's tensors by run-time name, through its architecture's rules."""

    label: str
    rules: tuple[Rule, ...]
    model_type: str | None
    tied: bool
    has_config: bool
    plain: dict[str, list[str]] = field(default_factory=dict)
    stacked: dict[str, dict[int, dict[int, str]]] = field(default_factory=dict)
    stored: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> WeightLayout:
        """The layout of `checkpoint` (built once per checkpoint, from its keys and config.json)."""
        layout = _LAYOUTS.get(checkpoint)
        if layout is None:
            label = f"{checkpoint.label} ({checkpoint.source})"
            layout = cls.build(label, checkpoint.keys(), read_model_config(checkpoint))
            _LAYOUTS[checkpoint] = layout
        return layout

    @classmethod
    def build(
        cls, label: str, keys: Collection[str], config: Mapping[str, Any] | None
    ) -> WeightLayout:
        """Index `keys` by run-time name with the rules of `config`'s model type."""
        model_type = _model_type(config)
        rules = RULES.get(model_type or "", ())
        layout = cls(label, rules, model_type, _tied(config), config is not None)
        layout.stored = set(keys)
        for key in keys:
            name, expert, part = to_runtime(key, rules)
            if expert is None or part is None:
                layout.plain.setdefault(name, []).append(key)
            else:
                layout.stacked.setdefault(name, {}).setdefault(expert, {})[part] = key
        return layout

    @property
    def names(self) -> set[str]:
        return set(self.plain) | set(self.stacked)

    def resolve(self, name: str) -> str:
        """The run-time name under which this checkpoint holds `name` (see the module doc).

        Raises IncompatibleModelsError naming the weight when it is missing,
        and listing the candidates when more than one fits.
        """
        if name in self.plain or name in self.stacked:
            return self._unique(name)
        if name in self.stored:  # an adapter trained on the saved layout (transformers 4)
            return name
        names = self.names
        candidates = prefix_candidates(name, names)
        if len(candidates) == 1:
            return self._unique(candidates[0])
        if not candidates and self.tied and _OUTPUT_HEAD.search(name):
            candidates = sorted(key for key in names if _EMBEDDING.search(key))
            if len(candidates) == 1:
                return self._unique(candidates[0])
        if candidates:
            raise IncompatibleModelsError(
                f"{self.label}: the adapter's weight {name!r} is ambiguous; candidates: "
                f"{', '.join(candidates)}.",
                key=name,
            )
        raise IncompatibleModelsError(self._missing(name), key=name)

    def _unique(self, name: str) -> str:
        keys = self.plain.get(name, [])
        if len(keys) > 1:
            raise IncompatibleModelsError(
                f"{self.label}: several tensors map to the weight {name!r} under the "
                f"{self.model_type!r} layout rules; candidates: {', '.join(sorted(keys))}.",
                key=name,
            )
        return name

    def _missing(self, name: str) -> str:
        message = f"{self.label} has no weight {name!r} (nor the same name with another prefix"
        if self.rules:
            message += f", nor {to_checkpoint(name, self.rules)!r} as {self.model_type} saves it"
        message += ") for the adapter's module."
        if _OUTPUT_HEAD.search(name):
            if not self.has_config:
                message += (
                    f" The output head may be tied to the input embedding, but there is no "
                    f"{CONFIG_NAME} to say so: point at the model folder that holds it."
                )
            elif not self.tied:
                message += f" {CONFIG_NAME} does not set tie_word_embeddings."
        return message + " Is this the model the adapter was trained on?"

    def weight(
        self,
        checkpoint: Checkpoint,
        name: str,
        *,
        expert: int | None = None,
        experts: int | None = None,
        transposed: bool = False,
    ) -> StoredWeight:
        """The stored matrix for the run-time weight `name` (one expert's, with `expert`).

        `experts` is how many experts the adapter gives a `target_parameters`
        weight (None for a module's weight, which must be a matrix); a 3-D or
        stacked weight must hold exactly as many, as PEFT requires to load.
        `transposed` is the module's own orientation (GPT-2 `Conv1D`); a 3-D
        expert parameter of a model in `TRANSPOSED_EXPERTS` adds one.
        """
        resolved = self.resolve(name)
        index = 0 if expert is None else expert
        if resolved in self.stacked:
            stacked = self.stacked[resolved]
            key = to_checkpoint(resolved, self.rules, index)
            self._check_experts(resolved, len(stacked), experts, key)
            parts = stacked.get(index)
            if parts is None or len(parts) != max(len(p) for p in stacked.values()):
                raise IncompatibleModelsError(
                    f"{self.label}: no complete expert {index} for the stacked weight "
                    f"{resolved!r} (found experts {sorted(stacked)}).",
                    key=key,
                )
            infos = tuple(checkpoint.info(parts[i]) for i in sorted(parts))
            return _stored(self.label, infos, transposed)
        info = checkpoint.info(self.plain.get(resolved, [resolved])[0])
        if len(info.shape) == 3:
            self._check_experts(resolved, info.shape[0], experts, info.key)
            info = expert_slice(info, index)
            transposed = transposed != (self.model_type in TRANSPOSED_EXPERTS)
        elif experts not in (None, 1):
            self._check_experts(resolved, 1, experts, info.key)
        return _stored(self.label, (info,), transposed)

    def _check_experts(self, name: str, stored: int, wanted: int | None, key: str) -> None:
        if wanted is None or stored != wanted:
            needs = "a matrix" if wanted is None else f"{wanted} experts"
            raise IncompatibleModelsError(
                f"{self.label}: the weight {name!r} holds {stored} expert(s) but the adapter "
                f"needs {needs}: is this the model the adapter was trained on?",
                key=key,
            )


_LAYOUTS: weakref.WeakKeyDictionary[Checkpoint, WeightLayout] = weakref.WeakKeyDictionary()


def _stored(label: str, parts: tuple[TensorInfo, ...], transposed: bool) -> StoredWeight:
    for info in parts:
        if len(info.shape) != 2:
            raise IncompatibleModelsError(
                f"{label}: the weight has shape {list(info.shape)}, not a matrix.",
                path=info.file,
                key=info.key,
            )
    columns = {info.shape[1] for info in parts}
    if len(columns) != 1:
        raise IncompatibleModelsError(
            f"{label}: the parts of one expert's weight ({', '.join(i.key for i in parts)}) "
            "have different widths and cannot be concatenated.",
            key=parts[0].key,
        )
    rows = sum(info.shape[0] for info in parts)
    return StoredWeight(parts, (rows, columns.pop()), transposed)


def expert_slice(info: TensorInfo, expert: int) -> TensorInfo:
    """The `expert`-th matrix of a 3-D tensor, as a tensor of its own (contiguous on disk).

    It keeps the tensor's key, so messages and `Checkpoint.reads` name what is on disk.
    """
    count, rows, columns = info.shape
    nbytes = info.nbytes // count if count else 0
    return replace(
        info,
        shape=(rows, columns),
        offset=info.offset + expert * nbytes,
        nbytes=nbytes,
    )


def read_rows(
    checkpoint: Checkpoint, weight: StoredWeight, block_bytes: int = 4 << 20
) -> Iterator[tuple[slice, torch.Tensor]]:
    """The stored matrix in blocks of whole rows, as `Checkpoint.read_rows` yields a tensor."""
    start = 0
    for info in weight.parts:
        for rows, block in read_info_rows(info, block_bytes):
            yield slice(start + rows.start, start + rows.stop), block
        start += info.shape[0]
        checkpoint.reads.append(info.key)


def read_model_config(checkpoint: Checkpoint) -> dict[str, Any] | None:
    """The checkpoint's `config.json`, or None when it has none (a single file)."""
    path = checkpoint.source.fetch(CONFIG_NAME)
    if path is None:
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as error:  # ValueError: bad JSON or UTF-8
        why = "nested too deeply" if isinstance(error, RecursionError) else error
        raise CorruptCheckpointError(
            f"{checkpoint.label}: cannot parse the model config ({why}).", path=path
        ) from None
    if not isinstance(config, dict):
        raise CorruptCheckpointError(
            f"{checkpoint.label}: the model config is not a JSON object.", path=path
        )
    return config


def _model_type(config: Mapping[str, Any] | None) -> str | None:
    model_type = (config or {}).get("model_type")
    return model_type if isinstance(model_type, str) else None


def _tied(config: Mapping[str, Any] | None) -> bool:
    """Whether `config.json` says the output head is the input embedding.

    Multimodal configs carry it on the top level or in `text_config`; the
    top level wins when both say. Unsaid is untied: the default depends on
    the model class, which a config alone does not settle.
    """
    if config is None:
        return False
    if "tie_word_embeddings" in config:
        return config["tie_word_embeddings"] is True
    text = config.get("text_config")
    return isinstance(text, dict) and text.get("tie_word_embeddings") is True
