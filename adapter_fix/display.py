"""Strings from files, made safe to show on a terminal.

Module names, config values, paths and keys come from files an attacker may
have written. Shown raw they could carry ANSI escape sequences (recolour or
rewrite the terminal), bidirectional overrides (make `q_proj` read as
something else) or newlines (forge extra lines of output). `printable`
escapes every such character; callers then hand the result to rich as a
`Text`, never as markup, so `[/x]` stays `[/x]`.
"""

from __future__ import annotations

import unicodedata

# Control, format (bidi overrides, zero-width), surrogate, private-use, unassigned, separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def printable(value: object) -> str:
    """`str(value)` with every control or invisible character written as its escape (`\\x1b`)."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) in _UNSAFE_CATEGORIES
        else ch
        for ch in text
    )
