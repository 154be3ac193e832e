"""Tests for lowbit_zoo.zoo: bundled photographs, crops, and the EfficientNet-Lite0 export."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from lowbit_zoo import zoo


def test_photos_load_offline_as_rgb_uint8():
    for name in zoo.CALIB_PHOTOS + zoo.EVAL_PHOTOS:
        img = zoo.load_photo(name)
        assert img.dtype == np.uint8
        assert img.ndim == 3 and img.shape[2] == 3
        assert min(img.shape[:2]) >= 224, name  # crops of 30% are upsampled at most ~3.3x
        assert not img.flags.writeable


def test_unknown_photo_and_split_rejected():
    with pytest.raises(ValueError):
        zoo.load_photo("lena")
    with pytest.raises(ValueError):
        zoo.photo_crops(1, "train")  # type: ignore[arg-type]


def test_split_assignment_is_disjoint():
    calib, evl = set(zoo.CALIB_PHOTOS), set(zoo.EVAL_PHOTOS)
    assert not calib & evl
    assert len(calib) == len(zoo.CALIB_PHOTOS) and len(evl) == len(zoo.EVAL_PHOTOS)
    # Aliases (skimage's cat() is chelsea.png) would defeat disjointness by name: compare pixels.
    digests = {n: hashlib.sha256(zoo.load_photo(n).tobytes()).hexdigest() for n in calib | evl}
    assert not {digests[n] for n in calib} & {digests[n] for n in evl}
    # A stereo pair is one scene: both views must sit in the same split.
    pair = {"motorcycle_left", "motorcycle_right"}
    assert pair <= calib or pair <= evl


@pytest.mark.parametrize("split", ["calib", "eval"])
def test_crops_only_use_their_split(split):
    allowed = set(zoo.CALIB_PHOTOS if split == "calib" else zoo.EVAL_PHOTOS)
    plan = zoo._crop_plan(40, split, seed=3)
    assert {p[0] for p in plan} == allowed  # every photo used, none from the other split
    for name, top, left, side, _flip in plan:
        h, w = zoo.load_photo(name).shape[:2]
        short = min(h, w)
        assert round(0.3 * short) <= side <= short
        assert 0 <= top <= h - side and 0 <= left <= w - side


def test_shapes_dtype_and_normalisation():
    x = zoo.photo_crops(5, "calib", seed=0, size=96)
    assert x.shape == (5, 3, 96, 96) and x.dtype == np.float32
    assert x.flags.c_contiguous
    mean, std = np.asarray(zoo.IMAGENET_MEAN), np.asarray(zoo.IMAGENET_STD)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    for c in range(3):
        assert x[:, c].min() >= lo[c] - 1e-5 and x[:, c].max() <= hi[c] + 1e-5
    assert zoo.photo_crops(0, "eval").shape == (0, 3, 224, 224)


def test_deterministic_and_seeded():
    a = zoo.photo_crops(6, "eval", seed=7, size=64)
    b = zoo.photo_crops(6, "eval", seed=7, size=64)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, zoo.photo_crops(6, "eval", seed=8, size=64))
    # Prefix-stable: the first k of n crops are the k crops.
    assert np.array_equal(a[:3], zoo.photo_crops(3, "eval", seed=7, size=64))


def test_uint8_crops_match_normalised_crops():
    u = zoo.photo_crops_uint8(3, "calib", seed=1, size=48)
    assert u.shape == (3, 48, 48, 3) and u.dtype == np.uint8
    x = zoo.photo_crops(3, "calib", seed=1, size=48)
    mean, std = np.asarray(zoo.IMAGENET_MEAN), np.asarray(zoo.IMAGENET_STD)
    back = (x.transpose(0, 2, 3, 1) * std + mean) * 255
    np.testing.assert_allclose(back, u, atol=1e-3)


def test_write_photo_folder_roundtrip(tmp_path):
    from PIL import Image

    paths = zoo.write_photo_folder(tmp_path / "imgs", 4, "eval", seed=2, size=32)
    assert [p.name for p in paths] == [f"eval_{i:04d}.png" for i in range(4)]
    expected = zoo.photo_crops_uint8(4, "eval", seed=2, size=32)
    for p, e in zip(paths, expected):
        with Image.open(p) as im:
            assert im.mode == "RGB"
            assert np.array_equal(np.asarray(im), e)


@pytest.mark.slow
def test_efficientnet_lite0_export_matches_torch(tmp_path):
    import onnxruntime as ort
    import torch

    path = zoo.efficientnet_lite0_onnx(tmp_path / "sub" / "effnet.onnx")
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["effnet.onnx"]  # no temp file left
    mtime = path.stat().st_mtime_ns
    assert zoo.efficientnet_lite0_onnx(path) == path and path.stat().st_mtime_ns == mtime  # skipped

    # Byte-identical across exports.
    again = zoo.efficientnet_lite0_onnx(tmp_path / "again.onnx")
    assert again.read_bytes() == path.read_bytes()

    x = zoo.photo_crops(4, "eval", seed=0)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    got = sess.run(None, {"input": x})[0]
    with torch.no_grad():
        want = zoo._efficientnet_lite0_torch()(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape == (4, 1000)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert np.array_equal(got.argmax(1), want.argmax(1))
    # Dynamic batch: batch 1 gives the same logits as row 0 of batch 4.
    one = sess.run(None, {"input": x[:1]})[0]
    assert np.abs(one - got[:1]).max() <= 1e-4 * np.abs(want).max()
