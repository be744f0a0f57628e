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
#   5. gpu tests (90 s): the gpu tier (CUDA graphs, the driver's masks against SAM 2's own, CUDA end to end);
#   6. sam3 (up to 120 s, what is left of the 8 minutes; skipped under 60 s): SAM 3 text tracking frames/s at
#      1920x1080 with 1, 4 and 16 objects, our TextTracker (file and live) against transformers' own loop, SAM 3's
#      full architecture with random weights in bf16, 16 frames after 2 of warm-up, up to 3 rounds within the
#      step's time (bench_sam3.py; figures in OUTDIR/sam3.json). Needs what the GPU image lacks, carried as
#      wheels beside the project's (pure Python, 16 MB; here, then `pip install --target` there as for the rest):
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl transformers==5.25.0 \
#          huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 open_clip_torch==3.3.0
#      Without them the step fails in one line naming them; the other steps do not need them.
# --dry-run: the same steps on the CPU at toy sizes (image size 256, 320x180, a few frames; step 4 as
# bench_service.py, the service against the plain SAM 2 way, since bench_gpu.py needs CUDA; step 6 with SAM 3's
# tiny random model at 128x96, 1 and 4 objects, 4 frames, one round), in under five
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
  device=cpu; isize=256; size=320x180; streams=1; ks=1,2; frames=6; minutes=0.25; t=(120 90 60 90 90 90)
  budget_s=600
  sam3=(--device cpu --model tiny --size 128x96 --objects 1,4 --frames 4 --warmup 2 --rounds 1 --threads 1)
  echo "dry run: the steps on the CPU at toy sizes" | tee "$out/env.txt"
else
  device=cuda; isize=1024; size=1920x1080; streams=1,4,8,16,24,32; ks=1,8; frames=90; minutes=1; t=(90 120 75 90 90 120)
  budget_s=480  # the whole run's 8 minutes: the last step gets what is left of them
  sam3=(--device cuda --model full --dtype bfloat16 --size 1920x1080 --objects 1,4,16 --frames 16 --warmup 2 --rounds 3)
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
left=$((budget_s - SECONDS))  # SECONDS: bash's count since the script started
limit=$((left < t[5] ? left : t[5]))
if [ "$limit" -ge 60 ]; then  # its own --budget-s leaves ~45 s for imports, building the model and the last round
  step sam3 "$limit" "$PY" bench/bench_sam3.py "${sam3[@]}" --budget-s $((limit - 45)) --json "$out/sam3.json"
else
  echo "sam3 skipped: ${left} s left of the ${budget_s} s budget; sam3 rc=skipped" | tee "$out/sam3.log"
fi
grep -h -E "K=|streams:|passed|failed|skipped|round|median|frames/s|first result|bare|plain|rc=|latency|frames:|^objects |^ +[0-9]+ +[0-9]+-[0-9]+|against the library" \
  "$out"/*.log | grep -v "propagate in video"
