"""io/keymap.py: transformers' key-conversion rules both ways, tied heads, stacked experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from adapter_fix.errors import IncompatibleModelsError
from adapter_fix.io.checkpoint import Checkpoint
from adapter_fix.io.keymap import RULES, WeightLayout, read_rows, to_checkpoint, to_runtime
from adapter_fix.io.sources import LocalSource

# What `save_pretrained` writes (transformers 5.x) and what the model calls it at run time.
SAVED_AND_RUNTIME = {
    "llava": [
        ("language_model.model.layers.0.self_attn.q_proj.weight",
         "model.language_model.layers.0.self_attn.q_proj.weight"),
        ("language_model.model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
        ("language_model.lm_head.weight", "lm_head.weight"),
        ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
         "model.vision_tower.encoder.layers.0.mlp.fc1.weight"),
        ("multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.weight"),
    ],
    "llava_next": [
        ("image_newline", "model.image_newline"),
        ("language_model.model.norm.weight", "model.language_model.norm.weight"),
    ],
    "qwen2_vl": [
        ("model.layers.0.self_attn.q_proj.weight",
         "model.language_model.layers.0.self_attn.q_proj.weight"),
        ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
        ("visual.blocks.0.attn.qkv.weight", "model.visual.blocks.0.attn.qkv.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ],
    "mixtral": [
        ("model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.mlp.gate.weight"),
        ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
    ],
    "phimoe": [
        ("model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.mlp.router.weight"),
    ],
}  # fmt: skip
EXPERTS = {
    "mixtral": [
        ("model.layers.1.block_sparse_moe.experts.7.w1.weight",
         ("model.layers.1.mlp.experts.gate_up_proj", 7, 0)),
        ("model.layers.1.block_sparse_moe.experts.7.w3.weight",
         ("model.layers.1.mlp.experts.gate_up_proj", 7, 1)),
        ("model.layers.1.block_sparse_moe.experts.7.w2.weight",
         ("model.layers.1.mlp.experts.down_proj", 7, 0)),
    ],
    "qwen3_moe": [
        ("model.layers.0.mlp.experts.2.gate_proj.weight",
         ("model.layers.0.mlp.experts.gate_up_proj", 2, 0)),
        ("model.layers.0.mlp.experts.2.up_proj.weight",
         ("model.layers.0.mlp.experts.gate_up_proj", 2, 1)),
        ("model.layers.0.mlp.experts.2.down_proj.weight",
         ("model.layers.0.mlp.experts.down_proj", 2, 0)),
    ],
}  # fmt: skip


@pytest.mark.parametrize("model_type", list(SAVED_AND_RUNTIME))
def test_saved_keys_map_to_runtime_names_and_back(model_type: str) -> None:
    rules = RULES[model_type]
    for saved, runtime in SAVED_AND_RUNTIME[model_type]:
        assert to_runtime(saved, rules) == (runtime, None, None)
        assert to_checkpoint(runtime, rules) == saved


@pytest.mark.parametrize("model_type", list(EXPERTS))
def test_per_expert_keys_map_to_one_stacked_parameter_and_back(model_type: str) -> None:
    rules = RULES[model_type]
    for saved, (runtime, expert, part) in EXPERTS[model_type]:
        assert to_runtime(saved, rules) == (runtime, expert, part)
        assert to_checkpoint(runtime, rules, expert, part) == saved


def test_a_vision_tower_saved_by_transformers_5_maps_too() -> None:
    """transformers 5 saves a CLIP tower without `vision_model.`; both layouts load."""
    saved = "vision_tower.encoder.layers.0.mlp.fc1.weight"
    runtime = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert to_runtime(saved, RULES["llava"]) == (runtime, None, None)


def test_runtime_names_are_left_alone() -> None:
    """A checkpoint already in the run-time layout (save_original_format=False) maps to itself."""
    for model_type, pairs in SAVED_AND_RUNTIME.items():
        for _, runtime in pairs:
            assert to_runtime(runtime, RULES[model_type])[0] == runtime, model_type
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    assert to_runtime(fused, RULES["mixtral"]) == (fused, None, None)


segment = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)
names = st.lists(segment | st.integers(0, 9).map(str), min_size=1, max_size=5).map(".".join)


@given(rest=names, model_type=st.sampled_from(sorted(RULES)))
def test_every_rule_table_round_trips_a_saved_key(rest: str, model_type: str) -> None:
    rules = RULES[model_type]
    for prefix in ("language_model.model.", "vision_tower.", "visual.", "model.layers.0.", ""):
        saved = f"{prefix}{rest}.weight"
        runtime, expert, part = to_runtime(saved, rules)
        if to_runtime(to_checkpoint(runtime, rules, expert, part or 0), rules) != (
            runtime,
            expert,
            part,
        ):
            pytest.fail(f"{model_type}: {saved} -> {runtime} does not come back")


def layout(keys: list[str], config: dict[str, object] | None) -> WeightLayout:
    return WeightLayout.build("BASE (test)", keys, config)


def test_tied_head_resolves_to_the_input_embedding() -> None:
    keys = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]
    tied = layout(keys, {"model_type": "llama", "tie_word_embeddings": True})
    assert tied.resolve("lm_head.weight") == "model.embed_tokens.weight"


def test_tied_head_of_a_vision_language_model_is_read_from_text_config() -> None:
    keys = ["language_model.model.embed_tokens.weight", "vision_tower.embeddings.patch.weight"]
    config = {"model_type": "llava", "text_config": {"tie_word_embeddings": True}}
    assert layout(keys, config).resolve("lm_head.weight") == (
        "model.language_model.embed_tokens.weight"
    )


@pytest.mark.parametrize(
    ("config", "hint"),
    [
        ({"model_type": "llama", "tie_word_embeddings": False}, "does not set tie_word_embeddings"),
        (None, "no config.json"),
    ],
)
def test_untied_or_unknown_head_is_missing_with_a_hint(
    config: dict[str, object] | None, hint: str
) -> None:
    with pytest.raises(IncompatibleModelsError, match=hint) as error:
        layout(["model.embed_tokens.weight"], config).resolve("lm_head.weight")
    assert error.value.exit_code == 7


def test_tied_head_with_two_embeddings_is_ambiguous_and_lists_them() -> None:
    keys = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
    with pytest.raises(IncompatibleModelsError) as error:
        layout(keys, {"tie_word_embeddings": True}).resolve("lm_head.weight")
    assert "decoder.embed_tokens.weight" in error.value.render()
    assert "encoder.embed_tokens.weight" in error.value.render()


def test_missing_weight_names_the_key_the_layout_would_store() -> None:
    with pytest.raises(IncompatibleModelsError, match=r"language_model\.model\.layers\.9"):
        layout(["language_model.model.norm.weight"], {"model_type": "llava"}).resolve(
            "model.language_model.layers.9.self_attn.q_proj.weight"
        )


def test_two_keys_converted_to_one_name_are_ambiguous() -> None:
    keys = ["language_model.model.norm.weight", "model.language_model.norm.weight"]
    with pytest.raises(IncompatibleModelsError, match="candidates") as error:
        layout(keys, {"model_type": "llava"}).resolve("model.language_model.norm.weight")
    assert "language_model.model.norm.weight" in error.value.render()


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], model_type: str) -> Checkpoint:
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
    return Checkpoint.open(LocalSource(folder), "BASE")


def read_whole(
    checkpoint: Checkpoint,
    name: str,
    expert: int | None,
    *,
    experts: int | None = None,
    transposed: bool = False,
) -> torch.Tensor:
    weight = WeightLayout.of(checkpoint).weight(checkpoint, name, expert=expert, experts=experts)
    assert weight.transposed == transposed
    out = torch.empty(weight.shape)
    for rows, block in read_rows(checkpoint, weight, block_bytes=16):
        out[rows] = block
    return out


def test_an_expert_reads_the_same_matrix_from_per_expert_and_fused_storage(tmp_path: Path) -> None:
    gate = torch.randn(3, 4, 5)
    up = torch.randn(3, 4, 5)
    per_expert = {
        f"model.layers.0.mlp.experts.{e}.{part}.weight": tensor[e].clone()
        for e in range(3)
        for part, tensor in (("gate_proj", gate), ("up_proj", up))
    }
    fused = {"model.layers.0.mlp.experts.gate_up_proj": torch.cat([gate, up], dim=1)}
    split = write_checkpoint(tmp_path / "split", per_expert, "qwen3_moe")
    whole = write_checkpoint(tmp_path / "whole", fused, "qwen3_moe")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    for expert in range(3):
        expected = torch.cat([gate[expert], up[expert]])
        assert torch.equal(read_whole(split, name, expert, experts=3), expected)
        assert torch.equal(read_whole(whole, name, expert, experts=3), expected)
    assert split.reads[:2] == [
        "model.layers.0.mlp.experts.0.gate_proj.weight",
        "model.layers.0.mlp.experts.0.up_proj.weight",
    ]


def test_transposed_experts_are_read_in_their_stored_orientation(tmp_path: Path) -> None:
    weights = torch.randn(2, 5, 4)  # experts x in x out
    checkpoint = write_checkpoint(
        tmp_path / "gpt_oss", {"model.layers.0.mlp.experts.down_proj": weights}, "gpt_oss"
    )
    name = "model.layers.0.mlp.experts.down_proj"
    assert torch.equal(read_whole(checkpoint, name, 1, experts=2, transposed=True), weights[1])


def test_a_name_stored_verbatim_in_the_saved_layout_is_found(tmp_path: Path) -> None:
    """A Mixtral adapter from transformers 4 names per-expert modules as the checkpoint does."""
    key = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    weights = {key: torch.randn(4, 3), key.replace("w1", "w3"): torch.randn(4, 3)}
    checkpoint = write_checkpoint(tmp_path / "mixtral", weights, "mixtral")
    assert torch.equal(read_whole(checkpoint, key, None), weights[key])


def test_an_expert_count_other_than_the_adapters_is_an_error(tmp_path: Path) -> None:
    checkpoint = write_checkpoint(
        tmp_path / "moe", {"model.layers.0.mlp.experts.down_proj": torch.zeros(2, 3, 3)}, "olmoe"
    )
    with pytest.raises(IncompatibleModelsError, match="holds 2 expert"):
        WeightLayout.of(checkpoint).weight(
            checkpoint, "model.layers.0.mlp.experts.down_proj", expert=0, experts=3
        )


def test_a_stacked_expert_count_other_than_the_adapters_is_an_error(tmp_path: Path) -> None:
    weights = {
        f"model.layers.0.mlp.experts.{e}.down_proj.weight": torch.zeros(3, 3) for e in (0, 1)
    }
    checkpoint = write_checkpoint(tmp_path / "moe", weights, "qwen3_moe")
    with pytest.raises(IncompatibleModelsError, match="holds 2 expert"):
        WeightLayout.of(checkpoint).weight(
            checkpoint, "model.layers.0.mlp.experts.down_proj", expert=0, experts=4
        )
