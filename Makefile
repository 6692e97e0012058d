# Every install step lives here. `make run` and `make test` work on a fresh machine (Python 3.11).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv run test test-slow bench wheel clean data-fashion-mnist device-root-arm64

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

run: venv
	$(BIN)/python -m autorank +device=rpi4

test: venv
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

# Fashion-MNIST (data=fashion_mnist) from the Debian package: gzipped IDX files in /usr/share/datasets.
data-fashion-mnist:
	test -d /usr/share/datasets/fashion-mnist || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; }

# The layer benchmark; `autorank-bench` lists the others (docs/BENCHMARKS.md).
bench: venv
	$(BIN)/autorank-bench layers

# The wheel a user installs (configs inside); tests/test_wheel.py builds and installs it too.
wheel: venv
	$(BIN)/pip wheel --no-deps --no-build-isolation -w dist .

# An aarch64 (Raspberry Pi) Debian root with a CPU-only torch, run through qemu-user without
# binfmt (nothing kernel-wide): qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11 -m autorank.device ...
# Cached: seconds once built. ROOT defaults to .cache/autorank/arm64-root.
device-root-arm64:
	bash scripts/device_root_arm64.sh $(ROOT)

clean:
	rm -rf $(VENV) outputs multirun .cache build dist
