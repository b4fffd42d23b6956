"""Inline SVG charts for the run report: no library, no script, no network; they render in any browser."""

from __future__ import annotations

import math
from html import escape

MARKED_UP_TO = 30  # a series of at most this many points gets a marker on each (where a short line hides them)
COLOURS = ("#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#bc4c00", "#0969da", "#57606a")
Point = tuple[float, float]


def line_chart(
    title: str,
    series: dict[str, list[Point]],
    width: int = 440,
    height: int = 230,
    x_label: str = "step",
    last_label: str = "last",
) -> str:
    """An SVG line chart of one or more (x, y) series sharing axes; points that are not finite are dropped.

    A short series (up to `MARKED_UP_TO` points) is marked at every point, so a run of three logged steps reads as
    three measurements and not as a trend."""
    clean = {name: [(x, y) for x, y in points if _finite(x) and _finite(y)] for name, points in series.items()}
    clean = {name: points for name, points in clean.items() if points}
    left, right, top, bottom = 58, 12, 26, 38
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<text x="{left}" y="16" class="chart-title">{escape(title)}</text>',
    ]
    if not clean:
        parts.append(f'<text x="{left}" y="{top + plot_h / 2}" class="chart-empty">no finite values</text></svg>')
        return "".join(parts)
    xs = [x for points in clean.values() for x, _ in points]
    ys = [y for points in clean.values() for _, y in points]
    integer_x = all(float(x).is_integer() for x in xs)  # steps: no tick at 2.5
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs), 5, integer_x), nice_ticks(min(ys), max(ys), 5)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def sx(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h

    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="chart-frame"/>')
    for tick, label in zip(y_ticks, tick_labels(y_ticks), strict=True):
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(tick):.1f}" y2="{sy(tick):.1f}" class="chart-grid"/>'
            f'<text x="{left - 6}" y="{sy(tick) + 4:.1f}" class="chart-tick" text-anchor="end">{label}</text>'
        )
    for tick, label in zip(x_ticks, tick_labels(x_ticks), strict=True):
        parts.append(
            f'<text x="{sx(tick):.1f}" y="{top + plot_h + 15}" class="chart-tick" text-anchor="middle">{label}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 6}" class="chart-tick" text-anchor="middle">{escape(x_label)}</text>'
    )
    for i, (name, points) in enumerate(clean.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = sorted(points)
        d = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(points))
        parts.append(
            f'<path class="series" data-series="{escape(name)}" d="{d}" fill="none" stroke="{colour}" stroke-width="1.8">'
            f"<title>{escape(name)}: {len(points)} points, last {fmt(points[-1][1])}</title></path>"
        )
        if len(points) <= MARKED_UP_TO:
            parts += [
                f'<circle class="marker" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{3 if len(points) == 1 else 2.5}" '
                f'fill="{colour}"><title>{escape(name)} @ {fmt(x)}: {fmt(y)}</title></circle>'
                for x, y in points
            ]
        parts.append(
            f'<text x="{left + plot_w - 4}" y="{top + 14 + 13 * i}" class="chart-legend" text-anchor="end" '
            f'fill="{colour}">{escape(name)} ({escape(last_label)} {fmt(points[-1][1])})</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [low, high] (1, 2, 2.5, 5 x 10^k steps; whole steps when `integer`)."""
    if high == low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(count - 1, 1)
    if integer:
        raw = max(raw, 1.0)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(
        m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw and not (integer and (m * magnitude) % 1)
    )
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value < high + step * 0.5:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def tick_labels(ticks: list[float]) -> list[str]:
    """Labels with as many decimals as the tick step needs, so neighbouring ticks never read the same."""
    step = round(abs(ticks[1] - ticks[0]), 12) if len(ticks) > 1 else 1.0
    biggest = max(abs(t) for t in ticks)
    if biggest >= 1e5 or biggest < 1e-3 or step < 1e-6:
        return [fmt(t) for t in ticks]
    exponent = math.floor(math.log10(step) + 1e-9)
    extra = 1 if abs(step / 10**exponent - 2.5) < 1e-6 else 0  # 0.25, 2.5: one more digit
    decimals = max(0, -exponent + extra)
    return [f"{t:.{decimals}f}" for t in ticks]


def fmt(value: float) -> str:
    """A short number: 3 significant figures, scientific when tiny or huge."""
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4g}"


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
