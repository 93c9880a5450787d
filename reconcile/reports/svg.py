"""Inline SVG charts, drawn here (no JavaScript, no external file, no dependency): every label is
escaped and made visible by `reconcile.reports.safe`, every number is an integer."""

from __future__ import annotations

from collections.abc import Sequence

from reconcile.reports.safe import Markup, el, visible

BAR_WIDTH = 600  # two bar charts side by side on a laptop screen
LINE_WIDTH = 420  # three run charts side by side
PALETTE = ("#2f6fb0", "#d9822b", "#3f8f5a", "#b23b3b", "#7a5ab8", "#8c6d31", "#c2549d", "#4d8f9c", "#6b6b6b")
LABEL_CHARS = 28


def _svg(width: int, height: int, title: str, body: str) -> Markup:
    return Markup(
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
        f"{el('title', title)}{body}</svg>"
    )


def _no_data(width: int, title: str) -> Markup:
    return _svg(width, 40, title, str(el("text", "no data for this run", x=10, y=25, class_="muted")))


def bar_chart(title: str, items: Sequence[tuple[str, int]], unit: str = "credits") -> Markup:
    """Horizontal bars, one per (label, value), largest first; the value is written at each bar's end."""
    items = sorted(((label, int(value)) for label, value in items), key=lambda kv: -kv[1])
    if not items or all(v == 0 for _, v in items):
        return _no_data(BAR_WIDTH, title)
    row, top, label_w, value_w = 26, 8, 190, 90
    bar_w = BAR_WIDTH - label_w - value_w
    top_value = max(v for _, v in items)
    parts = []
    for i, (label, value) in enumerate(items):
        y = top + i * row
        width = round(value / top_value * bar_w) if top_value else 0
        if value > 0:
            width = max(width, 1)
        shown = visible(label, LABEL_CHARS, note=False)
        parts += [
            el("text", shown, x=label_w - 8, y=y + 16, text_anchor="end"),
            el(
                "rect",
                el("title", f"{visible(label, 200, note=False)}: {value:,} {unit}"),
                x=label_w,
                y=y + 3,
                width=width,
                height=row - 8,
                fill=PALETTE[i % len(PALETTE)],
            ),
            el("text", f"{value:,}", x=label_w + width + 6, y=y + 16, class_="num"),
        ]
    return _svg(BAR_WIDTH, top * 2 + row * len(items), title, "".join(parts))


def line_chart(title: str, points: Sequence[tuple[str, int | None]], unit: str, color: str = PALETTE[0]) -> Markup:
    """One value per run (oldest first, None where a run has no value), the last run marked."""
    known = [(i, label, int(v)) for i, (label, v) in enumerate(points) if v is not None]
    if not known:
        return _no_data(LINE_WIDTH, title)
    height, left, right, top, bottom = 200, 70, 40, 24, 36
    plot_w, plot_h = LINE_WIDTH - left - right, height - top - bottom
    top_value = max(v for _, _, v in known) or 1
    top_value += top_value % 2 if top_value > 1 else 0  # even: the middle grid line is a whole number
    span = max(len(points) - 1, 1)

    def xy(i: int, v: int) -> tuple[float, float]:
        x = left + (i / span * plot_w if len(points) > 1 else plot_w / 2)
        return round(x, 1), round(top + plot_h - v / top_value * plot_h, 1)

    parts = []
    for fraction in (0, 0.5, 1) if top_value > 1 else (0, 1):
        y = round(top + plot_h - fraction * plot_h, 1)
        parts += [
            el("line", x1=left, x2=LINE_WIDTH - right, y1=y, y2=y, class_="grid"),
            el("text", f"{round(top_value * fraction):,}", x=left - 6, y=y + 4, text_anchor="end", class_="num"),
        ]
    coords = [xy(i, v) for i, _, v in known]
    if len(coords) > 1:
        parts.append(
            el("polyline", points=" ".join(f"{x},{y}" for x, y in coords), fill="none", stroke=color, stroke_width=2)
        )
    for (i, label, value), (x, y) in zip(known, coords, strict=True):
        last = i == len(points) - 1
        parts.append(
            el("circle", el("title", f"{label}: {value:,} {unit}"), cx=x, cy=y, r=5 if last else 3, fill=color)
        )
        if last:
            parts.append(el("text", f"{value:,}", x=x + 8, y=y - 6, class_="num"))
    if len(points) == 1:
        parts.append(el("text", points[0][0], x=coords[0][0], y=height - 12, text_anchor="middle", class_="muted"))
    else:
        parts.append(el("text", points[0][0], x=left, y=height - 12, class_="muted"))
        parts.append(el("text", points[-1][0], x=LINE_WIDTH - right, y=height - 12, text_anchor="end", class_="muted"))
    return _svg(LINE_WIDTH, height, title, "".join(parts))
