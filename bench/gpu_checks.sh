#!/usr/bin/env bash
# The GPU checks: one run of at most 8 minutes (GPU time comes rarely and briefly), the most telling figures
# first, each step bounded by its own timeout so that a slow step cannot eat the others' time. Logs under OUTDIR.
#   1. streams  (90 s): how many one-object 1080p30 live streams one GPU holds in real time with no skipped
#      frame, SAM 2.1 tiny at 1024 (bench_concurrency.py --streams, a model process per stream's slot);
#   2. K=8 vs 1 (120 s): aggregate frames/s of 8 jobs held at once against 1, one worker, shared model and
#      batching across jobs (bench_concurrency.py; target K=8 at least 4x K=1);
#   3. live p95 (75 s): one 1080p30 source for a minute, capture-to-result latency p50/p95 and frames skipped
#      (bench_live.py; target no skips, p95 under 100 ms);
#   4. service vs bare (90 s): the service against SAM 2's bare loop with the frames already on the GPU
#      (bench_gpu.py; target >= 0.9);
#   5. gpu tests (90 s): the gpu tier (CUDA graphs, the driver's masks against SAM 2's own, CUDA end to end).
# --dry-run: the same steps on the CPU at toy sizes (image size 256, 320x180, a few frames; step 4 as
# bench_service.py, the service against the plain SAM 2 way, since bench_gpu.py needs CUDA), in under five
# minutes: tests/test_gpu_checks.py runs it, so the script is known to work before a GPU is at hand.
# Usage: bash bench/gpu_checks.sh [--dry-run] OUTDIR [VIDEO]   (VIDEO: ../shared/videos/bedroom.mp4)
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out="${1:?usage: bash bench/gpu_checks.sh [--dry-run] OUTDIR [VIDEO]}"
video="${2:-../shared/videos/bedroom.mp4}"
mkdir -p "$out"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

if [ "$dry" = 1 ]; then
  device=cpu; isize=256; size=320x180; streams=1; ks=1,2; frames=6; minutes=0.25; t=(120 90 60 90 90)
  echo "dry run: the steps on the CPU at toy sizes" | tee "$out/env.txt"
else
  device=cuda; isize=1024; size=1920x1080; streams=1,4,8,16,24,32; ks=1,8; frames=90; minutes=1; t=(90 120 75 90 90)
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA here'; print(torch.__version__, torch.cuda.get_device_name())" \
    | tee "$out/env.txt" || exit 1
fi

step() {  # step NAME TIMEOUT_S COMMAND...: run it bounded, its log in OUTDIR/NAME.log, then its rc
  local name="$1" limit="$2"
  shift 2
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$?" | tee -a "$out/$name.log"
}

step streams "${t[0]}" "$PY" bench/bench_concurrency.py --device "$device" --image-size "$isize" --size "$size" \
  --modes processes --streams "$streams"
step concurrency "${t[1]}" "$PY" bench/bench_concurrency.py --device "$device" --image-size "$isize" --size "$size" \
  --frames "$frames" --ks "$ks" --repeats 1 --modes shared,batched
step live "${t[2]}" "$PY" bench/bench_live.py --device "$device" --image-size "$isize" --size "$size" \
  --minutes "$minutes" --max-latency 2
if [ "$dry" = 1 ]; then
  step service "${t[3]}" "$PY" bench/bench_service.py --device cpu --image-size "$isize" --frames "$frames" \
    --repeats 1 --video "$video"
else
  step service "${t[3]}" "$PY" bench/bench_gpu.py --video "$video" --repeats 1 --frames 150 \
    --runs "driver,service"
fi
step gpu_tests "${t[4]}" "$PY" -m pytest -q -m gpu -p no:cacheprovider
grep -h -E "K=|streams:|passed|failed|skipped|round|median|frames/s|first result|bare|plain|rc=|latency|frames:" \
  "$out"/*.log | grep -v "propagate in video"
