import mmap
import struct
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from lowbit import arrays as arrays_mod
from lowbit.arrays import load_arrays, release
from lowbit.data import ImagePreprocess, InputSpec, input_specs, open_data
from lowbit.errors import LowbitError

X = InputSpec("x", np.dtype(np.float32), ("N", 3))
IMG = InputSpec("img", np.dtype(np.float32), ("N", 3, 8, 8))


def raises(match_parts, fn, *args, **kwargs):
    """Assert a one-line LowbitError mentioning every part."""
    with pytest.raises(LowbitError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    for part in match_parts:
        assert str(part) in msg, (part, msg)
    return msg


def consume(src):
    return list(src)


def arange(n, width=3, dtype=np.float32):
    return np.arange(n * width, dtype=dtype).reshape(n, width)


# --- input_specs -----------------------------------------------------------------


def test_input_specs_skips_initializers(tmp_path):
    w = numpy_helper.from_array(np.ones((3, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[w],
    )
    model = helper.make_model(graph)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    for m in (model, path, str(path)):
        specs = input_specs(m)
        assert [s.name for s in specs] == ["x", "ids"]
        assert specs[0] == InputSpec("x", np.dtype(np.float32), ("batch", 3))
        assert specs[1].dtype == np.int64 and specs[1].shape == (1, None)


def test_input_specs_errors(tmp_path):
    raises(["model not found", "nope.onnx"], input_specs, tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xff not a model")
    raises(["bad.onnx", "not a valid ONNX model"], input_specs, bad)


# --- arrays from files -------------------------------------------------------------


def test_npy_batch_and_single_sample(tmp_path):
    np.save(tmp_path / "a.npy", arange(10))
    src = open_data(tmp_path / "a.npy", [X], batch_size=4)
    assert src.num_samples == 10
    out = consume(src)
    assert [b["x"].shape for b in out] == [(4, 3), (4, 3), (2, 3)]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in out]), arange(10))
    assert not isinstance(out[0]["x"], np.memmap) and out[0]["x"].flags.writeable
    # Re-iterable, same order.
    np.testing.assert_array_equal(consume(src)[0]["x"], out[0]["x"])

    np.save(tmp_path / "one.npy", np.array([1, 2, 3], np.float32))
    (b,) = consume(open_data(str(tmp_path / "one.npy"), [X]))
    assert b["x"].shape == (1, 3)


def test_npz_named_and_single_key(tmp_path):
    specs = [X, InputSpec("m", np.dtype(np.int64), ("N",))]
    np.savez(tmp_path / "d.npz", x=arange(5), m=np.arange(5), label=np.zeros(5))
    out = consume(open_data(tmp_path / "d.npz", specs, batch_size=2))
    assert [b["m"].tolist() for b in out] == [[0, 1], [2, 3], [4]]
    assert set(out[0]) == {"x", "m"}

    np.savez(tmp_path / "k.npz", whatever=arange(3))
    (b,) = consume(open_data(tmp_path / "k.npz", [X]))
    np.testing.assert_array_equal(b["x"], arange(3))


def _mapping(a):
    """The mmap object `a` views, or None."""
    base = a.base
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.obj if isinstance(base, memoryview) else base.base
    return base if isinstance(base, mmap.mmap) else None


def test_npy_and_stored_npz_are_memory_mapped_and_never_unpickled(tmp_path, monkeypatch):
    calls = []
    real_load = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    np.save(tmp_path / "a.npy", arange(4))
    np.savez(tmp_path / "b.npz", x=arange(3) + 10, other=np.zeros(2))
    np.savez_compressed(tmp_path / "c.npz", x=arange(2) + 20)
    assert sum(len(b["x"]) for b in open_data(tmp_path, [X], batch_size=3)) == 9
    assert all(c.get("allow_pickle") is False for c in calls)
    a, b, c = (load_arrays(tmp_path / f, [X])["x"] for f in ("a.npy", "b.npz", "c.npz"))
    assert _mapping(a) is not None and _mapping(b) is not None  # read by the pages used, not copied whole
    assert _mapping(c) is None  # compressed: read (of it only the samples needed)
    np.testing.assert_array_equal(a, arange(4))
    np.testing.assert_array_equal(b, arange(3) + 10)
    np.testing.assert_array_equal(c, arange(2) + 20)


def test_mapped_members_read_as_numpy_does(tmp_path):
    """Every member of a stored archive, whatever its dtype, byte order or rank, is the array numpy reads; names
    with odd characters and an archive with a comment move no offset."""
    arrays = {
        "x": np.arange(24, dtype=">f4").reshape(2, 3, 4),
        "ints": np.arange(7, dtype=np.int64),
        "scalar": np.array(3.5),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "bools": np.array([[True, False]]),
        "long_name_" + "é" * 40: np.ones((1, 1), np.float16),
    }
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with zipfile.ZipFile(path, "a") as zf:
        zf.comment = b"a comment"
    specs = [InputSpec(k, v.dtype, ("N", *v.shape[1:])) for k, v in arrays.items() if v.ndim]
    got = load_arrays(path, specs)
    for k, v in got.items():
        np.testing.assert_array_equal(v, arrays[k])
        assert v.dtype == arrays[k].dtype
    assert _mapping(got["fortran"]) is None  # Fortran order: read the usual way


def test_truncated_stored_member_is_one_line(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=arange(10_000))  # larger than zipfile's first read of its header: no CRC checked there
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("x.npy")
    # The member's header still says 10000 samples; the archive's directory says its bytes end early.
    where = data.rfind(b"PK\x01\x02")
    struct.pack_into("<LL", data, where + 20, info.compress_size - 40, info.file_size - 40)
    path.write_bytes(bytes(data))
    raises(["d.npz", "truncated"], open_data(path, [X]).__iter__().__next__)
    np.save(tmp_path / "a.npy", arange(10))
    cut = tmp_path / "cut.npy"
    cut.write_bytes((tmp_path / "a.npy").read_bytes()[:-5])
    raises(["cut.npy", "truncated"], open_data(cut, [X]).__iter__().__next__)


def test_samples_read_leave_memory(tmp_path, monkeypatch):
    """A mapped file's pages of samples already copied into batches are dropped from memory, and only those:
    every page released lies inside the rows read so far, and together they cover all but the pages that hold
    a batch boundary."""
    rows, width = 64, 4096  # 16 KiB a sample
    np.save(tmp_path / "big.npy", np.arange(rows * width, dtype=np.float32).reshape(rows, width))
    released = []
    monkeypatch.setattr(arrays_mod._FileMap, "madvise", lambda self, op, start, n: released.append((start, n)))
    spec = InputSpec("x", np.dtype(np.float32), ("N", width))
    seen = 0
    header = 128
    for batch in open_data(tmp_path / "big.npy", [spec], batch_size=5):
        seen += len(batch["x"])
        assert all(start >= header and start + n <= header + seen * width * 4 for start, n in released)
    assert sum(n for _, n in released) >= rows * width * 4 - (rows // 5 + 1) * mmap.PAGESIZE
    np.testing.assert_array_equal(batch["x"][-1], np.arange((rows - 1) * width, rows * width, dtype=np.float32))


def test_release_leaves_other_arrays_alone(tmp_path):
    """Only a file mapped by `load_arrays` (read-only) is released: a caller's copy-on-write memmap keeps its
    changes, a plain array its values."""
    np.save(tmp_path / "a.npy", np.zeros((8, 4096), np.float32))
    private = np.load(tmp_path / "a.npy", mmap_mode="c")
    private[:] = 7.0  # changed in memory only: dropping these pages would lose it
    release(private[2:6])
    assert float(private.min()) == 7.0
    plain = np.ones((8, 4096), np.float32)
    release(plain[1:7])
    assert float(plain.min()) == 1.0
    mapped = load_arrays(tmp_path / "a.npy", [X])["x"]
    release(mapped[1:7])  # dropped from memory, still the file's values when read again
    assert float(np.abs(mapped).max()) == 0.0


def test_folder_of_arrays_sorted_and_rebatched(tmp_path):
    np.save(tmp_path / "b.npy", arange(3) + 100)
    np.save(tmp_path / "a.npy", arange(2))
    np.savez(tmp_path / "c.npz", x=np.array([7, 7, 7], np.float32))  # a single sample
    (tmp_path / "README.txt").write_text("ignored")
    src = open_data(tmp_path, [X], batch_size=4)
    assert src.num_samples == 6
    out = consume(src)
    assert [len(b["x"]) for b in out] == [4, 2]
    flat = np.concatenate([b["x"] for b in out])
    np.testing.assert_array_equal(flat, np.concatenate([arange(2), arange(3) + 100, [[7, 7, 7]]]))


def test_float64_cast_to_float32(tmp_path):
    np.save(tmp_path / "a.npy", arange(2, dtype=np.float64))
    (b,) = consume(open_data(tmp_path / "a.npy", [X]))
    assert b["x"].dtype == np.float32


def test_fixed_batch_dim_one_and_limit(tmp_path):
    spec = InputSpec("x", np.dtype(np.float32), (1, 3))
    np.save(tmp_path / "a.npy", arange(5))
    src = open_data(tmp_path / "a.npy", [spec], batch_size=8, limit=3)
    assert src.batch_size == 1 and src.num_samples == 3
    out = consume(src)
    assert [b["x"].shape for b in out] == [(1, 3)] * 3
    np.testing.assert_array_equal(out[2]["x"], arange(5)[2:3])


def test_fixed_batch_drops_remainder_with_warning():
    spec = InputSpec("x", np.dtype(np.float32), (4, 3))
    src = open_data([arange(6)], [spec])
    assert src.num_samples == 4
    with pytest.warns(UserWarning, match="dropping the last 2"):
        out = consume(src)
    assert [b["x"].shape for b in out] == [(4, 3)]


def test_limit_across_files(tmp_path):
    np.save(tmp_path / "a.npy", arange(3))
    (tmp_path / "b.npy").write_bytes(np.lib.format.MAGIC_PREFIX)  # broken, but never reached...
    with pytest.raises(LowbitError):  # ...except by the up-front header scan
        open_data(tmp_path, [X], limit=2)
    (tmp_path / "b.npy").unlink()
    np.save(tmp_path / "b.npy", arange(3))
    src = open_data(tmp_path, [X], batch_size=10, limit=2)
    assert src.num_samples == 2
    (b,) = consume(src)
    np.testing.assert_array_equal(b["x"], arange(2))


# --- iterables -----------------------------------------------------------------------


def test_iterable_of_arrays_and_dicts():
    src = open_data([arange(3), np.ones(3, np.float32)], [X], batch_size=3)
    assert src.num_samples == 4
    assert [len(b["x"]) for b in consume(src)] == [3, 1]

    specs = [X, InputSpec("y", np.dtype(np.int32), ("N", 2))]
    gen = ({"x": np.full(3, i, np.float32), "y": np.array([i, i], np.int32)} for i in range(5))
    src = open_data(gen, specs, batch_size=2)
    assert src.num_samples is None
    out = consume(src)
    assert [b["y"][:, 0].tolist() for b in out] == [[0, 1], [2, 3], [4]]
    raises(["already consumed"], consume, src)


def test_limit_consumes_generator_lazily():
    def gen():
        yield arange(2)
        yield arange(2)
        raise AssertionError("read past the limit")

    (b,) = consume(open_data(gen(), [X], batch_size=8, limit=3))
    assert len(b["x"]) == 3


def test_bare_array_is_one_item():
    out = consume(open_data(arange(5), [X], batch_size=2))
    assert [len(b["x"]) for b in out] == [2, 2, 1]


# --- images --------------------------------------------------------------------------


def solid(path, color, size=(12, 10)):
    Image.new("RGB", size, color).save(path)


def test_image_folder_nchw_rgb(tmp_path):
    solid(tmp_path / "b.PNG", (255, 0, 0))
    solid(tmp_path / "a.jpg", (0, 0, 0))
    solid(tmp_path / "c.bmp", (0, 255, 0))
    pre = ImagePreprocess(size=10, crop=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    src = open_data(tmp_path, [IMG], batch_size=2, preprocess=pre)
    assert src.num_samples == 3
    first, second = consume(src)
    assert first["img"].shape == (2, 3, 8, 8) and second["img"].shape == (1, 3, 8, 8)
    # a.jpg (black) first: (0 - 0.5) / std; JPEG may be off by a level or two.
    np.testing.assert_allclose(first["img"][0, :, 0, 0], [-1, -2, -1], atol=0.05)
    # b.png (red), exact: R = (1 - .5) / .5, G = (0 - .5) / .25
    np.testing.assert_allclose(first["img"][1, :, 4, 4], [1, -2, -1], atol=1e-6)
    np.testing.assert_allclose(second["img"][0, :, 4, 4], [-1, 2, -1], atol=1e-6)


def test_image_nhwc_bgr_default_normalisation(tmp_path):
    solid(tmp_path / "red.png", (255, 0, 0), size=(40, 30))
    spec = InputSpec("img", np.dtype(np.float32), (None, 224, 224, 3))
    pre = ImagePreprocess(layout="NHWC", channels="BGR")
    (b,) = consume(open_data(tmp_path, [spec], preprocess=pre))
    assert b["img"].shape == (1, 224, 224, 3)
    mean, std = np.array(pre.mean), np.array(pre.std)
    expected_rgb = (np.array([1.0, 0.0, 0.0]) - mean) / std
    np.testing.assert_allclose(b["img"][0, 100, 100], expected_rgb[::-1], atol=1e-5)


def test_image_errors(tmp_path):
    solid(tmp_path / "a.png", (1, 2, 3))
    raises(["224", "8", "crop"], open_data, tmp_path, [IMG])  # default crop 224 vs model's 8
    nhwc = InputSpec("img", np.dtype(np.float32), ("N", 8, 8, 3))
    raises(["NCHW", "NHWC"], open_data, tmp_path, [nhwc], preprocess=ImagePreprocess(size=8, crop=8))
    raises(["one 4-D float input"], open_data, tmp_path, [X])
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    src = open_data(tmp_path, [IMG], preprocess=ImagePreprocess(size=8, crop=8))
    raises(["cannot read image", "b.jpg"], consume, src)
    np.save(tmp_path / "c.npy", arange(1))
    raises(["mixes"], open_data, tmp_path, [IMG])


@pytest.mark.parametrize(
    "kwargs, part",
    [
        ({"size": 0}, "size"),
        ({"size": 100, "crop": 224}, "crop"),
        ({"std": (1, 0, 1)}, "std"),
        ({"mean": (1, 2)}, "mean"),
        ({"layout": "CHW"}, "layout"),
        ({"channels": "RGBA"}, "channels"),
    ],
)
def test_image_preprocess_validation(kwargs, part):
    raises([part], ImagePreprocess, **kwargs)


# --- errors ----------------------------------------------------------------------------


def test_missing_path_and_empty_folder(tmp_path):
    raises(["calibration data not found", "nope.npy"], open_data, tmp_path / "nope.npy", [X])
    raises(["evaluation data not found"], open_data, tmp_path / "nope", [X], what="evaluation data")
    raises([str(tmp_path), ".npy", ".npz", ".jpg", ".png"], open_data, tmp_path, [X])
    (tmp_path / "notes.txt").write_text("x")
    raises([str(tmp_path), ".npy"], open_data, tmp_path, [X])
    raises(["unsupported data file", "notes.txt"], open_data, tmp_path / "notes.txt", [X])


def test_invalid_files(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    raises(["bad.npy", "not a valid .npy"], open_data, tmp_path / "bad.npy", [X])
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    raises(["bad.npz", "not a valid .npz"], open_data, tmp_path / "bad.npz", [X])


def test_pickled_object_array_refused(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"evil": 1}, None], dtype=object), allow_pickle=True)
    raises(["obj.npy", "Python objects"], open_data, path, [X])
    np.savez(tmp_path / "obj.npz", x=np.array([[1, 2, 3]], dtype=object))
    raises(["obj.npz", "Python objects"], open_data, tmp_path / "obj.npz", [X])


def test_missing_input_name(tmp_path):
    specs = [X, InputSpec("y", np.dtype(np.float32), ("N", 2))]
    np.savez(tmp_path / "d.npz", x=arange(2), z=arange(2, 2))
    raises(["'y'", "d.npz", "'x'", "'z'"], open_data, tmp_path / "d.npz", specs)
    np.save(tmp_path / "a.npy", arange(2))
    raises(["a.npy", "2 inputs", "x, y"], open_data, tmp_path / "a.npy", specs)
    raises(["'y'", "item 0", "'x'"], open_data, [{"x": arange(1)}], specs)
    raises(["item 0", "2 inputs"], open_data, [arange(1)], specs)


def test_wrong_shape_and_rank(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((5, 3, 200, 200), np.float32))
    spec = InputSpec("x", np.dtype(np.float32), ("batch", 3, 224, 224))
    msg = raises(["a.npy"], open_data, tmp_path / "a.npy", [spec])
    assert "input 'x': expected shape (N, 3, 224, 224), got (5, 3, 200, 200) in" in msg
    raises(["expected shape (N, 3)", "(2, 3, 1)"], open_data, [np.zeros((2, 3, 1), np.float32)], [X])
    raises(["expected shape (N, 3)", "(4,)"], open_data, [np.zeros(4, np.float32)], [X])


def test_wrong_dtype_and_sample_counts():
    raises(["float32", "int64", "item 0"], open_data, [np.zeros((2, 3), np.int64)], [X])
    ints = InputSpec("i", np.dtype(np.int32), ("N",))
    raises(["int32", "float32"], open_data, [np.zeros(2, np.float32)], [ints])
    specs = [X, InputSpec("y", np.dtype(np.float32), ("N", 2))]
    raises(["different numbers of samples"], open_data, [{"x": arange(2), "y": arange(3, 2)}], specs)


def test_nan_and_inf_named(tmp_path):
    data = arange(6)
    data[4, 1] = np.nan
    np.save(tmp_path / "a.npy", data)
    src = open_data(tmp_path / "a.npy", [X], batch_size=2)
    raises(["'x'", "NaN or Inf", "sample 4", "a.npy"], consume, src)
    raises(["sample 0", "item 1"], consume, open_data([arange(1), np.array([np.inf, 0, 0])], [X]))
    # float64 values too large for float32 become Inf after the cast.
    raises(["after casting float64 to float32"], consume, open_data([np.full(3, 1e300)], [X]))


def test_bad_arguments():
    raises(["batch_size"], open_data, [arange(1)], [X], batch_size=0)
    raises(["limit"], open_data, [arange(1)], [X], limit=0)
    raises(["yield numpy arrays"], consume, open_data(iter(["text"]), [X]))
    raises(["cannot read data"], open_data, 42, [X])


def test_files_that_cannot_be_mapped_are_read(tmp_path, monkeypatch):
    """Where mmap fails (some network or FUSE file systems), a stored .npz member is read as before."""

    class Refusing(arrays_mod._FileMap):
        def __new__(cls, *args, **kwargs):
            raise OSError(19, "No such device")

    monkeypatch.setattr(arrays_mod, "_FileMap", Refusing)
    np.savez(tmp_path / "d.npz", x=arange(5))
    out = consume(open_data(tmp_path / "d.npz", [X], batch_size=2))
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in out]), arange(5))
