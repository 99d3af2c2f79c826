"""Which source a spec names: a local path if one exists there, else a Hub id.

Sits above io/sources.py (the local kind) and io/hub.py (the Hub kind, which
imports huggingface_hub, so only when a Hub id is opened): neither imports
the other's way back.
"""

from __future__ import annotations

import re
from pathlib import Path

from adapter_fix.io.sources import HubOptions, LocalSource, Source

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<revision>[\w.\-/]+))?$")


def _looks_local(spec: str) -> bool:
    """A mistyped local path, not a Hub id: it starts like a path (`./`, `/`, `~`), or its
    `org` part is a local folder (`fixtures/llama-lorra` when `fixtures/` exists)."""
    return spec.startswith((".", "/", "~")) or Path(spec.split("/", 1)[0]).expanduser().is_dir()


def open_source(spec: str, options: HubOptions | None = None) -> Source:
    """A local path if one exists at `spec`, else a Hub id `org/name[@revision]`."""
    options = options or HubOptions()
    path = Path(spec).expanduser()
    match = HUB_ID.match(spec)
    if path.exists() or match is None or _looks_local(spec):
        return LocalSource(path)
    from adapter_fix.io.hub import HubSource

    return HubSource(match["repo"], match["revision"] or options.revision, options)
