"""The server-rendered SVG charts: well-formed, accessible, and nothing a client sends escapes its text."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import date, timedelta

import pytest

from proxy import charts

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = '<script>alert(1)</script>" onload="alert(2)&amp;'


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # raises on anything that is not well-formed XML


def days(n: int) -> list[date]:
    return [date(2026, 11, 1) + timedelta(days=i) for i in range(n)]


@pytest.mark.parametrize(
    "used, limit, state, fills",
    [(0, 100, "ok", False), (85, 100, "warn", True), (150, 100, "blocked", True), (5, 0, "blocked", True)],
)
def test_gauge_is_coloured_by_state_and_fills_to_the_fraction(used: int, limit: int, state: str, fills: bool) -> None:
    root = parse(charts.gauge(used, limit, state, title="Budget used", caption="85 %"))
    assert root.get("data-state") == state and f"gauge-{state}" in (root.get("class") or "")
    assert root.get("role") == "img" and root.get("aria-labelledby") == "gauge-title"
    assert root.find(f"{SVG}title").text == "Budget used: 85 %"  # type: ignore[union-attr]
    values = [p for p in root.iter(f"{SVG}path") if p.get("class") == "gauge-value"]
    assert bool(values) == fills
    if values:
        assert values[0].get("stroke") == charts.STATE_COLOURS[state]


def test_gauge_at_the_limit_ends_on_the_right_and_half_way_at_the_top() -> None:
    full = parse(charts.gauge(100, 100, "blocked", title="t", caption="c"))
    half = parse(charts.gauge(50, 100, "ok", title="t", caption="c"))

    def end(root: ET.Element) -> str:
        d = next(p for p in root.iter(f"{SVG}path") if p.get("class") == "gauge-value").get("d") or ""
        return " ".join(d.split()[-2:])

    assert end(full) == "180 100" and end(half) == "100 20"


def test_unknown_state_cannot_inject_a_class() -> None:
    root = parse(charts.gauge(1, 2, 'ok" onclick="x', title="t", caption="c"))
    assert root.get("data-state") == "unknown" and root.get("onclick") is None


def test_hostile_text_is_escaped_everywhere() -> None:
    svg = charts.daily_bars(
        days(3),
        [(HOSTILE, [5, 0, 7]), ("gpt-4o", [1, 2, 3])],
        title=HOSTILE,
        desc=HOSTILE,
        fmt=lambda v: f"{v:,.0f}",
        day_label=lambda d: d.isoformat(),
        ident='x" onload="y',
    )
    root = parse(svg)
    assert "<script>" not in svg and 'onload="' not in svg
    assert not [e for e in root.iter() if any(k.startswith("on") for k in e.attrib)]
    titles = [t.text or "" for t in root.iter(f"{SVG}title")]
    assert titles[0] == HOSTILE  # escaped in the markup, the same text once parsed
    assert any(t.endswith(f"{HOSTILE}: 5") for t in titles)
    gauge = charts.gauge(1, 2, "ok", title=HOSTILE, caption=HOSTILE)
    assert parse(gauge).find(f"{SVG}text").text == HOSTILE  # type: ignore[union-attr]
    html = charts.legend([HOSTILE])
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_bars_stack_by_model_with_a_title_each_and_a_labelled_axis() -> None:
    svg = charts.daily_bars(
        days(2),
        [("a", [100, 0]), ("b", [300, 50])],
        title="Tokens per day",
        desc="two days",
        fmt=lambda v: f"{v:,.0f}",
        day_label=lambda d: d.strftime("%m-%d"),
    )
    root = parse(svg)
    rects = list(root.iter(f"{SVG}rect"))
    assert len(rects) == 3  # zero segments are not drawn
    assert [r.find(f"{SVG}title").text for r in rects] == ["11-01 · a: 100", "11-01 · b: 300", "11-02 · b: 50"]  # type: ignore[union-attr]
    heights = [float(r.get("height") or 0) for r in rects]
    assert heights[1] == pytest.approx(3 * heights[0])  # to scale
    labels = [t.text for t in root.iter(f"{SVG}text")]
    assert labels[:5] == ["0", "100", "200", "300", "400"]  # four round steps up to the tallest bar
    assert "11-01" in labels and "11-02" in labels
    assert root.get("aria-labelledby") == "daily-title daily-desc"


def test_a_long_period_labels_only_some_days_and_an_empty_one_draws_no_bars() -> None:
    many = parse(
        charts.daily_bars(days(31), [("m", [1] * 31)], title="t", desc="d", fmt=str, day_label=lambda d: str(d.day))
    )
    day_labels = [t for t in many.iter(f"{SVG}text") if t.get("text-anchor") == "middle"]
    assert 4 <= len(day_labels) <= 9
    empty = parse(charts.daily_bars(days(5), [], title="t", desc="d", fmt=str, day_label=str))
    assert not list(empty.iter(f"{SVG}rect"))


def test_top_series_keeps_the_largest_and_sums_the_rest() -> None:
    series = [("a", [1, 1]), ("b", [5, 5]), ("c", [2, 0]), ("d", [0, 3])]
    assert charts.top_series(series, 2, "other") == [("b", [5, 5]), ("d", [0, 3]), ("other", [3, 1])]
    assert charts.top_series(series[:1], 2, "other") == [("a", [1, 1])]


@pytest.mark.parametrize("value, ceiling", [(0, 1), (0.3, 1), (1, 1), (7, 10), (12, 20), (120, 200), (2_400, 5_000)])
def test_nice_ceiling(value: float, ceiling: float) -> None:
    assert charts.nice_ceiling(value) == ceiling
