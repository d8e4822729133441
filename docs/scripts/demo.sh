#!/usr/bin/env bash
# The whole method on the embedded synthetic data, with the bundle's own workflows:
#   prepare data -> pre-train (global G^D, then local L^R, encoder frozen) -> fine-tune on 2 labelled volumes
#   -> the same fine-tuning from random initialisation -> evaluate both on the test volumes -> print the table.
# Usage: bash docs/scripts/demo.sh  (from the repository root; `make demo` builds the environment first)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
C=bundle/configs
# every stage command is also appended to bundle/models/commands.log: `make bundle` puts it in the model card
LOG=bundle/models/commands.log
mkdir -p bundle/models
echo "# make demo (docs/scripts/demo.sh), started $(date -u '+%Y-%m-%d %H:%M UTC'), git commit $(git rev-parse HEAD 2>/dev/null || echo unknown)" > "$LOG"
quote() {   # one word as a shell reads it back: bare, "double-quoted", or bash's %q when it holds " $ ` or \
    case "$1" in
        *[!A-Za-z0-9_./=:,+-]*) if [[ "$1" != *[\"\$\`\\]* ]]; then printf ' "%s"' "$1"; else printf ' %q' "$1"; fi ;;
        *) printf ' %s' "$1" ;;
    esac
}
run() {
    echo; echo "==> python -m monai.bundle run $*"
    { printf 'python -m monai.bundle run'; for word in "$@"; do quote "$word"; done; echo; } >> "$LOG"
    "$PY" -m monai.bundle run "$@"
}
START=$(date +%s)

run prepare_synthetic --config_file "['$C/train.yaml','$C/prepare.yaml']"
run pretrain --config_file "['$C/train.yaml','$C/pretrain.yaml']"
# fine-tune from the pre-trained encoder + decoder blocks 1..3 -> bundle/models/model.pt
run run --config_file "$C/train.yaml"
run run --config_file "['$C/train.yaml','$C/evaluate.yaml']"
# the same budget from random initialisation -> bundle/models/random_init/model.pt
RANDOM_INIT=(--use_pretrained False --model_dir bundle/models/random_init --output_dir bundle/eval/random_init)
run run --config_file "$C/train.yaml" "${RANDOM_INIT[@]}"
run run --config_file "['$C/train.yaml','$C/evaluate.yaml']" "${RANDOM_INIT[@]}"

PYTHONPATH=bundle "$PY" -m scripts.cli compare \
    --results "{'random init': 'bundle/eval/random_init/test', 'G^D + L^R pre-trained': 'bundle/eval/test'}" \
    --output bundle/eval/demo_results.md
PYTHONPATH=bundle "$PY" -m scripts.cli curves --output bundle/eval/demo_curves.png \
    --global_loss=bundle/eval/pretrain_global:global_loss --local_loss=bundle/eval/pretrain_local:local_loss \
    --validation_Dice_pretrained=bundle/eval:val_mean_dice \
    --validation_Dice_random_init=bundle/eval/random_init:val_mean_dice
echo "demo finished in $(( $(date +%s) - START )) s; table written to bundle/eval/demo_results.md"
