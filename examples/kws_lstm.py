"""Keyword spotting with an LSTM on synthesized speech: float vs lowbit dynamic int8 vs ONNX Runtime's
quantize_dynamic, on speakers the model never heard.

1. espeak-ng speaks 10 keywords and 8 other words in 8 English accents x 44 voice variants, each take at its
   own speed and pitch (cached under the work dir).
2. Speakers are split by accent AND variant: test accents (Scottish, Caribbean) and test variants are
   never used in training. Every clip gets background noise (white, pink, brown, mains hum or babble of other
   words) at a random SNR of 0-20 dB; "_silence_" clips are noise only.
3. 40 log-mel features every 20 ms (numpy) -> LSTM(128) -> mean over time -> two Linear layers, trained in
   PyTorch on the CPU with fixed seeds, exported to ONNX.
4. lowbit.quantize(..., recipe=preset("dynamic")): the LSTM becomes DynamicQuantizeLSTM (int8 W and R, one
   scale per direction unless a scale per gate row is measurably more accurate: ops/granularity.py), the
   Linear layers dynamic int8 MatMuls. Accuracy on held-out audio, size and paired latency (1 thread,
   interleaved) side by side with the float model and onnxruntime.quantization.quantize_dynamic (twice: the
   second copy of the same file shows the measurement's noise).

Usage: python examples/kws_lstm.py [--workdir artifacts/kws] [--epochs 14] [--results bench/RESULTS_KWS.md]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One BLAS thread: on a busy 2-core machine spinning BLAS/torch threads cost far more than they gain.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: E402

import lowbit  # noqa: E402
from lowbit import Recipe, Scheme  # noqa: E402
from lowbit.evaluate.bench import machine  # noqa: E402
from lowbit.evaluate.latency import interleaved_latency, paired_ratio  # noqa: E402
from lowbit.recipe import preset  # noqa: E402
from lowbit.runtimes.ort import session  # noqa: E402
from lowbit.torch.onnx_export import module_to_onnx  # noqa: E402
from lowbit_zoo import speech as sp  # noqa: E402

KEYWORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
OTHER = ["bed", "bird", "cat", "dog", "happy", "house", "tree", "wow"]
CLASSES = KEYWORDS + ["_unknown_", "_silence_"]
DEFAULT = "lowbit dynamic int8 (--preset dynamic)"
PER_TENSOR = "lowbit per-tensor, guard off"
ORT = "ORT quantize_dynamic"
ORT_COPY = "ORT quantize_dynamic, a second copy (noise control)"
TEST_VOICES = ("en-gb-scotland", "en-029")
N_VARIANTS, N_TEST_VARIANTS, TAKES = 44, 14, 2
SEED = 0
BATCH = 64
LR = 5e-3


def speakers() -> tuple[list[sp.Take], list[sp.Take]]:
    """Train and test takes; a test take shares neither accent nor variant with any training take."""
    rng = np.random.default_rng(SEED)
    chosen = [str(v) for v in rng.permutation(sp.variants())[:N_VARIANTS]]
    test_variants = set(chosen[:N_TEST_VARIANTS])
    train, test = [], []
    for voice in sp.VOICES:
        for variant in chosen:
            in_test = (voice in TEST_VOICES, variant in test_variants)
            if in_test[0] != in_test[1]:
                continue  # mixed speakers would leak an accent or a variant across the split
            for _ in range(TAKES):
                take = sp.Take(voice, variant, int(rng.integers(120, 221)), int(rng.integers(20, 81)))
                (test if in_test[0] else train).append(take)
    return train, test


def load_audio(takes: list[sp.Take], workdir: Path, name: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Every word of every take (16 kHz float32) and its word index, synthesized once and cached (int16)."""
    words = KEYWORDS + OTHER
    key = hashlib.sha256(repr((takes, words, sp.PAUSE_MS)).encode()).hexdigest()[:12]
    cache = workdir / f"audio-{name}-{key}.npz"
    if cache.exists():
        with np.load(cache) as z:
            flat, lengths, labels = z["audio"], z["lengths"], z["labels"]
        clips = np.split(flat.astype(np.float32) / 32767.0, np.cumsum(lengths)[:-1])
        return clips, labels
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        spoken = list(pool.map(lambda take: sp.synthesize(take, words), takes))
    clips = [c for per_take in spoken for c in per_take]
    labels = np.tile(np.arange(len(words)), len(takes))
    flat = np.clip(np.rint(np.concatenate(clips) * 32767.0), -32767, 32767).astype(np.int16)
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, audio=flat, lengths=np.array([len(c) for c in clips]), labels=labels)
    tmp.replace(cache)
    print(f"  synthesized {len(clips)} words in {time.perf_counter() - t:.0f} s -> {cache}")
    return [np.clip(np.rint(c * 32767.0), -32767, 32767) / 32767.0 for c in clips], labels


def noise(rng: np.random.Generator, clips: list[np.ndarray]) -> np.ndarray:
    kind = rng.choice(["white", "pink", "brown", "hum", "babble"])
    if kind == "hum":
        return sp.hum(rng, sp.RATE)
    if kind == "babble":  # other words of the same split, quietly overlapping
        x = sum(sp.place(clips[int(rng.integers(len(clips)))], rng) for _ in range(4))
        return (x + 1e-3 * sp.colored_noise(rng, sp.RATE, "pink")).astype(np.float32)
    return sp.colored_noise(rng, sp.RATE, str(kind))


def make_set(
    clips: list[np.ndarray], words: np.ndarray, copies: int, seed: int, noisy: bool = True, clean: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel features (N, 49, 40) and class labels: each word `copies` times at random offsets with noise
    at 0-20 dB SNR (a `clean` fraction without), plus noise-only "_silence_" clips (one per class share)."""
    rng = np.random.default_rng(seed)
    audio, labels = [], []
    for _ in range(copies):
        for clip, w in zip(clips, words):
            x = sp.place(clip, rng)
            if noisy and rng.random() >= clean:
                x = sp.mix(x, noise(rng, clips), float(rng.uniform(0, 20)))
            audio.append(x)
            labels.append(w if w < len(KEYWORDS) else CLASSES.index("_unknown_"))
    for _ in range(len(audio) // len(CLASSES)):
        audio.append(noise(rng, clips) * np.float32(10 ** rng.uniform(-3.5, -1)))
        labels.append(CLASSES.index("_silence_"))
    return sp.log_mel(np.stack(audio)), np.asarray(labels, np.int64)


class KWS(torch.nn.Module):
    def __init__(self, n_mels: int = 40, hidden: int = 128, n_classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(n_mels, hidden, batch_first=True)
        self.fc1 = torch.nn.Linear(hidden, 64)
        self.fc2 = torch.nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        return self.fc2(torch.relu(self.fc1(y.mean(dim=1))))


def train(x: np.ndarray, y: np.ndarray, epochs: int) -> KWS:
    torch.manual_seed(SEED)
    net = KWS()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=epochs * (-(-len(x) // BATCH)))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        t, total, correct = time.perf_counter(), 0.0, 0
        net.train()
        for idx in torch.randperm(len(x), generator=g).split(BATCH):
            out = net(xt[idx])
            loss = torch.nn.functional.cross_entropy(out, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            correct += int((out.argmax(1) == yt[idx]).sum())
        print(
            f"  epoch {epoch + 1:2d}/{epochs}: loss {total / len(x):.3f}, train acc {correct / len(x):.3f} "
            f"({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
    return net.eval()


def predict(path: Path, x: np.ndarray) -> np.ndarray:
    sess = session(path, "kernels")
    return np.concatenate([sess.run(None, {"x": x[i : i + 256]})[0] for i in range(0, len(x), 256)]).argmax(1)


def paired_latency(models: dict[str, Path], feeds: dict[str, np.ndarray], runs: int = 300) -> dict[str, list[float]]:
    """Seconds per run, 1 thread, interleaved; the two halves create sessions in opposite orders (creation
    order alone shifts ratios by a few percent on a small machine)."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for order in (list(models), list(reversed(models))):
        sessions = {k: session(models[k], "kernels", threads=1) for k in order}
        for k, v in interleaved_latency(sessions, feeds, runs=runs // 2, warmup=20).items():
            times[k].extend(v)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="artifacts/kws")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--results", default="bench/RESULTS_KWS.md", help="markdown file to write ('' for none)")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    start = time.perf_counter()

    print("1. speech from espeak-ng")
    train_takes, test_takes = speakers()
    tr_clips, tr_words = load_audio(train_takes, work, "train")
    te_clips, te_words = load_audio(test_takes, work, "test")
    print(
        f"  train: {len(train_takes)} takes, {len(tr_clips)} words; held-out: {len(test_takes)} takes "
        f"({', '.join(TEST_VOICES)} x {N_TEST_VARIANTS} unseen variants), {len(te_clips)} words"
    )

    print("2. noise and log-mel features")
    x_tr, y_tr = make_set(tr_clips, tr_words, copies=1, seed=1, clean=0.15)
    x_te, y_te = make_set(te_clips, te_words, copies=1, seed=2)
    x_clean, y_clean = make_set(te_clips, te_words, copies=1, seed=3, noisy=False)
    mean, std = x_tr.mean(axis=(0, 1)), x_tr.std(axis=(0, 1)) + 1e-6
    x_tr, x_te, x_clean = ((a - mean) / std for a in (x_tr, x_te, x_clean))
    print(f"  train {x_tr.shape}, held-out noisy {x_te.shape}, held-out clean {x_clean.shape}")

    print("3. train the LSTM")
    net = train(x_tr, y_tr, args.epochs)
    float_path, lowbit_path, ort_path = work / "kws.onnx", work / "kws.lowbit.onnx", work / "kws.ort_dynamic.onnx"
    onnx.save(module_to_onnx(net, (torch.from_numpy(x_te[:1]),)), str(float_path))

    print("4. quantize")
    res = lowbit.quantize(float_path, lowbit_path, recipe=preset("dynamic"), progress=False)
    for name, d in res.plan.nodes.items():
        if d.quantized or d.op_type in ("LSTM", "Gemm", "MatMul"):
            print(f"  {name:24s} {d.op_type:8s} {'int8 ' if d.quantized else 'float'} {d.reason}")
    lstm = next(d for d in res.plan.nodes.values() if d.op_type == "LSTM")
    choice = f"{lstm.details['granularity']} (SQNR in dB: {lstm.details['sqnr_db']})"
    # Per-tensor W and R without the AVX2 overflow guard: ONNX Runtime's own form.
    pt_path = work / "kws.lowbit_per_tensor.onnx"
    lowbit.quantize(
        float_path,
        pt_path,
        recipe=Recipe(default=Scheme(mode="dynamic", per_channel=False, avoid_overflow=False)),
        progress=False,
    )
    quantize_dynamic(str(float_path), str(ort_path), weight_type=QuantType.QInt8)
    ort_copy = work / "kws.ort_dynamic.copy.onnx"
    shutil.copyfile(ort_path, ort_copy)

    print("5. accuracy on held-out speakers, size, latency")
    models = {"float": float_path, DEFAULT: lowbit_path, PER_TENSOR: pt_path, ORT: ort_path, ORT_COPY: ort_copy}
    acc, agree = {}, {}
    ref = {k: predict(float_path, x) for k, x in (("noisy", x_te), ("clean", x_clean))}
    for label, path in models.items():
        p_noisy, p_clean = predict(path, x_te), predict(path, x_clean)
        acc[label] = (float(np.mean(p_noisy == y_te)), float(np.mean(p_clean == y_clean)))
        agree[label] = float(np.mean(p_noisy == ref["noisy"]))
    load = os.getloadavg()[0]
    times = paired_latency(models, {"x": x_te[:1]})
    load = max(load, os.getloadavg()[0])
    header = (
        "| model | held-out acc, noisy 0-20 dB | held-out acc, clean | top-1 agreement with float (noisy) "
        "| size | p50 latency, batch 1, 1 thread | paired latency ratio vs float | vs ORT quantize_dynamic |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for label, path in models.items():
        lines.append(
            f"| {label} | {100 * acc[label][0]:.1f}% | {100 * acc[label][1]:.1f}% | {100 * agree[label]:.1f}% "
            f"| {path.stat().st_size / 1024:.0f} KiB | {1e3 * float(np.median(times[label])):.3f} ms "
            f"| {paired_ratio(times, label, 'float'):.3f} | {paired_ratio(times, label, ORT):.3f} |"
        )
    vs_ort = paired_ratio(times, DEFAULT, ORT)
    noise = abs(paired_ratio(times, ORT_COPY, ORT) - 1)
    table = "\n".join(lines)
    print(table)
    print(f"  lowbit's default vs ORT quantize_dynamic: {vs_ort:.3f} (< 1: lowbit faster); noise control {noise:.3f}")
    ops = sorted({n.op_type for n in onnx.load(str(lowbit_path)).graph.node})
    took = time.perf_counter() - start
    print(f"  lowbit model ops: {', '.join(ops)}; total {took:.0f} s")

    if args.results:
        mach = machine()
        text = f"""# Keyword spotting: LSTM on espeak-ng speech, dynamic int8

Command: `make kws` (`python examples/kws_lstm.py`), {datetime.date.today().isoformat()}, {took:.0f} s in all.
Machine: {mach["cpu"]}, {mach["cores"]} cores, VNNI: {mach["vnni"]}; 1-minute load average up to {load:.1f} during
the latency rounds. The machine is shared with other jobs, so
absolute latencies are noisy; the ratios are medians of per-round ratios of interleaved runs (300 rounds, each
running every model once in a fresh seeded order; batch 1, one thread, session creation order alternated), which a
slow spell affects alike.

Data: espeak-ng {len(KEYWORDS)} keywords + {len(OTHER)} other words ("_unknown_") + noise-only "_silence_",
{len(sp.VOICES)} English accents x {N_VARIANTS} voice variants, {TAKES} takes per speaker at random speed and pitch.
Held-out speakers: accents {", ".join(TEST_VOICES)} x {N_TEST_VARIANTS} variants, none of either in training
({len(y_te)} clips). Noise: white, pink, brown, mains hum or babble at 0-20 dB SNR. Features: 40 log-mels,
30 ms windows every 20 ms, 1 s clips (49 frames). Model: LSTM(40 -> 128), mean over time, Linear(128, 64), ReLU,
Linear(64, {len(CLASSES)}); {args.epochs} epochs of Adam in PyTorch on the CPU.

{table}

lowbit's default (`--preset dynamic`) takes {vs_ort:.3f}x the time of `onnxruntime.quantization.quantize_dynamic`'s
model (its defaults: per-tensor int8 weights), paired in the same run. The noise-control row is the very same file
as quantize_dynamic's: its ratio is {noise:.3f} away from 1, so differences of that size are noise.

lowbit writes `com.microsoft.DynamicQuantizeLSTM` with int8 W and R and `DynamicQuantizeLinear -> MatMulInteger`
for the Linear layers, which ONNX Runtime fuses; ops in lowbit's model: {", ".join(ops)}.
W and R: {choice}. The rule (`src/lowbit/ops/granularity.py`): one scale per direction unless W or R is below
30 dB SQNR with it and a scale per gate row gains at least 3 dB, because ONNX Runtime's DynamicQuantizeLSTM
kernel runs per-gate-row scales more slowly (1.11-1.13x the time of quantize_dynamic's model in earlier runs,
when per gate row was lowbit's default). The int16 overflow guard for AVX2 CPUs without VNNI stays on: it only
changes the weights (with one scale per direction it trims the overflowing pairs or raises the direction's scale,
whichever is closer to the float weights), so it costs nothing at run time; "{PER_TENSOR}" shows what it costs in
accuracy on this model.
"""
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.results).with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(args.results)
        print(f"  wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
