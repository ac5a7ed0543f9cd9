#!/usr/bin/env bash
# One-command GPU check of the transformers reranker: equality vs the model card (fp32 + bf16, every
# engine path), bench/rerank.py per request and merged, profile counts (launches, syncs per request),
# and bench/peers.py: the hf engine next to vLLM's pooling runner on the same requests (vLLM rows say
# "not installed" where it is absent).
#
#   bench/gpu_check.sh                       # CUDA; ../shared beside the repo copy
#   bench/gpu_check.sh /path/to/shared       # shared data/tokenizer elsewhere
#   bench/gpu_check.sh --device cpu --quick  # dry run of the script itself, no GPU needed
#
# Needs python with torch + transformers; no network, no install (PYTHONPATH=repo). Results:
# bench/results/results.json and bench/results/summary.md (WINNOW_GPU_CHECK_OUT to change).
# Bounded by WINNOW_GPU_CHECK_TIMEOUT seconds (default 470 < 8 minutes).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -gt 0 && "$1" != -* ]]; then
  export WINNOW_SHARED="$(cd "$1" && pwd)"
  shift
fi
export WINNOW_SHARED="${WINNOW_SHARED:-$(cd "$REPO/.." && pwd)/shared}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
OUT="${WINNOW_GPU_CHECK_OUT:-$REPO/bench/results}"
mkdir -p "$OUT"
echo "repo=$REPO shared=$WINNOW_SHARED out=$OUT python=$($PY -c 'import sys;print(sys.executable)')" >&2
[[ -d "$WINNOW_SHARED/data/scifact" ]] || echo "warning: $WINNOW_SHARED/data/scifact missing: bench steps will fail" >&2
cd "$REPO"
timeout --signal=INT --kill-after=20 "${WINNOW_GPU_CHECK_TIMEOUT:-470}" \
  "$PY" bench/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
