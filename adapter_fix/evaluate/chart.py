"""The trade-off chart of an evaluation as inline SVG: kept task (x) against restored refusal
(y), one point per row, with the goal region shaded. Text in, text out: no I/O, no model.

Values are ratios (METHOD.md §9): ALIGNED sits at (0, 1), the attack at
(1, 0), a perfect repair at (1, 1). A ratio can leave [0, 1] (a repair that
refuses more than ALIGNED); the axes stretch to show it, up to `LIMITS`,
and a point beyond is drawn on the edge (its tooltip gives the value).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

WIDTH, HEIGHT = 520, 400
LEFT, RIGHT, TOP, BOTTOM = 56, 24, 16, 48  # margins: room for ticks and axis titles
LIMITS = (-1.0, 2.0)  # the widest the axes stretch
Role = Literal["aligned", "attack", "repair"]
STYLE: dict[Role, tuple[str, str]] = {  # fill, shape
    "aligned": ("#1565c0", "square"),
    "attack": ("#c62828", "triangle"),
    "repair": ("#2e7d32", "circle"),
}


@dataclass(frozen=True)
class Point:
    """One row on the plane: kept task (x), restored refusal (y)."""

    label: str
    kept_task: float
    restored_refusal: float
    role: Role


@dataclass(frozen=True)
class Goal:
    """The region a repair should reach: restored refusal and kept task at least these."""

    restored_refusal: float = 0.9
    kept_task: float = 0.8


def _domain(values: Sequence[float]) -> tuple[float, float]:
    low = max(LIMITS[0], min([0.0, *values]) - 0.1)
    high = min(LIMITS[1], max([1.0, *values]) + 0.1)
    return low, high


def _ticks(low: float, high: float) -> list[float]:
    step = 0.25 if high - low <= 1.5 else 0.5
    first = int(low / step - 1e-9) * step
    ticks = [first + i * step for i in range(int((high - first) / step) + 2)]
    return [round(t, 2) for t in ticks if low - 1e-9 <= t <= high + 1e-9]


def _marker(role: Role, x: float, y: float) -> str:
    fill, shape = STYLE[role]
    if shape == "square":
        return f'<rect x="{x - 6:.1f}" y="{y - 6:.1f}" width="12" height="12" fill="{fill}"/>'
    if shape == "triangle":
        corners = f"{x:.1f},{y - 7:.1f} {x - 7:.1f},{y + 6:.1f} {x + 7:.1f},{y + 6:.1f}"
        return f'<polygon points="{corners}" fill="{fill}"/>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{fill}"/>'


def tradeoff_svg(points: Sequence[Point], goal: Goal = Goal()) -> str:
    """An `<svg>` element (no script, no external reference) of `points` and the goal region."""
    xs = _domain([p.kept_task for p in points])
    ys = _domain([p.restored_refusal for p in points])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(value: float) -> float:
        return LEFT + (min(max(value, xs[0]), xs[1]) - xs[0]) / (xs[1] - xs[0]) * plot_w

    def sy(value: float) -> float:
        return TOP + (ys[1] - min(max(value, ys[0]), ys[1])) / (ys[1] - ys[0]) * plot_h

    parts = [
        f'<svg width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" font-family="sans-serif" font-size="12">',
        "<title>restored refusal against kept task</title>",
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
        'stroke="#999"/>',
        f'<rect class="goal" x="{sx(goal.kept_task):.1f}" y="{sy(ys[1]):.1f}" '
        f'width="{sx(xs[1]) - sx(goal.kept_task):.1f}" '
        f'height="{sy(goal.restored_refusal) - sy(ys[1]):.1f}" fill="#c8e6c9" opacity="0.7"/>',
        f'<text x="{sx(xs[1]) - 4:.1f}" y="{sy(ys[1]) + 14:.1f}" text-anchor="end" '
        'fill="#1b5e20">goal</text>',
    ]
    for tick in _ticks(*xs):
        x = sx(tick)
        parts.append(
            f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + plot_h}" stroke="#e0e0e0"/>'
            f'<text x="{x:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{tick:.0%}</text>'
        )
    for tick in _ticks(*ys):
        y = sy(tick)
        parts.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" stroke="#e0e0e0"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:.0%}</text>'
        )
    parts.append(
        f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 10}" text-anchor="middle">'
        "kept task (1 = like the attack)</text>"
        f'<text transform="translate(14 {TOP + plot_h / 2:.1f}) rotate(-90)" '
        'text-anchor="middle">restored refusal (1 = like ALIGNED)</text>'
    )
    for point in points:
        x, y = sx(point.kept_task), sy(point.restored_refusal)
        label = html.escape(point.label)
        anchor, dx = ("end", -9) if x > LEFT + plot_w * 0.75 else ("start", 9)
        parts.append(
            f'<g class="{point.role}"><title>{label}: kept task {point.kept_task:.0%}, '
            f"restored refusal {point.restored_refusal:.0%}</title>"
            f"{_marker(point.role, x, y)}"
            f'<text x="{x + dx:.1f}" y="{y - 8:.1f}" text-anchor="{anchor}">{label}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)
