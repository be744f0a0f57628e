#!/usr/bin/env bash
# Every check this project asks of a GPU machine, in one go, logs under OUTDIR:
#   1. the gpu test tier (CUDA graphs, the driver's masks against SAM 2's own predictor, CUDA end to end);
#   2. bench_gpu.py: the service against SAM 2's bare loop with frames already on the GPU (target >= 0.9);
#   3. bench_service.py --device cuda --image-size 1024: the service against the plain way (ffmpeg, then
#      init_state and propagation) at full size in bf16. Needs an ffmpeg: on PATH, $FFMPEG, or the
#      imageio-ffmpeg package (a static build; bench/common.py says which one ran).
#   4. bench_live.py --device cuda --image-size 1024 --size 1920x1080: one 1080p30 live source (ffmpeg on PATH
#      serves it over TCP) for LIVE_MINUTES (3): target no skips and a capture-to-result p95 under 100 ms.
#   5. bench_concurrency.py on CUDA (tiny at 1024, 1920x1080): aggregate frames/s for K = 1, 2, 4, 8 jobs on one
#      worker, shared model (with and without batching across jobs: frames and objects, worker/model/sam2/step_batch.py)
#      against a model process per slot and one batching model process for all slots (targets: K=8 at least 4x K=1; CONCURRENCY_OBJECTS objects a job, 1);
#      then how many 30 fps one-object live streams one GPU holds with no skips (STREAMS_MODE: processes, or
#      batched).
#   6. bench_gpu.py --runs "driver,driver compiled": torch.compile(mode="max-autotune") against our CUDA graphs.
# Usage: bash bench/gpu_checks.sh OUTDIR [VIDEO]   (python3 must have torch with CUDA and this
# project's dependencies; VIDEO defaults to ../shared/videos/bedroom.mp4)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash bench/gpu_checks.sh OUTDIR [VIDEO]}"
video="${2:-../shared/videos/bedroom.mp4}"
mkdir -p "$out"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA here'; print(torch.__version__, torch.cuda.get_device_name())" \
  | tee "$out/env.txt" || exit 1
timeout "${TESTS_S:-300}" "$PY" -m pytest -q -m gpu -p no:cacheprovider > "$out/gpu_tests.log" 2>&1
echo "gpu tests rc=$?" | tee -a "$out/gpu_tests.log"
timeout "${GPU_BENCH_S:-400}" "$PY" bench/bench_gpu.py --video "$video" --repeats "${REPEATS:-3}" \
  --runs "${RUNS:-driver,driver eager,service,masks only}" > "$out/bench_gpu.log" 2>&1
echo "bench_gpu rc=$?" | tee -a "$out/bench_gpu.log"
timeout "${SERVICE_BENCH_S:-400}" "$PY" bench/bench_service.py --device cuda --image-size 1024 --frames 300 \
  --repeats "${REPEATS:-3}" --video "$video" > "$out/bench_service_cuda.log" 2>&1
echo "bench_service rc=$?" | tee -a "$out/bench_service_cuda.log"
timeout "${LIVE_BENCH_S:-360}" "$PY" bench/bench_live.py --device cuda --image-size 1024 --size 1920x1080 \
  --minutes "${LIVE_MINUTES:-3}" --max-latency 2 > "$out/bench_live_cuda.log" 2>&1
echo "bench_live rc=$?" | tee -a "$out/bench_live_cuda.log"
timeout "${CONCURRENCY_BENCH_S:-600}" "$PY" bench/bench_concurrency.py --device cuda --image-size 1024 \
  --size 1920x1080 --frames 120 --ks 1,2,4,8 --repeats 1 --objects "${CONCURRENCY_OBJECTS:-1}" \
  --modes "${CONCURRENCY_MODES:-shared,batched,processes,batched-process}" \
  > "$out/bench_concurrency_cuda.log" 2>&1
echo "bench_concurrency rc=$?" | tee -a "$out/bench_concurrency_cuda.log"
timeout "${STREAMS_BENCH_S:-600}" "$PY" bench/bench_concurrency.py --device cuda --image-size 1024 \
  --size 1920x1080 --modes "${STREAMS_MODE:-processes}" --streams 1,4,8,16,24,32,50 > "$out/bench_streams_cuda.log" 2>&1
echo "bench_concurrency --streams rc=$?" | tee -a "$out/bench_streams_cuda.log"
timeout "${COMPILE_BENCH_S:-900}" "$PY" bench/bench_gpu.py --video "$video" --repeats 2 --frames 200 \
  --runs "driver,driver compiled" > "$out/bench_compile.log" 2>&1
echo "bench_gpu compile rc=$?" | tee -a "$out/bench_compile.log"
grep -h -E "K=|streams:|passed|failed|round|median|frames/s|first result|bare|plain|rc=|latency|frames:|growth" "$out"/*.log \
  | grep -v "propagate in video"
