"""The ramp chart: well-formed, self-contained SVG in HTML with every step."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from vllm_tuner.chart import ChartPoint, ramp_chart_html, ramp_chart_svg

SVG = "{http://www.w3.org/2000/svg}"


def points() -> list[ChartPoint]:
    return [
        ChartPoint(0.85, 700000, 27.2, True),
        ChartPoint(0.86, 720000, 27.5, True),
        ChartPoint(0.87, None, None, False, "did not start: oom <cudagraph> & capture"),
    ]


def test_the_svg_parses_and_draws_bars_and_the_memory_line():
    root = ET.fromstring(ramp_chart_svg(points(), capacity_gib=31.4))
    assert len(root.findall(f"{SVG}rect")) == 1 + 2  # the plot area and two bars
    assert len(root.findall(f"{SVG}circle")) == 2
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert {"0.85", "0.86", "0.87", "✘"} <= set(texts)
    assert any(t and t.startswith("GPU capacity 31.4") for t in texts)


def test_the_page_is_self_contained_and_escapes_labels():
    page = ramp_chart_html(points(), title="ramp <m>")
    assert (
        page.startswith("<!doctype html>")
        and "<script" not in page
        and "http://" not in page.split("<svg")[0]
    )
    assert "ramp &lt;m&gt;" in page and "oom &lt;cudagraph&gt; &amp; capture" in page


def test_an_empty_ramp_still_renders():
    assert ET.fromstring(ramp_chart_svg([])).tag == f"{SVG}svg"
