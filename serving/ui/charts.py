"""Charts drawn as SVG on the server: no script, no network, readable without colour.

Each chart is an ``<svg role="img">`` whose title and description say what it shows;
every data point is a shape with its own ``<title>`` (value, unit and date), so a
screen reader or a hover reads it, and each page also gives the numbers as a table.
Series differ by shape and dash as well as colour.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from markupsafe import Markup, escape

WIDTH, HEIGHT = 720, 240
PAD_L, PAD_R, PAD_T, PAD_B = 56, 16, 16, 36
# colour-blind-safe (Okabe–Ito), each at least 4.5:1 on white
COLOURS = ("#0b5cad", "#a34400", "#1b6e3c", "#7a3a8c")
SHAPES = ("circle", "square", "diamond", "triangle")
_ids = itertools.count(1)


@dataclass
class Point:
    x: datetime
    y: float
    label: str  # what the point's own title says


@dataclass
class Series:
    name: str
    points: list[Point]
    css: str = ""  # a class on each point (tests count them)


@dataclass
class Band:
    """A forecast interval at one time: median and (lower, upper)."""

    x: datetime
    median: float
    lower: float
    upper: float
    label: str


@dataclass
class Chart:
    title: str
    description: str
    y_label: str
    series: list[Series]
    bands: list[Band] = field(default_factory=list)
    marks: list[tuple[datetime, str]] = field(default_factory=list)  # vertical: version
    lines: list[tuple[float, str]] = field(default_factory=list)  # horizontal: threshold
    y_min: float | None = None
    y_max: float | None = None
    percent: bool = False
    chart_id: str = ""


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi].

    >>> _ticks(0, 1), _ticks(12.5, 61)
    ([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], [20.0, 30.0, 40.0, 50.0, 60.0])
    """
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * 0.999)
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 10) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def _time_ticks(x0: datetime, x1: datetime, most: int = 8) -> list[tuple[datetime, str]]:
    """Dates to label the time axis: years, months or days by the span.

    >>> [l for _, l in _time_ticks(datetime(2020, 3, 1), datetime(2026, 2, 1))]
    ['2021', '2022', '2023', '2024', '2025', '2026']
    >>> [l for _, l in _time_ticks(datetime(2026, 9, 20), datetime(2026, 11, 10))]
    ['2026-10', '2026-11']
    >>> [l for _, l in _time_ticks(datetime(2026, 11, 1), datetime(2026, 11, 9))][:3]
    ['11-01', '11-02', '11-03']
    """
    span = (x1 - x0).days
    if span >= 45:
        for months in (1, 3, 6, 12, 24, 60, 120):
            m = x0.year * 12 + x0.month - 1
            m = -(-m // months) * months  # the first multiple of the step at or after x0
            ticks = []
            while (t := datetime(m // 12, m % 12 + 1, 1)) <= x1:  # noqa: DTZ001 - naive UTC
                if t >= x0:
                    ticks.append(t)
                m += months
            if len(ticks) <= most:
                return [(t, str(t.year) if months >= 12 else f"{t:%Y-%m}") for t in ticks]
    step = max(1, -(-max(span, 1) // most))
    return [(x0 + timedelta(days=d), f"{x0 + timedelta(days=d):%m-%d}")
            for d in range(0, max(span, 1) + 1, step)]


def _fmt(v: float, percent: bool) -> str:
    return f"{v:.0%}" if percent else (f"{v:.0f}" if abs(v) >= 10 else f"{v:.2g}")


def render(chart: Chart) -> Markup:
    """The chart as inline SVG (escaped text throughout)."""
    n = next(_ids)
    cid = chart.chart_id or f"chart{n}"
    xs = [p.x for s in chart.series for p in s.points] + [b.x for b in chart.bands] + [
        m[0] for m in chart.marks]
    ys = [p.y for s in chart.series for p in s.points] + [
        v for b in chart.bands for v in (b.lower, b.upper)] + [v for v, _ in chart.lines]
    head = (f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
            f'aria-labelledby="{cid}-t {cid}-d" id="{cid}" preserveAspectRatio="xMinYMin meet">'
            f'<title id="{cid}-t">{escape(chart.title)}</title>'
            f'<desc id="{cid}-d">{escape(chart.description)}</desc>')
    if not xs or not ys:
        return Markup(head + f'<text x="{PAD_L}" y="{HEIGHT / 2}" class="empty">No data</text>'
                      "</svg>")
    x0, x1 = min(xs), max(xs)
    if x1 <= x0:
        x0, x1 = x0 - timedelta(days=30), x1 + timedelta(days=30)
    y0 = chart.y_min if chart.y_min is not None else min(ys)
    y1 = chart.y_max if chart.y_max is not None else max(ys)
    if chart.y_min is None or chart.y_max is None:
        pad = (y1 - y0) * 0.08 or abs(y1) * 0.1 or 1.0
        y0 = y0 - pad if chart.y_min is None else y0
        y1 = y1 + pad if chart.y_max is None else y1
    span = (x1 - x0).total_seconds()
    plot_w, plot_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B

    def px(t: datetime) -> float:
        return PAD_L + (t - x0).total_seconds() / span * plot_w

    def py(v: float) -> float:
        return PAD_T + (1 - (v - y0) / (y1 - y0)) * plot_h

    parts = [head, '<g class="axes" aria-hidden="true">',
             f'<line x1="{PAD_L}" y1="{PAD_T + plot_h}" x2="{PAD_L + plot_w}" '
             f'y2="{PAD_T + plot_h}" class="axis"/>',
             f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{PAD_T + plot_h}" class="axis"/>']
    for v in _ticks(y0, y1):
        y = py(v)
        parts.append(f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{PAD_L + plot_w}" y2="{y:.1f}" '
                     f'class="grid"/><text x="{PAD_L - 6}" y="{y + 4:.1f}" '
                     f'text-anchor="end" class="tick">{escape(_fmt(v, chart.percent))}</text>')
    for t, label in _time_ticks(x0, x1):
        parts.append(f'<text x="{px(t):.1f}" y="{HEIGHT - 12}" text-anchor="middle" '
                     f'class="tick">{label}</text>')
    parts.append(f'<text x="14" y="{PAD_T + plot_h / 2:.1f}" class="ylabel" '
                 f'transform="rotate(-90 14 {PAD_T + plot_h / 2:.1f})" text-anchor="middle">'
                 f'{escape(chart.y_label)}</text></g>')
    for v, label in chart.lines:
        y = py(v)
        parts.append(f'<g class="threshold"><line x1="{PAD_L}" y1="{y:.1f}" '
                     f'x2="{PAD_L + plot_w}" y2="{y:.1f}"/><text x="{PAD_L + plot_w - 4}" '
                     f'y="{y - 4:.1f}" text-anchor="end">{escape(label)}</text></g>')
    for t, label in chart.marks:
        x = px(t)
        right = x > PAD_L + plot_w * 0.8  # near the right edge: the label to the left
        parts.append(f'<g class="mark"><line x1="{x:.1f}" y1="{PAD_T}" x2="{x:.1f}" '
                     f'y2="{PAD_T + plot_h}"/><text x="{x - 3 if right else x + 3:.1f}" '
                     f'y="{PAD_T + 10}" text-anchor="{"end" if right else "start"}">'
                     f'{escape(label)}</text><title>{escape(label)}</title></g>')
    for i, s in enumerate(chart.series):
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
        pts = sorted(s.points, key=lambda p: p.x)
        if len(pts) > 1:
            path = " ".join(f"{px(p.x):.1f},{py(p.y):.1f}" for p in pts)
            dash = ' stroke-dasharray="6 3"' if i % 2 else ""
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                         f'stroke-width="1.5"{dash} aria-hidden="true"/>')
        for p in pts:
            parts.append(_shape(shape, px(p.x), py(p.y), colour, s.css, p.label))
    for b in chart.bands:
        x = px(b.x)
        parts.append(f'<g class="band"><line x1="{x:.1f}" y1="{py(b.lower):.1f}" x2="{x:.1f}" '
                     f'y2="{py(b.upper):.1f}"/><line x1="{x - 6:.1f}" y1="{py(b.lower):.1f}" '
                     f'x2="{x + 6:.1f}" y2="{py(b.lower):.1f}"/><line x1="{x - 6:.1f}" '
                     f'y1="{py(b.upper):.1f}" x2="{x + 6:.1f}" y2="{py(b.upper):.1f}"/>'
                     f'<circle cx="{x:.1f}" cy="{py(b.median):.1f}" r="4" class="median"/>'
                     f'<title>{escape(b.label)}</title></g>')
    legend_y = PAD_T + 2
    if len(chart.series) > 1:
        for i, s in enumerate(chart.series):
            colour, shape = COLOURS[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
            lx = PAD_L + 10 + i * 120
            parts.append(f'<g class="legend" aria-hidden="true">'
                         f'{_shape(shape, lx, legend_y + 6, colour, "", None)}'
                         f'<text x="{lx + 9}" y="{legend_y + 10}">{escape(s.name)}</text></g>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _shape(shape: str, x: float, y: float, colour: str, css: str, label: str | None) -> str:
    title = f"<title>{escape(label)}</title>" if label else ""
    cls = f' class="pt {css}"' if css else ' class="pt"' if label else ""
    if shape == "circle":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}"{cls}>{title}</circle>'
    if shape == "square":
        return (f'<rect x="{x - 3.5:.1f}" y="{y - 3.5:.1f}" width="7" height="7" '
                f'fill="{colour}"{cls}>{title}</rect>')
    if shape == "diamond":
        pts = (f"{x:.1f},{y - 4.5:.1f} {x + 4.5:.1f},{y:.1f} {x:.1f},{y + 4.5:.1f} "
               f"{x - 4.5:.1f},{y:.1f}")
        return f'<polygon points="{pts}" fill="{colour}"{cls}>{title}</polygon>'
    pts = f"{x:.1f},{y - 4.5:.1f} {x + 4.5:.1f},{y + 4:.1f} {x - 4.5:.1f},{y + 4:.1f}"
    return f'<polygon points="{pts}" fill="{colour}"{cls}>{title}</polygon>'
