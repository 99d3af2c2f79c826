"""Loading ALIGNED once with transformers and adapters onto it with peft.

Every input goes through `adapter_fix.io.locate.open_source`: a local folder
is read where it is, with `local_files_only=True`, so no request is ever made
for it; a Hub id is fetched file by file into the Hub cache (safetensors,
config, tokenizer and chat-template files only: pickles are refused, never
downloaded) and loaded from there. Remote code is never run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapter_fix.errors import (
    IncompatibleModelsError,
    OutOfMemoryError,
    SourceNotFoundError,
    UsageError,
)
from adapter_fix.hardware import BFLOAT16_CPU_FLAGS, cpu_flags
from adapter_fix.io.adapter import LoraAdapter, load_adapter
from adapter_fix.io.checkpoint import Checkpoint
from adapter_fix.io.sources import LocalSource, Source

INSTALL_LINE = "pip install 'adapter-fix[eval]'"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What from_pretrained reads besides weights: configs, tokenizers, chat templates.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def require_eval_extra() -> None:
    """Raise UsageError (exit 2) with the install line when transformers or peft is missing."""
    missing = []
    for module in ("transformers", "peft"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UsageError(
            f"`eval` runs the model and needs {' and '.join(missing)}, which are not installed. "
            f"Install the eval extra: {INSTALL_LINE}"
        )


def require_accelerate() -> None:
    """`--device-map auto` hands placement to accelerate: exit 2 with the install line without."""
    try:
        __import__("accelerate")
    except ImportError:
        raise UsageError(
            "--device-map auto places the model with accelerate, which is not installed. "
            "Install it (pip install accelerate), or use --device instead."
        ) from None


def check_placement(device: str, device_map: str | None) -> None:
    """A device map excludes --device; it needs accelerate (UsageError, exit 2)."""
    if device_map is None:
        return
    if device != "auto":
        raise UsageError(f"--device {device} and --device-map {device_map}: give one of them.")
    require_accelerate()


def resolve_device(device: str) -> torch.device:
    """auto: CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine.")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | str:
    """auto: float32 on CPU (fast and exact there), the checkpoint's own dtype on a GPU."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def dtype_warnings(
    device: str, dtype: str, cpuinfo: str | None = None, *, gradients: bool = False
) -> list[str]:
    """Warnings for a model run in bfloat16 on the CPU: on an x86 CPU whose flags
    (`cpuinfo`, read from `/proc/cpuinfo` when None) show no native bfloat16 arithmetic,
    its matrix products are emulated (7x float32's time for a 64-row product, one thread,
    on an AVX2 machine; nothing where the flags cannot be read); with `gradients` (a
    command that back-propagates through the model), on any CPU, it was no memory saving
    where measured (bench/README.md, "Session 20: what was tried and not kept")."""
    if dtype != "bfloat16" or resolve_device(device).type != "cpu":
        return []
    messages: list[str] = []
    flags = cpu_flags(cpuinfo)
    if flags is not None and not flags.intersection(BFLOAT16_CPU_FLAGS):
        messages.append(
            "--dtype bfloat16 on this CPU, which has no native bfloat16 arithmetic (no "
            f"{' or '.join(BFLOAT16_CPU_FLAGS)} among its flags): its matrix products are "
            "emulated, slower than float32's (7x for a batch of 64 rows, 1.5x for one, on an "
            "AVX2 machine); --dtype auto (float32 on the CPU) is likely faster here."
        )
    if gradients:
        messages.append(
            "--dtype bfloat16 on the CPU saves no memory in the gated repair: on a 135M model "
            "it peaked at 7.4 GB of resident memory against float32's 2.7 GB (measured on one "
            "CPU with native bfloat16; oneDNN's cache of bfloat16 primitives, it seems). "
            "Where memory is short, use --dtype auto (float32 on the CPU)."
        )
    return messages


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new work on `device`: CUDA's free memory, or Linux's MemAvailable
    (/proc/meminfo) on the CPU; None where neither can be read (then nothing is refused)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def local_folder(source: Source, files: Sequence[str]) -> Path:
    """A local folder holding `source`'s `files` (those it has): the folder itself, or the
    Hub cache snapshot they were fetched into."""
    if source.single_file is not None:
        raise UsageError(
            "eval needs a model folder (config, tokenizer and weights), not a single file.",
            path=source.identity,
        )
    if isinstance(source, LocalSource):
        return source.root
    fetched = [(name, source.fetch(name)) for name in files]
    # Top-level files of one Hub snapshot all lie in the snapshot's folder.
    folder = next((path.parent for name, path in fetched if path and "/" not in name), None)
    if folder is None:
        raise SourceNotFoundError("none of the model's files were found.", path=source.identity)
    return folder


@dataclass
class LoadedModel:
    """ALIGNED on its device, its tokenizer, and the adapters attached to it by name.

    device: where inputs go (with a device map: the input embeddings' device).
    device_map: "auto" when accelerate placed the layers, else None.
    """

    model: Any
    tokenizer: Any
    device: torch.device
    identity: str
    adapters: dict[str, str]  # peft adapter name -> source identity
    device_map: str | None = None

    @property
    def placement(self) -> str:
        """The device, or every device a device map uses ("auto: cuda:0, cuda:1")."""
        if self.device_map is None:
            return str(self.device)
        devices = dict.fromkeys(str(p.device) for p in self.model.parameters())
        return f"{self.device_map}: {', '.join(devices)}"

    @contextlib.contextmanager
    def variant(self, adapter_name: str | None) -> Iterator[Any]:
        """The model with one adapter active, or none (ALIGNED alone) for `None`."""
        if adapter_name is None:
            context = self.model.disable_adapter() if self.adapters else contextlib.nullcontext()
            with context:
                yield self.model
            return
        self.model.set_adapter(adapter_name)
        yield self.model


def model_folder(source: Source, role: str) -> Path:
    """The local folder of a transformers model: headers validated and pickles refused
    before anything else is fetched; config.json required."""
    checkpoint = Checkpoint.open(source, role)  # refuses pickles before any download
    weights = [name for name in source.list_files() if name.endswith(".safetensors")]
    folder = local_folder(source, [*MODEL_FILES, *weights])
    for shard in dict.fromkeys(checkpoint.weight_map.values()):
        checkpoint.header(shard)  # every header validated before transformers parses it
    if not (folder / "config.json").is_file():
        raise SourceNotFoundError(
            "no config.json: eval needs a transformers model folder.", path=source.identity
        )
    return folder


def load_tokenizer(folder: Path, source: Source) -> Any:
    """The tokenizer saved next to a model; SourceNotFoundError when absent or empty."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise SourceNotFoundError(
            f"no usable tokenizer ({_first_line(error)}). eval needs the tokenizer files "
            "(tokenizer.json, tokenizer_config.json) next to the model.",
            path=source.identity,
        ) from None
    if len(tokenizer) == 0:
        raise SourceNotFoundError(
            "the tokenizer loaded with an empty vocabulary (no tokenizer files next to the "
            "model?): prompts would encode to nothing. Add tokenizer.json / "
            "tokenizer_config.json.",
            path=source.identity,
        )
    return tokenizer


def load_model(
    source: Source, device: str = "auto", dtype: str = "auto", device_map: str | None = None
) -> LoadedModel:
    """Load ALIGNED (model + tokenizer) once, in eval mode, on `device` ("auto", "cpu", "cuda"),
    or placed by accelerate over every visible GPU (and the CPU) with `device_map="auto"`.

    Raises UsageError without the eval extra (or accelerate for a device map),
    UnsafeFormatError for pickle-only checkpoints, SourceNotFoundError without a
    config or tokenizer.
    """
    require_eval_extra()
    from transformers import AutoModelForCausalLM

    check_placement(device, device_map)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    folder = model_folder(source, "ALIGNED")
    tokenizer = load_tokenizer(folder, source)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch_dtype,
        local_files_only=True,
        use_safetensors=True,
        **({} if device_map is None else {"device_map": device_map}),
    )
    if device_map is None:
        model.to(target)
    else:
        target = model.get_input_embeddings().weight.device
    model.eval()
    return LoadedModel(model, tokenizer, target, source.identity, {}, device_map)


def attach_adapters(loaded: LoadedModel, sources: Sequence[Source]) -> list[str]:
    """Load each adapter onto the model with peft (the model itself is loaded once).

    Returns the peft adapter names, in order (`adapter_0`, `adapter_1`, ...).
    Each adapter is validated first (`adapter_fix.io.adapter.load_adapter`),
    so a broken one fails with its file and key before any generation.
    """
    from peft import PeftModel

    names = []
    for index, source in enumerate(sources):
        adapter = load_adapter(source)
        name = f"adapter_{index}"
        folder = adapter.config_path.parent
        try:
            if isinstance(loaded.model, PeftModel):
                loaded.model.load_adapter(folder, adapter_name=name, is_trainable=False)
            else:
                loaded.model = PeftModel.from_pretrained(
                    loaded.model, folder, adapter_name=name, is_trainable=False
                )
        except (RuntimeError, ValueError, KeyError) as error:
            raise _incompatible(adapter, error) from None
        loaded.adapters[name] = source.identity
        names.append(name)
    if loaded.device_map is None:  # with a device map, peft puts each layer by its base layer
        loaded.model.to(loaded.device)
    loaded.model.eval()
    return names


@contextlib.contextmanager
def batch_fits(batch_size: int, device: object, option: str = "--batch-size") -> Iterator[None]:
    """Turn an out-of-memory error inside the block into OutOfMemoryError (exit 13) naming
    `option`, the batch size to lower."""
    try:
        yield
    except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError too
        if not is_out_of_memory(error):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise OutOfMemoryError(
            f"a batch of {batch_size} prompts did not fit in memory on {device} "
            f"({_first_line(error)}). Lower {option} (now {batch_size}); --dtype bfloat16 "
            "also halves a float32 model's memory."
        ) from None


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or an allocator's out-of-memory RuntimeError (CPU, MPS)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text


def _incompatible(adapter: LoraAdapter, error: Exception) -> IncompatibleModelsError:
    if isinstance(error, KeyError):
        return IncompatibleModelsError(
            f"peft could not attach it to ALIGNED: no module {error}. Was it trained on "
            "another model?",
            path=adapter.source.identity,
        )
    return IncompatibleModelsError(
        f"peft could not attach it to ALIGNED ({_first_line(error)}). Was it trained on "
        "another model?",
        path=adapter.source.identity,
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
