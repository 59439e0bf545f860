"""PURE: small charts as inline SVG, drawn on the server (no chart library, no script).

The status page's progress bars and the HTML wave report's charts (time per step, held time
per mailbox, copy rates). Every label is escaped here, since the result is marked safe for
the templates; sizes are SVG attributes, not CSS, so the page's Content-Security-Policy
(no inline styles) does not get in the way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from markupsafe import Markup, escape

COLOURS = {"waiting": "#c9ced6", "prestaged": "#9ecae1", "cutover": "#fdae6b",
           "copying": "#6baed6", "copied": "#74c476", "done": "#238b45", "failed": "#d7301f",
           "value": "#3182bd"}


class Segment(Protocol):
    kind: str
    label: str
    count: int
    percent: float


def stacked(segments: Sequence[Segment], *, width: int = 480, height: int = 18) -> Markup:
    """One bar of coloured segments (a wave's mailboxes by state)."""
    parts = [f'<svg class="bar" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
             f'<rect width="{width}" height="{height}" fill="#eef0f3"/>']
    x = 0.0
    for s in segments:
        w = width * s.percent / 100.0
        parts.append(f'<rect x="{x:.1f}" width="{w:.1f}" height="{height}" '
                     f'fill="{COLOURS.get(s.kind, "#999")}" data-kind="{escape(s.kind)}">'
                     f'<title>{escape(s.label)}: {s.count}</title></rect>')
        x += w
    parts.append("</svg>")
    return Markup("".join(parts))


def meter(percent: float, *, width: int = 480, height: int = 10, kind: str = "value") -> Markup:
    """A plain progress bar."""
    w = width * max(0.0, min(percent, 100.0)) / 100.0
    return Markup(f'<svg class="meter" role="img" width="{width}" height="{height}" '
                  f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">'
                  f'<rect width="{width}" height="{height}" fill="#eef0f3"/>'
                  f'<rect width="{w:.1f}" height="{height}" fill="{COLOURS[kind]}"/>'
                  f'<title>{percent:.1f}%</title></svg>')


def hbars(items: Sequence[tuple[str, float]], *, unit: str, width: int = 640,
          row: int = 18, label_width: int = 220) -> Markup:
    """A horizontal bar chart: one labelled bar per item, the value written after it."""
    if not items:
        return Markup('<p class="empty">no data</p>')
    top = max(v for _, v in items) or 1.0
    chart = width - label_width - 90
    height = row * len(items) + 4
    parts = [f'<svg class="chart" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg" '
             f'font-family="sans-serif" font-size="12">']
    for i, (label, value) in enumerate(items):
        y = i * row + 2
        w = chart * value / top
        parts.append(f'<text x="{label_width - 6}" y="{y + row - 6}" text-anchor="end">'
                     f'{escape(label[:36])}</text>'
                     f'<rect x="{label_width}" y="{y}" width="{w:.1f}" height="{row - 4}" '
                     f'fill="{COLOURS["value"]}"/>'
                     f'<text x="{label_width + w + 4:.1f}" y="{y + row - 6}">'
                     f'{value:.1f} {escape(unit)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
