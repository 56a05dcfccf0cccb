#!/usr/bin/env bash
# The GPU benchmarks in one time-boxed run (about 7 minutes on one H100 or H200):
#   setup          install the carried wheels, unpack data and model, report versions and the GPU
#                  (with an 8192^3 bf16 matrix product as the card's practical peak)
#   scoring-bf16   benchmarks/scoring.py: pyterrier-ce vs sentence-transformers, batch 256/512/1024
#   scoring-fp32   the same in fp32 at batch 512 (do the scores agree to 1e-4?)
#   training-bf16  benchmarks/training.py: fit vs CrossEncoderTrainer, pairs/s and peak GPU memory
#   llm-lora       the same for a random-weight model of Qwen2.5-0.5B's shape: bf16 weights, LoRA
#                  adapters and the head on both sides
#   demo           benchmarks/budget_sweep.py --final: all-MiniLM-L6-v2, InfoNCE, as many SQuAD
#                  training questions as the time left allows (about 2 minutes of steps), then
#                  SQuAD test (300 questions) and TREC DL 2019/2020 against BM25 (Holm)
#   training-fp32  only when time is left over
# Each stage runs under `timeout`, cut to what is left of the run's budget (GPU_RUN_BUDGET
# seconds, default 420) less what the later stages need; a stage that fails or times out is
# logged with its exit status and the next one runs. Results go to $OUT, the folder results are
# written to (default $GPU_RUN_WORK/out), in at most 7 files:
#   gpu_run.log (everything), summary.md (environment, stages, all tables), scoring.md,
#   training.md, llm.md, demo.md, demo_train_log.jsonl
#
# Needs, in the checkout: .whl/ and .gpu/ (benchmarks/gpu_payload.sh builds them; ignored, never
# committed; 55 MiB with the tracked files). On the GPU machine, from the checkout's root:
#
#   command:   bash benchmarks/gpu_run.sh
#   carry:     [".whl", ".gpu"]
#   timeout_s: 480
#
# The script ends by itself within GPU_RUN_BUDGET + ~20 s; timeout_s 480 is the safety net. With
# the machine's start-up (1-2 minutes) a run takes at most ~10 minutes, so 15 minutes of GPU time
# hold one rerun at once on the warm machine, e.g. of a stage that failed, with a smaller budget:
#   command:   GPU_RUN_STAGES="demo" GPU_RUN_BUDGET=200 bash benchmarks/gpu_run.sh   (timeout_s 240)
#
# Other settings: GPU_RUN_STAGES (names above, space-separated; setup always runs),
# GPU_RUN_WORK (default /tmp/gpu-run: data, packages, indexes, temporary files; new, empty or made
# by an earlier run, since its contents are replaced), PYTHON.
# A dry run on the CPU with tiny sizes, through the same code paths (stages one at a time keeps
# each under a minute on a small machine):
#   OUT=$(mktemp -d) GPU_RUN_DEVICE=cpu GPU_RUN_SMALL=1 GPU_RUN_STAGES=scoring-bf16 bash benchmarks/gpu_run.sh
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
PYTHON="${PYTHON:-python3}"
DEVICE="${GPU_RUN_DEVICE:-cuda}"
SMALL="${GPU_RUN_SMALL:-0}"
BUDGET="${GPU_RUN_BUDGET:-420}"
STAGES="${GPU_RUN_STAGES:-scoring-bf16 scoring-fp32 training-bf16 llm-lora demo training-fp32}"
WORK="${GPU_RUN_WORK:-/tmp/gpu-run}"
SITE="$WORK/site"
OUT="${OUT:-$WORK/out}"
# everything under WORK is replaced between runs, so WORK must be a folder this script made
if [ -n "$(ls -A "$WORK" 2>/dev/null)" ] && [ ! -f "$WORK/.made-by-gpu_run" ]; then
    echo "GPU_RUN_WORK=$WORK holds files this script did not write: choose an empty or new folder." >&2
    exit 1
fi
mkdir -p "$WORK/tmp" && touch "$WORK/.made-by-gpu_run" && mkdir -p "$OUT" || exit 1
LOG="$OUT/gpu_run.log"
SUMMARY="$OUT/summary.md"
START=$SECONDS

export TMPDIR="$WORK/tmp"  # PISA indexes and the training groups, kept for a rerun on the same machine
export PYTERRIER_CE_DATA="$WORK/data"
export PYTHONPATH="$SITE:$REPO"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

left() { echo $((BUDGET - (SECONDS - START))); }
log() { echo "[$(date +%T) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }
wanted() { [[ " $STAGES " == *" $1 "* ]]; }

# run_stage NAME FILE CAP RESERVE MIN CMD...: CMD under a time box of CAP seconds, or of what is
# left of the budget less RESERVE (the later stages' share) when that is less; skipped under MIN.
# Its output goes to the log, its stdout also to FILE (when not "-").
run_stage() {
    local name=$1 file=$2 cap=$3 reserve=$4 min=$5
    shift 5
    wanted "$name" || return 0
    local box=$(($(left) - reserve))
    ((box > cap)) && box=$cap
    if ((box < min)); then
        log "stage $name: skipped (a ${box}s time box, under its ${min}s)"
        echo "| $name | skipped | 0 | $box |" >> "$SUMMARY"
        return 0
    fi
    log "stage $name (time box ${box}s): $*"
    [ "$file" != - ] && printf '\n## %s\n\n`%s`\n\n' "$name" "$*" >> "$file"
    local begin=$SECONDS rc
    if [ "$file" != - ]; then
        timeout -k 10 "$box" "$@" 2> >(tee -a "$LOG" >&2) | tee -a "$LOG" "$file"
    else
        timeout -k 10 "$box" "$@" 2> >(tee -a "$LOG" >&2) | tee -a "$LOG"
    fi
    rc=${PIPESTATUS[0]}
    sleep 0.2  # the stderr tee's last lines
    local what=$rc
    ((rc == 124 || rc == 137)) && what="$rc (timed out)"
    log "stage $name: exit $what after $((SECONDS - begin))s"
    echo "| $name | $what | $((SECONDS - begin)) | $box |" >> "$SUMMARY"
}

# Tiny sizes for a dry run on the CPU; the GPU sizes otherwise
if [ "$SMALL" = 1 ]; then
    SCORING=(--dataset vaswani --queries 2 --depth 5 --max-length 64 --repeats 1)
    SCORING_BATCHES=4,8
    SCORING_FP32_BATCHES=8
    TRAINING=(--steps 3 --skip 1 --batch 2 --max-length 64)
    LLM=(--model qwen2-tiny --steps 3 --skip 1 --batch 2 --max-length 64)
    DEMO=(--probe-steps 3 --test-queries 3 --dl-queries 2 --max-length 64
          --settings '{"objective": "infonce", "train_batch_size": 2}')
    DEMO_OVERHEAD=0 DEMO_MIN_TRAIN=3 DEMO_MAX_TRAIN=3
else
    SCORING=(--dataset vaswani --queries 93 --depth 200 --max-length 256 --repeats 3)
    SCORING_BATCHES=256,512,1024
    SCORING_FP32_BATCHES=512
    TRAINING=(--steps 40 --skip 10 --batch 32 --max-length 192)
    LLM=(--model qwen2-0.5b --steps 30 --skip 8 --batch 8 --max-length 192)
    DEMO=(--probe-steps 30 --test-queries 300 --settings '{"objective": "infonce"}')
    DEMO_OVERHEAD=90 DEMO_MIN_TRAIN=20 DEMO_MAX_TRAIN=180
fi

: > "$LOG"
for f in scoring.md training.md llm.md demo.md; do : > "$OUT/$f"; done
{
    echo "# GPU benchmarks ($(date -u +%FT%TZ), device $DEVICE$([ "$SMALL" = 1 ] && echo ', small sizes'))"
    echo
    if commit=$(git rev-parse --short HEAD 2>/dev/null); then
        git diff --quiet HEAD 2>/dev/null || commit+=" (with changes)"
    else
        commit="unknown (no git)"
    fi
    echo "commit $commit; budget ${BUDGET}s; stages: $STAGES"
    echo
} > "$SUMMARY"

# --- setup: wheels, payload, environment ------------------------------------------------------
log "setup: installing the carried wheels into $SITE"
if [ ! -d .whl ] || [ ! -d .gpu ]; then
    log "setup: .whl/ or .gpu/ missing: run benchmarks/gpu_payload.sh first (and carry both)"
    exit 1
fi
if [ "$DEVICE" = cpu ] && [ "$SMALL" = 1 ]; then
    # a dry run on another Python: only the wheels for any Python 3 install here, the rest is
    # this machine's own. What the GPU machine lacks and the wheels do not carry is hidden from
    # Python (the Java bridge among them), as if not installed; the imports it refused are listed
    wheels=(.whl/*-py3-none-any.whl .whl/*-py2.py3-none-any.whl)
    mkdir -p "$WORK/hide"
    export GPU_RUN_HIDDEN="$WORK/hidden.txt" GPU_RUN_REPO="$REPO"
    : > "$GPU_RUN_HIDDEN"
    cat > "$WORK/hide/sitecustomize.py" <<'EOF'
import importlib.machinery
import os
import sys


def _hide():
    sys.path.insert(0, os.path.join(os.environ["GPU_RUN_REPO"], "benchmarks"))
    try:
        from gpu_payload import hidden_modules
    finally:
        sys.path.pop(0)
    hidden = hidden_modules(os.path.join(os.environ["GPU_RUN_REPO"], ".whl"))

    class Without:
        """The path finder, blind to the hidden modules: find_spec gives None, import fails."""

        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in hidden:
                with open(os.environ["GPU_RUN_HIDDEN"], "a") as f:
                    f.write(f"{name.split('.')[0]}\n")
                return None
            return self.finder.find_spec(name, path, target)

        def __getattr__(self, attr):
            return getattr(self.finder, attr)

    sys.meta_path[:] = [Without(f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]


if os.environ.get("GPU_RUN_HIDDEN"):
    _hide()
EOF
    export PYTHONPATH="$WORK/hide:$PYTHONPATH"
else
    wheels=(.whl/*.whl)
fi
begin=$SECONDS
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${wheels[@]}" >> "$LOG" 2>&1
rc=$?
log "setup: pip install of ${#wheels[@]} wheels: exit $rc"
timeout 120 "$PYTHON" benchmarks/gpu_payload.py unpack .gpu --wheels .whl --site "$SITE" --data "$WORK/data" \
    2>&1 | tee -a "$LOG"
rc2=${PIPESTATUS[0]}
log "setup: unpack: exit $rc2"
{
    echo "## Environment"
    echo
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
        --format=csv,noheader 2>/dev/null | sed 's/^/- nvidia-smi: /'
    echo "- $(getconf _NPROCESSORS_ONLN) CPU cores, $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB memory"}')"
} >> "$SUMMARY"
timeout 180 "$PYTHON" benchmarks/gpu_payload.py env --device "$DEVICE" 2> >(tee -a "$LOG" >&2) | tee -a "$LOG" "$SUMMARY"
rc3=${PIPESTATUS[0]}
log "setup: environment report: exit $rc3 (setup took $((SECONDS - begin))s)"
printf '\n## Stages\n\n| stage | exit | seconds | time box |\n|---|---|---|---|\n' >> "$SUMMARY"
echo "| setup | $rc/$rc2/$rc3 | $((SECONDS - begin)) | - |" >> "$SUMMARY"

# --- 1. scoring -------------------------------------------------------------------------------
run_stage scoring-bf16 "$OUT/scoring.md" 80 300 30 \
    "$PYTHON" benchmarks/scoring.py --device "$DEVICE" --precision bf16 --batch-sizes "$SCORING_BATCHES" "${SCORING[@]}"
run_stage scoring-fp32 "$OUT/scoring.md" 45 280 20 \
    "$PYTHON" benchmarks/scoring.py --device "$DEVICE" --precision fp32 --batch-sizes "$SCORING_FP32_BATCHES" \
    "${SCORING[@]}"

# --- 2. training ------------------------------------------------------------------------------
run_stage training-bf16 "$OUT/training.md" 90 220 30 \
    "$PYTHON" benchmarks/training.py --device "$DEVICE" --precisions bf16 "${TRAINING[@]}"
# an LLM-shaped reranker: bf16 weights, LoRA adapters and the head, in both libraries
run_stage llm-lora "$OUT/llm.md" 75 150 30 \
    "$PYTHON" benchmarks/training.py --device "$DEVICE" --precisions bf16 --lora "${LLM[@]}"

# --- 3. the demo, with the time that is left --------------------------------------------------
if wanted demo; then
    box=$(($(left) - 5))
    seconds=$((box - DEMO_OVERHEAD))
    ((seconds > DEMO_MAX_TRAIN)) && seconds=$DEMO_MAX_TRAIN
    if ((seconds < DEMO_MIN_TRAIN)); then
        seconds=$DEMO_MIN_TRAIN
    fi
    rm -rf "$WORK/demo"
    printf '\n## demo\n\nall-MiniLM-L6-v2, InfoNCE, about %ss of training steps (budget_sweep.py --train-seconds)\n' \
        "$seconds" >> "$OUT/demo.md"
    run_stage demo - 100000 5 $((DEMO_MIN_TRAIN + DEMO_OVERHEAD)) \
        "$PYTHON" benchmarks/budget_sweep.py --name gpu-demo --final --final-dl trec_dl_2019,trec_dl_2020 \
        --train-seconds "$seconds" --out "$WORK/demo" --tables "$OUT/demo.md" "${DEMO[@]}"
    [ -f "$WORK/demo/gpu-demo.log.jsonl" ] && cp "$WORK/demo/gpu-demo.log.jsonl" "$OUT/demo_train_log.jsonl"
    if [ -f "$WORK/demo/results.jsonl" ]; then
        printf '\nThe run (benchmarks/budget_sweep.py row):\n\n```json\n%s\n```\n' \
            "$(tail -n 1 "$WORK/demo/results.jsonl")" >> "$OUT/demo.md"
    fi
fi

# --- 4. optional: fp32 training when time is left ---------------------------------------------
run_stage training-fp32 "$OUT/training.md" 80 5 60 \
    "$PYTHON" benchmarks/training.py --device "$DEVICE" --precisions fp32 "${TRAINING[@]}"

for f in scoring.md training.md llm.md demo.md; do
    if [ -s "$OUT/$f" ]; then
        printf '\n# %s\n' "$f" >> "$SUMMARY"
        cat "$OUT/$f" >> "$SUMMARY"
    fi
done
if [ -n "${GPU_RUN_HIDDEN:-}" ]; then
    hidden=$(sort -u "$GPU_RUN_HIDDEN" | tr '\n' ' ')
    log "dry run: imports refused (packages neither carried nor on the GPU machine): ${hidden:-none}"
    printf '\nDry run: imports refused (packages neither carried nor on the GPU machine): %s\n' "${hidden:-none}" \
        >> "$SUMMARY"
fi
log "done in $((SECONDS - START))s; results in $OUT: $(cd "$OUT" && echo *)"
