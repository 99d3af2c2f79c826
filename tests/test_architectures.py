"""Every architecture family users fine-tune, built tiny with real transformers and peft.

For each: a BASE saved with `save_pretrained`, an ALIGNED made by perturbing its
weights, and an adapter peft itself writes (`all-linear`, plus `lm_head` on the
tied model and `lora_bias` on Qwen2). `inspect` must agree with peft's own view of
the adapter, every repair method must write an adapter peft loads with no missing
or unexpected key, the repaired update of every module (every expert) must be the
dense CSULoRA of METHOD.md against that module's own displacement, and
`--strength 0` must give the original factors bit for bit.
"""

from __future__ import annotations

import copy
import functools
import json
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import run_cli
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer, ParamWrapper
from safetensors.torch import load_file
from transformers import (
    CLIPVisionConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

from adapter_fix.evaluate.generate import generate_ids
from adapter_fix.evaluate.objectives import repeated_prefix
from adapter_fix.io.adapter import load_adapter
from adapter_fix.io.checkpoint import Checkpoint
from adapter_fix.io.keymap import WeightLayout
from adapter_fix.io.sources import LocalSource

pytestmark = pytest.mark.model  # every test here runs a transformers model

SMALL = {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
TEXT = {"hidden_size": 16, "intermediate_size": 32, "vocab_size": 64, **SMALL}
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("csulora", "project", "safelora")


@dataclass(frozen=True)
class Architecture:
    """How to build one tiny model and its adapter."""

    model_class: type[PreTrainedModel]
    config: Callable[[], object]
    lora: dict[str, object]
    aligned_fused: bool = False  # save ALIGNED in the run-time layout (fused experts)


ARCHITECTURES = {
    "llama-tied": Architecture(
        LlamaForCausalLM,
        lambda: LlamaConfig(**TEXT, tie_word_embeddings=True),
        {"target_modules": [*LINEAR, "lm_head"]},
    ),
    "llama": Architecture(
        LlamaForCausalLM,
        lambda: LlamaConfig(**TEXT, tie_word_embeddings=False),
        {"target_modules": "all-linear"},
    ),
    "qwen2-lora-bias": Architecture(
        Qwen2ForCausalLM,
        lambda: Qwen2Config(**TEXT),
        {"target_modules": "all-linear", "lora_bias": True},
    ),
    "gemma": Architecture(
        GemmaForCausalLM,
        lambda: GemmaConfig(**TEXT, head_dim=8),
        {"target_modules": "all-linear"},
    ),
    "phi3": Architecture(
        Phi3ForCausalLM,
        lambda: Phi3Config(**TEXT, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        {"target_modules": "all-linear"},
    ),
    "gpt2": Architecture(
        GPT2LMHeadModel,
        lambda: GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=16),
        {"target_modules": "all-linear", "fan_in_fan_out": True},
    ),
    "mixtral": Architecture(
        MixtralForCausalLM,
        lambda: MixtralConfig(**TEXT, num_local_experts=3, num_experts_per_tok=2),
        {"target_modules": "all-linear"},
    ),
    "qwen3-moe": Architecture(
        Qwen3MoeForCausalLM,
        lambda: Qwen3MoeConfig(
            **TEXT, moe_intermediate_size=8, num_experts=3, num_experts_per_tok=2, head_dim=8
        ),
        {"target_modules": "all-linear"},
        aligned_fused=True,
    ),
    "olmoe": Architecture(  # peft names its experts by bare parameter names here
        OlmoeForCausalLM,
        lambda: OlmoeConfig(
            **{**TEXT, "intermediate_size": 8}, num_experts=3, num_experts_per_tok=2
        ),
        {"target_modules": "all-linear"},
    ),
    "gpt-oss": Architecture(
        GptOssForCausalLM,
        lambda: GptOssConfig(
            **{**TEXT, "intermediate_size": 16},
            head_dim=8,
            num_local_experts=3,
            num_experts_per_tok=2,
            layer_types=["full_attention"],
        ),
        {
            "target_modules": "all-linear",
            "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        },
    ),
    "switch-transformers": Architecture(
        SwitchTransformersForConditionalGeneration,
        lambda: SwitchTransformersConfig(
            d_model=16,
            d_ff=32,
            d_kv=8,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=2,
            num_experts=2,
            vocab_size=64,
            encoder_sparse_step=1,
            decoder_sparse_step=1,
        ),
        {"target_modules": "all-linear"},
    ),
    "llava": Architecture(
        LlavaForConditionalGeneration,
        lambda: LlavaConfig(
            text_config=LlamaConfig(**TEXT, tie_word_embeddings=True),
            vision_config=CLIPVisionConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=8,
                patch_size=4,
                projection_dim=16,
            ),
            image_token_index=63,
            tie_word_embeddings=True,
        ),
        {"target_modules": "all-linear"},
    ),
    "qwen2-vl": Architecture(
        Qwen2VLForConditionalGeneration,
        lambda: Qwen2VLConfig(
            text_config={
                **TEXT,
                "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
                "bos_token_id": 1,
                "eos_token_id": 2,
            },
            vision_config={
                "depth": 1,
                "embed_dim": 16,
                "hidden_size": 16,
                "num_heads": 2,
                "mlp_ratio": 2,
                "patch_size": 2,
                "spatial_merge_size": 1,
                "temporal_patch_size": 1,
                "in_channels": 3,
            },
        ),
        {"target_modules": "all-linear"},
    ),
}


@dataclass(frozen=True)
class Built:
    name: str
    architecture: Architecture
    base: Path
    aligned: Path
    adapter: Path


@pytest.fixture(autouse=True, scope="module")
def quiet_single_thread() -> Iterator[None]:
    """Library chatter off; one torch thread: on a shared 2-core machine, thread hand-offs
    cost ~20 ms per tiny QR, 70x the whole computation."""
    verbosity, threads = hf_logging.get_verbosity(), torch.get_num_threads()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(threads)
    hf_logging.set_verbosity(verbosity)
    hf_logging.enable_progress_bar()


def perturb(model: torch.nn.Module, seed: int) -> None:
    """The alignment: a rank-2 change plus a little noise on every matrix (every expert's)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim < 2:
                continue
            *batch, m, n = parameter.shape
            left = torch.randn((*batch, m, 2), generator=generator)
            right = torch.randn((*batch, 2, n), generator=generator)
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(0.05 * left @ right / (m * n) ** 0.5 + 1e-3 * noise)


@pytest.fixture(scope="session", params=list(ARCHITECTURES))
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    name = request.param
    architecture = ARCHITECTURES[name]
    root = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = architecture.config()
        config.dtype = "float32"  # type: ignore[attr-defined]
        model = architecture.model_class(config).eval()
        model.save_pretrained(root / "base")
        perturb(model, seed=1)
        model.save_pretrained(root / "aligned", save_original_format=not architecture.aligned_fused)
        peft_model = get_peft_model(
            model, LoraConfig(r=2, lora_alpha=6, init_lora_weights=False, **architecture.lora)
        )
        peft_model.save_pretrained(root / "adapter")
    return Built(name, architecture, root / "base", root / "aligned", root / "adapter")


_MODELS: dict[Path, PreTrainedModel] = {}


def load_model(built: Built, path: Path) -> PreTrainedModel:
    """A fresh copy of the model at `path` (each is read from disk once per session)."""
    if path not in _MODELS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _MODELS[path] = built.architecture.model_class.from_pretrained(
                path, dtype=torch.float32
            ).eval()
    return copy.deepcopy(_MODELS[path])


def with_adapter(built: Built, model_path: Path, adapter: Path) -> PeftModel:
    """PEFT's own loading of `adapter`, failing on any missing or unexpected key."""
    model = load_model(built, model_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, adapter)
    messages = " ".join(str(w.message).lower() for w in caught)
    assert "missing" not in messages and "unexpected" not in messages, messages
    written = load_file(adapter / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(peft_model)
    assert set(loaded) == set(written)
    for key, tensor in written.items():
        assert torch.equal(loaded[key].to(tensor.dtype), tensor), key
    return peft_model


Locator = tuple[str, str, int | None]  # module path, parameter name, expert


def peft_updates(peft_model: PeftModel) -> dict[str, tuple[torch.Tensor, Locator, int, float]]:
    """`{name: (dW, where W is, rank, scaling)}` for every LoRA module, one entry per expert.

    Names follow adapter-fix: the module path, or `<module>.<parameter>[expert]`
    for peft's `target_parameters`. `dW` is in the stored orientation of `W`.
    """
    updates = {}
    for path, layer in peft_model.base_model.model.named_modules():
        if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A:
            continue
        rank, scaling = layer.r["default"], layer.scaling["default"]
        with torch.no_grad():
            delta = layer.get_delta_weight("default").double()
        if not isinstance(layer, ParamWrapper):
            updates[path] = (delta, (path, "weight", None), rank, scaling)
            continue
        module = path.replace(".base_layer", "")
        name = f"{module}.{layer.parameter_name}"
        if delta.ndim == 2:
            updates[name] = (delta, (module, layer.parameter_name, None), rank, scaling)
            continue
        for expert in range(delta.shape[0]):
            where = (module, layer.parameter_name, expert)
            updates[f"{name}[{expert}]"] = (delta[expert], where, rank, scaling)
    return updates


def weight(model: PreTrainedModel, where: Locator) -> torch.Tensor:
    """The weight a LoRA module updates, from a model without adapter (tied heads resolved)."""
    module, parameter, expert = where
    tensor = getattr(model.get_submodule(module), parameter).detach().double()
    return tensor if expert is None else tensor[expert]


def dense_csulora(
    displacement: torch.Tensor, update: torch.Tensor, energy: float, strength: float
) -> torch.Tensor:
    """METHOD.md §1-§3 computed densely with an exact SVD, as an independent reference."""
    u, s, vh = torch.linalg.svd(displacement)
    captured = torch.cumsum(s**2, 0) / (s**2).sum()
    k = int((captured < energy - 1e-12).sum()) + 1
    p = u[:, :k] @ u[:, :k].T
    q = vh[:k].T @ vh[:k]
    full = p @ update @ q
    off = (update - p @ update) - (update - p @ update) @ q
    partial = update - full - off
    total = update.square().sum()
    a_h = 1 / (1 + strength * partial.square().sum() / total)
    a_o = 1 / (1 + strength * off.square().sum() / total)
    return full + a_h * partial + a_o * off


_REPAIRS: dict[tuple[str, str, tuple[str, ...]], Path] = {}


def repaired(
    built: Built, tmp_path_factory: pytest.TempPathFactory, method: str, *extra: str
) -> Path:
    """The adapter `repair` writes (once per session for each case and options)."""
    key = (built.name, method, extra)
    if key not in _REPAIRS:
        out = tmp_path_factory.mktemp(f"{built.name}-{method}") / "out"
        code, _, output = run_cli(
            "repair",
            built.base,
            built.aligned,
            built.adapter,
            "-o",
            out,
            "--method",
            method,
            "--quiet",
            *extra,
        )
        assert code == 0, output
        _REPAIRS[key] = out
    return _REPAIRS[key]


def test_inspect_matches_peft_modules_ranks_scaling_and_update_norms(built: Built) -> None:
    code, output, _ = run_cli("inspect", built.adapter, "--json", "--strict")
    assert code == 0, output
    report = json.loads(output)
    expected = peft_updates(with_adapter(built, built.base, built.adapter))
    modules = {module["name"]: module for module in report["modules"]}
    assert report["adapter"]["module_count"] == len(expected)
    assert set(modules) == set(expected)
    for name, (delta, _, rank, scaling) in expected.items():
        module = modules[name]
        assert module["rank"] == rank, name
        assert module["scaling"] == pytest.approx(scaling, rel=1e-12), name
        assert module["update_norm"] == pytest.approx(float(delta.norm()), rel=1e-5), name
        assert tuple(module["shape"]) in (tuple(delta.shape), tuple(delta.shape)[::-1]), name
    assert report["warnings"] == []
    lora_bias = bool(built.architecture.lora.get("lora_bias"))
    assert report["adapter"]["lora_bias"] == lora_bias
    assert [bool(m["lora_bias"]) for m in report["modules"]] == [lora_bias] * len(modules)


def test_key_rules_map_each_saved_checkpoint_onto_the_models_own_names(built: Built) -> None:
    """io/keymap.py agrees with transformers: every saved key, converted, is a parameter name."""
    for path in (built.base, built.aligned):
        config = json.loads((path / "config.json").read_text())
        saved = load_file(path / "model.safetensors")
        names = WeightLayout.build("BASE", list(saved), config).names
        state = load_model(built, path).state_dict()
        assert names <= set(state)
        stored = {state[name].data_ptr() for name in names}
        tied = {name for name in set(state) - names if state[name].data_ptr() in stored}
        assert set(state) - names == tied
        assert bool(tied) == bool(config.get("tie_word_embeddings")), tied


@pytest.mark.parametrize("method", METHODS)
def test_every_method_writes_an_adapter_peft_loads_without_missing_or_unexpected_keys(
    built: Built, tmp_path_factory: pytest.TempPathFactory, method: str
) -> None:
    out = repaired(built, tmp_path_factory, method)
    with_adapter(built, built.aligned, out)
    original = load_file(built.adapter / "adapter_model.safetensors")
    written = load_file(out / "adapter_model.safetensors")
    assert list(written) == list(original)
    for key, tensor in original.items():
        assert (written[key].dtype, written[key].shape) == (tensor.dtype, tensor.shape), key
        if key.endswith(".bias"):
            assert torch.equal(written[key], tensor), key
    report = json.loads((out / "repair_report.json").read_text())
    assert "repaired" in {module["action"] for module in report["modules"]}


def test_each_module_and_expert_is_repaired_against_its_own_displacement(
    built: Built, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = repaired(built, tmp_path_factory, "csulora", "--output-rank", "exact")
    before = peft_updates(with_adapter(built, built.aligned, built.adapter))
    after = peft_updates(with_adapter(built, built.aligned, out))
    base, aligned = load_model(built, built.base), load_model(built, built.aligned)
    assert set(after) == set(before)
    for name, (update, where, _, _) in before.items():
        displacement = weight(aligned, where) - weight(base, where)
        expected = dense_csulora(displacement, update, energy=0.9, strength=1.0)
        scale = float(update.norm())
        assert torch.allclose(after[name][0], expected, atol=1e-5 * scale, rtol=0), name
    report = json.loads((out / "repair_report.json").read_text())
    biases = {m["name"] for m in report["modules"] if m["lora_bias"]}
    assert bool(biases) == bool(built.architecture.lora.get("lora_bias"))


def test_strength_zero_gives_the_original_factors_bit_for_bit(
    built: Built, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = repaired(built, tmp_path_factory, "csulora", "--strength", "0")
    assert (out / "adapter_model.safetensors").exists()
    original = load_file(built.adapter / "adapter_model.safetensors")
    written = load_file(out / "adapter_model.safetensors")
    assert list(written) == list(original)
    for key, tensor in original.items():
        assert torch.equal(written[key], tensor), key


def test_a_basis_like_the_adapter_measures_what_the_weights_measure(
    built: Built, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`basis --like` keys entries by the adapter's weight names on every layout; `check
    --basis` then agrees with `check` from the weights (a full basis: --energy 1)."""
    basis = tmp_path_factory.mktemp(f"{built.name}-basis") / "basis"
    code, _, output = run_cli(
        "basis", built.base, built.aligned, "-o", basis, "--like", built.adapter, "--energy", "1"
    )
    if any(m.expert is not None for m in load_adapter(LocalSource(built.adapter)).modules):
        assert code == 6 and "does not cover expert parameters" in output, output
        return
    assert code == 0, output
    checks = []
    for given in ((built.base, built.aligned), ("--basis", basis)):
        result = run_cli(
            "check", *map(str, given), str(built.adapter), "--json", "--energy", "1", "-q"
        )
        assert result.exit_code in (0, 12), result.stderr
        checks.append(json.loads(result.stdout)["modules"])
    assert [m["name"] for m in checks[0]] == [m["name"] for m in checks[1]]
    # A float32 basis moves a reversal by up to ~2.5e-4 absolute whatever its size (on an
    # AVX-512 CPU: gpt2's c_proj 0.08502 from the weights, 0.08512 from the basis; 2.5e-4 on
    # switch-transformers), so 1e-3 absolute beside 1e-4 relative. The fixtures' reversals
    # are 0.008 to 3 in size: a module read from another's entry fails unless the two
    # reversals agree within 1e-3.
    for direct, via in zip(*checks, strict=True):
        assert via["reversal"] == pytest.approx(direct["reversal"], rel=1e-4, abs=1e-3)


def test_one_and_three_workers_write_the_same_bytes(
    built: Built, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers read concurrently, and the experts of one fused parameter share a cached read
    of its factors: slowed down, the reads interleave, and the bytes must not change."""
    one = repaired(built, tmp_path_factory, "csulora", "--workers", "1")
    real_read = Checkpoint.read

    def slow_read(self: Checkpoint, key: str, **options: bool) -> torch.Tensor:
        if "lora_" in key:
            time.sleep(0.005)
        return real_read(self, key, **options)

    monkeypatch.setattr(Checkpoint, "read", slow_read)
    three = tmp_path_factory.mktemp(f"{built.name}-workers") / "out"
    code, _, output = run_cli(
        "repair", built.base, built.aligned, built.adapter, "-o", three, "--workers", "3", "-q"
    )
    assert code == 0, output
    weights = "adapter_model.safetensors"
    assert (three / weights).read_bytes() == (one / weights).read_bytes()


def test_generation_with_a_shared_prefix_answers_as_prompt_by_prompt(built: Built) -> None:
    """`generate_ids` runs a batch's shared prefix (a chat template's system turn) once and
    repeats its key/value cache: the greedy answers must be those of each prompt alone."""
    if built.architecture.model_class.__name__.startswith("SwitchTransformers"):
        pytest.skip("an encoder-decoder model: `eval` generates with causal LMs only")
    model = with_adapter(built, built.aligned, built.adapter)
    system = [5, 9, 14, 3, 22, 7, 31, 12]  # SHARED_PREFIX_MIN tokens; GPT-2 here has 16 positions
    prompts = [[*system, 40, 2], [*system, 11, 23, 35], [*system, 8], [*system, 27, 19]]
    generate = functools.partial(generate_ids, pad=0, stops=[], max_new_tokens=5)
    caches: list[object] = []

    def repeated(*args: object) -> object:
        caches.append(repeated_prefix(*args))
        return caches[-1]

    with torch.no_grad(), mock.patch("adapter_fix.evaluate.generate.repeated_prefix", repeated):
        together = generate(model, prompts, batch_size=4)
        alone = generate(model, prompts, batch_size=1)
    assert len(caches) == 1 and caches[0] is not None  # the batch of 4 shared its prefix
    assert together == alone
    assert all(len(answer) == 5 for answer in together)
