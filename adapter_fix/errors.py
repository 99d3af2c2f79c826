"""One exception family; each class carries the exit code the CLI returns for it.

Exit codes (documented in the README):

    0   success
    1   internal error (a bug: please report it)
    2   usage error (bad option or argument; click's own code)
    3   input not found (path, Hub repo, revision or file)
    4   unsafe format refused (pickle checkpoints: .bin, .pt, .pth)
    5   corrupt or invalid checkpoint (truncated file, bad header or index, missing tensor)
    6   invalid or unsupported adapter (config/tensor mismatch, DoRA, unknown PEFT type)
    7   models incompatible with each other or with the adapter (shapes, missing weights,
        ALIGNED equal to BASE)
    8   non-finite values (NaN or Inf) in a tensor that is read, or computed from finite ones
    9   output refused or failed (OUT is an input, exists without --force, write error)
    10  download failed (network, authentication, offline cache miss)
    11  `inspect --strict`: the adapter has warnings
    12  a gate failed: `eval --min-refusal/--max-over-refusal` (a row fell short), or
        `check` (a threshold exceeded)
    13  out of memory: a batch did not fit on the device (`--batch-size` of eval or the
        gated repair)
    130 interrupted (Ctrl-C): cleaned up, nothing written
    143 terminated (SIGTERM): cleaned up like Ctrl-C, nothing written

`EXIT_CODES` below is the same table for `--help` and the tests.
"""

from __future__ import annotations


class AdapterFixError(Exception):
    """Base of every error adapter-fix reports to the user (never with a traceback)."""

    exit_code = 1
    title = "error"

    def __init__(self, message: str, *, path: object = None, key: str | None = None) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.key = key
        super().__init__(self.render())

    def render(self) -> str:
        """One paragraph: what went wrong, where (file and key), and what to do."""
        where = []
        if self.path is not None:
            where.append(f"file {self.path}")
        if self.key is not None:
            where.append(f"key {self.key!r}")
        prefix = f"{', '.join(where)}: " if where else ""
        return f"{prefix}{self.message}"


class SourceNotFoundError(AdapterFixError):
    exit_code = 3
    title = "not found"


class UnsafeFormatError(AdapterFixError):
    exit_code = 4
    title = "unsafe format refused"


class CorruptCheckpointError(AdapterFixError):
    exit_code = 5
    title = "corrupt or invalid checkpoint"


class InvalidAdapterError(AdapterFixError):
    exit_code = 6
    title = "invalid or unsupported adapter"


class IncompatibleModelsError(AdapterFixError):
    exit_code = 7
    title = "incompatible inputs"


class NonFiniteError(AdapterFixError):
    exit_code = 8
    title = "non-finite values"


class OutputError(AdapterFixError):
    exit_code = 9
    title = "output refused"


class DownloadError(AdapterFixError):
    exit_code = 10
    title = "download failed"


class StrictWarningsError(AdapterFixError):
    exit_code = 11
    title = "warnings (--strict)"


class UsageError(AdapterFixError):
    """A bad argument found after parsing (a prompt file with no usable column, a missing extra)."""

    exit_code = 2
    title = "usage error"


class GateFailedError(AdapterFixError):
    exit_code = 12
    title = "gate failed"


class OutOfMemoryError(AdapterFixError):
    """A batch did not fit in the device's memory; the message names the option to lower."""

    exit_code = 13
    title = "out of memory"


# The documented exit codes, one short line each: --help prints them, a test checks the README.
EXIT_CODES: dict[int, str] = {
    0: "ok",
    1: "internal error (a bug)",
    2: "usage",
    3: "not found",
    4: "pickle refused",
    5: "corrupt checkpoint",
    6: "invalid/unsupported adapter",
    7: "incompatible inputs",
    8: "NaN/Inf",
    9: "output refused",
    10: "download failed",
    11: "warnings with --strict",
    12: "gate failed (eval, check)",
    13: "out of memory (lower --batch-size)",
    130: "interrupted (Ctrl-C)",
    143: "terminated (SIGTERM)",
}


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

CONVERT_HINT = (
    "adapter-fix never unpickles weights, because loading a pickle can run arbitrary code. "
    "Convert the checkpoint once, in an environment you trust, with "
    "`model.save_pretrained(folder, safe_serialization=True)` (transformers or peft), or "
    "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')`, "
    "then point adapter-fix at the .safetensors output."
)


def unsafe_format(path: object) -> UnsafeFormatError:
    """The error for a pickle-only input, with the conversion recipe."""
    return UnsafeFormatError(f"pickle checkpoint refused. {CONVERT_HINT}", path=path)
