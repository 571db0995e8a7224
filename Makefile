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
DEMO_PATIENTS ?= 30
DEMO_SIZE     ?= 128
DEMO_SLICES   ?= 40
SPLITS        := $(DATA)/splits
RUN           := $(DATA)/runs/demo
# The real-collection recipe, named once (thoracic_seg/recipe.py reads these lines; the README's
# commands, the notebook and benchmarks/bench_quality.py's baseline use exactly them). Literal words
# only, no $(...). The GPU profile is train_multi_organ.py's defaults (256 px, base 64, batch 16).
REAL_PHASE3_ARGS ?= --crop-body
REAL_TRAIN_ARGS  ?= --augment --tumour-oversampling 0.3 --context-slices 0 --lr-schedule cosine
CPU_SIZE         ?= 128
CPU_TRAIN_ARGS   ?= --base-channels 16 --batch-size 8 --lr 1e-3
# One network per seed, their probabilities averaged by predict_multi_organ.py --checkpoint A B
# (bench_quality's ensemble verdict, docs/quality.md).
REAL_ENSEMBLE_SEEDS ?= 0 1
# A small network trained on the CPU for a fixed budget of 1890 steps (18 epochs, about 6 minutes on
# 2 cores; the cosine schedule ends with the budget),
# so the demo's numbers are the same on every run of the same machine type (see README).
DEMO_TRAIN_ARGS ?= --base-channels 16 --lr 1e-3 --lr-schedule cosine --epochs 30 --augment \
	--max-steps 1890 --device auto

.PHONY: all install demo test clean clean-data recipe

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
	$(PY) convert_dicom_to_nifti.py --data-root $(DATA) --overwrite
	$(PY) extract_multi_organ_masks.py --data-root $(DATA) --overwrite
	$(PY) normalize_ct_and_masks.py --data-root $(DATA) --size $(DEMO_SIZE) --overwrite
	$(PY) prepare_train_val_test_splits.py --data-root $(DATA) --splits-dir $(SPLITS) --force
	rm -rf $(RUN)
	$(PY) train_multi_organ.py --data-root $(DATA) --splits-dir $(SPLITS) --output-dir $(RUN) \
		$(DEMO_TRAIN_ARGS)
	$(PY) evaluate_multi_organ.py --data-root $(DATA) --splits-dir $(SPLITS) \
		--checkpoint $(RUN)/best_unet_multi_organ.pth --postprocess
	$(PY) predict_multi_organ.py --checkpoint $(RUN)/best_unet_multi_organ.pth --postprocess \
		--input $(DATA)/raw/synthetic/$$(head -n 1 $(SPLITS)/test.txt) --output $(DATA)/predictions --overwrite
	$(PY) visualize_all_phases.py --data-root $(DATA) --splits-dir $(SPLITS) --run $(RUN) --output figures
	@echo "Demo done: figures/, $(RUN)/evaluation_postprocessed/summary.md, $(DATA)/predictions/"

recipe:
	@echo "phase 3:  python normalize_ct_and_masks.py $(REAL_PHASE3_ARGS)   (CPU: --size $(CPU_SIZE))"
	@echo "training: python train_multi_organ.py $(REAL_TRAIN_ARGS)   (CPU: $(CPU_TRAIN_ARGS))"
	@echo "networks: one per --seed in $(REAL_ENSEMBLE_SEEDS); predict_multi_organ.py --checkpoint with all of them"

clean-data:
	rm -rf $(DATA)

clean:
	rm -rf $(VENV) .pytest_cache
