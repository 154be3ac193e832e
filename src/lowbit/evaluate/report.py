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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..graph.write import atomic_write_bytes
from .report_assets import CSS, JS
from .report_auto import auto_section
from .report_charts import _e, _finite, _fmt, _headline, _histogram, _mb, _pct, _scatter, _sqnr_chart


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
