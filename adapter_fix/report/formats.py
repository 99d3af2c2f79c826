"""Every `--report` file, its format picked by the file's extension: the one dispatch.

`repair`, `check` and `eval` write the formats listed here; `basis` writes its
JSON document (`json_text`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapter_fix.errors import OutputError
from adapter_fix.report.check import check_markdown
from adapter_fix.report.eval import html_eval, markdown_eval
from adapter_fix.report.repair import html_report, markdown_report


def json_text(result: Any) -> str:
    """A result's versioned JSON document, as every command writes it."""
    return json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n"


FORMATS: dict[str, dict[str, Callable[[Any], str]]] = {
    "repair": {".json": json_text, ".md": markdown_report, ".html": html_report},
    "check": {".json": json_text, ".md": check_markdown},
    "eval": {".json": json_text, ".md": markdown_eval, ".html": html_eval},
}
"""Per command, its report formats by extension (lower case)."""


def format_names(command: str) -> str:
    """`.json, .md or .html`: the extensions `command`'s reports take, for messages."""
    names = list(FORMATS[command])
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def report_text(command: str, result: Any, path: Path) -> str:
    """`command`'s report for `path`, in the format its extension names."""
    render = FORMATS[command].get(path.suffix.lower())
    if render is None:
        raise OutputError(
            f"unknown report format {path.suffix!r}; use {format_names(command)}.", path=path
        )
    return render(result)
