#!/usr/bin/env bash
# One GPU check, side by side in one run, one JSON figure per line on stdout ({"name", "value", "unit"}):
#   1. `make install` on a fresh machine (seconds);
#   2. CT CNN-RNN full size (ResNeXt-50 32x4d + GRU, the paper config), batch 128, 14 x 1 x 96 x 144:
#      fp32 vs bf16 vs bf16 + channels_last vs + torch.compile: samples/s and % of the card's dense bf16 peak
#      (bench/_gpu.py: H100 SXM / H200 989 TFLOP/s, H100 PCIe 756);
#   3. Diff-X seconds per patient (4 time points x 10 seeds, 50 steps) at full size (SD v1 UNets, 512 x 512)
#      in bf16, random init (speed does not depend on the weights);
#   4. a real 1-GPU Ray Train fit (raypipe synth ct, preprocess ct, train cnn-rnn, random init, 3 epochs):
#      samples/s after the first epoch and the GPU's busy share (nvidia-smi);
#   5. Serve vs in-process p50 for one X-ray client (bench/serve_load.py --quick, tiny models).
# Every step runs under `timeout` with min(its cap, what is left of GPU_CHECK_BUDGET_S = 470 s), so the whole
# script ends within the budget; a step that fails or times out prints a line with value null and its exit code.
# Step logs: $GPU_CHECK_LOGS (default a temp folder, printed on stderr).
#
#   bench/gpu_check.sh             # on the GPU machine
#   bench/gpu_check.sh --dry-run   # tiny models on CPU, no install: checks the script and its output here
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
BUDGET=${GPU_CHECK_BUDGET_S:-470}
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d /tmp/gpu_check_XXXX)}
mkdir -p "$LOGS"
echo "gpu_check: logs in $LOGS, budget ${BUDGET} s, dry-run ${DRY}" >&2
START=$(date +%s)
PY=.venv/bin/python
export PYTHONPATH=$PWD

status_line() {  # name, value (number or null), unit, rc
  printf '{"name": "gpu_check/%s", "value": %s, "unit": "%s", "rc": %s}\n' "$1" "$2" "$3" "$4"
}

step() {  # name, cap seconds, command...: run under the smaller of cap and what is left; print its JSON lines
  local name=$1 cap=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 5 )); then
    status_line "$name/seconds" null s 124
    return
  fi
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$LOGS/$name.out" 2> "$LOGS/$name.err"
  local rc=$?
  grep '^{' "$LOGS/$name.out"
  status_line "$name/seconds" $(( $(date +%s) - t0 )) s "$rc"
}

if (( DRY )); then
  status_line "install/seconds" null s 0
  step train_ct 120 $PY bench/bench_train_ct.py --models cnn_rnn_tiny --batch 2 --steps 1 --warmup 1 \
    --device cpu --modes fp32,bf16,bf16_cl
  step diffx 60 $PY bench/bench_generate.py --model diffx_tiny --steps 2 --seeds 2 --patients 1
  step fit_ct 240 $PY bench/bench_fit_ct.py --tiny --timeout 220
  step serve 120 $PY bench/serve_load.py --quick --quick-requests 4 --out "$LOGS/serve_load.json"
else
  step install 240 make install
  step train_ct 110 $PY bench/bench_train_ct.py --models cnn_rnn --batch 128 --steps 5 --warmup 2
  step diffx 60 $PY bench/bench_generate.py --model diffx --gpu --seeds 10 --patients 1
  step fit_ct 120 $PY bench/bench_fit_ct.py --patients 256 --epochs 3 --model cnn_rnn --batch 128 --timeout 110
  step serve 60 $PY bench/serve_load.py --quick --quick-requests 16 --out "$LOGS/serve_load.json"
fi
status_line "total/seconds" $(( $(date +%s) - START )) s 0
