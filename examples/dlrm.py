"""A DLRM-style click model: float vs int8 / int4 row-wise embedding tables, quantized with lowbit recipes.

The click data is generated here (no download) from a hidden logistic model, so that AUC means something:
  * 8 categorical features with Zipf-distributed ids (s = 1.05, ids shuffled as hashing would) over tables of
    1,000 to 100,000 rows, and a 4-id "history" of earlier items drawn from the item table;
  * 13 dense count features (log-normal counts, fed as log1p);
  * the true click logit = bias + dense weights + a bias per id + latent-factor crosses between feature pairs
    (user x item, item x history, dense x item, ...); the label is a Bernoulli draw, so even the true model
    reaches only the "oracle" AUC printed below.
The model (bottom MLP for dense features, one 32-wide embedding table per categorical feature, the history as
the mean of item embeddings (a 2-D index tensor into the shared item table), pairwise dot products of all
vectors, top MLP, sigmoid) is trained in PyTorch for a few epochs, exported to ONNX with a dynamic batch, and
quantized by lowbit:
  * `--preset dynamic` (what the README recommends for such models): each embedding table int8, weight-only (the
    lookup has no activation to quantize), with one scale per table unless a scale per row is measurably more
    accurate (ops/granularity.py: per-table SQNR below 30 dB; these tables reach 33-40 dB), so a lookup is one
    Gather + DequantizeLinear; the MLP layers dynamic int8 (DynamicQuantizeLinear -> MatMulInteger);
  * `--preset weight-only-int8`: the same tables, the MLP layers weight-only int8 (per-channel, behind
    DequantizeLinear, which ONNX Runtime runs every call): closer to float, slower;
  * int4 tables in blocks of 32 = one scale per row, and blocks of 16 (uint8 bytes of two nibbles, gathered, then
    unpacked and scaled by standard ops), by a recipe rule on Gather.
Also ONNX Runtime's own `quantize_dynamic` on the same float file, for comparison.

    python examples/dlrm.py [--epochs 1] [--results bench/RESULTS_DLRM.md]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.metrics import log_loss, roc_auc_score

import lowbit
from lowbit import Recipe, Rule, Scheme
from lowbit.evaluate.bench import machine
from lowbit.evaluate.latency import interleaved_latency, paired_ratio
from lowbit.plan import Plan
from lowbit.recipe import preset
from lowbit.runtimes.ort import session

CARDINALITIES = (100_000, 50_000, 20_000, 10_000, 5_000, 2_000, 1_000, 1_000)  # table 0: items
HISTORY = 4
DENSE = 13
DIM = 32
LATENT = 4
LR_EMB = 0.05
CROSSES = ((0, 1), (0, 2), (1, 3), (2, 4), (0, 5), (3, 6))  # feature pairs whose latent factors interact


@dataclass
class Clicks:
    dense: np.ndarray  # (n, 13) float32, log1p counts
    sparse: np.ndarray  # (n, 8) int64
    history: np.ndarray  # (n, 4) int64 item ids
    label: np.ndarray  # (n,) float32
    truth: np.ndarray  # (n,) true click probability

    def feeds(self, rows: slice | np.ndarray = slice(None)) -> dict[str, np.ndarray]:
        return {"dense": self.dense[rows], "sparse": self.sparse[rows], "history": self.history[rows]}

    def __len__(self) -> int:
        return len(self.label)


ZIPF = 1.05


def zipf_ids(rng: np.random.Generator, popular: np.ndarray, size: tuple) -> np.ndarray:
    """Power-law popularity: `popular` lists the ids most popular first (anywhere in the table, as after hashing)."""
    p = 1.0 / np.arange(1, len(popular) + 1) ** ZIPF
    return popular[rng.choice(len(popular), size=size, p=p / p.sum())].astype(np.int64)


def make_clicks(
    n: int, seed: int = 0, cardinalities: tuple[int, ...] = CARDINALITIES, truth_seed: int = 1234
) -> Clicks:
    """`n` impressions; the hidden model depends only on `truth_seed`, so train and test sets share it."""
    t = np.random.default_rng(truth_seed)
    bias = [t.normal(0, 0.6, c) for c in cardinalities]
    latent = [t.normal(0, 1.0, (c, LATENT)) for c in cardinalities]
    w_dense = t.normal(0, 0.25, DENSE)
    p_dense = t.normal(0, 0.3, (DENSE, LATENT))
    pairs = [(a, b) for a, b in CROSSES if b < len(cardinalities)]
    pair_w = t.normal(0, 0.35, len(CROSSES))[: len(pairs)]
    popular = [t.permutation(c) for c in cardinalities]
    mu = t.normal(1.0, 0.6, DENSE)
    ref = np.log1p(np.floor(t.lognormal(mu, 1.0, (10_000, DENSE))))  # fixed standardisation, whatever the sample

    r = np.random.default_rng(seed)
    dense = np.log1p(np.floor(r.lognormal(mu, 1.0, (n, DENSE)))).astype(np.float32)
    sparse = np.stack([zipf_ids(r, order, (n,)) for order in popular], axis=1)
    history = zipf_ids(r, popular[0], (n, HISTORY))
    z = (dense - ref.mean(0)) / ref.std(0)
    logit = -1.8 + z @ w_dense + sum(bias[f][sparse[:, f]] for f in range(len(cardinalities)))
    for (a, b), w in zip(pairs, pair_w):
        logit += w * np.sum(latent[a][sparse[:, a]] * latent[b][sparse[:, b]], axis=1)
    item = latent[0][sparse[:, 0]]
    logit += 0.3 * np.sum(latent[0][history].mean(axis=1) * item, axis=1)  # interest in similar items
    logit += 0.3 * np.sum((z @ p_dense) * item, axis=1)
    prob = 1.0 / (1.0 + np.exp(-logit))
    label = (r.random(n) < prob).astype(np.float32)
    return Clicks(dense, sparse, history, label, prob)


class DLRM(torch.nn.Module):
    def __init__(self, cardinalities: tuple[int, ...] = CARDINALITIES, dim: int = DIM) -> None:
        super().__init__()
        self.bottom = torch.nn.Sequential(
            torch.nn.Linear(DENSE, 64), torch.nn.ReLU(), torch.nn.Linear(64, dim), torch.nn.ReLU()
        )
        # sparse=True: an update touches only the rows of the batch (SparseAdam), as large tables need.
        self.tables = torch.nn.ModuleList(torch.nn.Embedding(c, dim, sparse=True) for c in cardinalities)
        for t in self.tables:
            torch.nn.init.uniform_(t.weight, -0.05, 0.05)
        k = len(cardinalities) + 2  # dense vector, one per table, history
        rows, cols = np.triu_indices(k, 1)
        self.register_buffer("pairs", torch.as_tensor(rows * k + cols), persistent=False)
        self.top = torch.nn.Sequential(
            torch.nn.Linear(dim + len(rows), 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, 64),
            torch.nn.ReLU(),
            torch.nn.Linear(64, 1),
        )

    def logits(self, dense: torch.Tensor, sparse: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        x = self.bottom(dense)
        vectors = [x] + [t(sparse[:, i]) for i, t in enumerate(self.tables)] + [self.tables[0](history).mean(1)]
        v = torch.stack(vectors, dim=1)  # (N, k, D)
        dots = torch.bmm(v, v.transpose(1, 2)).flatten(1)[:, self.pairs]  # each pair once
        return self.top(torch.cat([x, dots], dim=1)).squeeze(1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(dense, sparse, history))


def train(model: DLRM, data: Clicks, epochs: int, batch: int = 1024, seed: int = 0) -> None:
    torch.manual_seed(seed)
    dense_params = [p for n, p in model.named_parameters() if not n.startswith("tables.")]
    opts = [torch.optim.Adam(dense_params, lr=2e-3), torch.optim.Adagrad(list(model.tables.parameters()), lr=LR_EMB)]
    tensors = [torch.as_tensor(a) for a in (data.dense, data.sparse, data.history, data.label)]
    loss_fn = torch.nn.BCEWithLogitsLoss()
    order = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.as_tensor(order.permutation(len(data)))
        for i in range(0, len(data), batch):
            idx = perm[i : i + batch]
            d, s, h, y = (t[idx] for t in tensors)
            loss = loss_fn(model.logits(d, s, h), y)
            for o in opts:
                o.zero_grad()
            loss.backward()
            for o in opts:
                o.step()
    model.eval()


def export(model: DLRM, example: Clicks, path: Path) -> None:
    feeds = example.feeds(slice(0, 2))
    args = tuple(torch.as_tensor(feeds[k]) for k in ("dense", "sparse", "history"))
    names = ["dense", "sparse", "history"]
    torch.onnx.export(
        model,
        args,
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=names,
        output_names=["click"],
        dynamic_axes={n: {0: "N"} for n in names + ["click"]},
    )


DEFAULT = "--preset dynamic (int8 tables, dynamic int8 MLP)"
ORT = "onnxruntime quantize_dynamic"
ORT_COPY = "onnxruntime quantize_dynamic, a second copy (noise control)"


def recipes() -> dict[str, Recipe]:
    """The presets, then hybrid recipes: int4 embedding tables by op type (Gather), the MLP layers weight-only int8."""
    wo8 = Scheme(mode="weight_only")

    def emb4(block: int) -> Rule:
        return Rule(op_types=("Gather",), scheme=Scheme(mode="weight_only", weights="int4", block_size=block))

    return {
        DEFAULT: preset("dynamic"),
        "--preset weight-only-int8 (int8 tables, weight-only int8 MLP)": preset("weight-only-int8"),
        "int4 rows (block 32 = row), weight-only int8 MLP": Recipe(default=wo8, rules=(emb4(32),)),
        "int4 blocks of 16, weight-only int8 MLP": Recipe(default=wo8, rules=(emb4(16),)),
        # Affine int4 tables run as ONNX Runtime's com.microsoft.GatherBlockQuantized: its speed, for comparison.
        "int4 rows affine (GatherBlockQuantized), weight-only int8 MLP": Recipe(
            default=wo8,
            rules=(
                Rule(
                    op_types=("Gather",),
                    scheme=Scheme(mode="weight_only", weights="int4", block_size=32, symmetric_weights=False),
                ),
            ),
        ),
    }


def predict(path: Path, data: Clicks, batch: int = 4096) -> np.ndarray:
    sess = session(path, "kernels", threads=1)
    return np.concatenate(
        [sess.run(None, data.feeds(slice(i, i + batch)))[0] for i in range(0, len(data), batch)]
    ).astype(np.float64)


def latency_times(paths: dict[str, Path], feeds: dict[str, np.ndarray], runs: int) -> dict[str, list[float]]:
    """Seconds per round, 1 thread, interleaved; sessions created in both orders."""
    times: dict[str, list[float]] = {k: [] for k in paths}
    for order in (list(paths), list(reversed(paths))):
        sessions = {k: session(paths[k], "kernels", threads=1) for k in order}
        for k, v in interleaved_latency(sessions, feeds, runs=runs // 2, warmup=5).items():
            times[k].extend(v)
    return times


def table_choices(plan: Plan) -> str:
    """How lowbit scaled each table, and the SQNRs that decided it, from the plan."""
    found = []
    for name, d in plan.nodes.items():
        if d.op_type == "Gather" and d.quantized and "sqnr_db" in d.details:
            db = d.details["sqnr_db"]
            found.append(f"{name} {d.details['granularity']} ({db['per-table']} dB; per-row {db['per-row']} dB)")
    return "; ".join(found)


def ort_dynamic(src: Path, dst: Path) -> str:
    """ONNX Runtime's quantize_dynamic with its defaults; returns what it did to the Gathers."""
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(src), str(dst))
    m = onnx.load(str(dst))
    inits = {t.name: t for t in m.graph.initializer}
    tables = [
        n for n in m.graph.node if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2
    ]
    if not tables:
        return "no Gather reads a constant table any more"
    t = inits[tables[0].input[0]]
    dq = [
        n
        for n in m.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in {o for g in tables for o in g.output}
    ]
    scale = inits.get(dq[0].input[1]) if dq else None
    dtype = onnx.TensorProto.DataType.Name(t.data_type)
    return (
        f"{len(tables)} Gathers read {dtype} tables, then DequantizeLinear "
        f"(scale shape {list(scale.dims) if scale is not None else '?'}: one scale per table)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=400_000, help="training impressions")
    ap.add_argument("--test", type=int, default=100_000, help="held-out impressions")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--runs", type=int, default=200, help="latency rounds (batch --batch, 1 thread)")
    ap.add_argument("--batch", type=int, default=256, help="latency batch")
    ap.add_argument("--out", type=Path, default=Path("artifacts/dlrm"))
    ap.add_argument("--results", type=Path, help="write the table as markdown here")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # faster than 2 on a shared 2-core machine (less spinning), and reproducible

    t0 = time.perf_counter()
    train_set, test_set = make_clicks(args.train, seed=0), make_clicks(args.test, seed=1)
    oracle = roc_auc_score(test_set.label, test_set.truth)
    print(
        f"data: {len(train_set)} train / {len(test_set)} test impressions, CTR {train_set.label.mean():.3f}, "
        f"oracle AUC (true probabilities) {oracle:.4f} ({time.perf_counter() - t0:.0f} s)"
    )
    model = DLRM()
    t0 = time.perf_counter()
    train(model, train_set, args.epochs)
    print(f"trained {args.epochs} epochs in {time.perf_counter() - t0:.0f} s")
    float_path = args.out / "dlrm.onnx"
    export(model, test_set, float_path)

    paths = {"float": float_path}
    tables = ""
    for i, (label, recipe) in enumerate(recipes().items()):
        res = lowbit.quantize(float_path, args.out / f"dlrm.v{i}.onnx", recipe=recipe, progress=False)
        paths[f"lowbit {label}"] = res.output
        how = Counter(f"{d.op_type}: {d.reason}" for d in res.plan.nodes.values() if d.quantized)
        print(f"{label}: " + "; ".join(f"{n} x {k}" for k, n in sorted(how.items())))
        if label == DEFAULT:
            tables = table_choices(res.plan)
            print(f"  tables: {tables}")
    ort_path = args.out / "dlrm.ort_dynamic.onnx"
    ort_note = ort_dynamic(float_path, ort_path)
    paths[ORT] = ort_path
    paths[ORT_COPY] = args.out / "dlrm.ort_dynamic.copy.onnx"
    shutil.copyfile(ort_path, paths[ORT_COPY])
    print(f"{ORT}: {ort_note}")

    probs = {k: predict(p, test_set) for k, p in paths.items()}
    with torch.no_grad():
        torch_probs = model(*(torch.as_tensor(v) for v in test_set.feeds().values())).numpy()
    assert np.abs(torch_probs - probs["float"]).max() < 1e-4, "ONNX export disagrees with PyTorch"
    rows = np.random.default_rng(7).choice(len(test_set), args.batch, replace=False)
    np.savez(args.out / "latency_feeds.npz", **test_set.feeds(rows))  # for repeat runs: bench/paired.py
    load = os.getloadavg()[0]
    times = latency_times(paths, test_set.feeds(rows), args.runs)
    load = max(load, os.getloadavg()[0])

    float_bytes = float_path.stat().st_size
    header = (
        "| model | AUC | log loss | mean abs prob. diff vs float | size MB | % of float "
        f"| latency vs float (batch {args.batch}, 1 thread) | latency vs quantize_dynamic |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for k, p in probs.items():
        size = paths[k].stat().st_size
        lines.append(
            f"| {k} | {roc_auc_score(test_set.label, p):.4f} | "
            f"{log_loss(test_set.label, np.clip(p, 1e-7, 1 - 1e-7)):.4f} | "
            f"{np.abs(p - probs['float']).mean():.5f} | {size / 1e6:.2f} | {100 * size / float_bytes:.1f}% | "
            f"{paired_ratio(times, k, 'float'):.3f}x | {paired_ratio(times, k, ORT):.3f}x |"
        )
    print(
        f"\nheld-out AUC (oracle {oracle:.4f}), {len(test_set)} impressions; latency: paired median of {args.runs} "
        "interleaved rounds\n"
    )
    print("\n".join(lines))
    noise = abs(paired_ratio(times, ORT_COPY, ORT) - 1)

    if args.results:
        cmd = "python examples/dlrm.py " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
        )
        mach = machine()
        text = "\n".join(
            [
                "# DLRM-style click model: float vs int8 / int4 embedding tables",
                "",
                f"Command: `{cmd}` (also `make dlrm`), run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
                "",
                f"Machine: {mach['cpu']}, {mach['cores']} cores (VNNI: {mach['vnni']}), onnxruntime {ort.__version__}, "
                f"torch {torch.__version__}; "
                f"shared with other jobs (1-minute load average up to {load:.1f} during the latency rounds), so only "
                "the paired, interleaved latency ratios are meaningful (1 thread, "
                f"batch {args.batch}, median of {args.runs} rounds, sessions created in both orders).",
                "",
                f"Data: generated clicks ({len(train_set)} train / {len(test_set)} held-out impressions, CTR "
                f"{train_set.label.mean():.3f}); the true click probabilities reach AUC {oracle:.4f} on the held-out "
                "set "
                "(the ceiling). Tables: " + ", ".join(f"{c:,}" for c in CARDINALITIES) + f" rows x {DIM}.",
                "",
                *lines,
                "",
                f"onnxruntime quantize_dynamic (defaults): {ort_note}.",
                "",
                "Notes:",
                f"- lowbit's default (`--preset dynamic`) chose per table ({tables}). The rule "
                "(src/lowbit/ops/granularity.py): one scale per table unless its SQNR is below 30 dB and a scale "
                "per row gains at least 3 dB; a scale per row "
                "costs a second Gather per id (1.2-1.3x float's time in earlier runs), one scale per table is one "
                "Gather + DequantizeLinear, quantize_dynamic's form. lowbit stores it as uint8 (q + 128, zero point "
                "128; the same values): ONNX Runtime then moves the DequantizeLinear past the Unsqueeze that "
                "follows, where an int8 table gets an extra Q/DQ pair per lookup.",
                "- The MLP layers hold <1% of the bytes: dynamic int8 (the default) moves the probabilities as much as "
                "quantize_dynamic's; weight-only int8 (`--preset weight-only-int8`) moves them less but runs slower, "
                "since ONNX Runtime dequantizes its weights on every call.",
                "- Symmetric int4 tables are stored as bytes of two nibbles, gathered, then unpacked by standard ops "
                "(Mod, BitShift, Concat, DequantizeLinear, Mul); affine ones use ONNX Runtime's GatherBlockQuantized "
                "kernel, whose row above shows its cost.",
                f"- Noise: the noise-control row is the very same file as quantize_dynamic's; its paired ratio is "
                f"{noise:.3f} away from 1 in this run, so differences of that size between rows are noise. Each "
                "round runs every model once, in a fresh seeded order; ratios of the same model moved more than "
                "that between runs on this shared machine, so compare rows within one run.",
                "",
            ]
        )
        args.results.write_text(text)
        print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
