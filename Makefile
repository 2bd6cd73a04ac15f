# Quick start:  make demo   (the main job on the embedded demo data)
#               make test   (the test suite)
# Both create .venv and install the project on first use (needs only Python >= 3.10 and pip).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-slow test-all install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,demo]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m train.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m 'slow and not gpu' --durations=15

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

clean:
	rm -rf runs shards outputs multirun
