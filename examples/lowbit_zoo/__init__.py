"""Offline models and data for lowbit's examples, tests and benchmarks; not shipped in the lowbit wheel.

* :mod:`lowbit_zoo.zoo`: EfficientNet-Lite0 and all-MiniLM-L6-v2 exported to ONNX from installed packages,
  crops of real photographs (scikit-image), real English sentences (scikit-learn's docstrings).
* :mod:`lowbit_zoo.speech`: spoken words synthesized by Debian's espeak-ng, noise, log-mel features.

Examples run as ``python examples/NAME.py``, which puts ``examples/`` on ``sys.path``; ``tests/conftest.py`` and the
bench scripts insert it themselves. Submodules are imported on demand (``speech`` needs scipy).
"""
