"""Models past 2 GB: build a transformer-style float model with external data, quantize it three ways with the
`lowbit quantize` CLI (each in its own process, peak RSS and CPU time from wait4), check each output with the
path-based onnx.checker and run it in ONNX Runtime from its path against the float model.

    PYTHONPATH=src:examples python bench/large.py --gb 2.5 --out /tmp/large --results bench/RESULTS_LARGE.md

The model (random weights, fixed seed) is written tensor by tensor into OUT/float.onnx + float.onnx.data, never
held in memory whole; nothing is stored in git. Peak RSS is the child's own (wait4's ru_maxrss; the parent stays
small, since Linux carries the parent's RSS at fork into the child's maximum).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

SEED = 0
VOCAB = 32000
SEQ = 16
ALIGN = 4096  # external tensors start on page boundaries, so runtimes can map them


class DataWriter:
    """Initializers streamed into one external data file, one tensor at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = path.open("wb")
        self.offset = 0
        self.rng = np.random.default_rng(SEED)
        self.weight_bytes = 0

    def add(self, name: str, shape: tuple[int, ...], std: float = 0.02, value: float | None = None) -> TensorProto:
        if value is not None:
            arr = np.full(shape, value, np.float32)
        else:
            arr = self.rng.standard_normal(shape, dtype=np.float32)
            arr *= np.float32(std)
        pad = -self.offset % ALIGN
        self.f.write(b"\0" * pad)
        self.offset += pad
        self.f.write(arr.tobytes())
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(arr.nbytes))):
            t.external_data.add(key=k, value=v)
        self.offset += arr.nbytes
        self.weight_bytes += arr.nbytes
        return t

    def close(self) -> None:
        self.f.close()


def layer_count(gb: float, d: int) -> int:
    per_layer = 12 * d * d * 4  # QKV + out (4 d^2) and FFN (8 d^2), float32
    return max(1, round((gb * 1e9 - VOCAB * d * 4) / per_layer))


def build(path: Path, gb: float, d: int, heads: int) -> int:
    """Write the model to `path` (+ `path.data`); returns its weight bytes."""
    layers = layer_count(gb, d)
    data = DataWriter(path.with_name(path.name + ".data"))
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    small = [  # shapes and scalars live in the .onnx itself
        helper.make_tensor("heads_shape", TensorProto.INT64, [4], [0, 0, heads, d // heads]),
        helper.make_tensor("model_shape", TensorProto.INT64, [3], [0, 0, d]),
        helper.make_tensor("inv_sqrt", TensorProto.FLOAT, [], [1.0 / np.sqrt(d // heads)]),
    ]

    def w(name: str, shape: tuple[int, ...], **kw: float) -> str:
        inits.append(data.add(name, shape, **kw))
        return name

    def node(op: str, ins: list[str], out: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def norm(x: str, name: str) -> str:
        return node("LayerNormalization", [x, w(f"{name}.g", (d,), value=1.0), w(f"{name}.b", (d,), value=0.0)], name)

    x = node("Gather", [w("embed", (VOCAB, d)), "tokens"], "embedded")
    for i in range(layers):
        p = f"l{i}"
        h = norm(x, f"{p}.ln1")
        qkv = []
        for k, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            y = node("MatMul", [h, w(f"{p}.w{k}", (d, d))], f"{p}.{k}")
            y = node("Add", [y, w(f"{p}.b{k}", (d,), value=0.0)], f"{p}.{k}b")
            y = node("Reshape", [y, "heads_shape"], f"{p}.{k}r")
            qkv.append(node("Transpose", [y], f"{p}.{k}t", perm=perm))
        s = node("MatMul", qkv[:2], f"{p}.scores")
        s = node("Mul", [s, "inv_sqrt"], f"{p}.scaled")
        s = node("Softmax", [s], f"{p}.probs", axis=-1)
        a = node("MatMul", [s, qkv[2]], f"{p}.attn")
        a = node("Transpose", [a], f"{p}.attn_t", perm=[0, 2, 1, 3])
        a = node("Reshape", [a, "model_shape"], f"{p}.attn_r")
        a = node("MatMul", [a, w(f"{p}.wo", (d, d))], f"{p}.o")
        a = node("Add", [a, w(f"{p}.bo", (d,), value=0.0)], f"{p}.ob")
        x = node("Add", [x, a], f"{p}.res1")
        h = norm(x, f"{p}.ln2")
        h = node("MatMul", [h, w(f"{p}.w1", (d, 4 * d))], f"{p}.ff1")
        h = node("Add", [h, w(f"{p}.b1", (4 * d,), value=0.0)], f"{p}.ff1b")
        h = node("Relu", [h], f"{p}.relu")
        h = node("MatMul", [h, w(f"{p}.w2", (4 * d, d))], f"{p}.ff2")
        h = node("Add", [h, w(f"{p}.b2", (d,), value=0.0)], f"{p}.ff2b")
        x = node("Add", [x, h], f"{p}.res2")
    norm(x, "hidden")
    data.close()
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", d])],
        initializer=small + inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return data.weight_bytes


def run_measured(cmd: list[str]) -> dict:
    """Run `cmd`; its wall time, CPU time and peak RSS (this child's own, from wait4)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "rc": proc.returncode,
        "wall_s": time.perf_counter() - t,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss": usage.ru_maxrss * 1024,
        "log": out.decode(errors="replace"),
    }


def verify(float_path: Path, out: Path, tokens: np.ndarray) -> dict:
    """onnx.checker by path, then the output next to the float model in ONNX Runtime (cosine of the hidden states).
    One session at a time, each from its path."""
    import onnxruntime as ort

    onnx.checker.check_model(str(out))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    res = []
    for p in (float_path, out):
        sess = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        res.append(sess.run(None, {"tokens": tokens})[0].astype(np.float64).ravel())
        del sess
    cos = float(res[0] @ res[1] / (np.linalg.norm(res[0]) * np.linalg.norm(res[1])))
    data = out.with_name(out.name + ".data")
    return {"cosine": cos, "onnx_bytes": out.stat().st_size, "data_bytes": data.stat().st_size if data.exists() else 0}


MODES = {
    "weight-only int8": ["--mode", "weight_only"],
    "dynamic int8": ["--mode", "dynamic"],
    "static int8 (calibrated)": ["--mode", "static", "--samples", "16", "--batch-size", "4"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.5, help="approximate float weight size in GB (1e9 bytes)")
    ap.add_argument("--d", type=int, default=0, help="model width (default: 1024 below 1 GB, else 2048)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/lowbit-large"), help="work folder (not in git)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--results", type=Path, help="write the results table here (e.g. bench/RESULTS_LARGE.md)")
    ap.add_argument("--reuse", action="store_true", help="use the model already in --out (run modes apart)")
    ap.add_argument("--extra", nargs="*", default=[], help="more `lowbit quantize` options for every mode")
    args = ap.parse_args()
    d = args.d or (1024 if args.gb < 1 else 2048)
    args.out.mkdir(parents=True, exist_ok=True)
    float_path = args.out / "float.onnx"
    tokens = np.random.default_rng(1).integers(0, VOCAB, (16, SEQ), dtype=np.int64)
    if args.reuse and float_path.is_file():  # built by an earlier run with the same --gb (same seed: same model)
        weight_bytes = sum(
            int(e.value)
            for t in onnx.load(str(float_path), load_external_data=False).graph.initializer
            for e in t.external_data
            if e.key == "length"
        )
    else:
        t = time.perf_counter()
        weight_bytes = build(float_path, args.gb, d, heads=d // 128)
        print(f"built {float_path}: {weight_bytes / 1e9:.2f} GB of weights in {time.perf_counter() - t:.0f} s")
        np.save(args.out / "calib.npy", tokens)
    rows = []
    for mode in args.modes:
        out = args.out / f"{mode.split()[0]}.onnx"
        cmd = [sys.executable, "-m", "lowbit.cli.main", "quantize", str(float_path), "-o", str(out), "--quiet"]
        cmd += MODES[mode] + ["--calib", str(args.out / "calib.npy")] + args.extra
        r = run_measured(cmd)
        print(f"{mode}: rc {r['rc']}, peak RSS {r['peak_rss'] / 1e9:.2f} GB, {r['wall_s']:.0f} s", flush=True)
        if r["rc"] != 0:
            print(r["log"][-3000:], file=sys.stderr)
            return 1
        r.update(verify(float_path, out, tokens[:2]))
        (args.out / f"{out.stem}.log").write_text(r["log"])  # the CLI's whole summary
        keep = ("size:", "time:", "speed:", "hidden (", "performance lint")
        r["summary"] = [line.strip() for line in r["log"].splitlines() if line.strip().startswith(keep)]
        rows.append((mode, r))
        print(f"  cosine vs float {r['cosine']:.4f}", flush=True)
    table = report(args, d, weight_bytes, rows)
    print(table)
    if args.results:
        args.results.write_text(table)
    return 0


def report(args: argparse.Namespace, d: int, weight_bytes: int, rows: list[tuple[str, dict]]) -> str:
    import onnxruntime as ort

    import lowbit

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    lines = [
        "# Models past 2 GB",
        "",
        f"`PYTHONPATH=src:examples python bench/large.py --gb {args.gb}` on {cpu} ({os.cpu_count()} cores), "
        f"lowbit {lowbit.__version__}, onnx {onnx.__version__}, ONNX Runtime {ort.__version__}.",
        "",
        f"Float model: transformer-style, width {d}, {layer_count(args.gb, d)} layers, vocabulary {VOCAB}, "
        f"{weight_bytes / 1e9:.2f} GB of float32 weights in external data (random, seed {SEED}). Each mode runs "
        "`lowbit quantize` in its own process with `--calib` (16 random-token samples of length 16), so the "
        "kernels-vs-simulation check, the speed check and the lint run as they do for any user.",
        "",
        "| mode | peak RSS | RSS / weights | wall | CPU | output .onnx + .data | checker (path) | cosine vs float |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in rows:
        lines.append(
            f"| {mode} | {r['peak_rss'] / 1e9:.2f} GB | {r['peak_rss'] / weight_bytes:.2f}x | {r['wall_s']:.0f} s | "
            f"{r['cpu_s']:.0f} s | {r['onnx_bytes'] / 1e6:.1f} MB + {r['data_bytes'] / 1e9:.2f} GB | passes | "
            f"{r['cosine']:.4f} |"
        )
    lines.append("")
    for mode, r in rows:
        for note in r["summary"]:
            lines.append(f"- {mode}: `{note.strip()}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
