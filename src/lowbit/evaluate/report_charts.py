"""The report's formatting helpers and inline SVG charts (SQNR bars, size/latency scatter, activation
histograms), drawn here in Python so the HTML file needs nothing from the network."""

from __future__ import annotations

import math
from html import escape
from typing import Any, TypeGuard

WORST = 5  # layers highlighted in the SQNR chart


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _finite(x: Any) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _fmt(x: Any, digits: int = 2, suffix: str = "") -> str:
    if x is None:
        return "\u2013"
    if isinstance(x, float) and math.isinf(x):
        return "exact" if x > 0 else "-\u221e"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, float):
        return f"{x:.{digits}f}{suffix}"
    return f"{x}{suffix}"


def _pct(x: Any) -> str:
    return "\u2013" if x is None else f"{100 * x:.1f}%"


# headline metrics that are fractions 0..1, drawn on the charts' percentage axis; others (SQNR) draw cosine
_FRACTIONS = ("top1_agreement", "map_iou", "pixel_agreement", "sequence_match", "class_agreement", "cosine")


def _headline(v: dict) -> tuple[str, Any]:
    """(label, value) of a variant's headline fidelity: its "task" when given, else top-1 agreement."""
    t = v.get("task")
    if not t:
        return "top-1 agreement", v.get("top1_agreement")
    return str(t.get("label", t.get("metric", "?"))), t.get("value")


def _chart_y(v: dict) -> tuple[str, Any]:
    t = v.get("task")
    if t and t.get("metric") not in _FRACTIONS:
        return "cosine", v.get("cosine")
    return _headline(v)


def _mb(n: Any) -> str:
    if n is None:
        return "\u2013"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _num(v: float) -> str:
    return f"{v:.1f}"


def _worst(layers: list[dict]) -> set[int]:
    ranked = sorted(
        (i for i, layer in enumerate(layers) if _finite(layer.get("sqnr_db"))), key=lambda i: layers[i]["sqnr_db"]
    )
    return set(ranked[:WORST])


def _sqnr_chart(layers: list[dict]) -> str:
    if not layers:
        return '<p class="empty">No per-layer measurements.</p>'
    values = [layer.get("sqnr_db") for layer in layers] + [layer.get("alone_sqnr_db") for layer in layers]
    top = max([v for v in values if _finite(v)] + [1.0])
    worst = _worst(layers)
    row, label_w, bar_w, width = 16, 280, 540, 900
    height = 24 + row * len(layers) + 24
    scale = bar_w / top
    out = [
        f'<svg class="chart" id="sqnr-chart" width="{width}" height="{height}" role="img" '
        f'aria-label="per-layer SQNR in dB">'
    ]
    for k in range(0, int(top) + 1, max(5, 5 * math.ceil(top / 50))):
        x = label_w + k * scale
        out.append(
            f'<line class="grid" x1="{_num(x)}" y1="16" x2="{_num(x)}" y2="{height - 20}"/>'
            f'<text x="{_num(x)}" y="{height - 6}" text-anchor="middle">{k} dB</text>'
        )
    for i, layer in enumerate(layers):
        y = 20 + i * row
        name = str(layer.get("node", "?"))
        shown = name if len(name) <= 40 else "\u2026" + name[-39:]
        sqnr = layer.get("sqnr_db")
        length = top if isinstance(sqnr, float) and math.isinf(sqnr) and sqnr > 0 else sqnr if _finite(sqnr) else 0
        length = max(0.0, float(length))
        cls = "bar worst" if i in worst else "bar"
        tip = f"{name} ({layer.get('op_type', '?')}): {_fmt(sqnr, 1, ' dB')}"
        if layer.get("alone_sqnr_db") is not None:
            tip += f"; quantized alone: {_fmt(layer['alone_sqnr_db'], 1, ' dB')}"
        out.append(
            f'<text x="{label_w - 6}" y="{y + 11}" text-anchor="end">{_e(shown)}</text>'
            f'<rect class="{cls}" data-node="{_e(name)}" x="{label_w}" y="{y + 2}" '
            f'width="{_num(length * scale)}" height="{row - 4}"><title>{_e(tip)}</title></rect>'
            f'<text x="{_num(label_w + length * scale + 4)}" y="{y + 11}">{_e(_fmt(sqnr, 1))}</text>'
        )
        alone = layer.get("alone_sqnr_db")
        if _finite(alone):
            out.append(
                f'<circle class="alone" cx="{_num(label_w + max(0.0, alone) * scale)}" cy="{y + row / 2}" '
                f'r="3.5"><title>{_e(name)} quantized alone: {_e(_fmt(alone, 1, " dB"))}</title></circle>'
            )
    out.append(f'<line class="axis" x1="{label_w}" y1="16" x2="{label_w}" y2="{height - 20}"/></svg>')
    legend = [
        '<p class="legend"><span><i style="background:var(--bar)"></i>SQNR of the layer output, errors of '
        'earlier layers included</span><span><i style="background:var(--worst)"></i>'
        f"{len(worst)} lowest</span>"
    ]
    if any(_finite(layer.get("alone_sqnr_db")) for layer in layers):
        legend.append('<span><i style="background:var(--alone);border-radius:5px"></i>only this layer quantized</span>')
    legend.append("</p>")
    return "".join(out) + "".join(legend)


def _scatter(chart_id: str, variants: list[dict], x_key: str, x_label: str, x_scale: float) -> str:
    raw = [(v, v.get(x_key), _chart_y(v)[1]) for v in variants]
    pts = [(v, x * x_scale, y) for v, x, y in raw if _finite(x) and _finite(y)]
    if not pts:
        return ""
    y_label = _chart_y(variants[-1])[0]  # a quantized variant's: the float one may have no task
    width, height, left, bottom, top_pad, right = 440, 300, 56, 40, 24, 24
    x_max = max(x for _, x, _ in pts) * 1.25 or 1.0
    y_min = min(min(y for _, _, y in pts) - 0.02, 0.9)
    step = 0.05 if y_min >= 0.75 else 0.1 if y_min >= 0.5 else 0.25  # round percentages on the axis
    y_min = max(0.0, math.floor(y_min / step + 1e-9) * step)
    ticks = round((1 - y_min) / step)

    def px(x: float) -> float:
        return left + (width - left - right) * x / x_max

    def py(y: float) -> float:
        return top_pad + (height - top_pad - bottom) * (1 - (y - y_min) / (1 - y_min or 1))

    out = [
        f'<svg class="chart" id="{chart_id}" width="{width}" height="{height}" role="img" '
        f'aria-label="{_e(y_label)} vs {_e(x_label)}">'
    ]
    for k in range(ticks + 1):
        yv = y_min + step * k
        out.append(
            f'<line class="grid" x1="{left}" y1="{_num(py(yv))}" x2="{width - right}" y2="{_num(py(yv))}"/>'
            f'<text x="{left - 4}" y="{_num(py(yv) + 4)}" text-anchor="end">{100 * yv:.0f}%</text>'
        )
    for k in range(5):
        xv = x_max * k / 4
        out.append(f'<text x="{_num(px(xv))}" y="{height - bottom + 14}" text-anchor="middle">{xv:.3g}</text>')
    out.append(
        f'<line class="axis" x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}"/>'
        f'<line class="axis" x1="{left}" y1="{top_pad}" x2="{left}" y2="{height - bottom}"/>'
        f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">{_e(x_label)}</text>'
        f'<text x="12" y="{(top_pad + height - bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {(top_pad + height - bottom) / 2})">{_e(y_label)} with float</text>'
    )
    for i, (v, x, y) in enumerate(pts):
        cls = "point float" if i == 0 and variants and v is variants[0] else "point"
        name = str(v.get("name", "?"))
        # labels right of a point, or left of it in the right half; alternate heights so equal points stay legible
        right_half = px(x) > (left + width - right) / 2
        tx, anchor = (px(x) - 9, "end") if right_half else (px(x) + 9, "start")
        out.append(
            f'<circle class="{cls}" cx="{_num(px(x))}" cy="{_num(py(y))}" r="6" data-variant="{_e(name)}">'
            f"<title>{_e(name)}: {x:.3g} {_e(x_label)}, {_e(y_label)} {_pct(y)}</title></circle>"
            f'<text x="{_num(tx)}" y="{_num(py(y) - 8 + 22 * (i % 2))}" text-anchor="{anchor}">'
            f"{_e(name[:32])}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def _histogram(tensor: str, h: dict) -> str:
    edges = [float(e) for e in h.get("edges", [])]
    counts = [float(c) for c in h.get("counts", [])]
    rng = h.get("range")
    if len(edges) != len(counts) + 1 or not counts:
        return ""
    lo, hi = edges[0], edges[-1]
    if rng is not None:
        lo, hi = min(lo, float(rng[0])), max(hi, float(rng[1]))
    if hi <= lo:
        hi = lo + 1.0
    width, height, left, right, top_pad, bottom = 340, 180, 14, 14, 20, 20
    peak = math.log1p(max(counts)) or 1.0

    def px(x: float) -> float:
        return left + (width - left - right) * (x - lo) / (hi - lo)

    base = height - bottom
    out = [
        f'<svg class="chart histogram" data-tensor="{_e(tensor)}" width="{width}" height="{height}" role="img" '
        f'aria-label="activation histogram of {_e(tensor)}">'
    ]
    for i, c in enumerate(counts):
        if c <= 0:
            continue
        x0, x1 = px(edges[i]), px(edges[i + 1])
        bh = (base - top_pad) * math.log1p(c) / peak
        out.append(
            f'<rect class="hist-bar" x="{x0:.2f}" y="{base - bh:.2f}" width="{max(x1 - x0, 0.5):.2f}" '
            f'height="{bh:.2f}"><title>[{edges[i]:.4g}, {edges[i + 1]:.4g}): {c:.0f}</title></rect>'
        )
    out.append(f'<line class="axis" x1="{left}" y1="{base}" x2="{width - right}" y2="{base}"/>')
    out.append(
        f'<text x="{left}" y="{base + 13}">{lo:.3g}</text>'
        f'<text x="{width - right}" y="{base + 13}" text-anchor="end">{hi:.3g}</text>'
    )
    if rng is not None:
        for side, v in (("a", float(rng[0])), ("b", float(rng[1]))):
            x = px(v)
            # the label sits inside the range, next to its line, so both fit at the chart's edges
            tx, anchor = (x + 3, "start") if side == "a" else (x - 3, "end")
            out.append(
                f'<line class="range-line" data-bound="{side}" data-value="{v!r}" x1="{x:.2f}" '
                f'y1="{top_pad - 6}" x2="{x:.2f}" y2="{base}"><title>{side} = {v:.4g}</title></line>'
                f'<text x="{tx:.2f}" y="{top_pad - 8}" text-anchor="{anchor}">{side}={v:.3g}</text>'
            )
    out.append("</svg>")
    node = h.get("node")
    where = f" (output of {_e(node)})" if node else ""
    chosen = f"chosen range [{float(rng[0]):.4g}, {float(rng[1]):.4g}]" if rng is not None else "no chosen range"
    clipped = ""
    if rng is not None:
        total = sum(counts) or 1.0
        outside = sum(c for i, c in enumerate(counts) if edges[i + 1] <= float(rng[0]) or edges[i] >= float(rng[1]))
        clipped = f"; {100 * outside / total:.2f}% of values in bins fully outside it"
    return (
        f"<figure>{''.join(out)}<figcaption><b>{_e(tensor)}</b>{where}: {chosen}{clipped}; "
        f"counts on a log scale</figcaption></figure>"
    )
