"""Baseline: onnxruntime's own static quantization of EfficientNet-Lite0, and ORT QDQ fusion probes.

Measures, on this machine:
  * quantize_static (QDQ, u8 activations, s8 weights, per-channel, MinMax, 64 calib crops),
    with reduce_range False and True; top-1 agreement with the float model on 256 eval crops
    when the QDQ model runs with default optimizations (fused integer kernels) and with
    ORT_DISABLE_ALL (DQ -> float op -> Q, i.e. float simulation);
  * latency float vs int8 (1 thread, batch 1, median of 50 after warm-up) and file sizes;
  * which fused op ORT picks for per-channel Conv / MatMul / Gemm QDQ patterns.

Usage: python bench/ort_baseline.py [--workdir DIR] [--skip-model] [--skip-probes]
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # lowbit_zoo: models and photo crops

N_CALIB = 64
N_EVAL = 256


def cpu_flags() -> str:
    try:
        out = subprocess.run(
            ["grep", "-o", r"avx512_vnni\|avx_vnni\|avx512f\|avx2\|amx_int8", "/proc/cpuinfo"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        return " ".join(sorted(set(out))) or "(none)"
    except OSError:
        return "(unknown)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def session(path: str | Path, *, opt: str = "default", threads: int = 0, dump: str | Path | None = None):
    so = ort.SessionOptions()
    so.log_severity_level = 3  # dumping an ORT_ENABLE_ALL graph warns that it is hardware specific
    if opt == "disable":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif opt != "default":
        raise ValueError(opt)
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if dump is not None:
        so.optimized_model_filepath = str(dump)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_batched(sess, x: np.ndarray, bs: int = 32) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + bs]})[0] for i in range(0, len(x), bs)])


def latency_ms(path: str | Path, x1: np.ndarray, *, warmup: int = 10, reps: int = 50) -> float:
    sess = session(path, threads=1)
    name = sess.get_inputs()[0].name
    for _ in range(warmup):
        sess.run(None, {name: x1})
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, {name: x1})
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def op_counts(path: str | Path) -> collections.Counter:
    m = onnx.load(str(path), load_external_data=False)
    return collections.Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in m.graph.node
    )


def fmt_counts(c: collections.Counter) -> str:
    return ", ".join(f"{k}:{v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


# --------------------------------------------------------------------------------------------
# Part A: EfficientNet-Lite0 with onnxruntime.quantization
# --------------------------------------------------------------------------------------------


def model_baseline(work: Path) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from lowbit_zoo import zoo

    fp32 = zoo.efficientnet_lite0_onnx(work / "effnet_lite0.onnx")
    pre = work / "effnet_lite0.pre.onnx"
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        if not pre.exists():
            quant_pre_process(str(fp32), str(pre))
        src = pre
        print(f"quant_pre_process: OK ({fmt_counts(op_counts(pre))})")
    except Exception as e:  # noqa: BLE001 - report and fall back
        src = fp32
        print(f"quant_pre_process: FAILED ({type(e).__name__}: {str(e)[:200]}); quantizing the raw export")

    calib = zoo.photo_crops(N_CALIB, "calib", seed=0)
    evalx = zoo.photo_crops(N_EVAL, "eval", seed=0)

    class Reader(CalibrationDataReader):
        def __init__(self, x: np.ndarray):
            self._it = iter([{"input": x[i : i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self._it, None)

    ref_logits = run_batched(session(fp32), evalx)
    ref = ref_logits.argmax(1)
    pre_top1 = run_batched(session(src), evalx).argmax(1)
    print(f"float export vs pre-processed float: top-1 agreement {np.mean(pre_top1 == ref):.4f}")

    x1 = evalx[:1]
    rows = []
    sizes = {"float (export)": fp32.stat().st_size}
    if src != fp32:
        sizes["float (pre-processed)"] = src.stat().st_size
    lat = {"float (export)": latency_ms(fp32, x1)}
    if src != fp32:
        lat["float (pre-processed)"] = latency_ms(src, x1)
    for rr in (False, True):
        q = work / f"effnet_lite0.qdq{'.rr' if rr else ''}.onnx"
        t0 = time.perf_counter()
        quantize_static(
            str(src),
            str(q),
            Reader(calib),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=rr,
            calibrate_method=CalibrationMethod.MinMax,
        )
        tq = time.perf_counter() - t0
        sizes[f"int8 QDQ reduce_range={rr}"] = q.stat().st_size
        dump = work / f"effnet_lite0.qdq{'.rr' if rr else ''}.optimized.onnx"
        kern_sess = session(q, dump=dump)
        kern = run_batched(kern_sess, evalx)
        sim = run_batched(session(q, opt="disable"), evalx)
        rows.append(
            dict(
                rr=rr,
                quant_s=tq,
                kern_agree=np.mean(kern.argmax(1) == ref),
                sim_agree=np.mean(sim.argmax(1) == ref),
                kern_vs_sim=np.mean(kern.argmax(1) == sim.argmax(1)),
                kern_err=float(np.abs(kern - ref_logits).max()),
                sim_err=float(np.abs(sim - ref_logits).max()),
                kern_sim_err=float(np.abs(kern - sim).max()),
                kern_sim_rmse=float(np.sqrt(np.mean((kern - sim) ** 2))),
                kern_top1=kern.argmax(1),
                sim_top1=sim.argmax(1),
                qdq_ops=op_counts(q),
                opt_ops=op_counts(dump),
            )
        )
        lat[f"int8 rr={rr}"] = latency_ms(q, x1)

    print(
        f"\n{N_CALIB} calib crops ({', '.join(zoo.CALIB_PHOTOS)}), {N_EVAL} eval crops ({', '.join(zoo.EVAL_PHOTOS)})"
    )
    print("top-1 agreement with float model on eval crops:")
    print(
        f"{'reduce_range':>12} | {'kernels (default opt)':>21} | {'simulation (DISABLE_ALL)':>24} | "
        f"{'kernels vs sim':>14} | max|dlogit| kern/sim/kern-sim | rmse kern-sim"
    )
    for r in rows:
        print(
            f"{str(r['rr']):>12} | {r['kern_agree']:>21.4f} | {r['sim_agree']:>24.4f} | "
            f"{r['kern_vs_sim']:>14.4f} | {r['kern_err']:.3f} / {r['sim_err']:.3f} / {r['kern_sim_err']:.3f}"
            f" | {r['kern_sim_rmse']:.4f}   (quantize_static {r['quant_s']:.1f}s)"
        )
    photo = np.array([p[0] for p in zoo._crop_plan(N_EVAL, "eval", 0)])
    # Float top-1 margin (logit gap between best and second best): low-margin crops flip first.
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    print("per eval photo: crops, median float top-1 margin, agreement kern/sim for each reduce_range")
    for name in zoo.EVAL_PHOTOS:
        sel = photo == name
        cells = "  ".join(
            f"rr={r['rr']}: "
            f"{np.mean(r['kern_top1'][sel] == ref[sel]):.3f}/{np.mean(r['sim_top1'][sel] == ref[sel]):.3f}"
            for r in rows
        )
        print(f"  {name:<18} {sel.sum():>3}  margin {np.median(margin[sel]):5.2f}  {cells}")
    conf = margin >= np.median(margin)
    for r in rows:
        print(
            f"reduce_range={r['rr']}: agreement on the half with the larger float margin "
            f"kern {np.mean(r['kern_top1'][conf] == ref[conf]):.4f} / sim "
            f"{np.mean(r['sim_top1'][conf] == ref[conf]):.4f}; "
            f"smaller-margin half kern {np.mean(r['kern_top1'][~conf] == ref[~conf]):.4f} / sim "
            f"{np.mean(r['sim_top1'][~conf] == ref[~conf]):.4f}"
        )
    for r in rows:
        print(f"reduce_range={r['rr']} QDQ model ops: {fmt_counts(r['qdq_ops'])}")
        print(f"reduce_range={r['rr']} optimized (default) ops: {fmt_counts(r['opt_ops'])}")
    print("\nlatency, 1 thread, batch 1, median of 50 after 10 warm-up runs (ms):")
    for k, v in lat.items():
        print(f"  {k:<20} {v:8.2f}")
    print("file sizes (bytes):")
    for k, v in sizes.items():
        print(f"  {k:<28} {v:>10}  ({v / 2**20:.2f} MiB)")


# --------------------------------------------------------------------------------------------
# Part B: which fused kernels does ORT select for per-channel QDQ patterns?
# --------------------------------------------------------------------------------------------


def _qdq(name: str, x: str, scale: float, zp: int, dtype=TensorProto.UINT8):
    """Q then DQ of activation x (per-tensor); returns (nodes, inits, output name)."""
    s = numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s")
    z = helper.make_tensor(f"{name}_z", dtype, [], [zp])
    nodes = [
        helper.make_node("QuantizeLinear", [x, s.name, z.name], [f"{name}_q"]),
        helper.make_node("DequantizeLinear", [f"{name}_q", s.name, z.name], [f"{name}_dq"]),
    ]
    return nodes, [s, z], f"{name}_dq"


def _weight_dq(name: str, w: np.ndarray, axis: int | None):
    """int8 constant weight + DQ. axis=None: per-tensor; else per-channel along axis (symmetric)."""
    if axis is None:
        scale = np.float32(np.abs(w).max() / 127)
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        s = numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s")
        z = numpy_helper.from_array(np.array(0, np.int8), f"{name}_z")
        attrs = {}
    else:
        red = tuple(i for i in range(w.ndim) if i != axis)
        scale = (np.abs(w).max(axis=red) / 127).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        s = numpy_helper.from_array(scale, f"{name}_s")
        z = numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_z")
        attrs = {"axis": axis}
    qi = numpy_helper.from_array(q, f"{name}_q")
    node = helper.make_node("DequantizeLinear", [qi.name, s.name, z.name], [f"{name}_dq"], **attrs)
    return [node], [qi, s, z], f"{name}_dq"


def _bias_dq(name: str, b: np.ndarray, in_scale: float, w_scale):
    """int32 bias + DQ with scale in_scale * w_scale (per-channel if w_scale is a vector)."""
    bscale = (np.float32(in_scale) * np.asarray(w_scale, np.float32)).astype(np.float32)
    q = np.round(b / bscale).astype(np.int32)
    qi = numpy_helper.from_array(q, f"{name}_q")
    s = numpy_helper.from_array(bscale, f"{name}_s")
    z = numpy_helper.from_array(np.zeros_like(bscale, dtype=np.int32), f"{name}_z")
    attrs = {"axis": 0} if bscale.ndim else {}
    return (
        [helper.make_node("DequantizeLinear", [qi.name, s.name, z.name], [f"{name}_dq"], **attrs)],
        [qi, s, z],
        f"{name}_dq",
    )


def _probe(kind: str, *, axis, out_qdq: bool, opset: int, int_bias: bool = False, trans_b: int = 0):
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    if kind == "Conv":
        x_shape, out_shape = [1, 8, 16, 16], [1, 16, 16, 16]
        w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
        b = rng.standard_normal(16).astype(np.float32)
    elif kind == "MatMul":
        x_shape, out_shape = [4, 32], [4, 24]
        w = rng.standard_normal((32, 24)).astype(np.float32)
        b = None
    else:  # Gemm
        x_shape, out_shape = [4, 32], [4, 24]
        w = rng.standard_normal((24, 32) if trans_b else (32, 24)).astype(np.float32)
        b = rng.standard_normal(24).astype(np.float32)
    # Spread channel magnitudes over two decades: a kernel that mishandled per-channel scales
    # would then differ grossly from the DISABLE_ALL float simulation.
    oc_axis = 0 if kind == "Conv" or (kind == "Gemm" and trans_b) else 1
    shape = [1] * w.ndim
    shape[oc_axis] = -1
    w = w * np.logspace(-1, 1, w.shape[oc_axis], dtype=np.float32).reshape(shape)
    n, i, xq = _qdq("x", "x", 0.02, 128)
    nodes += n
    inits += i
    n, i, wq = _weight_dq("w", w, axis)
    nodes += n
    inits += i
    ins = [xq, wq]
    if b is not None:
        if int_bias:
            red = tuple(k for k in range(w.ndim) if k != (axis or 0))
            wscale = (np.abs(w).max(axis=red) / 127) if axis is not None else np.abs(w).max() / 127
            n, i, bq = _bias_dq("b", b, 0.02, wscale)
            nodes += n
            inits += i
            ins.append(bq)
        else:
            bi = numpy_helper.from_array(b, "b")
            inits.append(bi)
            ins.append("b")
    attrs = {"pads": [1, 1, 1, 1]} if kind == "Conv" else ({"transB": trans_b} if kind == "Gemm" else {})
    nodes.append(helper.make_node(kind, ins, ["y_f"], **attrs))
    out = "y_f"
    if out_qdq:
        n, i, out = _qdq("y", "y_f", 1.0, 128)
        nodes += n
        inits += i
    nodes.append(helper.make_node("Identity", [out], ["y"]))
    g = helper.make_graph(
        nodes,
        f"probe_{kind}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8 if opset <= 17 else 10
    onnx.checker.check_model(m)
    return m, rng.standard_normal(x_shape).astype(np.float32)


def fusion_probes(work: Path) -> None:
    cases = []
    for opset in (17, 21):
        for out_qdq in (True, False):
            for ax in (None, 0):
                cases.append(("Conv", dict(axis=ax, out_qdq=out_qdq, opset=opset, int_bias=True)))
            for ax in (None, 1):
                cases.append(("MatMul", dict(axis=ax, out_qdq=out_qdq, opset=opset)))
            for tb, ax in ((0, None), (0, 1), (1, None), (1, 0)):
                for ib in (False, True):
                    cases.append(("Gemm", dict(axis=ax, out_qdq=out_qdq, opset=opset, trans_b=tb, int_bias=ib)))
    print("\nfusion probes (x: u8 QDQ per-tensor; w: int8 constant + DQ; optimized graph with default options):")
    print(f"{'case':<66} | optimized graph ops")
    for kind, kw in cases:
        m, x = _probe(kind, **kw)
        p = work / "probe.onnx"
        onnx.save(m, p)
        dump = work / "probe.opt.onnx"
        s = session(p, dump=dump)
        y = s.run(None, {"x": x})[0]
        y_ref = session(p, opt="disable").run(None, {"x": x})[0]
        ops = op_counts(dump)
        ops.pop("Identity", None)
        pc = "per-tensor" if kw["axis"] is None else f"per-channel axis={kw['axis']}"
        extra = f" transB={kw['trans_b']}" if kind == "Gemm" else ""
        bias = (" bias=int32-DQ" if kw.get("int_bias") else " bias=float") if kind != "MatMul" else ""
        label = f"op{kw['opset']} {kind}{extra} w {pc}{bias} out_qdq={kw['out_qdq']}"
        diff = float(np.abs(y - y_ref).max() / np.abs(y_ref).max())
        print(f"{label:<66} | {fmt_counts(ops)}   (max|opt-sim|/max|sim|={diff:.2g})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--skip-probes", action="store_true")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lowbit_ort_baseline_"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, numpy {np.__version__}, python "
        f"{sys.version.split()[0]}"
    )
    print(f"CPU: {cpu_model()}; {os.cpu_count()} logical CPUs; flags: {cpu_flags()}")
    print(f"workdir: {work}")
    if not args.skip_probes:
        fusion_probes(work)
    if not args.skip_model:
        model_baseline(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
