#!/usr/bin/env bash
# The whole method on the embedded synthetic data, with the bundle's own workflows:
#   prepare data -> pre-train once (global G^D, then local L^R with the encoder frozen)
#   -> for |XL| = 1 and 2 labelled volumes, two labelled subsets each: fine-tune from the pre-trained weights and,
#      with the same budget, from random initialisation; evaluate every model on the test volumes
#   -> the reference: random initialisation fine-tuned on every labelled volume of the training pool
#   -> the paired table (per subset: both mean Dice values and the gain; per |XL|: mean gain ± std over subsets),
#      whether each pre-training stage converged, and the curves.
# Usage: bash docs/scripts/demo.sh  (from the repository root; `make demo` builds the environment first)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
C=bundle/configs

# ---- the demo's budget: overlays on the configs' CPU-scale defaults, so that the whole demo fits in 15 minutes on
# ---- 2 CPU cores (model card, "Performance": the stage times of a run); each value is commented in its file
DEMO=docs/scripts
PRETRAIN_CONFIG="['$C/train.yaml','$C/pretrain.yaml','$DEMO/demo_pretrain.yaml']"
FINETUNE_CONFIG="['$C/train.yaml','$DEMO/demo_finetune.yaml']"
EVALUATE_CONFIG="['$C/train.yaml','$DEMO/demo_finetune.yaml','$C/evaluate.yaml']"
SEED=${SEED:-0}   # seeds the synthetic patients, the split, every initialisation and every random draw
SUBSETS=(labelled_1_0 labelled_1_1 labelled_2_0 labelled_2_1)  # datalist keys labelled_<|XL|>_<subset>
REFERENCE=labelled_all                                       # every labelled pool volume, random init (empty: skip)

# the demo's weights go to $MODELS (git-ignored), never to bundle/models/, which holds the committed release
MODELS=bundle/runs/demo/models
LOG=$MODELS/commands.log   # every stage command, as run
mkdir -p "$MODELS"
echo "# make demo (docs/scripts/demo.sh, SEED=$SEED), started $(date -u '+%Y-%m-%d %H:%M UTC'), git commit $(git rev-parse HEAD 2>/dev/null || echo unknown)" > "$LOG"
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
stage_time() { echo "demo: $1 took $(( $(date +%s) - $2 )) s"; }

T=$(date +%s)
run prepare_synthetic --config_file "['$C/train.yaml','$C/prepare.yaml']" --seed "$SEED"
stage_time "data preparation" "$T"
T=$(date +%s)
run pretrain --config_file "$PRETRAIN_CONFIG" --model_dir "$MODELS" --seed "$SEED"
stage_time "pre-training" "$T"

# fine-tune + evaluate: one labelled subset (a datalist key) and one initialisation (pretrained | random_init);
# weights in $MODELS/<init>/<subset>/model.pt, logs and test Dice in bundle/eval/<init>/<subset>/
finetune() {
    local subset=$1 init=$2 T
    T=$(date +%s)
    local args=(--train_key "$subset" --model_dir "$MODELS/$init/$subset" --output_dir "bundle/eval/$init/$subset"
                --pretrained_checkpoint "$MODELS/pretrained_local.pt" --seed "$SEED")
    [ "$init" = random_init ] && args+=(--use_pretrained False)
    run run --config_file "$FINETUNE_CONFIG" "${args[@]}"
    run run --config_file "$EVALUATE_CONFIG" "${args[@]}"
    stage_time "fine-tuning + evaluation ($init, $subset)" "$T"
}
for subset in "${SUBSETS[@]}"; do
    finetune "$subset" pretrained
    finetune "$subset" random_init
done
REFERENCE_ARGS=()
if [ -n "$REFERENCE" ]; then
    finetune "$REFERENCE" random_init
    REFERENCE_ARGS=(--reference "{'random init, $REFERENCE': 'bundle/eval/random_init/$REFERENCE/test'}")
fi

SUBSET_LIST=$(printf "'%s'," "${SUBSETS[@]}")
PYTHONPATH=bundle "$PY" -m scripts.cli compare \
    --results "{'random init': 'bundle/eval/random_init/{subset}/test', 'pre-trained': 'bundle/eval/pretrained/{subset}/test'}" \
    --subsets "[${SUBSET_LIST%,}]" "${REFERENCE_ARGS[@]}" --stops bundle/eval --output bundle/eval/demo_results.md
# the table says which run it is (seed, commit, date) and where the demo's recipe differs from the shipped defaults
{ echo "make demo, SEED=$SEED, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u '+%Y-%m-%d')"
  echo; cat bundle/eval/demo_results.md
  echo; echo "Settings that differ from the configs' defaults ($DEMO/demo_pretrain.yaml, $DEMO/demo_finetune.yaml):"
  echo; grep -h '^[a-z]' "$DEMO/demo_pretrain.yaml" "$DEMO/demo_finetune.yaml" | sed -e 's/  *# .*//' -e 's/^/- /'; } \
    > bundle/eval/demo_results.md.tmp
mv bundle/eval/demo_results.md.tmp bundle/eval/demo_results.md
PYTHONPATH=bundle "$PY" -m scripts.cli curves --output bundle/eval/demo_curves.png \
    --global_loss=bundle/eval/pretrain_global:global_loss --local_loss=bundle/eval/pretrain_local:local_loss \
    --validation_Dice_pretrained=bundle/eval/pretrained/labelled_1_0:val_mean_dice \
    --validation_Dice_random_init=bundle/eval/random_init/labelled_1_0:val_mean_dice
echo "demo finished in $(( $(date +%s) - START )) s; table written to bundle/eval/demo_results.md"
