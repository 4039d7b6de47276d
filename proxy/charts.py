"""Charts drawn on the server as SVG strings: a budget gauge and daily bars stacked by model.

Pure functions, no scripts, no fetches: they work on an air-gapped host and under a strict CSP (colours are
SVG attributes, not inline styles). Every text that reaches the SVG is escaped here: model names come from
clients and are hostile.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime
from html import escape

from . import i18n

# Colours with at least 3:1 contrast on white, told apart by people with the common colour blindnesses.
PALETTE = ("#1f77b4", "#d95f02", "#1b9e77", "#7570b3", "#c2185b", "#66a61e", "#a6761d", "#5f6b7a")
STATE_COLOURS = {"ok": "#2e7d32", "warn": "#b35900", "blocked": "#c62828", "unknown": "#757575"}
TRACK = "#e3e6ea"
INK = "#333a42"
GRID = "#d5d9de"

_IDENT = re.compile(r"[^a-z0-9-]")


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _ident(value: str) -> str:
    return _IDENT.sub("-", value.lower())[:40] or "chart"


def _num(value: float) -> str:
    """A coordinate: two decimals at most, no exponent."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def gauge(used: int, limit: int, state: str, *, title: str, caption: str, ident: str = "gauge") -> str:
    """A half-ring filled to used / limit, coloured by the state; `caption` (e.g. "85 %") in its middle."""
    state = state if state in STATE_COLOURS else "unknown"
    ident = _ident(ident)
    fraction = 0.0 if limit <= 0 or used <= 0 else min(used / limit, 1.0)
    if limit <= 0 and used > 0:
        fraction = 1.0
    cx, cy, r = 100.0, 100.0, 80.0

    def point(f: float) -> str:
        theta = math.pi * (1 - f)
        return f"{_num(cx + r * math.cos(theta))} {_num(cy - r * math.sin(theta))}"

    track = f"M {point(0)} A {_num(r)} {_num(r)} 0 0 1 {point(1)}"
    parts = [
        f'<svg class="gauge gauge-{state}" data-state="{state}" viewBox="0 0 200 118" role="img"'
        f' aria-labelledby="{ident}-title" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{ident}-title">{_e(title)}: {_e(caption)}</title>',
        f'<path d="{track}" fill="none" stroke="{TRACK}" stroke-width="18" stroke-linecap="round"/>',
    ]
    if fraction > 0:
        value = f"M {point(0)} A {_num(r)} {_num(r)} 0 0 1 {point(fraction)}"
        parts.append(
            f'<path class="gauge-value" d="{value}" fill="none" stroke="{STATE_COLOURS[state]}"'
            ' stroke-width="18" stroke-linecap="round"/>'
        )
    parts.append(
        f'<text x="100" y="96" text-anchor="middle" font-size="26" font-weight="600" fill="{INK}">{_e(caption)}</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above `value` (an axis' step): whole numbers from 1."""
    if value <= 1:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power  # not reached: the loop ends at 10


def top_series(series: Sequence[tuple[str, Sequence[int]]], keep: int, other: str) -> list[tuple[str, list[int]]]:
    """The `keep` largest series by total, and the rest summed into one called `other`."""
    ranked = sorted(series, key=lambda s: (-sum(s[1]), s[0]))
    out = [(name, list(values)) for name, values in ranked[:keep]]
    rest = ranked[keep:]
    if rest:
        width = max(len(v) for _, v in rest)
        out.append((other, [sum(v[i] for _, v in rest if i < len(v)) for i in range(width)]))
    return out


def daily_bars(
    days: Sequence[date],
    series: Sequence[tuple[str, Sequence[int]]],
    *,
    title: str,
    desc: str,
    fmt: Callable[[float], str],
    day_label: Callable[[date], str],
    ident: str = "daily",
) -> str:
    """One bar per day, stacked by series (a model), with a y axis in tokens and a <title> on every segment."""
    ident = _ident(ident)
    width, height = 440.0, 230.0
    left, right, top, bottom = 52.0, 8.0, 10.0, 28.0
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum(values[i] for _, values in series if i < len(values)) for i in range(len(days))]
    y_max = 4 * nice_ceiling(max(totals, default=0) / 4)  # four steps of a round number of tokens
    parts = [
        f'<svg class="chart" viewBox="0 0 {_num(width)} {_num(height)}" role="img"'
        f' aria-labelledby="{ident}-title {ident}-desc" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{ident}-title">{_e(title)}</title>',
        f'<desc id="{ident}-desc">{_e(desc)}</desc>',
    ]
    for i in range(5):  # the grid and the y axis' labels
        value = y_max * i / 4
        y = top + plot_h - plot_h * i / 4
        parts.append(
            f'<line x1="{_num(left)}" x2="{_num(width - right)}" y1="{_num(y)}" y2="{_num(y)}" stroke="{GRID}"'
            ' stroke-width="1"/>'
        )
        parts.append(
            f'<text x="{_num(left - 6)}" y="{_num(y + 4)}" text-anchor="end" font-size="11" fill="{INK}">'
            f"{_e(fmt(value))}</text>"
        )
    n = max(len(days), 1)
    band = plot_w / n
    bar = max(band * 0.72, 1.0)
    every = max(1, math.ceil(n / 8))  # at most about eight day labels, however long the period
    for i, day in enumerate(days):
        x = left + band * i + (band - bar) / 2
        base = top + plot_h
        for j, (name, values) in enumerate(series):
            tokens = values[i] if i < len(values) else 0
            if tokens <= 0:
                continue
            h = plot_h * tokens / y_max
            base -= h
            parts.append(
                f'<rect x="{_num(x)}" y="{_num(base)}" width="{_num(bar)}" height="{_num(max(h, 0.5))}"'
                f' fill="{PALETTE[j % len(PALETTE)]}"><title>{_e(day_label(day))} · {_e(name)}: {_e(fmt(tokens))}'
                "</title></rect>"
            )
        if i % every == 0:
            parts.append(
                f'<text x="{_num(left + band * i + band / 2)}" y="{_num(height - bottom + 16)}" text-anchor="middle"'
                f' font-size="11" fill="{INK}">{_e(day_label(day))}</text>'
            )
    parts.append(
        f'<line x1="{_num(left)}" x2="{_num(width - right)}" y1="{_num(top + plot_h)}" y2="{_num(top + plot_h)}"'
        f' stroke="{INK}" stroke-width="1"/>'
    )
    parts.append("</svg>")
    return "".join(parts)


def legend(names: Sequence[str]) -> str:
    """The series' colours and names, as an HTML list under a chart (it wraps on a phone; an SVG would not)."""
    items = "".join(
        f'<li><svg width="12" height="12" aria-hidden="true" focusable="false"><rect width="12" height="12"'
        f' fill="{PALETTE[i % len(PALETTE)]}"/></svg> {_e(name)}</li>'
        for i, name in enumerate(names)
    )
    return f'<ul class="legend">{items}</ul>'


def tokens_by_model(days: Sequence[date], per_model: Mapping[str, Sequence[int]], locale: str) -> tuple[str, str]:
    """The statement's and the dashboard's chart: tokens per day stacked by model (the seven largest and the
    rest), and its legend; ("", "") when there are no tokens to show."""
    series = top_series(list(per_model.items()), 7, i18n.text(locale, "chart.other"))
    total = sum(sum(values) for _, values in series)
    if not total:
        return "", ""

    def num(value: float) -> str:
        return i18n.number(value, locale)

    svg = daily_bars(
        days,
        series,
        title=i18n.text(locale, "chart.daily_title"),
        desc=i18n.text(locale, "chart.daily_desc", total=num(total)),
        fmt=num,
        day_label=lambda d: i18n.short_date(datetime(d.year, d.month, d.day), locale),
    )
    return svg, legend([name for name, _ in series])
