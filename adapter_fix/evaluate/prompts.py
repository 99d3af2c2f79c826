"""Prompt sets as data: files with a documented schema, read into `PromptSet`s.

A prompt set is a local file or a file in a Hub dataset repo
(`hf://datasets/org/name[@revision]/path/in/repo.csv`, fetched through
`adapter_fix.io.hub` like every other input):

- `.txt`: one prompt a line; blank lines are skipped.
- `.jsonl`: one JSON object (or string) a line.
- `.json`: a list of objects (or strings).
- `.csv`: a header row, then one prompt a row.

Columns are recognised by name, first match wins (`--field` names the prompt
column instead):

- prompt: `prompt`, `goal` (AdvBench), `Goal` (JailbreakBench), `Behavior`
  (HarmBench), `behavior`, `instruction`, `question`;
- reference answer (task sets): `reference`, `answer`, `response`, `output`;
- category: `category`, `Category` (JailbreakBench), `SemanticCategory`
  (HarmBench), `type` (XSTest).

XSTest mixes safe prompts with unsafe "contrast" prompts; a benign set keeps
only its safe ones (`label` is `safe`, or `type` does not start with
`contrast_`), so over-refusal is measured on safe requests alone.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from adapter_fix.errors import SourceNotFoundError, UsageError
from adapter_fix.io.sources import HubOptions

Role = Literal["harmful", "benign", "task"]

PROMPT_FIELDS = ("prompt", "goal", "Goal", "Behavior", "behavior", "instruction", "question")
REFERENCE_FIELDS = ("reference", "answer", "response", "output")
CATEGORY_FIELDS = ("category", "Category", "SemanticCategory", "type")
SUFFIXES = (".txt", ".jsonl", ".json", ".csv")
DEFAULT_SETS = {"harmful": "harmful.jsonl", "benign": "benign.jsonl"}
HUB_DATASET = re.compile(
    r"^hf://datasets/(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<revision>[\w.\-]+))?"
    r"/(?P<path>.+)$"
)
MAX_PROMPT_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Prompt:
    """One request: its text, an optional reference answer and category, its row in the file."""

    text: str
    reference: str | None = None
    category: str | None = None
    row: int = 0


@dataclass(frozen=True)
class PromptSet:
    """Prompts read from one file; `origin` names the file (or Hub file) for reports."""

    name: str
    origin: str
    prompts: tuple[Prompt, ...]
    dropped: int = 0  # rows left out (XSTest's unsafe contrast prompts in a benign set)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def texts(self) -> list[str]:
        return [prompt.text for prompt in self.prompts]

    @property
    def references(self) -> list[str] | None:
        """Every prompt's reference, or None unless all prompts have one."""
        references = [prompt.reference for prompt in self.prompts]
        if not references or any(reference is None for reference in references):
            return None
        return [reference for reference in references if reference is not None]

    def limited(self, limit: int | None) -> PromptSet:
        """`limit` prompts spread evenly over the file, in file order (all when None).

        Files are often grouped by category; evenly spaced rows keep every
        category represented where the first rows would hold only the first.
        """
        if limit is None or limit >= len(self.prompts):
            return self
        total = len(self.prompts)
        chosen = tuple(self.prompts[index * total // limit] for index in range(limit))
        return PromptSet(self.name, self.origin, chosen, self.dropped)


def default_prompt_set(role: Literal["harmful", "benign"]) -> PromptSet:
    """The set shipped in adapter_fix/evaluate/data/ (see its README)."""
    data = resources.files("adapter_fix.evaluate").joinpath("data", DEFAULT_SETS[role])
    text = data.read_text(encoding="utf-8")
    origin = f"adapter-fix:{DEFAULT_SETS[role]}"
    return parse_prompts(text, ".jsonl", role=role, origin=origin, field=None)


def load_prompt_set(
    spec: str, role: Role, *, field: str | None = None, hub: HubOptions | None = None
) -> PromptSet:
    """Read the prompt set at `spec`: a local file, or `hf://datasets/org/name[@rev]/path`.

    A local path never touches the network. Raises SourceNotFoundError (exit
    3) when the file does not exist, UsageError (exit 2) when it holds no
    usable prompts.
    """
    path = _local_or_hub(spec, hub or HubOptions())
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(
            f"unknown prompt file type {path.suffix!r}; use .txt (one prompt a line), .jsonl, "
            ".json or .csv.",
            path=spec,
        )
    try:
        if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
            raise UsageError("the prompt file is larger than 256 MB.", path=spec)
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError("the prompt file is not UTF-8 text.", path=spec) from None
    except OSError as error:
        raise SourceNotFoundError(f"cannot read it ({error.strerror}).", path=spec) from None
    return parse_prompts(text, suffix, role=role, origin=spec, field=field)


def prompt_set(
    spec: str | None,
    role: Literal["harmful", "benign"],
    *,
    field: str | None = None,
    hub: HubOptions | None = None,
) -> PromptSet:
    """The set the user gave for `role` (`load_prompt_set`), else the shipped one. eval and
    the gated repair read their harmful and benign prompts through this one loader."""
    if spec is None:
        return default_prompt_set(role)
    return load_prompt_set(spec, role, field=field, hub=hub)


def _local_or_hub(spec: str, hub: HubOptions) -> Path:
    match = HUB_DATASET.match(spec)
    if match is None:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SourceNotFoundError(
                "no such prompt file. Give a .txt, .jsonl, .json or .csv file, or a Hub "
                "dataset file as hf://datasets/org/name[@revision]/path/in/repo.csv.",
                path=spec,
            )
        return path
    from adapter_fix.io.hub import HubSource

    source = HubSource(match["repo"], match["revision"] or hub.revision, hub, repo_type="dataset")
    fetched = source.fetch(match["path"])
    if fetched is None:
        raise SourceNotFoundError(
            f"no file {match['path']!r} in the Hub dataset {source.requested}.", path=spec
        )
    return fetched


def parse_prompts(
    text: str, suffix: str, *, role: Role, origin: str, field: str | None
) -> PromptSet:
    """Parse a prompt file's text; `suffix` (.txt, .jsonl, .json, .csv) says how."""
    if suffix == ".txt":
        rows: list[Mapping[str, Any]] = [
            {"prompt": line.strip()} for line in text.splitlines() if line.strip()
        ]
        if field is not None:
            raise UsageError("--field applies to .jsonl, .json and .csv files.", path=origin)
    elif suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
    elif suffix == ".jsonl":
        rows = [
            _record(json_line(line, number, origin), number, origin)
            for number, line in enumerate(text.splitlines(), 1)
            if line.strip()
        ]
    else:
        rows = _json_rows(text, origin)
    return _prompt_set(rows, role=role, origin=origin, field=field)


def json_line(line: str, number: int, origin: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise UsageError(f"line {number} is not JSON ({error.msg}).", path=origin) from None


def _json_rows(text: str, origin: str) -> list[Mapping[str, Any]]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"not JSON ({error.msg} at line {error.lineno}).", path=origin) from None
    if not isinstance(document, list):
        raise UsageError("a .json prompt file holds a list of objects or strings.", path=origin)
    return [_record(item, number, origin) for number, item in enumerate(document, 1)]


def _record(item: Any, number: int, origin: str) -> Mapping[str, Any]:
    if isinstance(item, str):
        return {"prompt": item}
    if isinstance(item, dict):
        return item
    raise UsageError(f"record {number} is neither an object nor a string.", path=origin)


def _first_field(columns: Iterable[str], candidates: Sequence[str]) -> str | None:
    present = set(columns)
    return next((name for name in candidates if name in present), None)


def _prompt_set(
    rows: list[Mapping[str, Any]], *, role: Role, origin: str, field: str | None
) -> PromptSet:
    if not rows:
        raise UsageError("the file holds no prompts.", path=origin)
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    prompt_field = field or _first_field(columns, PROMPT_FIELDS)
    if prompt_field is None or (field is not None and field not in columns):
        shown = ", ".join(repr(name) for name in list(columns)[:12]) or "none"
        wanted = (
            f"column {field!r} (--field)"
            if field
            else "prompt column (" + ", ".join(PROMPT_FIELDS) + ")"
        )
        raise UsageError(
            f"no {wanted} in this file; its columns are {shown}. Name the prompt column "
            "with --field.",
            path=origin,
        )
    reference_field = _first_field(columns, REFERENCE_FIELDS) if role == "task" else None
    category_field = _first_field(columns, CATEGORY_FIELDS)
    prompts: list[Prompt] = []
    dropped = 0
    for number, row in enumerate(rows, 1):
        if role == "benign" and _is_xstest_unsafe(row):
            dropped += 1
            continue
        value = row.get(prompt_field)
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"row {number} has no text in column {prompt_field!r}.", path=origin)
        prompts.append(
            Prompt(
                text=value.strip(),
                reference=_text(row.get(reference_field)) if reference_field else None,
                category=_text(row.get(category_field)) if category_field else None,
                row=number,
            )
        )
    if not prompts:
        raise UsageError(
            f"the file holds no prompts ({dropped} unsafe rows left out).", path=origin
        )
    return PromptSet(role, origin, tuple(prompts), dropped)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _is_xstest_unsafe(row: Mapping[str, Any]) -> bool:
    label = row.get("label")
    if isinstance(label, str) and label:
        return label.strip().lower() == "unsafe"
    kind = row.get("type")
    return isinstance(kind, str) and kind.startswith("contrast_")
