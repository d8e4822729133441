#!/usr/bin/env bash
# Bundle checks: metadata against the local copy of the model zoo's 2024-07-25 schema (offline; the file metadata.json's
# "schema" URL points to, from Project-MONAI/MONAI-extra-test-data, Apache-2.0), the network's input/output shapes
# (no weights needed: without models/model.pt the network is built from metadata.json's data contract), and a
# TorchScript export of models/model.pt (run after fine-tuning; skipped with a note when absent).
set -euo pipefail
cd "$(dirname "$0")/../../bundle"
PY=${PY:-../.venv/bin/python}
SCHEMA=${SCHEMA:-../docs/scripts/meta_schema_20240725.json}
"$PY" -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath "$SCHEMA"
"$PY" -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \
    --config_file configs/inference.yaml --n 2
if [ -f models/model.pt ]; then
    "$PY" -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt --key_in_ckpt model \
        --meta_file configs/metadata.json --config_file configs/inference.yaml
else
    echo "models/model.pt not found: run fine-tuning (make demo) before the TorchScript export"
fi
