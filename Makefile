# One entry point per job; every target builds its own virtual environment first.
#   make demo   pre-train, fine-tune (pre-trained vs random), evaluate on the embedded synthetic data (< 15 min, 2 CPUs)
#   make test   the test suite (what CI runs)
#   make bundle the release: dist/<name>_v<version>.zip + weight files + large_files.yml (docs/use_pretrained.md)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0

.PHONY: venv demo test test-all verify bundle version bench experiments report clean

# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[test,plot,export]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	PY=$(PY) bash docs/scripts/demo.sh

test: venv
	$(PY) -m pytest -q

test-all: venv
	$(PY) -m pytest -q -m "slow or not slow"

# bundle checks: metadata against the local schema copy, network input/output, TorchScript export
verify: venv
	bash docs/scripts/verify.sh

# the release archive of the bundle with its weights (after make demo): the weight files go beside the archive, to be
# uploaded under RELEASE_URL (default: a placeholder prefix, see the model card); DATASET / DATA_LICENCE say what the
# weights were trained on when it was not the embedded synthetic data
RELEASE_URL ?=
DATASET ?=
DATA_LICENCE ?=
PACK_ARGS = $(if $(strip $(RELEASE_URL)),--url "$(RELEASE_URL)") $(if $(strip $(DATASET)),--dataset "$(DATASET)") \
            $(if $(strip $(DATA_LICENCE)),--data_licence "$(DATA_LICENCE)")
bundle: venv
	$(PY) -m study.release pack $(strip $(PACK_ARGS))

# a new version in metadata.json with its changelog entry: make version VERSION=0.2.0 CHANGE="what changed"
version: venv
	$(PY) -m study.release version "$(VERSION)" "$(CHANGE)"

# speed and peak memory of the contrastive losses, and their share of a pre-training step (add ARGS=--paper for 192x192)
bench: venv
	PYTHONPATH=bundle $(PY) -m study.benchmark $(ARGS)

# the study of PLAN (resumable: run it again after an interruption), then its tables and figures into docs/study/
PLAN ?= docs/experiments/acdc_cpu.yaml
WORKERS ?= 1   # jobs at a time (2 on a 2-core machine: docs/experiments.md)
experiments: venv
	PYTHONPATH=bundle $(PY) -m study.experiments run $(PLAN) --workers $(WORKERS)
report: venv
	PYTHONPATH=bundle $(PY) -m study.experiments report $(PLAN) --output docs/study/$(basename $(notdir $(PLAN)))

clean:
	rm -rf $(VENV) runs bundle/eval bundle/data dist
