"""The fixed parts of the HTML report: style sheet and the small script (table sorting). No network, ever."""

CSS = """
:root { --fg: #1d2430; --muted: #667085; --line: #d0d5dd; --bar: #4e79a7; --worst: #e15759;
        --alone: #f28e2b; --range: #e15759; --bg: #ffffff; --stripe: #f6f7f9; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; padding: 24px; max-width: 1100px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 32px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
p.meta, p.note, .empty { color: var(--muted); margin: 4px 0 12px; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: var(--stripe); cursor: pointer; user-select: none; }
th[data-sort="asc"]::after { content: " \\25B2"; }
th[data-sort="desc"]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: var(--stripe); border: 1px solid var(--line); padding: 12px; overflow: auto; }
svg.chart { display: block; margin: 8px 0 16px; font-size: 11px; }
svg.chart text { fill: var(--fg); }
svg.chart .axis { stroke: var(--muted); stroke-width: 1; }
svg.chart .grid { stroke: var(--line); stroke-width: 1; stroke-dasharray: 2 3; }
svg.chart rect.bar { fill: var(--bar); }
svg.chart rect.bar.worst { fill: var(--worst); }
svg.chart circle.alone { fill: var(--alone); }
svg.chart circle.point { fill: var(--bar); stroke: #fff; stroke-width: 1.5; }
svg.chart circle.point.float { fill: var(--muted); }
svg.chart circle.point.front { fill: var(--alone); }
svg.chart circle.point.chosen { stroke: var(--fg); }
svg.chart rect.hist-bar { fill: var(--bar); opacity: 0.85; }
svg.chart line.range-line { stroke: var(--range); stroke-width: 2; stroke-dasharray: 5 3; }
.histograms { display: flex; flex-wrap: wrap; gap: 8px 24px; }
.histograms figure { margin: 0; }
.histograms figcaption { font-size: 12px; color: var(--muted); max-width: 340px; overflow-wrap: anywhere; }
.legend span { display: inline-block; margin-right: 16px; color: var(--muted); font-size: 12px; }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px; vertical-align: middle; }
"""

# Click a header to sort its table (numbers numerically, using data-value when a cell shows a formatted
# value). The script marks <html data-ready="1"> so a headless browser test can tell it ran to the end.
JS = """
(function () {
  "use strict";
  function key(cell) {
    var raw = cell.getAttribute("data-value");
    var text = raw !== null ? raw : cell.textContent.trim();
    var num = parseFloat(text);
    return isNaN(num) || !/^[-+]?[0-9.]/.test(text) ? { n: false, v: text.toLowerCase() } : { n: true, v: num };
  }
  function sortBy(table, col, th) {
    var body = table.tBodies[0];
    if (!body) { return; }
    var desc = th.getAttribute("data-sort") === "asc";
    var heads = table.querySelectorAll("th");
    for (var h = 0; h < heads.length; h++) { heads[h].removeAttribute("data-sort"); }
    th.setAttribute("data-sort", desc ? "desc" : "asc");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (ra, rb) {
      var a = key(ra.cells[col]), b = key(rb.cells[col]);
      var c = a.n && b.n ? a.v - b.v : String(a.v).localeCompare(String(b.v));
      return desc ? -c : c;
    });
    for (var r = 0; r < rows.length; r++) { body.appendChild(rows[r]); }
  }
  var tables = document.querySelectorAll("table.sortable");
  for (var t = 0; t < tables.length; t++) {
    (function (table) {
      var heads = table.tHead ? table.tHead.rows[0].cells : [];
      for (var i = 0; i < heads.length; i++) {
        (function (col, th) { th.addEventListener("click", function () { sortBy(table, col, th); }); })(i, heads[i]);
      }
    })(tables[t]);
  }
  document.documentElement.setAttribute("data-ready", "1");
})();
"""
