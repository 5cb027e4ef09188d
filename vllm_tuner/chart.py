"""A self-contained HTML page with an SVG chart of a ramp: KV tokens and peak memory per step.

Pure: :func:`ramp_chart_html` turns plain points into text; no plotting library, no scripts, no
network. Bars are the KV cache tokens vLLM reported at each step (left axis); the line is the peak
memory of the busiest device (GPU or NUMA node) under the soak (right axis) with its capacity as a
dashed line; a failed step is drawn in red with its reason under the axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 760, 360
LEFT, RIGHT, TOP, BOTTOM = 70, 70, 40, 80


@dataclass(frozen=True)
class ChartPoint:
    utilization: float
    kv_tokens: int | None
    peak_gib: float | None  # the busiest device's peak under load
    passed: bool
    label: str = ""  # failure words, shown under a failed step


def ramp_chart_html(
    points: list[ChartPoint], *, title: str, capacity_gib: float | None = None, unit: str = "GPU"
) -> str:
    """The page; ``unit`` names one device ("GPU", "NUMA node") in the axis and capacity labels."""
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:24px;color:#222}"
        "li{margin:2px 0}</style></head><body>\n"
        f"<h2>{escape(title)}</h2>\n{ramp_chart_svg(points, capacity_gib=capacity_gib, unit=unit)}\n"
        + _legend(points)
        + "</body></html>\n"
    )


def ramp_chart_svg(points: list[ChartPoint], *, capacity_gib: float | None = None, unit: str = "GPU") -> str:
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    n = max(1, len(points))
    slot = plot_w / n
    max_tokens = max([p.kv_tokens or 0 for p in points] + [1])
    mem_values = [p.peak_gib for p in points if p.peak_gib is not None]
    max_mem = max(mem_values + ([capacity_gib] if capacity_gib else []) + [1.0]) * 1.05
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' "
        f"viewBox='0 0 {WIDTH} {HEIGHT}' font-size='11' font-family='sans-serif'>",
        f"<rect x='{LEFT}' y='{TOP}' width='{plot_w}' height='{plot_h}' fill='#fafafa' stroke='#ccc'/>",
    ]
    for i in range(5):  # gridlines and both axes' ticks
        frac = i / 4
        y = TOP + plot_h * (1 - frac)
        out.append(f"<line x1='{LEFT}' y1='{y:.1f}' x2='{LEFT + plot_w}' y2='{y:.1f}' stroke='#eee'/>")
        out.append(
            f"<text x='{LEFT - 6}' y='{y + 4:.1f}' text-anchor='end' fill='#3b6fb6'>{_tokens(max_tokens * frac)}</text>"
        )
        out.append(
            f"<text x='{LEFT + plot_w + 6}' y='{y + 4:.1f}' fill='#c0392b'>{max_mem * frac:.1f}</text>"
        )
    out.append(f"<text x='{LEFT}' y='{TOP - 12}' fill='#3b6fb6'>KV cache tokens</text>")
    out.append(
        f"<text x='{LEFT + plot_w}' y='{TOP - 12}' text-anchor='end' fill='#c0392b'>peak GiB per {escape(unit)}</text>"
    )
    line: list[str] = []
    for i, p in enumerate(points):
        cx = LEFT + slot * (i + 0.5)
        if p.kv_tokens:
            h = plot_h * p.kv_tokens / max_tokens
            color = "#7aa6e0" if p.passed else "#e8a0a0"
            out.append(
                f"<rect x='{cx - slot * 0.3:.1f}' y='{TOP + plot_h - h:.1f}' width='{slot * 0.6:.1f}' "
                f"height='{h:.1f}' fill='{color}'><title>{p.kv_tokens:,} tokens</title></rect>"
            )
        mark = "✔" if p.passed else "✘"
        fill = "#1e7d32" if p.passed else "#c0392b"
        out.append(
            f"<text x='{cx:.1f}' y='{TOP + plot_h + 16}' text-anchor='middle'>{p.utilization:.2f}</text>"
            f"<text x='{cx:.1f}' y='{TOP + plot_h + 32}' text-anchor='middle' fill='{fill}'>{mark}</text>"
        )
        if p.peak_gib is not None:
            y = TOP + plot_h * (1 - p.peak_gib / max_mem)
            line.append(f"{cx:.1f},{y:.1f}")
            out.append(
                f"<circle cx='{cx:.1f}' cy='{y:.1f}' r='4' fill='#c0392b'>"
                f"<title>{p.peak_gib:.2f} GiB</title></circle>"
            )
    if len(line) > 1:
        out.append(f"<polyline points='{' '.join(line)}' fill='none' stroke='#c0392b' stroke-width='2'/>")
    if capacity_gib:
        y = TOP + plot_h * (1 - capacity_gib / max_mem)
        out.append(
            f"<line x1='{LEFT}' y1='{y:.1f}' x2='{LEFT + plot_w}' y2='{y:.1f}' stroke='#c0392b' "
            f"stroke-dasharray='5,4'/><text x='{LEFT + 4}' y='{y - 4:.1f}' fill='#c0392b'>"
            f"{escape(unit)} capacity {capacity_gib:.1f} GiB</text>"
        )
    out.append(
        f"<text x='{LEFT + plot_w / 2}' y='{HEIGHT - 18}' text-anchor='middle'>--gpu-memory-utilization</text>"
    )
    out.append("</svg>")
    return "\n".join(out)


def _legend(points: list[ChartPoint]) -> str:
    items = [f"<li>{p.utilization:.2f}: {escape(p.label)}</li>" for p in points if not p.passed and p.label]
    return f"<ul>{''.join(items)}</ul>\n" if items else ""


def _tokens(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.1f}M"
    if value >= 1e3:
        return f"{value / 1e3:.0f}k"
    return f"{value:.0f}"
