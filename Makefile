# Both targets build their own virtual environment from pinned dependencies on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test browser speech qat minilm kws dlrm clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[demo,test,examples]'
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

test: $(STAMP) browser speech
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Quantization-aware training on Fashion-MNIST (Debian package dataset-fashion-mnist).
qat: $(STAMP)
	@test -d /usr/share/datasets/fashion-mnist || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  else echo "install Debian package dataset-fashion-mnist (needs root)"; exit 1; fi; }
	$(BIN)/python examples/qat_fashion_mnist.py

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
