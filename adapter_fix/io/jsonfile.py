"""Parsing JSON from untrusted files: strict, shallow, never a crash.

Python's `json` accepts `NaN` and `Infinity`, keeps the last of duplicate
keys, and raises RecursionError on deeply nested input. Files adapter-fix
reads (safetensors headers, indexes, adapter configs) are JSON in the strict
sense: none of these, and never nested deeper than `MAX_DEPTH`.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32


class JsonError(ValueError):
    """Not strict, shallow JSON; the message says why."""


def _reject_constant(name: str) -> Any:
    raise JsonError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise JsonError(f"{text} is out of the range of a float")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise JsonError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def depth(value: Any) -> int:
    """How deeply `value` nests lists and objects (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((child, level + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, level + 1) for child in item)
    return deepest


def parse_json(text: str | bytes) -> Any:
    """`json.loads`, strict: JsonError on bad JSON, NaN/Infinity, duplicate keys, deep nesting."""
    try:
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except RecursionError:
        raise JsonError(f"nested deeper than {MAX_DEPTH} levels") from None
    except JsonError:
        raise
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit integer
        raise JsonError(f"not valid JSON ({error})") from None
    if depth(value) > MAX_DEPTH:
        raise JsonError(f"nested deeper than {MAX_DEPTH} levels")
    return value
