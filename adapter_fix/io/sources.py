"""Where a model or adapter comes from: a local folder, a local file, or a Hub id.

A `Source` turns file names relative to the model's root (`config.json`,
`model-00001-of-00002.safetensors`) into local paths, fetching each one only
when it is asked for, so a Hub download brings only the index, the config and
the shards that hold tensors the run actually reads. Which source a spec names
(a local path or a Hub id) is io/locate.py's `open_source`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from adapter_fix.errors import SourceNotFoundError


@dataclass(frozen=True)
class HubOptions:
    """How Hub ids are resolved. Passed explicitly, never read from globals, so tests are offline.

    revision: branch, tag or commit (an `@revision` in the id wins over it).
    cache_dir: the Hub cache folder (default: huggingface_hub's).
    offline: use only what is already in the cache; never touch the network.
    endpoint: the Hub's URL (default: huggingface_hub's, or HF_ENDPOINT).
    token: an access token; None uses the usual Hub environment (HF_TOKEN, saved login).
    """

    revision: str | None = None
    cache_dir: Path | None = None
    offline: bool = False
    endpoint: str | None = None
    token: str | None = None


class Source(ABC):
    """A model or adapter whose files can be fetched one by one.

    `identity` says where it came from, for provenance: an absolute path, or
    `org/name@<commit sha>` for the Hub. `single_file` is set when the source
    is one weights file rather than a folder.
    """

    identity: str
    single_file: Path | None = None

    @abstractmethod
    def fetch(self, filename: str) -> Path | None:
        """Local path of `filename` (relative to the root), or None if the source lacks it."""

    @abstractmethod
    def list_files(self) -> list[str]:
        """Every file name in the source, relative to its root, sorted."""

    @property
    def local_paths(self) -> list[Path]:
        """Where this source lives on local disk: outputs may never overlap these."""
        return []

    def contains(self, path: Path) -> bool:
        """Whether a fetched file really belongs to this source (a link may point anywhere)."""
        return True

    def __str__(self) -> str:
        return self.identity


class LocalSource(Source):
    """A folder or a single file on local disk."""

    def __init__(self, path: Path) -> None:
        path = path.expanduser()
        if not path.exists():
            raise SourceNotFoundError(
                "no such file or folder. Give a local folder, a .safetensors file, or a "
                "Hub id such as org/name or org/name@revision.",
                path=path,
            )
        self.root = path.resolve()
        self.identity = str(self.root)
        if self.root.is_file():
            self.single_file = self.root

    @property
    def local_paths(self) -> list[Path]:
        return [self.root]

    def contains(self, path: Path) -> bool:
        """Whether `path`, links followed, stays in the folder (or, for a folder inside a Hub
        cache snapshot, in that repo's `blobs/`, where the snapshot's links point)."""
        resolved = path.resolve()
        allowed = [self.root]
        if self.root.parent.name == "snapshots":
            allowed.append(self.root.parent.parent / "blobs")
        return any(resolved.is_relative_to(folder) for folder in allowed)

    def fetch(self, filename: str) -> Path | None:
        if self.single_file is not None:
            return self.single_file if filename == self.single_file.name else None
        candidate = self.root / filename
        return candidate if candidate.is_file() else None

    def list_files(self) -> list[str]:
        if self.single_file is not None:
            return [self.single_file.name]
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())


def local_paths(sources: Sequence[Source]) -> list[Path]:
    """The inputs on local disk, which no output may overlap."""
    return [path for source in sources for path in source.local_paths]
