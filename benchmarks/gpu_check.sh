#!/usr/bin/env bash
# GPU check, under 8 minutes on one H100/H200-class GPU (benchmarks/README.md "GPU check"):
#   1. correctness: the packed layout on CUDA (flex_attention, compiled) vs the naive computation, with
#      gradients, on sliding-window and softcapped models;
#   2. DPO step of a random Qwen2.5-0.5B-shaped model (494M parameters, vocabulary 151,936), prompts 512 +
#      responses 256 tokens, 16 pairs per step, bf16 autocast: prefalign packed, prefalign padded, TRL
#      (when installed; its fastest settings in 1.16: bf16, no gradient checkpointing, precomputed
#      reference, flash-attention-2 if installed else SDPA) -> step time, tokens/s, peak GPU memory, MFU;
#   3. with 2+ GPUs: prefalign packed under DDP and FSDP2 on 2 GPUs.
# Needs a Python with CUDA torch and this project installed (pip install -e .), optionally trl.
# usage: PY=python benchmarks/gpu_check.sh [--dry-run]     (--dry-run: tiny model on CPU, checks the script)
# Results: one JSON line per run on stdout and in ${OUT:-gpu_check_out}/results.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python}"
OUT="${OUT:-gpu_check_out}"
DRY=""
[ "${1:-}" = "--dry-run" ] && DRY="--dry-run"
export TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1
mkdir -p "$OUT"
: > "$OUT/results.jsonl"
NGPU=0
if [ -z "$DRY" ]; then
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())") || exit 2
  [ "$NGPU" -ge 1 ] || { echo "error: no CUDA GPU visible to $PY (use --dry-run to check the script on CPU)"; exit 2; }
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
fail=0
run() {  # run LIMIT_S CMD...: one JSON line kept
  local limit=$1; shift
  local log; log=$(mktemp)
  if timeout "$limit" "$@" > "$log" 2>&1; then
    grep '^{"' "$log" | tee -a "$OUT/results.jsonl"
  else
    echo "FAILED ($*): $(grep -v '^\s*$' "$log" | tail -3 | tr '\n' ' ' | cut -c1-400)"; fail=1
  fi
  rm -f "$log"
}
echo "== correctness (packed vs naive, with gradients)"
run 120 "$PY" benchmarks/gpu_check.py correctness $DRY
echo "== one GPU: step time, tokens/s, peak memory, MFU"
run 100 "$PY" benchmarks/gpu_check.py "prefalign packed" $DRY
run 100 "$PY" benchmarks/gpu_check.py "prefalign padded" $DRY
if "$PY" -c "import trl" 2>/dev/null; then
  run 120 "$PY" benchmarks/gpu_check.py TRL $DRY
else
  echo "TRL not installed for $PY: skipped (pip install trl in a separate environment, see benchmarks/README.md)"
fi
if [ "$NGPU" -ge 2 ]; then
  echo "== two GPUs: DDP, FSDP2 (prefalign packed)"
  run 100 "$PY" -m torch.distributed.run --nproc_per_node 2 benchmarks/gpu_check.py "prefalign packed"
  ACCELERATE_USE_FSDP=true FSDP_VERSION=2 FSDP_AUTO_WRAP_POLICY=TRANSFORMER_BASED_WRAP \
    FSDP_STATE_DICT_TYPE=FULL_STATE_DICT run 100 "$PY" -m torch.distributed.run --nproc_per_node 2 \
    benchmarks/gpu_check.py "prefalign packed"
fi
exit $fail
