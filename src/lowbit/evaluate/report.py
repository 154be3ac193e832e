"""Render a quantization report as ONE self-contained HTML file: inline CSS, inline SVG charts drawn here in
Python, a few lines of inline JS (table sorting). It never references the network, so it opens offline and
can be mailed around. All text from models, plans and recipes is HTML-escaped.

The renderer takes a plain dict (gathered by `lowbit.evaluate.report_data.report`, or built by hand):

    {
      "title": str,
      "generated": str,                     # ISO 8601 time
      "lowbit_version": str,
      "summary": {"rows": [[label, value], ...]},
      "variants": [                         # the float model first, then each quantized model
        {"name": str, "size_bytes": int, "top1_agreement": float | None,   # fraction 0..1, vs float
         "cosine": float | None, "latency_ms": float | None,
         "kind": str, "task": {"metric": str, "label": str, "value": float | None}  # optional: the headline
         }, ...],                           # that fits the first output (outputs.py); default top-1
      "layers": [                           # per-layer SQNR of the quantized model vs float, graph order
        {"node": str, "op_type": str, "sqnr_db": float,                    # inf = exact
         "alone_sqnr_db": float | None (optional: only this layer quantized),
         "suggestion": str (optional: a fix worth trying)}, ...],
      "histograms": {                       # worst layers' float activations and the chosen range
        tensor: {"edges": [n + 1 floats], "counts": [n ints], "range": [a, b] | None,
                 "node": str (optional, the layer it belongs to)}, ...},
      "lint": [{"kind": str, "nodes": [str, ...], "message": str, "fix": str}, ...],
      "recipe": dict | None,
      "recipe_note": str (optional: where the recipe comes from),
      "auto": dict (optional: `lowbit auto`'s OUT.auto.json; report_auto.py draws its explored points),
    }

Missing keys render as empty sections. Charts carry stable ids/classes for tests and styling:
`svg#sqnr-chart` with one `rect.bar` per layer (`rect.bar.worst` for the lowest SQNRs), `svg#variants-size-chart`
and `svg#variants-latency-chart` with one `circle.point` per variant, one `svg.histogram` per tensor with
`rect.hist-bar` bins and two `line.range-line`; tables `#summary-table`, `#variants-table`, `#layers-table`,
`#lint-table`; `pre#recipe`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import Any, TypeGuard

from ..graph.write import atomic_write_bytes
from .report_assets import CSS, JS
from .report_auto import auto_section

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


def _table(
    table_id: str, head: list[str] | None, rows: Iterable[Sequence[tuple[str, Any] | str]], sortable: bool = True
) -> str:
    """rows hold cells as plain text or (text, sort value) pairs; numeric cells are right-aligned."""
    cls = ' class="sortable"' if sortable else ""
    out = [f'<table id="{table_id}"{cls}>']
    if head:
        out.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        out.append("<tr>")
        for cell in row:
            if isinstance(cell, tuple):
                text, value = cell
                val = "" if value is None or not _finite(value) else f' data-value="{value!r}"'
                out.append(f'<td class="num"{val}>{_e(text)}</td>')
            else:
                out.append(f"<td>{_e(cell)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


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


def _variants(variants: list[dict]) -> str:
    if not variants:
        return '<p class="empty">No models measured.</p>'
    base = variants[0].get("size_bytes")
    rows: list[list[tuple[str, Any] | str]] = []
    for v in variants:
        size = v.get("size_bytes")
        ratio = size / base if size is not None and base else None
        rows.append(
            [
                str(v.get("name", "?")),
                (_mb(size), size),
                (_pct(ratio), ratio),
                (_pct(v.get("top1_agreement")), v.get("top1_agreement")),
                _headline_cell(v),
                (_fmt(v.get("cosine"), 4), v.get("cosine")),
                (_fmt(v.get("latency_ms"), 3), v.get("latency_ms")),
            ]
        )
    charts = _scatter("variants-size-chart", variants, "size_bytes", "file size (MB)", 1e-6)
    charts += _scatter("variants-latency-chart", variants, "latency_ms", "latency (ms)", 1.0)
    table = _table(
        "variants-table",
        ["model", "size", "of float", "top-1 agreement", "task metric", "cosine vs float", "latency ms"],
        rows,
    )
    return f'<div class="histograms">{charts}</div>{table}'


def _headline_cell(v: dict) -> tuple[str, Any]:
    from .outputs import format_value  # numpy comes with it: only when a table is drawn

    label, value = _headline(v)
    metric = (v.get("task") or {}).get("metric", "top1_agreement")
    if value is None or not _finite(value):  # SQNR of float against itself: exact
        return ("exact", None) if value is not None else ("\u2013", None)
    return f"{label} {format_value(metric, value)}", value


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


def _lint(lint: list[dict]) -> str:
    if not lint:
        return '<p class="empty">No findings.</p>'
    rows = [
        [
            str(f.get("kind", "")),
            ", ".join(str(n) for n in f.get("nodes", []) or []),
            str(f.get("message", "")),
            str(f.get("fix", "")),
        ]
        for f in lint
    ]
    return _table("lint-table", ["kind", "nodes", "finding", "fix"], rows)


def render(data: dict) -> str:
    """The whole report as an HTML string (see the module docstring for `data`)."""
    title = str(data.get("title") or "lowbit quantization report")
    layers = list(data.get("layers") or [])
    hists = dict(data.get("histograms") or {})
    summary_rows = [[str(k), str(v)] for k, v in (data.get("summary") or {}).get("rows", [])]
    layer_head = ["node", "op", "SQNR dB", "alone dB"]
    layer_rows: list[list[tuple[str, Any] | str]] = [
        [
            str(layer.get("node", "?")),
            str(layer.get("op_type", "?")),
            (_fmt(layer.get("sqnr_db"), 1), layer.get("sqnr_db")),
            (_fmt(layer.get("alone_sqnr_db"), 1), layer.get("alone_sqnr_db")),
        ]
        for layer in layers
    ]
    if any(layer.get("suggestion") for layer in layers):
        layer_head.append("suggestion")
        for row, layer in zip(layer_rows, layers):
            row.append(str(layer.get("suggestion") or ""))
    recipe = data.get("recipe")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">generated {_e(data.get("generated", "?"))} '
        f"by lowbit {_e(data.get('lowbit_version', '?'))}</p>",
        '<section id="summary"><h2>Summary</h2>',
        _table("summary-table", None, summary_rows, sortable=False)
        if summary_rows
        else '<p class="empty">Nothing to summarize.</p>',
        "</section>",
        '<section id="variants"><h2>Accuracy, size and latency</h2>',
        "<p class=\"note\">Top-1 agreement and cosine compare each model's output with the float model's on the same "
        "data; latency is the median of interleaved single-batch runs.</p>",
        _variants(list(data.get("variants") or [])),
        "</section>",
        auto_section(data["auto"]) if data.get("auto") else "",
        '<section id="layers"><h2>Per-layer SQNR</h2>',
        '<p class="note">Signal-to-quantization-noise ratio of each layer\'s output, quantized model vs float; '
        "higher is better, every 6 dB is about one bit.</p>",
        _sqnr_chart(layers),
        _table("layers-table", layer_head, layer_rows) if layers else "",
        "</section>",
        '<section id="histograms"><h2>Activations of the worst layers</h2>',
        '<div class="histograms">' + "".join(_histogram(str(t), h) for t, h in hists.items()) + "</div>"
        if hists
        else '<p class="empty">No histograms.</p>',
        "</section>",
        '<section id="lint"><h2>Findings</h2>',
        _lint(list(data.get("lint") or [])),
        "</section>",
        '<section id="recipe-section"><h2>Recipe</h2>',
        f'<p class="note">{_e(data["recipe_note"])}</p>' if data.get("recipe_note") else "",
        f'<pre id="recipe">{_e(json.dumps(recipe, indent=2, sort_keys=True, default=str))}</pre>'
        if recipe is not None
        else '<p class="empty">No recipe (no plan was given).</p>',
        "</section>",
        f"<script>{JS}</script>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(data: dict, path: str | Path) -> Path:
    """Render and write atomically (a reader never sees half a report)."""
    atomic_write_bytes(render(data).encode("utf-8"), path)
    return Path(path)
