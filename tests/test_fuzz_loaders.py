"""Property-based fuzz of the loaders: recipes, plans and calibration data.

Whatever a user hands lowbit (a hand-edited recipe, a damaged plan, an odd array), a loader either returns its
object or raises a one-line LowbitError: never a TypeError, KeyError or RecursionError with a traceback. The
budgets are fixed and the examples derandomized, so CI runs the same cases every time, in well under a minute.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import numpy_helper

import lowbit
from conftest import tiny_cnn
from lowbit.data import InputSpec, open_data
from lowbit.errors import LowbitError
from lowbit.recipe import PRESETS, Recipe, Rule, Scheme

T = TypeVar("T")

# database=None: no examples replayed from earlier runs (a changed strategy would replay them inconsistently).
FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | LowbitError:
    """`fn(...)`'s result, or the LowbitError it raised after checking its message is one line; any other
    exception propagates and fails the example."""
    try:
        return fn(*args, **kwargs)
    except LowbitError as e:
        message = str(e)
        assert len(message.splitlines()) == 1, f"LowbitError message is not one line: {message!r}"
        return e


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="lowbit-fuzz-"))


# ---------------------------------------------------------------------------------------------------------------
# JSON-like values and mutations of valid documents

RECIPE_KEYS = sorted({f for cls in (Recipe, Scheme, Rule) for f in cls.__dataclass_fields__})
# Drawn through copy.deepcopy: the edits below mutate containers in place, and a shared list would carry one
# example's edits into the next (hypothesis then sees the same choices draw different data).
ODD_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    10**30,
    -(10**30),
    10**400,  # beyond float64; 10**5000 cannot even be repr()ed: see the plain tests
    0.0,
    -0.0,
    1e-46,
    1e39,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    32.0,
    "",
    "NaN",
    "nan",
    "0.1",
    "1",
    "2",
    "int8",
    "uint8",
    "a\nb",
    "line\r\nbreak",
    "\u2028",
    "x" * 300,
    [],
    {},
    [[0.1]],
    [1, [2, [3]]],
    {"a": {"b": None}},
]

keys = st.sampled_from(RECIPE_KEYS) | st.text(max_size=8)
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(ODD_VALUES).map(copy.deepcopy)
)
json_values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=20,
)


def deep(value: Any, depth: int, kind: str = "list") -> Any:
    """`value` inside `depth` lists or objects (built iteratively: deeper than the recursion limit is fine)."""
    for _ in range(depth):
        value = [value] if kind == "list" else {"default": value}
    return value


def _containers(doc: Any) -> list[tuple]:
    """Paths to the dicts and lists inside `doc` (the root included), down to depth 20."""
    found, todo = [], [((), doc)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, (dict, list)):
            found.append(path)
            if len(path) < 20:
                items = value.items() if isinstance(value, dict) else enumerate(value)
                todo.extend(((*path, k), v) for k, v in items)
    return sorted(found, key=lambda p: (len(p), repr(p)))


def _at(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


@st.composite
def mutated(draw: st.DrawFn, base: Any, max_steps: int = 4) -> Any:
    """`base` (a JSON document) after a few random edits: drop, replace, retype, add and nest values."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_steps))):
        paths = _containers(doc)
        if not paths:
            return draw(json_values)
        container = _at(doc, draw(st.sampled_from(paths)))
        slots = list(container) if isinstance(container, dict) else list(range(len(container)))
        op = draw(st.sampled_from(["drop", "replace", "odd", "retype", "add", "nest", "wrap_root"]))
        if op == "add" or not slots:
            if isinstance(container, dict):
                container[draw(keys)] = draw(json_values)
            else:
                container.append(draw(json_values))
            continue
        slot = draw(st.sampled_from(slots))
        value = container[slot]
        if op == "drop":
            del container[slot]
        elif op == "replace":
            container[slot] = draw(json_values)
        elif op == "odd":
            container[slot] = draw(st.sampled_from(ODD_VALUES).map(copy.deepcopy))
        elif op == "retype":
            container[slot] = draw(
                st.sampled_from(
                    [
                        [value],
                        {"value": value},
                        dump(value).decode(),
                        dump(value).decode()[:40],
                        value if not isinstance(value, (int, float)) else -value,
                        None,
                    ]
                )
            )
        elif op == "nest":
            depth = draw(st.sampled_from([1, 2, 50]))  # deeper: see the plain tests (too deep to print)
            container[slot] = deep(value, depth, draw(st.sampled_from(["list", "dict"])))
        else:
            doc = draw(st.sampled_from([[doc], {"recipe": doc}, deep(doc, 50)]))
    return doc


def dump(doc: Any) -> bytes:
    """JSON text as a person might write it (NaN/Infinity included); a document too deep or holding an int too
    long for json to write is written as a truncated document instead (still something a loader must survive)."""
    try:
        return json.dumps(doc).encode()
    except (RecursionError, ValueError):
        return b"[" * 100_000


@st.composite
def file_bytes(draw: st.DrawFn, valid: bytes) -> bytes:
    """Arbitrary bytes, or a valid file cut short or with bytes flipped/inserted."""
    kind = draw(st.sampled_from(["random", "truncate", "flip", "insert"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "truncate":
        return valid[: draw(st.integers(0, len(valid)))]
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 5))):
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        b = draw(st.binary(min_size=1, max_size=3))
        if kind == "flip" and data:
            data[i : i + len(b)] = b
        else:
            data[i:i] = b
    return bytes(data)


# ---------------------------------------------------------------------------------------------------------------
# Recipes

PRESET_DICTS = [r.to_dict() for r in PRESETS.values()]
recipe_docs = st.sampled_from(PRESET_DICTS).flatmap(mutated) | json_values


def check_recipe(result: Recipe | LowbitError) -> None:
    if isinstance(result, Recipe):
        # What loads must survive its own round trip.
        assert Recipe.from_dict(result.to_dict()) == result


@settings(FUZZ, max_examples=400)
@given(recipe_docs)
def test_recipe_from_dict_returns_a_recipe_or_one_line_error(doc: Any) -> None:
    check_recipe(outcome(Recipe.from_dict, doc))
    if isinstance(doc, dict):
        check_recipe(outcome(Recipe.load, doc))


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(FUZZ, max_examples=200)
@given(st.data())
def test_recipe_file_loads_or_one_line_error(fuzz_dir: Path, data: st.DataObject) -> None:
    if data.draw(st.booleans()):
        raw = dump(data.draw(recipe_docs))
    else:
        raw = data.draw(file_bytes(json.dumps(PRESETS["weight-only-int4"].to_dict(), indent=2).encode()))
    path = fuzz_dir / "recipe.json"
    path.write_bytes(raw)
    check_recipe(outcome(Recipe.load, path))


def test_valid_presets_still_round_trip() -> None:
    for name, recipe in PRESETS.items():
        assert Recipe.from_dict(recipe.to_dict()) == recipe, name


# ---------------------------------------------------------------------------------------------------------------
# Plans

CALIB = np.random.default_rng(1).normal(0, 1, (8, 3, 16, 16)).astype(np.float32)
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


@pytest.fixture(scope="module")
def real_plan(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, dict[str, Any]]:
    out = tmp_path_factory.mktemp("plan") / "q.onnx"
    lowbit.quantize(tiny_cnn(), out, calib=CALIB, progress=False)
    return tiny_cnn(), json.loads(out.with_suffix(".plan.json").read_text())


ODD_PARAMS = [0, -1, -0.5, "NaN", "nan", "inf", float("nan"), float("inf"), 1e39, 1e-46, 1e308, 10**30, 10**400]
ODD_PARAMS += ["0.1", "3", [[0.1]], [], None, True, {"scale": 1}, 0.5, 3, 255, 256, -129, 1.5]


@st.composite
def odd_tensor_params(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """The plan with one tensor's scale, zero point, axis, range, dtype or kind set to odd values."""
    doc = copy.deepcopy(base)
    name = draw(st.sampled_from(sorted(doc["tensors"])))
    t = doc["tensors"][name]
    key = draw(st.sampled_from(["scale", "zero_point", "axis", "range", "dtype", "kind", "block_size"]))
    value = draw(
        st.sampled_from(ODD_PARAMS).map(copy.deepcopy)
        | st.lists(st.sampled_from(ODD_PARAMS).map(copy.deepcopy), max_size=4)
    )
    if key in ("scale", "zero_point") and isinstance(t[key], list) and t[key] and draw(st.booleans()):
        i = draw(st.integers(0, len(t[key]) - 1))
        t[key][i] = value  # one element of the list
        note(f"tensor {name!r}: {key}[{i}] = {value!r}")
    else:
        t[key] = value
        note(f"tensor {name!r}: {key} = {value!r}")
    return doc


@st.composite
def plan_docs(draw: st.DrawFn, base: dict[str, Any]) -> Any:
    kind = draw(st.sampled_from(["params", "params", "mutate", "version"]))
    if kind == "params":
        return draw(odd_tensor_params(base))
    if kind == "version":
        doc = copy.deepcopy(base)
        doc["version"] = draw(st.sampled_from([1, 2, 3, 0, -1, "2", 2.0, None, [2], "a\nb", 10**400]))
        return doc
    doc = draw(mutated(base))
    note(f"changed: {_diff(base, doc)}")
    return doc


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two JSON documents differ, for the failure report (the drawn plan is long)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=repr) for d in _diff(a.get(k), b.get(k), f"{path}.{k}")]
    if a != b:
        text = repr(b)
        return [f"{path} = {text if len(text) < 200 else text[:200] + '...'}"]
    return []


def quantize_with(model: onnx.ModelProto, plan: lowbit.Plan) -> None:
    result = outcome(lowbit.quantize, model, plan=plan, progress=False)
    if isinstance(result, LowbitError):
        return
    for init in result.model.graph.initializer:
        if init.data_type in FLOAT_TYPES:
            values = numpy_helper.to_array(init)
            assert np.isfinite(values).all(), f"initializer {init.name} has non-finite values"
            if init.name.endswith("scale") or "scale" in init.name:
                assert (values > 0).all(), f"scale {init.name} is not positive"


@settings(FUZZ, max_examples=250)
@given(st.data())
def test_plan_file_loads_or_one_line_error(
    fuzz_dir: Path, real_plan: tuple[onnx.ModelProto, dict[str, Any]], data: st.DataObject
) -> None:
    model, base = real_plan
    if data.draw(st.integers(0, 4)):
        raw = dump(data.draw(plan_docs(base)))
    else:
        raw = data.draw(file_bytes(json.dumps(base).encode()))
    path = fuzz_dir / "q.plan.json"
    path.write_bytes(raw)
    plan = outcome(lowbit.Plan.load, path)
    if isinstance(plan, lowbit.Plan):
        quantize_with(model, plan)


def test_real_plan_still_reapplies(real_plan: tuple[onnx.ModelProto, dict[str, Any]], tmp_path: Path) -> None:
    model, base = real_plan
    path = tmp_path / "q.plan.json"
    path.write_text(json.dumps(base))
    plan = lowbit.Plan.load(path)
    assert plan.to_dict() | {"lowbit_version": None} == base | {"lowbit_version": None}
    lowbit.quantize(model, plan=plan, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Data

SPECS = [
    [InputSpec("x", np.dtype(np.float32), ("N", 3, 4))],
    [InputSpec("x", np.dtype(np.float32), (2, 3))],  # fixed batch
    [InputSpec("x", np.dtype(np.float16), ("N", "T"))],
    [InputSpec("ids", np.dtype(np.int64), ("N", 5)), InputSpec("mask", np.dtype(np.float32), ("N", "T"))],
    [InputSpec("x", np.dtype(np.uint8), (None,))],
]
DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8, np.bool_, np.complex64, "<U3", "<M8[s]"]


def arrays_for(spec: InputSpec) -> st.SearchStrategy[np.ndarray]:
    """Arrays near the spec (right rank, maybe right dims) or anything, of any of DTYPES, NaN/Inf included."""
    near = st.tuples(
        *[st.integers(0, 4) if not isinstance(d, int) or d > 4 else st.sampled_from([d, d, 1]) for d in spec.shape]
    )
    shapes = near | hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)
    dtypes = st.sampled_from([spec.dtype, spec.dtype, *DTYPES]).map(np.dtype)
    return st.tuples(dtypes, shapes).flatmap(lambda ds: hnp.arrays(ds[0], ds[1]))


class Unpickled:
    """An object whose unpickling is recorded: an object-dtype .npy holding one must never be loaded."""

    loads: list[str] = []

    def __reduce__(self) -> tuple:
        return (_record_unpickle, ())


def _record_unpickle() -> Unpickled:
    Unpickled.loads.append("unpickled")
    return Unpickled()


def object_array(shape: tuple[int, ...]) -> np.ndarray:
    a = np.empty(shape, dtype=object)
    for i in range(a.size):
        a.flat[i] = Unpickled() if i % 2 else 1.0
    return a


@st.composite
def item_arrays(draw: st.DrawFn, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """One item's arrays keyed by input name (sometimes a wrong name or an object array)."""
    out = {}
    for s in specs:
        name = s.name if draw(st.integers(0, 9)) else draw(st.sampled_from(["y", "other", s.name + "_"]))
        if draw(st.integers(0, 14)):
            out[name] = draw(arrays_for(s))
        else:
            out[name] = object_array(draw(st.sampled_from([(2, 3, 4), (2,), (0,), ()])))
    return out


def consume(source: Any, specs: list[InputSpec], batch_size: int, limit: int | None) -> None:
    """Open and read everything; every batch holds each input in the spec's dtype, finite when float."""
    ds = outcome(open_data, source, specs, batch_size=batch_size, limit=limit)
    if isinstance(ds, LowbitError):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "dropping the last N samples" with a fixed batch size
        batches = outcome(list, ds)
    if isinstance(batches, LowbitError):
        return
    for batch in batches:
        assert set(batch) == {s.name for s in specs}
        for s in specs:
            a = batch[s.name]
            assert a.dtype == s.dtype and a.ndim == len(s.shape)
            if a.dtype.kind in "fc":
                assert np.isfinite(a).all()
    if ds.num_samples is not None:
        assert sum(len(next(iter(b.values()))) for b in batches) == ds.num_samples


batching = st.tuples(st.integers(1, 4), st.none() | st.integers(1, 6))


@settings(FUZZ, max_examples=300)
@given(st.data())
def test_data_iterables_give_batches_or_one_line_error(data: st.DataObject) -> None:
    specs = data.draw(st.sampled_from(SPECS))
    items = data.draw(st.lists(item_arrays(specs), max_size=4))
    batch_size, limit = data.draw(batching)
    form = data.draw(st.sampled_from(["list", "generator", "bare"]))
    source: Any
    if form == "bare" and items:
        first = items[0]
        source = next(iter(first.values())) if len(first) == 1 and data.draw(st.booleans()) else first
    elif form == "generator":
        source = (item for item in items)
    else:
        source = items
    consume(source, specs, batch_size, limit)


@settings(FUZZ, max_examples=200)
@given(st.data())
def test_data_files_give_batches_or_one_line_error(fuzz_dir: Path, data: st.DataObject) -> None:
    specs = data.draw(st.sampled_from(SPECS))
    arrays = data.draw(item_arrays(specs))
    batch_size, limit = data.draw(batching)
    folder = Path(tempfile.mkdtemp(dir=fuzz_dir))
    if len(arrays) == 1 and data.draw(st.booleans()):
        path = folder / "data.npy"
        np.save(path, next(iter(arrays.values())), allow_pickle=True)
    else:
        path = folder / "data.npz"
        np.savez(path, **arrays)
    if data.draw(st.integers(0, 5)) == 0:
        path.write_bytes(data.draw(file_bytes(path.read_bytes())))
    source = folder if data.draw(st.booleans()) else path
    Unpickled.loads.clear()
    consume(source, specs, batch_size, limit)
    assert not Unpickled.loads, "an object array was unpickled"


def test_object_npy_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "objects.npy"
    np.save(path, object_array((2, 3, 4)), allow_pickle=True)
    Unpickled.loads.clear()
    with pytest.raises(LowbitError, match="Python objects"):
        list(open_data(path, SPECS[0]))
    assert not Unpickled.loads


def test_valid_data_still_batches(tmp_path: Path) -> None:
    x = np.arange(5 * 3 * 4, dtype=np.float32).reshape(5, 3, 4)
    np.save(tmp_path / "x.npy", x)
    batches = list(open_data(tmp_path / "x.npy", SPECS[0], batch_size=2))
    assert [len(b["x"]) for b in batches] == [2, 2, 1]
    assert np.array_equal(np.concatenate([b["x"] for b in batches]), x)
    assert not math.isnan(float(batches[0]["x"][0, 0, 0]))


# ---------------------------------------------------------------------------------------------------------------
# Regressions the fuzz found (plain tests, so they run whatever the budgets)


def test_unknown_recipe_key_with_a_control_character_is_one_line() -> None:
    with pytest.raises(LowbitError, match="unknown recipe key") as e:
        Recipe.from_dict({"\x1e": 1})
    assert len(str(e.value).splitlines()) == 1


def test_recipe_values_too_deep_or_too_long_to_print() -> None:
    for key, value in (("default", {"mode": deep("static", 5000)}), ("version", 10**5000), ("batch_size", -(10**5000))):
        with pytest.raises(LowbitError, match="too large to print"):
            Recipe.from_dict({key: value})


def test_recipe_file_with_an_integer_too_long_to_read(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text('{"batch_size": 1' + "0" * 5000 + "}")
    with pytest.raises(LowbitError, match="not valid JSON"):
        Recipe.load(tmp_path / "r.json")


def test_plan_version_with_a_line_break_is_one_line(real_plan: tuple[onnx.ModelProto, dict], tmp_path: Path) -> None:
    (tmp_path / "q.plan.json").write_text(json.dumps(real_plan[1] | {"version": "a\nb"}))
    with pytest.raises(LowbitError, match=r"has version 'a\\nb'"):
        lowbit.Plan.load(tmp_path / "q.plan.json")


def test_plan_nested_too_deeply(tmp_path: Path) -> None:
    (tmp_path / "q.plan.json").write_text("[" * 100_000)
    with pytest.raises(LowbitError, match="nests too deeply"):
        lowbit.Plan.load(tmp_path / "q.plan.json")


def test_plan_scale_written_as_an_integer_is_read_as_a_float(
    real_plan: tuple[onnx.ModelProto, dict], tmp_path: Path
) -> None:
    doc = copy.deepcopy(real_plan[1])
    doc["tensors"]["s"]["scale"] = [1]
    (tmp_path / "q.plan.json").write_text(json.dumps(doc))
    assert lowbit.Plan.load(tmp_path / "q.plan.json").tensors["s"].scale == [1.0]


def test_huge_activation_scale_in_plan(real_plan: tuple[onnx.ModelProto, dict], tmp_path: Path) -> None:
    """A plan that validates (finite, float32-representable scales) but gives an Add an absurd scale: the
    portable target's Add alignment overflowed (OverflowError); scale ratios XNNPACK refuses are left alone."""
    doc = copy.deepcopy(real_plan[1])
    doc["tensors"]["s"]["scale"] = [1e15]
    (tmp_path / "q.plan.json").write_text(json.dumps(doc))
    result = outcome(lowbit.quantize, real_plan[0], plan=lowbit.Plan.load(tmp_path / "q.plan.json"), progress=False)
    assert not isinstance(result, LowbitError) and result.plan.tensors["s"].scale == [1e15]
