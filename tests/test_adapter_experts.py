"""peft `target_parameters` adapters (fused expert factors) and `lora_bias` keys, parsed and
written back exactly as peft lays them out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapter_fix.commands.repair import check_repairable
from adapter_fix.errors import InvalidAdapterError
from adapter_fix.io.adapter import load_adapter, parameter_candidates, read_factors
from adapter_fix.io.adapter_writer import assemble_factors
from adapter_fix.io.lora_keys import AdapterKey, lora_scaling
from adapter_fix.io.sources import LocalSource

PREFIX = "base_model.model.model.layers.0.mlp.experts"
EXPERTS, RANK, ALPHA = 3, 2, 6


def write_adapter_folder(folder: Path, tensors: dict[str, torch.Tensor], **config: object) -> Path:
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors")
    settings = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": [], **config}
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder


def peft_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """peft's `ParamWrapper.get_delta_weight` for a non-transposed 3-D parameter."""
    experts = lora_a.shape[0] // RANK if lora_a.shape[0] % RANK == 0 else 1
    weight_a = lora_a.reshape(experts, -1, lora_a.shape[-1])
    weight_b = lora_b.reshape(lora_b.shape[0], -1, experts)
    return torch.einsum("o r e, e r i -> e o i", weight_b, weight_a) * scaling


@pytest.fixture
def moe_adapter(tmp_path: Path) -> Path:
    generator = torch.Generator().manual_seed(0)
    tensors = {  # down_proj wraps gate_up_proj: the inner wrapper is `experts.base_layer`
        f"{PREFIX}.base_layer.lora_A.weight": torch.randn(RANK * EXPERTS, 4, generator=generator),
        f"{PREFIX}.base_layer.lora_B.weight": torch.randn(10, RANK * EXPERTS, generator=generator),
        f"{PREFIX}.lora_A.weight": torch.randn(RANK * EXPERTS, 5, generator=generator),
        f"{PREFIX}.lora_B.weight": torch.randn(4, RANK * EXPERTS, generator=generator),
    }
    return write_adapter_folder(
        tmp_path / "moe", tensors, target_parameters=["experts.gate_up_proj", "experts.down_proj"]
    )


def test_nested_wrappers_are_the_module_parameters_in_registration_order(moe_adapter: Path) -> None:
    adapter = load_adapter(LocalSource(moe_adapter))
    names = [module.name for module in adapter.modules]
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    down = "model.layers.0.mlp.experts.down_proj"
    assert names == [f"{gate_up}[{e}]" for e in range(3)] + [f"{down}[{e}]" for e in range(3)]
    first = adapter.modules[0]
    assert (first.kind, first.rank, first.num_experts, first.shape) == ("expert", 2, 3, (10, 4))
    assert first.scaling == lora_scaling(ALPHA, RANK, False)
    assert adapter.warnings == []


def test_each_experts_factors_multiply_to_peft_delta_weight(moe_adapter: Path) -> None:
    adapter = load_adapter(LocalSource(moe_adapter))
    tensors = {key: adapter.weights.read(key) for key in adapter.weights}
    for wrapper in (f"{PREFIX}.base_layer", PREFIX):
        delta = peft_delta(
            tensors[f"{wrapper}.lora_A.weight"], tensors[f"{wrapper}.lora_B.weight"], 3.0
        )
        modules = [m for m in adapter.modules if m.key_a == f"{wrapper}.lora_A.weight"]
        for module in modules:
            lora_b, lora_a = read_factors(adapter, module)
            assert torch.allclose(module.scaling * lora_b @ lora_a, delta[module.expert], atol=1e-6)


def test_experts_written_at_other_ranks_are_padded_to_one_rank_with_the_same_updates(
    moe_adapter: Path,
) -> None:
    adapter = load_adapter(LocalSource(moe_adapter))
    gate_up = [m for m in adapter.modules if m.target.endswith("gate_up_proj")]
    generator = torch.Generator().manual_seed(1)
    new_ranks = {0: 4, 2: 3}  # expert 1 unchanged
    new = {
        gate_up[e].name: (
            torch.randn(rank, 4, generator=generator),
            torch.randn(10, rank, generator=generator),
            rank,
        )
        for e, rank in new_ranks.items()
    }
    replacements, ranks = assemble_factors(adapter, new)
    assert ranks == {"model.layers.0.mlp.experts.gate_up_proj": 4}
    lora_a = replacements[gate_up[0].key_a]
    lora_b = replacements[gate_up[0].key_b]
    assert lora_a.shape == (4 * EXPERTS, 4) and lora_b.shape == (10, 4 * EXPERTS)
    written = lora_b.reshape(10, 4, EXPERTS).permute(2, 0, 1) @ lora_a.reshape(EXPERTS, 4, 4)
    written = written * lora_scaling(ALPHA, 4, False)
    for e, module in enumerate(gate_up):
        if e in new_ranks:
            new_a, new_b, rank = new[module.name]
            expected = lora_scaling(ALPHA, rank, False) * new_b @ new_a
        else:
            old_b, old_a = read_factors(adapter, module)
            expected = module.scaling * old_b @ old_a
        assert torch.allclose(written[e], expected, atol=1e-5), e


def test_a_single_wrapper_with_several_candidate_parameters_is_ambiguous(tmp_path: Path) -> None:
    tensors = {
        f"{PREFIX}.lora_A.weight": torch.zeros(RANK * EXPERTS, 5),
        f"{PREFIX}.lora_B.weight": torch.zeros(4, RANK * EXPERTS),
    }
    folder = write_adapter_folder(
        tmp_path / "one", tensors, target_parameters=["gate_up_proj", "down_proj"]
    )
    with pytest.raises(InvalidAdapterError, match="candidates: gate_up_proj, down_proj"):
        load_adapter(LocalSource(folder))


def test_parameter_candidates_prefer_entries_naming_the_module() -> None:
    config = {
        "target_parameters": ["down_proj", "gate_up_proj", "gate.weight", "experts.down_proj"]
    }
    assert parameter_candidates(config, "model.layers.0.mlp.gate") == ["weight"]
    assert parameter_candidates(config, "model.layers.0.mlp.experts") == ["down_proj"]
    assert parameter_candidates(config, "model.layers.0.mlp.shared") == [
        "gate_up_proj",
        "down_proj",
    ]


def test_lora_b_bias_keys_parse_as_bias_not_as_an_adapter_name() -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    parsed = AdapterKey.parse(key)
    assert parsed == AdapterKey("model.layers.0.self_attn.q_proj", "lora_B", suffix=".bias")
    assert parsed is not None and parsed.format() == key
    named = AdapterKey.parse("base_model.model.x.q_proj.lora_B.default.bias")
    assert named is not None and (named.adapter_name, named.suffix) == ("default", ".bias")


def test_lora_bias_adapter_loads_with_its_biases_carried(tmp_path: Path) -> None:
    stem = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{stem}.lora_A.weight": torch.ones(RANK, 4),
        f"{stem}.lora_B.weight": torch.ones(6, RANK),
        f"{stem}.lora_B.bias": torch.ones(6),
    }
    folder = write_adapter_folder(
        tmp_path / "bias", tensors, lora_bias=True, target_modules=["q_proj"]
    )
    adapter = load_adapter(LocalSource(folder))
    assert adapter.unsupported == {}
    assert [m.bias_key for m in adapter.modules] == [f"{stem}.lora_B.bias"]
    assert adapter.carried_keys == [f"{stem}.lora_B.bias"]
    assert adapter.warnings == []


def test_under_all_linear_a_bare_entry_does_not_turn_a_linear_module_into_a_parameter(
    tmp_path: Path,
) -> None:
    stem = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{stem}.lora_A.weight": torch.ones(RANK, 4),
        f"{stem}.lora_B.weight": torch.ones(6, RANK),
    }
    folder = write_adapter_folder(
        tmp_path / "linear", tensors, target_modules="all-linear", target_parameters=["down_proj"]
    )
    (module,) = load_adapter(LocalSource(folder)).modules
    assert (module.kind, module.target) == ("linear", "model.layers.0.self_attn.q_proj.weight")


def test_fused_factors_that_are_no_multiple_of_r_are_flagged_and_not_repaired(
    tmp_path: Path,
) -> None:
    tensors = {
        f"{PREFIX}.lora_A.weight": torch.ones(5, 4),
        f"{PREFIX}.lora_B.weight": torch.ones(6, 5),
    }
    folder = write_adapter_folder(
        tmp_path / "odd", tensors, target_parameters=["experts.down_proj"]
    )
    adapter = load_adapter(LocalSource(folder))
    (module,) = adapter.modules
    assert (module.rank, module.configured_rank) == (5, RANK)
    assert "PEFT will refuse" in adapter.warnings[0]
    with pytest.raises(InvalidAdapterError, match="has rank 5"):
        check_repairable(adapter)
