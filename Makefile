# Two commands do all the set-up on a fresh clone:
#   make demo   - create .venv, install, generate the synthetic cohort, run every phase
#   make test   - create .venv, install, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed
DATA   ?= DATA
# The demo cohort: small enough for a 2-core CPU, big enough to train a useful small network.
DEMO_PATIENTS ?= 20
DEMO_SIZE     ?= 128
DEMO_SLICES   ?= 40

.PHONY: all install demo test clean clean-data

all: test

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# Without an NVIDIA GPU, install the CPU build of torch first: a looser requirement
	@# would pull a multi-GB CUDA build.
	@if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) make_synthetic_cohort.py --data-root $(DATA) --patients $(DEMO_PATIENTS) \
		--size $(DEMO_SIZE) --slices $(DEMO_SLICES) --overwrite

clean-data:
	rm -rf $(DATA)

clean:
	rm -rf $(VENV) .pytest_cache
