#!/usr/bin/env bash
# The GPU speed-up benchmark in one go (about ten minutes on one H100 or H200): the real shapes of
# recipes/bench/gpu.yaml for Qwen2.5-0.5B and 1.5B at 4K and 16K tokens, bf16, every mode interleaved
# (viq-offline with and without the folded code embedder), with MFU, the predicted viq-offline step and the
# code-shard loader's share of a step. scripts/gpu_check.sh runs a shorter cut of it among its checks.
# Prints the markdown table and leaves bench.json / bench.md / bench.png in $BENCH_OUT (default
# runs/bench/gpu), copied to $OUT too when that is set (the device runner's output folder).
#
#   bash scripts/gpu_bench.sh                  # 0.5B and 1.5B, 4K and 16K
#   BENCH_LARGE=1 bash scripts/gpu_bench.sh    # then 3B and 7B with LLM checkpointing (H200 advised)
#   bash scripts/gpu_bench.sh steps=3          # extra key=value overrides go to `viq bench`
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
BENCH_OUT="${BENCH_OUT:-runs/bench/gpu}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available()); import viq.attention as a; print('attention backends', \
a.available_backends('cuda', torch.bfloat16))"

SMALL='[{llm: qwen2.5-0.5b, seq_len: 4096}, {llm: qwen2.5-0.5b, seq_len: 16384},
        {llm: qwen2.5-1.5b, seq_len: 4096}, {llm: qwen2.5-1.5b, seq_len: 16384}]'
timeout 540 "$PY" -m mllm.cli bench recipes/bench/gpu.yaml "presets=$SMALL" "out_dir=$BENCH_OUT" "$@"
cat "$BENCH_OUT/bench.md"

if [[ "${BENCH_LARGE:-0}" == "1" ]]; then
  LARGE='[{llm: qwen2.5-3b, seq_len: 4096}, {llm: qwen2.5-3b, seq_len: 16384},
          {llm: qwen2.5-7b, seq_len: 4096}, {llm: qwen2.5-7b, seq_len: 16384}]'
  timeout 900 "$PY" -m mllm.cli bench recipes/bench/gpu.yaml "presets=$LARGE" "out_dir=$BENCH_OUT-large" \
    llm_checkpointing=true "$@"
  cat "$BENCH_OUT-large/bench.md"
fi

if [[ -n "${OUT:-}" ]]; then
  cp "$BENCH_OUT"/bench.{json,md,png} "$OUT"/
  if [[ -d "$BENCH_OUT-large" ]]; then
    for f in json md png; do cp "$BENCH_OUT-large/bench.$f" "$OUT/bench-large.$f"; done
  fi
fi
