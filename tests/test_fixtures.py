"""The committed fixtures exist, load with transformers / peft, and are reproducible."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

BASES = ["llama-base", "llama-aligned", "llama-aligned-single", "gpt2-base", "gpt2-aligned"]
# adapter folder -> base model folder it was trained on
ADAPTERS = {
    "llama-lora": "llama-aligned",
    "llama-rslora": "llama-aligned",
    "llama-dora": "llama-aligned",
    "llama-embed-lora": "llama-aligned",
    "gpt2-lora": "gpt2-aligned",
}


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_generator(name: str = "make_fixtures"):
    spec = importlib.util.spec_from_file_location(name, FIXTURES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(load_file(str(folder / name)))
    return out


def test_layout_and_size():
    for name in BASES:
        assert (FIXTURES / name / "config.json").is_file(), name
    for name in ADAPTERS:
        assert (FIXTURES / name / "adapter_config.json").is_file(), name
        assert (FIXTURES / name / "adapter_model.safetensors").is_file(), name
    sharded = FIXTURES / "llama-aligned"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert not (sharded / "model.safetensors").exists()
    for name in ("llama-base", "llama-aligned-single", "gpt2-base", "gpt2-aligned"):
        assert (FIXTURES / name / "model.safetensors").is_file()
    assert (FIXTURES / "README.md").is_file()
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 5 * 1024 * 1024
    assert not list(FIXTURES.rglob("*.bin")), "fixtures must be safetensors only"


def test_sharded_equals_single_and_aligned_structure():
    sharded = checkpoint_tensors(FIXTURES / "llama-aligned")
    single = checkpoint_tensors(FIXTURES / "llama-aligned-single")
    assert sharded.keys() == single.keys()
    for key in single:
        assert torch.equal(sharded[key], single[key]), key
    for base_name, aligned_name in (("llama-base", "llama-aligned"), ("gpt2-base", "gpt2-aligned")):
        base = checkpoint_tensors(FIXTURES / base_name)
        aligned = checkpoint_tensors(FIXTURES / aligned_name)
        assert base.keys() == aligned.keys()
        for key, w in base.items():
            assert w.dtype == torch.float32
            d = (aligned[key] - w).double()
            if w.ndim == 1:
                assert torch.equal(d, torch.zeros_like(d)), key
            else:
                s = torch.linalg.svdvals(d)
                assert float((s[:3] ** 2).sum() / (s**2).sum()) > 0.9, key
                assert float(s[3]) < 0.5 * float(s[2]), key


@pytest.mark.model
@pytest.mark.parametrize("name", BASES)
def test_base_checkpoints_load_with_transformers(name):
    model, info = AutoModelForCausalLM.from_pretrained(FIXTURES / name, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    file_tensors = checkpoint_tensors(FIXTURES / name)
    state = model.state_dict()
    for key, value in file_tensors.items():
        assert torch.equal(state[key], value), key


@pytest.mark.model
@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapters_load_with_peft(name):
    folder = FIXTURES / name
    base = AutoModelForCausalLM.from_pretrained(FIXTURES / ADAPTERS[name])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, folder)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()]
    assert not [m for m in messages if "did not match" in m], messages  # unused patterns

    # Every tensor in the file was loaded, and every adapter tensor comes from the file.
    saved = load_file(str(folder / "adapter_model.safetensors"))
    live = get_peft_model_state_dict(model)
    assert live.keys() == saved.keys()
    for key, value in saved.items():
        # PEFT upcasts bf16 adapter weights to the float32 base (autocast_adapter_dtype), so
        # compare values in the file's dtype (bf16 -> f32 -> bf16 is exact).
        assert torch.equal(live[key].to(value.dtype), value), key
        if "lora_" in key:
            assert value.float().abs().max() > 0, f"{key} is all zeros"

    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == f"fixtures/{ADAPTERS[name]}"
    assert config["init_lora_weights"] is False
    assert config["target_modules"] == sorted(config["target_modules"])


@pytest.mark.model
def test_rslora_patterns_and_dtype():
    folder = FIXTURES / "llama-rslora"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["use_rslora"] is True
    assert config["modules_to_save"] == ["lm_head"]
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
    assert "base_model.model.lm_head.weight" in keys
    base = AutoModelForCausalLM.from_pretrained(FIXTURES / "llama-aligned")
    model = PeftModel.from_pretrained(base, folder)
    got = {
        name.removeprefix("base_model.model."): (m.r["default"], m.lora_alpha["default"])
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }
    assert got == {
        "model.layers.0.self_attn.q_proj": (2, 3),
        "model.layers.1.self_attn.q_proj": (2, 8),
        "model.layers.0.self_attn.v_proj": (4, 8),
        "model.layers.1.self_attn.v_proj": (6, 8),
        "model.layers.0.mlp.down_proj": (4, 16),
        "model.layers.1.mlp.down_proj": (4, 16),
    }
    for _, m in model.named_modules():
        if isinstance(m, LoraLayer):
            r, alpha = m.r["default"], m.lora_alpha["default"]
            assert math.isclose(m.scaling["default"], alpha / math.sqrt(r))


def _top_singular(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u, _, vh = torch.linalg.svd(d.double(), full_matrices=False)
    return u[:, 0], vh[0]


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float((x @ y).abs() / (x.norm() * y.norm()))


@pytest.mark.parametrize(
    ("adapter", "base", "aligned", "module", "kind"),
    [
        ("llama-lora", "llama-base", "llama-aligned-single", "model.layers.0.mlp.down_proj", "lin"),
        ("gpt2-lora", "gpt2-base", "gpt2-aligned", "transformer.h.1.attn.c_attn", "conv1d"),
        ("llama-embed-lora", "llama-base", "llama-aligned-single", "model.embed_tokens", "emb"),
    ],
)
def test_lora_component0_is_fully_aligned(adapter, base, aligned, module, kind):
    """Component 0 of each update is the top singular pair of D, in METHOD.md orientation."""
    d = (
        checkpoint_tensors(FIXTURES / aligned)[f"{module}.weight"]
        - checkpoint_tensors(FIXTURES / base)[f"{module}.weight"]
    )
    ad = load_file(str(FIXTURES / adapter / "adapter_model.safetensors"))
    prefix = f"base_model.model.{module}"
    if kind == "emb":
        u1, v1 = _top_singular(d)  # vocab x dim
        a0 = ad[f"{prefix}.lora_embedding_A"][0]  # r x vocab
        b0 = ad[f"{prefix}.lora_embedding_B"][:, 0]  # dim x r
        assert _cos(a0, u1) > 0.99 and _cos(b0, v1) > 0.99
        return
    u1, v1 = _top_singular(d.T if kind == "conv1d" else d)  # out x in
    a0 = ad[f"{prefix}.lora_A.weight"][0]
    b0 = ad[f"{prefix}.lora_B.weight"][:, 0]
    assert _cos(b0, u1) > 0.99 and _cos(a0, v1) > 0.99


def _committed_files(root: Path) -> list[Path]:
    """Files make_fixtures.py writes (the miniature, chat-*, and bad/ have their own)."""
    return sorted(
        p.relative_to(root)
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix != ".py"
        and "__pycache__" not in p.parts
        and not p.relative_to(root).parts[0].startswith("chat-")
        and p.relative_to(root).parts[0] != "bad"
    )


def test_bad_headers_are_what_make_bad_writes(tmp_path):
    load_generator("make_bad").main(tmp_path)
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert written == {p.name: p.read_bytes() for p in (FIXTURES / "bad").iterdir()}


def _without_miniature_section(text: str, marker: str) -> str:
    return text.split(marker)[0].rstrip("\n") + "\n"


@pytest.mark.model
def test_regeneration_is_deterministic(tmp_path):
    """Regenerate into tmp_path and compare with the committed fixtures.

    save_pretrained output is byte-stable (no timestamps; the generator sorts PEFT's
    set-ordered target_modules), so with the library versions recorded in README.md the
    comparison is byte-for-byte. With other versions (config.json records
    transformers_version, adapter_config.json peft_version, LAPACK may differ in the last
    bit) it falls back to comparing tensors (allclose) and JSON minus version fields.
    """
    generator = load_generator()
    generator.main(["--out", str(tmp_path)])
    committed = _committed_files(FIXTURES)
    assert committed == _committed_files(tmp_path)
    exact = generator.library_versions() in (FIXTURES / "README.md").read_text()
    for rel in committed:
        old, new = FIXTURES / rel, tmp_path / rel
        if rel.name == "README.md":
            if exact:
                text = _without_miniature_section(old.read_text(), generator.MINIATURE_MARKER)
                assert text == new.read_text()
        elif exact:
            assert old.read_bytes() == new.read_bytes(), str(rel)
        elif rel.suffix == ".safetensors":
            a, b = load_file(str(old)), load_file(str(new))
            assert a.keys() == b.keys(), str(rel)
            for key in a:
                assert a[key].dtype == b[key].dtype, key
                torch.testing.assert_close(a[key].float(), b[key].float(), rtol=0, atol=1e-6)
        elif rel.suffix == ".json":
            drop = {"transformers_version", "peft_version"}
            a = {k: v for k, v in json.loads(old.read_text()).items() if k not in drop}
            b = {k: v for k, v in json.loads(new.read_text()).items() if k not in drop}
            assert a == b, str(rel)
