# One entry point per job; every target builds its own virtual environment first.
#   make demo   pre-train, fine-tune (pre-trained vs random), evaluate on the embedded synthetic data (< 15 min, 2 CPUs;
#               SEED=1 for another draw of the data and of every initialisation)
#   make test   lint, then the test suite (what CI runs)
#   make lint   flake8 and isort (check only) over the Python code, configured in setup.cfg
#   make bundle the release: dist/<name>_v<version>.zip + weight files + large_files.yml (docs/use_pretrained.md)
#   make release DATA=<ACDC folder>   the release trained on real data, resumable (docs/release.md; QUICK=1: a test)
#   make test-monailabel   the bundle served and trained by a real MONAI Label server (own venv: docs/monailabel.md)
#   make gpu-check  the first check on a GPU machine (docs/performance.md); setup variables: README "Setup"
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch build: TORCH is the requirement, TORCH_INDEX an extra index pip looks in first. Default: torch 2.13.0 as
# pip finds it: PyPI's Linux x86-64 wheel is the CUDA build (several GB); this project's machines hold the CPU build
# locally. CPU build anywhere: TORCH_INDEX=https://download.pytorch.org/whl/cpu; a given CUDA build: its index from
# pytorch.org, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128 (README "Setup"; only the CPU build was tested).
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
TORCH_PIP   = $(if $(strip $(TORCH_INDEX)),--extra-index-url $(TORCH_INDEX)) "$(TORCH)"

.PHONY: venv demo lint test test-monailabel venv-monailabel verify bundle version bench gpu-check experiments report \
        clean

# torch is installed first, pinned (TORCH_PIP): the project's install then keeps that build
$(VENV)/.installed: setup.cfg setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIP)
	$(PY) -m pip install --quiet $(TORCH_PIP) -e ".[test,plot,export]"
	touch $@

venv: $(VENV)/.installed

# make demo SEED=1: other synthetic patients, split, initialisations and random draws
SEED ?= 0
demo: venv
	PY=$(PY) SEED=$(SEED) bash docs/scripts/demo.sh

# the model zoo's checks: flake8 and isort in check mode, with setup.cfg's settings (120 columns, black's import layout)
LINT_PATHS := bundle study tests setup.py
lint: venv
	$(PY) -m flake8 $(LINT_PATHS)
	$(PY) -m isort --check-only --diff $(LINT_PATHS)

# the test files spread over TEST_WORKERS processes (pytest-xdist; auto: one per core), each file's tests in one
# process (--dist loadfile: a module's fixtures are made once); TEST_WORKERS=0 runs them in this process
TEST_WORKERS ?= auto
test: venv lint
	$(PY) -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadfile

# MONAI Label's own environment, beside .venv (docs/monailabel.md): monailabel 0.8.5 imports torchvision, and only
# the torch 2.14.1 + torchvision 0.29.1 pair imports together here (PyPI's torchvision fails beside the CPU torch
# 2.13.0). pip stays the venv's own: a newer pip would not apply the machine's torch cap inside the build
# environment of monailabel's sdist dependencies. No `[test]` extra: our jsonschema>=4 clashes with pydicom-seg's
# jsonschema<4 (a monailabel dependency). sam2 (a monailabel dependency, an sdist) is built without its CUDA
# extension: the server runs with --conf sam2 false. The DICOM stack is held below pydicom 3: monailabel imports
# pydicom-seg 0.4.1, which fails on pydicom 3 ("No module named 'pydicom._storage_sopclass_uids'"), and the newest
# dicomweb-client / pynetdicom need pydicom 3 (pip check is clean with these). The stamp and pip's wheel cache
# make a second run quick; the test caches its short-run weights in $(MLVENV)/test-cache.
MLVENV   ?= .venv-monailabel
MLPY     := $(MLVENV)/bin/python
ML_TORCH := torch==2.14.1 torchvision==0.29.1
$(MLVENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(MLVENV)
	$(MLPY) -m pip install --quiet $(ML_TORCH)
	SAM2_BUILD_CUDA=0 $(MLPY) -m pip install --quiet $(ML_TORCH) monailabel==0.8.5 "monai==1.6.1" "pytorch-ignite==0.5.5" -e . \
		"pydicom>=2.4.4,<3" "dicomweb-client[gcp]>=0.59.1,<0.60" "pynetdicom>=2.0.2,<3" \
		"pytest>=8" "pytest-timeout>=2" requests
	touch $@

venv-monailabel: $(MLVENV)/.installed

# a real `monailabel start_server` on 127.0.0.1 serving and training the bundle through its REST API
test-monailabel: venv-monailabel
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(MLPY) -m pytest -s -v -p no:cacheprovider tests/monailabel_server \
		-o timeout=3600

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
	PYTHONPATH=bundle $(PY) -m study.release pack $(strip $(PACK_ARGS))

# the release built from real data in one resumable command (docs/release.md): prepare DATA with PREPARE (its extra
# options: PREPARE_OPTIONS, a YAML mapping), pre-train until each stage has converged, fine-tune model.pt on every
# labelled training volume for FINETUNE_EPOCHS x 50 steps (default: docs/experiments/release.yaml), evaluate it on the
# test split, pack into DIST (default RELEASE_DIR/dist). QUICK=1: tiny budgets, the archive marked not for use;
# ALLOW_UNCONVERGED=1: release a stage that stopped on its budget (the model card says so); INSTALL=1: also make it the
# repository's release (bundle/models/ and bundle/large_files.yml, to be committed)
DATA ?=
PREPARE ?= prepare_acdc
PREPARE_OPTIONS ?=
QUICK ?=
ALLOW_UNCONVERGED ?=
INSTALL ?=
FINETUNE_EPOCHS ?=
RELEASE_DIR ?=
DIST ?=
RELEASE_ARGS = --prepare "$(PREPARE)" $(if $(strip $(PREPARE_OPTIONS)),--prepare_options "$(PREPARE_OPTIONS)") \
               $(if $(strip $(QUICK)),--quick) $(if $(strip $(ALLOW_UNCONVERGED)),--allow_unconverged) \
               $(if $(strip $(INSTALL)),--install) \
               $(if $(strip $(FINETUNE_EPOCHS)),--finetune_epochs $(FINETUNE_EPOCHS)) \
               $(if $(strip $(RELEASE_DIR)),--release_dir "$(RELEASE_DIR)") $(if $(strip $(DIST)),--dist "$(DIST)")
.PHONY: release
release: venv
	@test -n "$(DATA)" || { echo "ERROR: give the raw data folder: make release DATA=<folder>"; exit 2; }
	PYTHONPATH=bundle $(PY) -m study.build_release --data "$(DATA)" $(strip $(RELEASE_ARGS) $(PACK_ARGS))

# a new version in metadata.json (the one place it is set; setup.py reads it) with its changelog entry:
#   make version VERSION=minor CHANGE="what changed"    (VERSION: major | minor | patch | x.y.z above the current one)
version: venv
	PYTHONPATH=bundle $(PY) -m study.release version "$(VERSION)" "$(CHANGE)"

# speed and peak memory of the contrastive losses, their share of a pre-training step (add ARGS=--paper for 192x192),
# and each stage's data pipeline against its model step alone (docs/performance.md)
bench: venv
	PYTHONPATH=bundle $(PY) -m study.benchmark $(ARGS)

# the first check on a GPU machine (no GPU has run this bundle yet; docs/performance.md): pre-train and fine-tune
# 300 iterations per stage at 192 px with AMP, images/s and peak GPU memory per stage, GPU vs CPU inference on >= 99.9 %
# of the voxels; exit 0 only if all pass. DEVICE=cpu: a tiny smoke run of the same path (tests/test_gpu_check.py)
DEVICE ?= cuda
GPU_CHECK_ARGS = --device $(DEVICE) $(if $(filter cpu,$(DEVICE)),--tiny --iterations 5 --image_size 32)
gpu-check: venv
	PYTHONPATH=bundle $(PY) -m study.gpu_check $(GPU_CHECK_ARGS)

# the study of PLAN (resumable: run it again after an interruption), then its tables and figures into docs/study/
PLAN ?= docs/experiments/acdc_cpu.yaml
WORKERS ?= 1   # jobs at a time (2 on a 2-core machine: docs/experiments.md)
experiments: venv
	PYTHONPATH=bundle $(PY) -m study.experiments run $(PLAN) --workers $(WORKERS)
report: venv
	PYTHONPATH=bundle $(PY) -m study.experiments report $(PLAN) --output docs/study/$(basename $(notdir $(PLAN)))

clean:
	rm -rf $(VENV) $(MLVENV) runs bundle/eval bundle/data dist
