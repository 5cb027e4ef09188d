"""A self-contained HTML page with an SVG chart of a throughput sweep, in ramp's style (``chart.py``).

Pure: :func:`sweep_chart_html` turns the sweep's table rows into text; no plotting library, no scripts,
no network. Bars are output tokens/s per concurrency (left axis; the chosen one green, one that broke a
limit red, its reason in the list under the chart); the line is p95 TTFT (right axis), with the TTFT
limit of the SLO, if any, as a dashed line.
"""

from __future__ import annotations

from html import escape

from .chart import BOTTOM, HEIGHT, LEFT, RIGHT, TOP, WIDTH, _tokens


def sweep_chart_html(
    rows: list[dict],
    *,
    title: str,
    chosen: int | None,
    broken: dict[int, str],
    ttft_limit_s: float | None = None,
) -> str:
    """``rows``: ``ThroughputResult.table()``; ``broken``: concurrency → why it was not chosen."""
    items = "".join(f"<li>C={c}: {escape(why)}</li>" for c, why in sorted(broken.items()))
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:24px;color:#222}"
        "li{margin:2px 0}</style></head><body>\n"
        f"<h2>{escape(title)}</h2>\n{sweep_chart_svg(rows, chosen=chosen, broken=broken, ttft_limit_s=ttft_limit_s)}\n"
        + (f"<ul>{items}</ul>\n" if items else "")
        + "</body></html>\n"
    )


def sweep_chart_svg(
    rows: list[dict], *, chosen: int | None, broken: dict[int, str], ttft_limit_s: float | None = None
) -> str:
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(1, len(rows))
    max_tput = max([r["output_tokens_per_s"] for r in rows] + [1.0]) * 1.05
    ttfts = [r["ttft_p95"] for r in rows if r.get("ttft_p95") is not None]
    max_ttft = max(ttfts + ([ttft_limit_s] if ttft_limit_s else []) + [1e-3]) * 1.1
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' "
        f"viewBox='0 0 {WIDTH} {HEIGHT}' font-size='11' font-family='sans-serif'>",
        f"<rect x='{LEFT}' y='{TOP}' width='{plot_w}' height='{plot_h}' fill='#fafafa' stroke='#ccc'/>",
    ]
    for i in range(5):
        frac = i / 4
        y = TOP + plot_h * (1 - frac)
        out.append(f"<line x1='{LEFT}' y1='{y:.1f}' x2='{LEFT + plot_w}' y2='{y:.1f}' stroke='#eee'/>")
        out.append(
            f"<text x='{LEFT - 6}' y='{y + 4:.1f}' text-anchor='end' fill='#3b6fb6'>{_tokens(max_tput * frac)}</text>"
            f"<text x='{LEFT + plot_w + 6}' y='{y + 4:.1f}' fill='#c0392b'>{max_ttft * frac:.2g}</text>"
        )
    out.append(f"<text x='{LEFT}' y='{TOP - 12}' fill='#3b6fb6'>output tokens/s</text>")
    out.append(
        f"<text x='{LEFT + plot_w}' y='{TOP - 12}' text-anchor='end' fill='#c0392b'>p95 TTFT (s)</text>"
    )
    line: list[str] = []
    for i, r in enumerate(rows):
        c = r["concurrency"]
        cx = LEFT + slot * (i + 0.5)
        h = plot_h * r["output_tokens_per_s"] / max_tput
        color = "#5cb85c" if c == chosen else ("#e8a0a0" if c in broken else "#7aa6e0")
        out.append(
            f"<rect x='{cx - slot * 0.3:.1f}' y='{TOP + plot_h - h:.1f}' width='{slot * 0.6:.1f}' "
            f"height='{h:.1f}' fill='{color}'><title>C={c}: {r['output_tokens_per_s']:,.0f} tok/s</title></rect>"
            f"<text x='{cx:.1f}' y='{TOP + plot_h + 16}' text-anchor='middle'>{c}</text>"
        )
        if r.get("ttft_p95") is not None:
            y = TOP + plot_h * (1 - r["ttft_p95"] / max_ttft)
            line.append(f"{cx:.1f},{y:.1f}")
            out.append(
                f"<circle cx='{cx:.1f}' cy='{y:.1f}' r='4' fill='#c0392b'><title>{r['ttft_p95']:.3g} s</title></circle>"
            )
    if len(line) > 1:
        out.append(f"<polyline points='{' '.join(line)}' fill='none' stroke='#c0392b' stroke-width='2'/>")
    if ttft_limit_s:
        y = TOP + plot_h * (1 - ttft_limit_s / max_ttft)
        out.append(
            f"<line x1='{LEFT}' y1='{y:.1f}' x2='{LEFT + plot_w}' y2='{y:.1f}' stroke='#c0392b' "
            f"stroke-dasharray='5,4'/><text x='{LEFT + 4}' y='{y - 4:.1f}' fill='#c0392b'>"
            f"TTFT limit {ttft_limit_s:g} s</text>"
        )
    out.append(f"<text x='{LEFT + plot_w / 2}' y='{HEIGHT - 18}' text-anchor='middle'>clients (C)</text>")
    out.append("</svg>")
    return "\n".join(out)
