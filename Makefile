# Both targets build their own virtual environment from pinned dependencies on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test browser qat clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[demo,test]'
	touch $(STAMP)

# The HTML report is tested in headless Chromium (Debian packages chromium, chromium-driver).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "install Debian packages chromium and chromium-driver (needs root)"; exit 1; fi; }

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Quantization-aware training on Fashion-MNIST (Debian package dataset-fashion-mnist).
qat: $(STAMP)
	@test -d /usr/share/datasets/fashion-mnist || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  else echo "install Debian package dataset-fashion-mnist (needs root)"; exit 1; fi; }
	$(BIN)/python examples/qat_fashion_mnist.py

clean:
	rm -rf $(VENV) artifacts
