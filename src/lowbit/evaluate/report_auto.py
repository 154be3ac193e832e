"""The report's `lowbit auto` section: every assignment the search measured, score vs latency, the front marked.

Drawn from `OUT.auto.json` (AutoResult.to_dict()) when it sits beside the first quantized model. Stable hooks:
`svg#auto-front-chart` with one `circle.point` per measured assignment (`front` on the explored front, `chosen`
on the one written) carrying `data-step`; `table#auto-table` lists the front.
"""

from __future__ import annotations

from html import escape
from typing import Any


def _num(v: float) -> str:
    return f"{v:.1f}"


def _stage(point: dict[str, Any]) -> str:
    """How the search reached a point: a step of its chain, a measured trim trial, or a point for the front."""
    return {"trim": "trim trial", "front": "chain step (front)"}.get(point.get("stage", "chain"), "chain step")


def auto_section(auto: dict[str, Any]) -> str:
    points = [p for p in auto.get("points") or [] if p.get("score") is not None and p.get("latency_ratio")]
    if not points:
        return ""
    front = {p["step"] for p in auto.get("front") or []}
    chosen = auto.get("step")
    width, height, left, bottom, top, right = 480, 300, 56, 40, 20, 24
    xs = [p["latency_ratio"] for p in points]
    ys = [p["score"] for p in points]
    x_lo, x_hi = min(xs) * 0.95, max(xs) * 1.05
    y_lo, y_hi = min(ys) - 0.5, max(max(ys), float(auto.get("reference") or 0)) + 0.5

    def px(x: float) -> float:
        return left + (width - left - right) * (x - x_lo) / ((x_hi - x_lo) or 1.0)

    def py(y: float) -> float:
        return top + (height - top - bottom) * (1 - (y - y_lo) / ((y_hi - y_lo) or 1.0))

    metric = escape(str(auto.get("metric", "score")))
    out = [
        f'<svg class="chart" id="auto-front-chart" width="{width}" height="{height}" role="img" '
        f'aria-label="{metric} vs latency">',
        f'<line class="axis" x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}"/>',
        f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">latency vs float '
        "(1 thread)</text>",
        f'<text x="12" y="{(top + height - bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {(top + height - bottom) / 2})">{metric}</text>',
    ]
    for k in range(5):
        xv, yv = x_lo + (x_hi - x_lo) * k / 4, y_lo + (y_hi - y_lo) * k / 4
        out.append(f'<text x="{_num(px(xv))}" y="{height - bottom + 14}" text-anchor="middle">{xv:.2f}x</text>')
        out.append(f'<text x="{left - 4}" y="{_num(py(yv) + 4)}" text-anchor="end">{yv:.1f}</text>')
    for p in sorted(points, key=lambda p: p["step"]):
        cls = "point" + (" front" if p["step"] in front else "") + (" chosen" if p["step"] == chosen else "")
        mix = ", ".join(f"{n} {k}" for k, n in sorted((p.get("precisions") or {}).items()))
        out.append(
            f'<circle class="{cls}" cx="{_num(px(p["latency_ratio"]))}" cy="{_num(py(p["score"]))}" '
            f'r="{7 if p["step"] == chosen else 5}" data-step="{p["step"]}">'
            f"<title>{_stage(p)} {p['step']}: {p['score']:.2f}, "
            f"{p['latency_ratio']:.3f}x float, {p['size_bytes'] / 1e6:.2f} MB ({escape(mix)})</title></circle>"
        )
    out.append("</svg>")
    rows = "".join(
        f'<tr><td class="num">{p["step"]}</td><td class="num">{p["score"]:.2f}</td>'
        f'<td class="num">{p["latency_ratio"]:.3f}</td><td class="num">{p["size_bytes"] / 1e6:.2f}</td>'
        f"<td>{escape(', '.join(f'{n} {k}' for k, n in sorted((p.get('precisions') or {}).items())))}</td></tr>"
        for p in sorted(auto.get("front") or [], key=lambda p: p["latency_ratio"])
    )
    table = (
        '<table class="sortable" id="auto-table"><thead><tr><th>step</th><th>score</th><th>latency vs float</th>'
        f"<th>MB</th><th>layers</th></tr></thead><tbody>{rows}</tbody></table>"
    )
    note = (
        f'<p class="note">Each point is an assignment `lowbit auto` built and measured ({metric} on its '
        "evaluation data with integer kernels; latency paired against float). Larger: the one it wrote; "
        "the table lists the front (no other point is faster, more accurate and smaller at once).</p>"
    )
    return f'<section id="auto"><h2>Mixed precision search</h2>{note}{"".join(out)}{table}</section>'
