"""Regular expressions from untrusted configs, matched in linear time.

PEFT matches `target_modules` (a string) with `re.fullmatch` and
`rank_pattern` / `alpha_pattern` keys with `re.match(r"(.*\\.)?(KEY)$")`.
Python's `re` backtracks: `(.*.*)*X` takes exponential time on a 30-character
module name, and an adapter is untrusted input (a CI gate inspects adapters
from anyone). So adapter-fix parses the pattern with Python's own parser and
runs it as a Thompson NFA: time `O(len(name) * states)`, whatever the pattern.

Supported: everything whose match/no-match answer does not need
backtracking: literals, `.`, classes (`[a-z]`, `\\d`, `\\w`, `\\s` and
negations), groups, alternation, every repeat (greedy or lazy, `{m,n}`),
`^`, `$`, `\\A`, `\\Z`, `\\b`, `\\B`. Refused (exit 6, naming the construct):
lookarounds, backreferences, conditionals, atomic groups, possessive repeats,
inline flags, and patterns longer than MAX_PATTERN characters or larger than
MAX_STATES NFA states once repeats are expanded.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

try:  # Python >= 3.11
    from re import _constants as sre_constants  # type: ignore[attr-defined]
    from re import _parser as sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

MAX_PATTERN = 1000
MAX_STATES = 5000

C = sre_constants
CharTest = Callable[[str], bool]


class UnsafePatternError(ValueError):
    """A pattern adapter-fix will not evaluate; the message names the construct."""


@dataclass(eq=False)
class _State:
    """One NFA state: consumes a character (`test`), checks a position (`anchor`), or splits."""

    test: CharTest | None = None
    anchor: str | None = None
    out: list[_State] = field(default_factory=list)
    accept: bool = False


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


CATEGORIES: dict[object, CharTest] = {
    C.CATEGORY_DIGIT: str.isdecimal,
    C.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    C.CATEGORY_SPACE: str.isspace,
    C.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
    C.CATEGORY_WORD: _is_word,
    C.CATEGORY_NOT_WORD: lambda ch: not _is_word(ch),
}
ANCHORS = {
    C.AT_BEGINNING: "begin",
    C.AT_BEGINNING_STRING: "begin",
    C.AT_END: "end",
    C.AT_END_STRING: "end_string",
    C.AT_BOUNDARY: "boundary",
    C.AT_NON_BOUNDARY: "non_boundary",
}
REFUSED = {
    C.ASSERT: "a lookahead/lookbehind",
    C.ASSERT_NOT: "a negative lookahead/lookbehind",
    C.GROUPREF: "a backreference",
    C.GROUPREF_EXISTS: "a conditional group",
    getattr(C, "ATOMIC_GROUP", "ATOMIC_GROUP"): "an atomic group",
    getattr(C, "POSSESSIVE_REPEAT", "POSSESSIVE_REPEAT"): "a possessive repeat",
}


def _equals(code: int) -> CharTest:
    char = chr(code)
    return lambda ch: ch == char


def _differs(code: int) -> CharTest:
    char = chr(code)
    return lambda ch: ch != char


def _in_range(low: int, high: int) -> CharTest:
    return lambda ch: low <= ord(ch) <= high


def _class_test(items: list[tuple[object, object]]) -> CharTest:
    negate = bool(items) and items[0][0] is C.NEGATE
    tests: list[CharTest] = []
    for op, av in items[1:] if negate else items:
        if op is C.LITERAL:
            tests.append(_equals(av))  # type: ignore[arg-type]
        elif op is C.RANGE:
            tests.append(_in_range(*av))  # type: ignore[misc]
        elif op is C.CATEGORY:
            tests.append(CATEGORIES[av])
        else:
            raise UnsafePatternError(f"the character class item {op} is not supported")
    return lambda ch: any(test(ch) for test in tests) != negate


class _Builder:
    """Thompson's construction over Python's parse tree; counts states against MAX_STATES."""

    def __init__(self) -> None:
        self.states = 0

    def state(self, **kwargs: object) -> _State:
        self.states += 1
        if self.states > MAX_STATES:
            raise UnsafePatternError(f"it expands to more than {MAX_STATES} states")
        return _State(**kwargs)  # type: ignore[arg-type]

    def sequence(self, items: list[tuple[object, object]], then: _State) -> _State:
        """The start state of `items` followed by `then` (built back to front)."""
        for op, av in reversed(items):
            then = self.item(op, av, then)
        return then

    def item(self, op: object, av: object, then: _State) -> _State:
        if op in REFUSED:
            raise UnsafePatternError(f"it uses {REFUSED[op]}")
        if op is C.LITERAL:
            return self.state(test=_equals(av), out=[then])  # type: ignore[arg-type]
        if op is C.NOT_LITERAL:
            return self.state(test=_differs(av), out=[then])  # type: ignore[arg-type]
        if op is C.ANY:
            return self.state(test=lambda ch: ch != "\n", out=[then])
        if op is C.IN:
            return self.state(test=_class_test(av), out=[then])  # type: ignore[arg-type]
        if op is C.AT:
            return self.state(anchor=ANCHORS[av], out=[then])
        if op is C.BRANCH:
            _, branches = av  # type: ignore[misc]
            starts = [self.sequence(list(branch), then) for branch in branches]
            return self.state(out=starts)
        if op is C.SUBPATTERN:
            _, add_flags, del_flags, pattern = av  # type: ignore[misc]
            if add_flags or del_flags:
                raise UnsafePatternError("it sets inline flags")
            return self.sequence(list(pattern), then)
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            low, high, pattern = av  # type: ignore[misc]
            return self.repeat(list(pattern), low, high, then)
        raise UnsafePatternError(f"it uses {op}, which is not supported")

    def repeat(
        self, items: list[tuple[object, object]], low: int, high: int, then: _State
    ) -> _State:
        if high == C.MAXREPEAT:
            loop = self.state()
            loop.out = [self.sequence(items, loop), then]
            start = loop
        else:
            start = then
            for _ in range(high - low):
                optional = self.state()
                optional.out = [self.sequence(items, start), then]
                start = optional
        for _ in range(low):
            start = self.sequence(items, start)
        return start


@dataclass(frozen=True)
class SafePattern:
    """A compiled pattern; `fullmatch(text)` answers as `re.fullmatch` would, in linear time."""

    pattern: str
    start: _State

    def fullmatch(self, text: str) -> bool:
        current = _closure([self.start], text, 0)
        for position, ch in enumerate(text):
            moved = [
                target for s in current if s.test is not None and s.test(ch) for target in s.out
            ]
            if not moved:
                return False
            current = _closure(moved, text, position + 1)
        return any(s.accept for s in current)


def _anchor_holds(anchor: str, text: str, position: int) -> bool:
    if anchor == "begin":
        return position == 0
    if anchor == "end":
        return position == len(text) or (position == len(text) - 1 and text[-1] == "\n")
    if anchor == "end_string":
        return position == len(text)
    before = position > 0 and _is_word(text[position - 1])
    after = position < len(text) and _is_word(text[position])
    return (before != after) == (anchor == "boundary")


def _closure(states: list[_State], text: str, position: int) -> list[_State]:
    """Every state reachable from `states` without consuming a character, at `position`."""
    seen: set[int] = set()
    result: list[_State] = []
    stack = list(reversed(states))
    while stack:
        state = stack.pop()
        if id(state) in seen:
            continue
        seen.add(id(state))
        if state.anchor is not None:
            if _anchor_holds(state.anchor, text, position):
                stack.extend(reversed(state.out))
        elif state.test is not None or state.accept:
            result.append(state)
        else:
            stack.extend(reversed(state.out))
    return result


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> SafePattern:
    """Parse `pattern` (Python syntax) into a linear-time matcher.

    Raises `re.error` for an invalid pattern and `UnsafePatternError` for one
    outside the supported subset (see the module doc).
    """
    if len(pattern) > MAX_PATTERN:
        raise UnsafePatternError(f"it is longer than {MAX_PATTERN} characters")
    try:
        parsed = sre_parse.parse(pattern)
        if parsed.state.flags & ~re.UNICODE:
            raise UnsafePatternError("it sets inline flags")
        builder = _Builder()
        return SafePattern(pattern, builder.sequence(list(parsed), builder.state(accept=True)))
    except RecursionError:
        raise UnsafePatternError("it nests groups too deeply") from None
