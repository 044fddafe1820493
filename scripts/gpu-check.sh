#!/usr/bin/env bash
# gpu-check.sh — visionserve's GPU check, in one call on a GPU machine (~7 of its 8 minutes).
#
#   bash scripts/gpu-check.sh [--out DIR] [--wheels DIR] [--budget SECONDS]
#   bash scripts/gpu-check.sh --cpu [--out DIR]     # the same steps on the CPU provider, small
#
# On the GPU machine (Python 3.12 with torch cu130 and cuda-bindings, a CPU-only onnxruntime,
# no network) it:
#   1. installs the carried wheels (onnxruntime-gpu, the gRPC/protobuf versions the generated
#      stubs need) into /tmp/site, first on PYTHONPATH, and this checkout (no index, no deps);
#   2. prints the GPU, the packages, and whether ONNX Runtime has CUDAExecutionProvider;
#   3. runs the gpu / onnxruntime_cuda tests with VISIONSERVE_REQUIRE_GPU=1 (a skip there is
#      a failure), then the tensorrt tests unforced (no TensorRT there: they must SKIP, saying
#      why; TensorRT-RTX does not run on SM 9.0);
#   4. exports ResNet-50 (224) and a UNet (base 32, depth 4, served at 512) with random
#      weights, onnxruntime-cuda their only backend, + model.fp16.onnx (bench/gpu_check.py);
#   5. figures (bench/gpu_check.py figures): the backend actually used; ORT-CUDA FP32/FP16
#      images/s vs torch FP16 eager (ResNet-50 batch 128, UNet 512 batch 16); FP16-vs-FP32
#      agreement; first-call cost per new shape and GPU memory across shapes (cuDNN
#      HEURISTIC vs EXHAUSTIVE);
#   6. served/bare on the GPU: bench/served_vs_bare.py on ResNet-50 (prints both backends).
# Each step has its own time limit from what is left of --budget; a failed step does not stop
# the next; the exit status is 1 if any step failed. The log and figures.json land in --out
# (default $OUT, the device tool's return folder, else /tmp/gpu-check).
#
# Before it, stage the wheels here and carry them over (one call per part):
#   ../shared/gpu/stage-wheels.sh grpcio==1.85.3 grpcio-health-checking==1.85.1 \
#       grpcio-reflection==1.85.1 protobuf==7.36.2
# (README.md, "GPU check", says how to run it.)
set -uo pipefail

DEVICE=cuda
OUT_DIR=${OUT:-/tmp/gpu-check}
WHEELS=${GPU_WHEELS:-/tmp/gpuw}
BUDGET=500
PY=${PYTHON:-python3}
usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) DEVICE=cpu; shift ;;
    --out) OUT_DIR=${2:?--out needs a folder}; shift 2 ;;
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu-check.sh: --budget must be whole seconds, got $BUDGET" >&2; exit 2 ;; esac

cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT_DIR" || exit 2
WORK=${GPU_CHECK_WORK:-/tmp/vs-gpu-check}  # big files (ONNX models) stay out of --out
rm -rf "$WORK" && mkdir -p "$WORK"
exec > >(tee -a "$OUT_DIR/gpu-check.log") 2>&1
export PYTHONUNBUFFERED=1
T0=$SECONDS
STATUS=0
step() { echo; echo "=== [$((SECONDS - T0)) s] $*"; }
failed() { echo "FAILED: $*"; STATUS=1; }
# cap N: N seconds, or what is left of the budget (less 10 s) if that is less; fails under 20 s
cap() {
  local left=$((BUDGET - (SECONDS - T0) - 10))
  if [ "$left" -lt 20 ]; then echo "SKIPPED: the time budget is spent" >&2; return 1; fi
  echo $(($1 < left ? $1 : left))
}
if [ "$DEVICE" = cpu ]; then
  QUICK=(--quick); BACKEND=onnxruntime-cpu; FORCE=0
  SERVED=(--clients 4 --client-processes 1 --seconds 1 --rounds 1 --max-batch 4 --latency-requests 20 --no-pin)
else
  QUICK=(); BACKEND=onnxruntime-cuda; FORCE=1
  SERVED=(--clients 64 --client-processes 4 --seconds 4 --rounds 2 --max-batch 32 --latency-requests 200)
fi

if [ "$DEVICE" = cuda ]; then
  step "1 install: carried wheels -> /tmp/site (first on PYTHONPATH); this checkout, no index"
  if ls "$WHEELS"/part* >/dev/null 2>&1; then cat "$WHEELS"/part* | tar -C "$WHEELS" -xf - || failed "unpacking the wheel parts"; fi
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || failed "installing the carried wheels"
  else
    failed "no wheels in $WHEELS (stage them with ../shared/gpu/stage-wheels.sh, see the header)"
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || { failed "installing visionserve"; exit 1; }
fi

step "2 environment"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader
"$PY" - <<'PY' || failed "environment"
import importlib.util as u
import grpc, numpy, onnxruntime as ort
from google import protobuf
print("onnxruntime", ort.__version__, ort.get_available_providers())
print("grpc", grpc.__version__, "protobuf", protobuf.__version__, "numpy", numpy.__version__)
print({m: u.find_spec(m) is not None for m in ("torch", "tensorrt", "tensorrt_rtx", "cuda.bindings")})
from visionserve.server.engine_compat import detect_gpu, gpu_runtime_unavailable
print("GPU:", detect_gpu(0), "| TensorRT runtime:", gpu_runtime_unavailable() or "usable")
PY

step "3 pytest: GPU tests with VISIONSERVE_REQUIRE_GPU=$FORCE, then the tensorrt tests unforced"
t=$(cap 120) && { VISIONSERVE_REQUIRE_GPU=$FORCE timeout "$t" "$PY" -m pytest -p no:cacheprovider -q -rs \
  -m "(gpu or onnxruntime_cuda) and not tensorrt" \
  tests/server/test_onnxruntime_backend.py tests/server/test_backend_registry.py || failed "GPU tests"; }
t=$(cap 60) && { timeout "$t" "$PY" -m pytest -p no:cacheprovider -q -rs -m tensorrt \
  tests/server/test_tensorrt_backend.py tests/export/test_build.py; rc=$?; [ $rc = 0 ] || [ $rc = 5 ] || failed "tensorrt tests (rc $rc)"; }

step "4 models: ResNet-50 and UNet, random weights, backends $BACKEND only, + model.fp16.onnx"
t=$(cap 240) && { timeout "$t" "$PY" bench/gpu_check.py models --out "$WORK" --backend "$BACKEND" "${QUICK[@]}" || failed "models"; }

step "5 figures ($DEVICE)"
t=$(cap 200) && { timeout "$t" "$PY" bench/gpu_check.py figures --out "$WORK" --device "$DEVICE" "${QUICK[@]}" || failed "figures"; }
cp "$WORK/figures.json" "$OUT_DIR/" 2>/dev/null

step "6 served vs bare on $DEVICE: ResNet-50 (bench/served_vs_bare.py)"
t=$(cap 120) && { timeout "$t" "$PY" bench/served_vs_bare.py --repository "$WORK/repository" --model resnet50 \
  --intra-op-threads 0 "${SERVED[@]}" || failed "served_vs_bare"; }

step "done in $((SECONDS - T0)) s: status $STATUS; log and figures.json in $OUT_DIR"
grep -E "^(FAILED|SKIPPED)|backend:|ratio|passed|failed" "$OUT_DIR/gpu-check.log" | tail -30
exit $STATUS
