"""Synthetic Llama checkpoints for the benchmark, written in the real on-disk formats.

Writes three folders under OUT:

- `base/`: sharded safetensors (`model-0000i-of-0000n.safetensors`), the index
  `model.safetensors.index.json` and a Llama `config.json`, bf16;
- `aligned/`: the same keys, each linear weight displaced by `D = (U * s) @ V^T
  + noise` (rank 32, geometrically decaying spectrum, noise 1e-4 per entry);
  embeddings, norms and lm_head are copied from the base, so only the seven
  linear modules carry a safety signal;
- `adapter/`: `adapter_config.json` + `adapter_model.safetensors`, a PEFT LoRA
  on q,k,v,o,gate,up,down at r=16, lora_alpha=32.

Nothing is held whole: each safetensors header is computed from the shapes
first, then every tensor is generated a block of rows at a time and appended,
so memory stays at a few hundred MB whatever the model size. Every tensor is
seeded from its key alone, so `--layers 2` holds exactly the first two layers
of `--layers 8`. A finished folder carries `stamp.json`; a second run with the
same settings does nothing.

    python bench/make_checkpoints.py --preset llama-3-8b --layers 8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

GENERATOR_VERSION = 1
WORK = Path(__file__).resolve().parent / "_work"
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANK = 16
LORA_ALPHA = 32
WEIGHT_STD = 0.02
DISPLACEMENT_RANK = 32
# Spectrum s_i ~ 0.94^i: about 18 directions hold 90% of ||D||^2, the default --energy.
DISPLACEMENT_DECAY = 0.94
# Low-rank part's RMS per entry, relative to WEIGHT_STD: a chat model moves weights by a few %.
DISPLACEMENT_RELATIVE = 0.05
NOISE_STD = 1e-4
ROW_BLOCK_ELEMENTS = 1 << 25  # 32 Mi floats (128 MB float32) per generated block


@dataclass(frozen=True)
class Preset:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS = {
    "llama-3-8b": Preset(4096, 14336, 32, 8, 32, 128256),
    "llama-3.2-1b": Preset(2048, 8192, 32, 8, 16, 128256, tie_embeddings=True),
    "tiny": Preset(64, 176, 4, 2, 8, 512),
}


@dataclass(frozen=True)
class TensorSpec:
    key: str
    shape: tuple[int, int] | tuple[int]
    role: str  # "embed", "norm", "linear", "lm_head"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * 2  # bf16


def model_tensors(preset: Preset, layers: int) -> list[TensorSpec]:
    """Every tensor of a Llama checkpoint with `layers` layers, in Hugging Face's order."""
    hidden, kv = preset.hidden, preset.kv_heads * preset.head_dim
    specs = [TensorSpec("model.embed_tokens.weight", (preset.vocab, hidden), "embed")]
    for i in range(layers):
        prefix = f"model.layers.{i}"
        specs += [
            TensorSpec(f"{prefix}.input_layernorm.weight", (hidden,), "norm"),
            TensorSpec(f"{prefix}.self_attn.q_proj.weight", (hidden, hidden), "linear"),
            TensorSpec(f"{prefix}.self_attn.k_proj.weight", (kv, hidden), "linear"),
            TensorSpec(f"{prefix}.self_attn.v_proj.weight", (kv, hidden), "linear"),
            TensorSpec(f"{prefix}.self_attn.o_proj.weight", (hidden, hidden), "linear"),
            TensorSpec(f"{prefix}.post_attention_layernorm.weight", (hidden,), "norm"),
            TensorSpec(f"{prefix}.mlp.gate_proj.weight", (preset.intermediate, hidden), "linear"),
            TensorSpec(f"{prefix}.mlp.up_proj.weight", (preset.intermediate, hidden), "linear"),
            TensorSpec(f"{prefix}.mlp.down_proj.weight", (hidden, preset.intermediate), "linear"),
        ]
    specs.append(TensorSpec("model.norm.weight", (hidden,), "norm"))
    if not preset.tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", (preset.vocab, hidden), "lm_head"))
    return specs


def adapter_tensors(preset: Preset, layers: int) -> list[TensorSpec]:
    """lora_A (`r x in`) and lora_B (`out x r`) for every linear module, PEFT's key names."""
    specs = []
    for spec in model_tensors(preset, layers):
        if spec.role != "linear":
            continue
        module = spec.key.removesuffix(".weight")
        out_features, in_features = spec.shape
        specs.append(
            TensorSpec(f"base_model.model.{module}.lora_A.weight", (LORA_RANK, in_features), "A")
        )
        specs.append(
            TensorSpec(f"base_model.model.{module}.lora_B.weight", (out_features, LORA_RANK), "B")
        )
    return specs


def _generator(seed: int, key: str, salt: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{salt}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _row_blocks(rows: int, cols: int) -> Iterator[slice]:
    step = max(1, ROW_BLOCK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def base_blocks(spec: TensorSpec, seed: int) -> Iterator[torch.Tensor]:
    """The base tensor, float32, a block of rows at a time."""
    generator = _generator(seed, spec.key, "base")
    if spec.role == "norm":
        yield 1.0 + 0.05 * torch.randn(spec.shape, generator=generator)
        return
    rows, cols = spec.shape
    for block in _row_blocks(rows, cols):
        values = torch.randn(block.stop - block.start, cols, generator=generator)
        yield values.mul_(WEIGHT_STD)


def displacement_factors(spec: TensorSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(U * s, V)` of the low-rank part of `D`, `m x 32` and `n x 32`."""
    rows, cols = spec.shape
    generator = _generator(seed, spec.key, "displacement")
    left = torch.randn(rows, DISPLACEMENT_RANK, generator=generator) / math.sqrt(rows)
    right = torch.randn(cols, DISPLACEMENT_RANK, generator=generator) / math.sqrt(cols)
    decay = DISPLACEMENT_DECAY ** torch.arange(DISPLACEMENT_RANK, dtype=torch.float32)
    # Scale so the low-rank part's RMS per entry is DISPLACEMENT_RELATIVE * WEIGHT_STD.
    target_norm = DISPLACEMENT_RELATIVE * WEIGHT_STD * math.sqrt(rows * cols)
    spectrum = decay * (target_norm / float(torch.linalg.vector_norm(decay)))
    return left * spectrum, right


def aligned_blocks(spec: TensorSpec, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`(W_b block, W_a block)`: the aligned weight is the base plus `D` on linear modules."""
    if spec.role != "linear":
        for block in base_blocks(spec, seed):
            yield block, block
        return
    left, right = displacement_factors(spec, seed)
    noise = _generator(seed, spec.key, "noise")
    rows, cols = spec.shape
    for block, base in zip(_row_blocks(rows, cols), base_blocks(spec, seed), strict=True):
        aligned = torch.randn(base.shape, generator=noise).mul_(NOISE_STD)
        aligned.addmm_(left[block], right.T).add_(base)
        yield base, aligned


def adapter_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    """A trained-looking LoRA factor: A ~ N(0, 1/in), B ~ N(0, 0.01^2)."""
    generator = _generator(seed, spec.key, "adapter")
    values = torch.randn(spec.shape, generator=generator)
    return values.mul_(1 / math.sqrt(spec.shape[1]) if spec.role == "A" else 0.01)


class SafetensorsStream:
    """A safetensors file whose header is known up front and whose data is appended in order."""

    def __init__(self, path: Path, specs: list[TensorSpec]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in specs:
            header[spec.key] = {
                "dtype": "BF16",
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.path, self.expected, self.written = path, offset, 0
        self.handle = path.open("wb")
        self.handle.write(len(encoded).to_bytes(8, "little"))
        self.handle.write(encoded)

    def append(self, block: torch.Tensor) -> None:
        data = block.to(torch.bfloat16).contiguous().view(-1).view(torch.uint8)
        self.handle.write(data.numpy().data)
        self.written += data.numel()

    def close(self) -> None:
        self.handle.close()
        if self.written != self.expected:
            raise RuntimeError(f"{self.path}: wrote {self.written} bytes, expected {self.expected}")


def plan_shards(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy shards of at most `shard_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def llama_config(preset: Preset, layers: int) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "head_dim": preset.head_dim,
        "hidden_act": "silu",
        "hidden_size": preset.hidden,
        "initializer_range": 0.02,
        "intermediate_size": preset.intermediate,
        "max_position_embeddings": 8192,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": preset.heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": preset.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "tie_word_embeddings": preset.tie_embeddings,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": preset.vocab,
    }


def adapter_config(base_name: str) -> dict[str, object]:
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": base_name,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": LORA_RANK,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(LINEAR_MODULES),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def write_models(
    preset: Preset, layers: int, seed: int, base_dir: Path, aligned_dir: Path, shard_bytes: int
) -> None:
    """Write base and aligned together: each base block is generated once and used for both."""
    specs = model_tensors(preset, layers)
    shards = plan_shards(specs, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for folder in (base_dir, aligned_dir):
        folder.mkdir(parents=True)
        index = {
            "metadata": {"total_size": sum(spec.nbytes for spec in specs)},
            "weight_map": {
                spec.key: name for name, shard in zip(names, shards, strict=True) for spec in shard
            },
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (folder / "config.json").write_text(json.dumps(llama_config(preset, layers), indent=2))
    for name, shard in zip(names, shards, strict=True):
        base_file = SafetensorsStream(base_dir / name, shard)
        aligned_file = SafetensorsStream(aligned_dir / name, shard)
        for spec in shard:
            for base, aligned in aligned_blocks(spec, seed):
                base_file.append(base)
                aligned_file.append(aligned)
        base_file.close()
        aligned_file.close()


def write_adapter(preset: Preset, layers: int, seed: int, folder: Path, base_name: str) -> None:
    folder.mkdir(parents=True)
    specs = adapter_tensors(preset, layers)
    stream = SafetensorsStream(folder / "adapter_model.safetensors", specs)
    for spec in specs:
        stream.append(adapter_tensor(spec, seed))
    stream.close()
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config(base_name), indent=2))


def make_checkpoints(
    preset_name: str,
    layers: int | None = None,
    out: Path | None = None,
    *,
    seed: int = 0,
    shard_bytes: int = 2 << 30,
    quiet: bool = False,
) -> Path:
    """Write (or find, by its stamp) base/, aligned/ and adapter/ under `out`; return `out`."""
    preset = PRESETS[preset_name]
    layers = preset.layers if layers is None else layers
    if not 1 <= layers <= preset.layers:
        raise ValueError(f"{preset_name} has 1 to {preset.layers} layers, not {layers}")
    out = out if out is not None else WORK / f"{preset_name}-L{layers}"
    stamp = {
        "generator_version": GENERATOR_VERSION,
        "preset": preset_name,
        "shapes": asdict(preset),
        "layers": layers,
        "seed": seed,
        "shard_bytes": shard_bytes,
        "lora": {"r": LORA_RANK, "lora_alpha": LORA_ALPHA},
    }
    stamp_path = out / "stamp.json"
    if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        return out
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    write_models(preset, layers, seed, out / "base", out / "aligned", shard_bytes)
    write_adapter(preset, layers, seed, out / "adapter", f"synthetic/{preset_name}-aligned")
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    if not quiet:
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(
            f"wrote {out} ({size / 1e9:.2f} GB) in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-3-8b")
    parser.add_argument("--layers", type=int, help="Build the first N layers only.")
    parser.add_argument("--out", type=Path, help="Default: bench/_work/PRESET-LN.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=2.0, help="Largest shard, GiB.")
    args = parser.parse_args()
    out = make_checkpoints(
        args.preset, args.layers, args.out, seed=args.seed, shard_bytes=int(args.shard_gb * 2**30)
    )
    print(out)


if __name__ == "__main__":
    main()
