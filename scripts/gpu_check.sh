#!/usr/bin/env bash
# The GPU check, in one command of at most 8 minutes on one H100 or H200:
#   1. preflight: Python, torch, CUDA, transformers, the attention backends; every package the steps need
#      (a missing one is named with how to supply it) and the optional ones (deepspeed, datasets, flash-attn,
#      wandb), which may all be absent: the steps then use torch's varlen kernel and the plain Trainer;
#   2. the gpu-marked tests (pytest -m gpu);
#   3. bf16 varlen attention (flash-attn if installed, torch's varlen kernel) against per-segment SDPA,
#      outputs and gradients, on a 16K-token LLM row and on packed images, with times;
#   4. the bench cells of Qwen2.5-0.5B and 1.5B at 4K and 16K tokens (recipes/bench/gpu.yaml, real shapes,
#      random weights), viq-offline with and without the folded code embedder, and the code-shard loader;
#   5. 20 steps of LoRA training from codes on the debug-shaped model, one GPU, no DeepSpeed.
# Each step has its own time limit (they add up to 8 minutes) and a failed step does not stop the others;
# the script exits 1 when any failed. Outputs go to $OUT when it is set, else runs/gpu_check (at most 8
# files: gpu_check.md, the summary; gpu_check.log, every step's output; preflight.json, attention.json,
# train.json; bench/bench.{json,md,png}); scratch data goes to $VIQ_CHECK_WORK (default runs/gpu_check-work,
# whose train/ folder each run empties).
#
#   bash scripts/gpu_check.sh                # on a machine with a CUDA GPU
#   bash scripts/gpu_check.sh --cpu-dry-run  # the same steps on tiny shapes on the CPU (CI runs it)
#
# Offline machines. Nothing here downloads anything. A package missing there (the preflight names it) can
# travel as wheels: the script installs every *.whl of the wheel folder, $VIQ_WHEELS (default wheels/ in the
# repository), into a private target (pip --no-index --no-deps --target) and puts it on PYTHONPATH. Prepare
# the folder on a machine with a network, for the GPU machine's Python (3.12 here) and platform:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d wheels NAME==VERSION ...
# --no-deps fetches none of a package's own dependencies: name each missing one too (`unzip -p
# wheels/NAME-*.whl '*/METADATA' | grep ^Requires-Dist` lists them), and keep one version of each.
# A pure-Python package (tqdm, peft, pytest, pluggy, iniconfig, ...) is one py3-none-any wheel; for a
# compiled one the flags above pick its cp312 manylinux wheel.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DRY=0
case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac
OUT_DIR="${OUT:-runs/gpu_check}"
WORK="${VIQ_CHECK_WORK:-runs/gpu_check-work}"
mkdir -p "$OUT_DIR" "$WORK"
WORK="$(cd "$WORK" && pwd)"
rm -rf "$WORK/train"  # scratch of an earlier check: the training step starts from nothing
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

WHEELS="${VIQ_WHEELS:-wheels}"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE="$WORK/site-packages"
  echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels of $WHEELS into $SITE" | tee -a "$LOG"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl 2>&1 | tee -a "$LOG" || { echo "FAIL: the wheels of $WHEELS do not install" | tee -a "$LOG"; exit 1; }
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi

if [[ $DRY == 1 ]]; then
  DEVICE=cpu
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny shapes: one thread is faster on a shared CPU
  REQUIRE=""
  ATTN_TOKENS=256
  BENCH=(recipes/bench/gpu.yaml "presets=[{llm: debug, seq_len: 160}]" encoder=debug dtype=float32 threads=1
         steps=1 warmup=0 loader_rows=2 loader_workers=0 "data.grids=[[4, 4], [4, 6], [6, 4], [8, 8]]"
         "data.grid_weights=[0.3, 0.3, 0.3, 0.1]" "data.prompt_tokens=[2, 12]" "data.answer_tokens=[1, 48]")
  TRAIN_SAMPLES=16
  LIMITS=(60 90 60 90 120)
else
  DEVICE=cuda
  # one GPU: the Trainer would wrap the model in DataParallel over several visible ones
  CUDA_VISIBLE_DEVICES="$(echo "${CUDA_VISIBLE_DEVICES:-0}" | cut -d, -f1)"
  export CUDA_VISIBLE_DEVICES
  REQUIRE=--require-cuda
  ATTN_TOKENS=16384
  BENCH=(recipes/bench/gpu.yaml "presets=[{llm: qwen2.5-0.5b, seq_len: 4096}, {llm: qwen2.5-0.5b, seq_len: 16384},
         {llm: qwen2.5-1.5b, seq_len: 4096}, {llm: qwen2.5-1.5b, seq_len: 16384}]" steps=3 warmup=1 loader_rows=4)
  TRAIN_SAMPLES=64
  LIMITS=(40 100 60 190 90)  # 480 s in all
fi
# every cell with and without the fold, against the frozen tower and the LLM alone; packed rows only
# (scripts/gpu_bench.sh runs the whole recipe, the trainable tower and the padded batches too)
BENCH+=("modes=[continuous, viq-online, viq-offline, viq-offline-unfolded, text-only]" "padded_modes=[]"
        "out_dir=$OUT_DIR/bench" "device=$DEVICE")

SUMMARY=()
FAILED=0
step() {  # step NAME LIMIT_S COMMAND...: run it under a time limit, log it, record its status
  local name=$1 limit=$2 start rc status
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124 | 137) status="FAILED (over ${limit} s)"; FAILED=1 ;;
    *) status="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  SUMMARY+=("| $name | $status | $(($(date +%s) - start)) |")
  echo "=== $name: $status" | tee -a "$LOG"
}

GPU_TESTS=$(grep -rlE --include='test_*.py' 'pytest\.mark\.gpu' tests | sort)
step preflight "${LIMITS[0]}" "$PY" scripts/gpu_check.py preflight "$OUT_DIR" $REQUIRE
# shellcheck disable=SC2086  # one argument per test file
step gpu-tests "${LIMITS[1]}" "$PY" -m pytest -q -p no:cacheprovider -m gpu $GPU_TESTS
step attention "${LIMITS[2]}" "$PY" scripts/gpu_check.py attention "$OUT_DIR" --device "$DEVICE" --tokens "$ATTN_TOKENS"
step bench "${LIMITS[3]}" "$PY" -m mllm.cli bench "${BENCH[@]}"
step train-lora-from-codes "${LIMITS[4]}" "$PY" scripts/gpu_check.py train "$OUT_DIR" --device "$DEVICE" \
  --work "$WORK/train" --steps 20 --samples "$TRAIN_SAMPLES"

{
  echo "# GPU check$([[ $DRY == 1 ]] && echo ' (CPU dry run, tiny shapes)')"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); device:"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU (CPU)"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  if [[ -f "$OUT_DIR/bench/bench.md" ]]; then echo; sed 's/^# /## /' "$OUT_DIR/bench/bench.md"; fi
} >"$OUT_DIR/gpu_check.md"
cat "$OUT_DIR/gpu_check.md"
exit $FAILED
