"""`lowbit report`: the HTML renders in headless Chromium with every chart drawn, escapes what it shows,
references nothing on the network, and the CLI gathers real measurements for it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import lowbit
from browser import Element, external_references, parse, render
from conftest import run_cli, tiny_cnn
from lowbit.evaluate.report import render as render_html
from lowbit.evaluate.report import write_report
from lowbit.evaluate.report_charts import WORST

EVIL = "<script>alert(1)</script>"


def sample_data(node_name: str = "conv") -> dict:
    sqnrs = [31.0, 12.5, 44.0, math.inf, 25.0, 8.0, 38.0, 19.5, 50.0, 27.0, 33.0, 15.0]
    layers = [{"node": f"{node_name}{i}", "op_type": "Conv", "sqnr_db": s} for i, s in enumerate(sqnrs)]
    layers[1]["alone_sqnr_db"] = 30.0
    rng = np.random.default_rng(0)
    hists = {}
    for i, (a, b) in enumerate([(0.0, 6.0), (-2.0, 3.5), (0.1, 1.6)]):
        counts, edges = np.histogram(rng.normal(1.0, 1.5, 5000), bins=40)
        hists[f"t{i}_{node_name}"] = {
            "edges": edges.tolist(),
            "counts": counts.tolist(),
            "range": [a, b],
            "node": f"{node_name}{i}",
        }
    return {
        "title": f"report for {node_name}",
        "generated": "2026-01-01T00:00:00+00:00",
        "lowbit_version": "0.1.0",
        "summary": {
            "rows": [
                ["float model", "m.onnx"],
                ["nodes quantized", "11 of 12"],
                [f"left float: {node_name}", "too sensitive"],
            ]
        },
        "variants": [
            {"name": "float", "size_bytes": 18_600_000, "top1_agreement": 1.0, "cosine": 1.0, "latency_ms": 8.1},
            {
                "name": f"int8 {node_name}",
                "size_bytes": 5_000_000,
                "top1_agreement": 0.90,
                "cosine": 0.989,
                "latency_ms": 4.6,
            },
            {
                "name": "int8 percentile",
                "size_bytes": 5_000_000,
                "top1_agreement": 0.93,
                "cosine": 0.992,
                "latency_ms": None,
            },
        ],
        "layers": layers,
        "histograms": hists,
        "lint": [
            {
                "kind": "low-sqnr",
                "nodes": [f"{node_name}5", f"{node_name}1"],
                "message": "two layers below 15 dB",
                "fix": "keep them float",
            },
            {
                "kind": "wide-range",
                "nodes": [f"{node_name}2"],
                "message": f"outliers in {node_name}2",
                "fix": "--calibration percentile",
            },
        ],
        "recipe": {"default": {"activations": "uint8"}, "rules": [{"names": [node_name], "scheme": None}]},
    }


def rows(table: Element) -> list[Element]:
    return table.find("tbody").find_all("tr")


@pytest.mark.browser
def test_report_renders_every_chart_in_chromium(tmp_path: Path) -> None:
    data = sample_data()
    path = write_report(data, tmp_path / "r.html")
    page = render(path)
    assert page.console == [], page.console
    html = page.root.find("html")
    assert html.attrs.get("data-ready") == "1", "the report's script did not run to the end"
    assert external_references(page.root) == []

    chart = page.root.find("svg", id="sqnr-chart")
    bars = chart.find_all("rect", cls="bar")
    assert [b.attrs["data-node"] for b in bars] == [layer["node"] for layer in data["layers"]]
    lowest = sorted(
        (layer for layer in data["layers"] if math.isfinite(layer["sqnr_db"])), key=lambda layer: layer["sqnr_db"]
    )[:WORST]
    assert {b.attrs["data-node"] for b in bars if "worst" in b.classes} == {layer["node"] for layer in lowest}
    # bar length follows SQNR; the exact layer (inf) is drawn as long as the best finite one
    widths = {b.attrs["data-node"]: float(b.attrs["width"]) for b in bars}
    finite = sorted(
        (layer for layer in data["layers"] if math.isfinite(layer["sqnr_db"])), key=lambda layer: layer["sqnr_db"]
    )
    assert [widths[layer["node"]] for layer in finite] == sorted(widths[layer["node"]] for layer in finite)
    assert widths["conv3"] == max(widths.values()) > 0
    assert len(chart.find_all("circle", cls="alone")) == 1

    size_points = page.root.find("svg", id="variants-size-chart").find_all("circle", cls="point")
    assert len(size_points) == 3
    lat_points = page.root.find("svg", id="variants-latency-chart").find_all("circle", cls="point")
    assert len(lat_points) == 2  # one variant has no latency
    # higher agreement is drawn higher (smaller y)
    cy = {p.attrs["data-variant"]: float(p.attrs["cy"]) for p in size_points}
    assert cy["float"] < cy["int8 percentile"] < cy["int8 conv"]

    hists = page.root.find_all("svg", cls="histogram")
    assert [h.attrs["data-tensor"] for h in hists] == list(data["histograms"])
    for h in hists:
        assert len(h.find_all("rect", cls="hist-bar")) > 10
        lines = h.find_all("line", cls="range-line")
        assert [line.attrs["data-bound"] for line in lines] == ["a", "b"]
        want = data["histograms"][h.attrs["data-tensor"]]["range"]
        assert [float(line.attrs["data-value"]) for line in lines] == want
        assert float(lines[0].attrs["x1"]) < float(lines[1].attrs["x1"])

    assert len(rows(page.root.find("table", id="summary-table"))) == 3
    assert len(rows(page.root.find("table", id="variants-table"))) == 3
    assert len(rows(page.root.find("table", id="layers-table"))) == len(data["layers"])
    assert len(rows(page.root.find("table", id="lint-table"))) == 2
    assert json.loads(page.root.find("pre", id="recipe").all_text()) == data["recipe"]


@pytest.mark.browser
def test_empty_report_renders_without_errors(tmp_path: Path) -> None:
    page = render(write_report({}, tmp_path / "empty.html"))
    assert page.console == [], page.console
    assert page.root.find("html").attrs.get("data-ready") == "1"
    assert page.root.find_all("svg") == []
    assert len(page.root.find_all("section")) == 6


@pytest.mark.browser
def test_text_is_escaped_everywhere(tmp_path: Path) -> None:
    data = sample_data(EVIL)
    text = render_html(data)
    assert EVIL not in text and "<script>alert" not in text
    page = render(write_report(data, tmp_path / "evil.html"))
    assert page.console == [], page.console
    assert len(page.root.find_all("script")) == 1  # only the report's own
    # the name survives as text and attribute values, exactly as given
    nodes = [b.attrs["data-node"] for b in page.root.find("svg", id="sqnr-chart").find_all("rect", cls="bar")]
    assert nodes[0] == f"{EVIL}0"
    assert EVIL in page.root.find("h1").all_text()
    assert EVIL in page.root.find("table", id="lint-table").all_text()
    assert json.loads(page.root.find("pre", id="recipe").all_text())["rules"][0]["names"] == [EVIL]


def lowbit_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit.cli.main", *args], capture_output=True, text=True)


@pytest.fixture
def quantized(tiny_model: Path, tiny_calib: Path, tmp_path: Path) -> Path:
    out = tmp_path / "tiny.int8.onnx"
    lowbit.quantize(str(tiny_model), str(out), calib=str(tiny_calib), progress=False)
    return out


@pytest.mark.browser
def test_cli_writes_a_report_of_real_measurements(
    tiny_model: Path, tiny_calib: Path, quantized: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report.html"
    proc = lowbit_cli(
        "report", str(tiny_model), str(quantized), "--data", str(tiny_calib), "-o", str(out), "--json", "--quiet"
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    plan = lowbit.Plan.load(quantized.with_suffix(".plan.json"))

    assert [v["name"] for v in data["variants"]] == ["float", quantized.name]
    q = data["variants"][1]
    assert q["size_bytes"] == quantized.stat().st_size and q["top1_agreement"] >= 0.9 and q["cosine"] > 0.99
    assert all(v["latency_ms"] > 0 for v in data["variants"])
    computing = {"conv1", "conv2", "add", "gap", "flatten", "fc"}  # Relu/Clip were folded away
    assert {"conv1", "conv2", "fc"} <= {layer["node"] for layer in data["layers"]} <= computing
    assert all(20 < float(layer["sqnr_db"]) < 80 for layer in data["layers"])
    assert len(data["histograms"]) == 4
    for tensor, h in data["histograms"].items():
        if tensor in plan.tensors:
            assert h["range"] == plan.tensors[tensor].range
        assert sum(h["counts"]) > 0 and h["edges"][0] <= h["range"][0] and h["edges"][-1] >= h["range"][1]
    assert (
        isinstance(data["recipe"], dict) and data["recipe"]["default"] == json.loads(json.dumps(plan.recipe))["default"]
    )

    page = render(out)
    assert page.console == [], page.console
    assert external_references(page.root) == []
    assert len(page.root.find("svg", id="sqnr-chart").find_all("rect", cls="bar")) == len(data["layers"])
    hists = page.root.find_all("svg", cls="histogram")
    assert len(hists) == 4 and all(len(h.find_all("line", cls="range-line")) == 2 for h in hists)
    assert len(rows(page.root.find("table", id="variants-table"))) == 2


def test_cli_quick_layer_sqnr_without_diagnose(
    tiny_model: Path, tiny_calib: Path, quantized: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r.html"
    proc = lowbit_cli(
        "report",
        str(tiny_model),
        str(quantized),
        "--data",
        str(tiny_calib),
        "-o",
        str(out),
        "--no-bench",
        "--no-diagnose",
        "--json",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    plan = lowbit.Plan.load(quantized.with_suffix(".plan.json"))
    # one entry per computing node of the quantized model, in graph order (Relu/Clip were folded away)
    assert [layer["node"] for layer in data["layers"]] == ["conv1", "conv2", "add", "gap", "flatten", "fc"]
    assert all(20 < float(layer["sqnr_db"]) < 80 for layer in data["layers"])
    lowest = sorted(data["layers"], key=lambda layer: float(layer["sqnr_db"]))[:4]
    assert sorted(h["node"] for h in data["histograms"].values()) == sorted(layer["node"] for layer in lowest)
    for tensor, h in data["histograms"].items():
        assert h["range"] == plan.tensors[tensor].range
        assert sum(h["counts"]) == 32 * {"r1": 8 * 256, "r2": 8 * 256, "s": 8 * 256, "g": 8, "f": 8, "y": 10}[tensor]
    assert data["recipe"] == json.loads(json.dumps(plan.recipe))


def test_layer_sqnr_of_the_output_matches_the_output_fidelity(quantized: Path, tiny_calib: Path) -> None:
    from lowbit.evaluate.metrics import sqnr_db
    from lowbit.evaluate.report_layers import layer_sqnr
    from lowbit.runtimes.ort import session

    x = np.load(tiny_calib)
    batches = [{"x": x[:16]}, {"x": x[16:]}]
    layers, extent = layer_sqnr(tiny_cnn(), onnx.load(str(quantized)), batches)
    ref = session(tiny_cnn()).run(None, {"x": x})[0]
    out = session(str(quantized), "simulate").run(None, {"x": x})[0]
    fc = next(layer for layer in layers if layer["node"] == "fc")
    assert fc["sqnr_db"] == pytest.approx(sqnr_db(ref, out), abs=1e-3)
    assert extent["y"] == pytest.approx((float(ref.min()), float(ref.max())))


def test_cli_without_plan_or_bench(tiny_model: Path, tiny_calib: Path, quantized: Path, tmp_path: Path) -> None:
    quantized.with_suffix(".plan.json").unlink()
    out = tmp_path / "r.html"
    proc = lowbit_cli(
        "report",
        str(tiny_model),
        str(quantized),
        "--data",
        str(tiny_calib),
        "-o",
        str(out),
        "--no-bench",
        "--limit",
        "8",
        "--json",
        "--quiet",
    )  # no plan: no diagnosis
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["recipe"] is None and all(v["latency_ms"] is None for v in data["variants"])
    assert all(h["range"] is None for h in data["histograms"].values())
    assert "8 samples" in dict(data["summary"]["rows"])["data"]
    root = parse(out.read_text())
    assert root.find_all("line", cls="range-line") == [] and root.find_all("svg", id="variants-latency-chart") == []


@pytest.mark.parametrize("which", ["float", "quant", "data", "suffix"])
def test_cli_refuses_to_overwrite_an_input(
    which: str, tiny_model: Path, tiny_calib: Path, quantized: Path, tmp_path: Path
) -> None:
    target = {"float": tiny_model, "quant": quantized, "data": tiny_calib, "suffix": tmp_path / "r.txt"}[which]
    before = target.read_bytes() if target.exists() else None
    proc = run_cli("report", str(tiny_model), str(quantized), "--data", str(tiny_calib), "-o", str(target))
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lowbit: error:") and "Traceback" not in proc.stderr, err
    assert ("inputs" if which != "suffix" else ".html") in err
    assert (target.read_bytes() if target.exists() else None) == before
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".html" or p.name.endswith(".tmp")]
