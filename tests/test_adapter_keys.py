"""Adapter key <-> base weight key mapping, PEFT's pattern and scaling rules."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapter_fix.errors import IncompatibleModelsError
from adapter_fix.io.lora_keys import (
    AdapterKey,
    is_targeted,
    lora_scaling,
    pattern_key,
    resolve_weight_key,
)

segment = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True).filter(
    lambda s: not s.startswith("lora_") and s != "weight"
)
module_names = (
    st.lists(segment | st.integers(0, 99).map(str), min_size=1, max_size=6)
    .map(".".join)
    .filter(lambda name: not name[0].isdigit())
)


@given(
    module=module_names,
    role=st.sampled_from(["lora_A", "lora_B", "lora_embedding_A", "lora_magnitude_vector"]),
    prefix=st.sampled_from(["base_model.model.", ""]),
    adapter_name=st.sampled_from([None, "default", "my-adapter"]),
    suffix=st.sampled_from([".weight", ".bias", ""]),
)
def test_adapter_key_round_trips(
    module: str, role: str, prefix: str, adapter_name: str | None, suffix: str
) -> None:
    key = AdapterKey(module, role, prefix, adapter_name, suffix)
    text = key.format()
    assert AdapterKey.parse(text) == key
    assert AdapterKey.parse(text).format() == text


@given(module=module_names, role=st.sampled_from(["lora_A", "lora_B"]))
def test_base_weight_key_round_trips(module: str, role: str) -> None:
    key = AdapterKey(module, role)
    assert AdapterKey.from_base_weight_key(key.base_weight_key, role) == key


def test_peft_key_forms_parse() -> None:
    plain = AdapterKey.parse("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    assert plain == AdapterKey("model.layers.0.self_attn.q_proj", "lora_A")
    named = AdapterKey.parse("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight")
    assert named.module == "model.layers.0.mlp.up_proj"
    assert named.adapter_name == "default"
    embedding = AdapterKey.parse("base_model.model.model.embed_tokens.lora_embedding_A")
    assert embedding.role == "lora_embedding_A"
    assert embedding.suffix == ""
    assert AdapterKey.parse("base_model.model.lm_head.weight") is None
    assert AdapterKey.parse("base_model.model.model.layers.0.self_attn.q_proj.bias") is None


KEYS = {
    "model.layers.0.self_attn.q_proj.weight",
    "model.embed_tokens.weight",
    "h.0.attn.c_attn.weight",
}


def test_exact_weight_key_wins() -> None:
    assert resolve_weight_key("model.layers.0.self_attn.q_proj.weight", KEYS, "BASE") == (
        "model.layers.0.self_attn.q_proj.weight"
    )


def test_checkpoint_without_the_head_prefix_is_found() -> None:
    assert (
        resolve_weight_key("transformer.h.0.attn.c_attn.weight", KEYS, "BASE")
        == "h.0.attn.c_attn.weight"
    )


def test_checkpoint_with_an_extra_prefix_is_found() -> None:
    keys = {"language_model.model.layers.0.self_attn.q_proj.weight"}
    assert resolve_weight_key("model.layers.0.self_attn.q_proj.weight", keys, "BASE") == next(
        iter(keys)
    )


def test_ambiguous_weight_key_lists_candidates() -> None:
    keys = {"a.model.layers.0.q.weight", "b.model.layers.0.q.weight"}
    with pytest.raises(IncompatibleModelsError) as error:
        resolve_weight_key("model.layers.0.q.weight", keys, "BASE")
    assert "a.model.layers.0.q.weight" in error.value.render()
    assert "b.model.layers.0.q.weight" in error.value.render()


def test_missing_weight_key_is_an_error_naming_the_module() -> None:
    with pytest.raises(IncompatibleModelsError, match=r"model\.layers\.9\.q\.weight"):
        resolve_weight_key("model.layers.9.q.weight", KEYS, "BASE")


def test_pattern_key_matches_at_dot_boundaries_first_key_wins() -> None:
    patterns = ["model.layers.1.self_attn.q_proj", "q_proj"]
    assert pattern_key(patterns, "model.layers.1.self_attn.q_proj") == patterns[0]
    assert pattern_key(patterns, "model.layers.0.self_attn.q_proj") == "q_proj"
    assert pattern_key(patterns, "model.layers.0.self_attn.xq_proj") is None
    assert pattern_key(["layers.1.self_attn.q_proj"], "model.layers.11.self_attn.q_proj") is None


def test_target_modules_follow_peft_rules() -> None:
    assert is_targeted("model.layers.0.self_attn.q_proj", ["q_proj", "v_proj"])
    assert not is_targeted("model.layers.0.self_attn.k_proj", ["q_proj", "v_proj"])
    assert is_targeted("model.layers.0.self_attn.q_proj", r".*\.q_proj")
    assert not is_targeted("model.layers.0.self_attn.q_proj", "q_proj")
    assert is_targeted("model.layers.0.mlp.up_proj", "all-linear")


def test_scaling_is_alpha_over_r_or_sqrt_r_for_rslora() -> None:
    assert lora_scaling(16, 8, False) == 2.0
    assert lora_scaling(16, 4, True) == 16 / math.sqrt(4)
