#!/usr/bin/env bash
# latprune's one prepared GPU check (issue 14, item 6). Run from the repository root on a machine
# with an NVIDIA GPU, which may have no network:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        (default runs/gpu-check; under 5 minutes)
#
# 1. installs latprune with `pip install --no-deps -e .` on top of the host's own torch (and, if
#    WHEELS=DIR names a folder of wheels, installs missing dependencies from it without network);
# 2. detects the GPU, CUDA in torch, onnxruntime-gpu's providers, TensorRT and Polygraphy;
# 3. runs every test marked gpu or tensorrt;
# 4. runs a miniature `latprune run --runtime trt` in fp16 and in int8, and `latprune bench` on the
#    first finished run with each GPU runtime present (trt, ort-cuda, ort-trt);
# 5. writes OUT_DIR/gpu_check.json: per step "passed", "failed (exit N)" or "not run: missing X",
#    with the log file of each step. The exit status is 0 when nothing that ran failed.
set -u
OUT=${1:-runs/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
START=$(date +%s)
declare -A STEP
step() {  # step NAME LOGFILE CMD...: run it, record passed / failed (exit N)
  local name=$1 log=$2; shift 2
  echo "== $name" >&2
  if "$@" >"$log" 2>&1; then STEP[$name]="passed"; else STEP[$name]="failed (exit $?)"; fi
  echo "   ${STEP[$name]} ($log)" >&2
}
skip() { STEP[$1]="not run: missing $2"; echo "== $1: ${STEP[$1]}" >&2; }

if [ -n "${WHEELS:-}" ]; then
  step deps "$OUT/deps.log" "$PY" -m pip install --no-index --find-links "$WHEELS" \
    torch-pruning onnx onnxruntime-gpu tqdm matplotlib pyyaml polygraphy pytest
fi
step install "$OUT/install.log" "$PY" -m pip install --no-deps --no-build-isolation -e .

"$PY" - >"$OUT/detect.json" 2>"$OUT/detect.log" <<'PYEOF'
import importlib, json
def has(m):
    try:
        return getattr(importlib.import_module(m), "__version__", "present")
    except Exception as e:  # a missing or broken package is what this records
        return None
d = {m: has(m) for m in ("torch", "torch_pruning", "onnx", "onnxruntime", "tensorrt", "polygraphy", "latprune")}
try:
    import torch
    d["cuda"] = torch.cuda.is_available()
    d["gpu"] = torch.cuda.get_device_name(0) if d["cuda"] else None
except Exception:
    d["cuda"], d["gpu"] = False, None
try:
    import onnxruntime as ort
    d["ort_providers"] = ort.get_available_providers()
except Exception:
    d["ort_providers"] = []
print(json.dumps(d))
PYEOF
DETECT=$(cat "$OUT/detect.json" 2>/dev/null || echo '{}')
field() { "$PY" -c "import json,sys; d=json.loads(sys.argv[1]); v=d.get(sys.argv[2]); print('' if v in (None, False, []) else v)" "$DETECT" "$1"; }
provider() { "$PY" -c "import json,sys; print('yes' if sys.argv[2] in json.loads(sys.argv[1]).get('ort_providers', []) else '')" "$DETECT" "$1"; }
CUDA=$(field cuda); TRT=$(field tensorrt); LATPRUNE=$(field latprune)
ORT_CUDA=$(provider CUDAExecutionProvider); ORT_TRT=$(provider TensorrtExecutionProvider)

MINI=(--no-progress --train-subset 512 --val-size 256 --test-subset 256 --pretrain-epochs 0.5
      --finetune-epochs 0.25 --batch-size 64 --deploy-batch 32 --profile-step 16 --profile-round-s 0.004
      --verify-rounds 3 --verify-round-s 0.1 --calibrate-iters 2 --calibrate-round-s 0.05 --fit-configs 2
      --warmup-epochs 0.25 --prune-steps 2 --prune-every 3 --robust-images 8 --search 0 --budget 0.9
      --calibration-images 64 --cache-dir "$OUT/cache")
if [ -z "$LATPRUNE" ]; then
  for s in tests run-trt-fp16 run-trt-int8 bench-trt bench-ort-cuda bench-ort-trt; do skip $s "latprune (install failed)"; done
elif [ -z "$CUDA" ]; then
  for s in tests run-trt-fp16 run-trt-int8 bench-trt bench-ort-cuda bench-ort-trt; do skip $s "a CUDA GPU visible to torch"; done
else
  step tests "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider -m "gpu or tensorrt" tests/gpu
  BENCH_RUN=""
  for prec in fp16 int8; do
    if [ -z "$TRT" ]; then skip run-trt-$prec tensorrt; continue; fi
    step run-trt-$prec "$OUT/run-trt-$prec.log" "$PY" -m latprune.cli run --runtime trt --precision $prec "${MINI[@]}" \
      --out "$OUT/run-trt-$prec"
    # exit 4 (budget missed at this miniature size) still wrote a complete report
    [ -f "$OUT/run-trt-$prec/report.json" ] && [ -z "$BENCH_RUN" ] && BENCH_RUN="$OUT/run-trt-$prec"
    [ -f "$OUT/run-trt-$prec/report.json" ] && STEP[run-trt-$prec]="${STEP[run-trt-$prec]/failed (exit 4)/passed (exit 4: budget missed at miniature size)}"
  done
  if [ -z "$BENCH_RUN" ]; then  # an fp32 ORT CPU run to bench the GPU runtimes on
    step run-ort-fp32 "$OUT/run-ort-fp32.log" "$PY" -m latprune.cli run "${MINI[@]}" --out "$OUT/run-ort-fp32"
    [ -f "$OUT/run-ort-fp32/report.json" ] && BENCH_RUN="$OUT/run-ort-fp32"
  fi
  for rt in trt ort-cuda ort-trt; do
    case $rt in trt) need=$TRT; what=tensorrt;; ort-cuda) need=$ORT_CUDA; what="onnxruntime-gpu CUDAExecutionProvider";;
                ort-trt) need=$ORT_TRT; what="onnxruntime-gpu TensorrtExecutionProvider";; esac
    if [ -z "$need" ]; then skip bench-$rt "$what"; elif [ -z "$BENCH_RUN" ]; then skip bench-$rt "a finished run"; else
      step bench-$rt "$OUT/bench-$rt.log" "$PY" -m latprune.cli bench "$BENCH_RUN" --runtime $rt --iterations 100 \
        --allow-noisy --json "$OUT/bench-$rt.json"
    fi
  done
fi

SUMMARY=$(for k in "${!STEP[@]}"; do printf '%s\t%s\n' "$k" "${STEP[$k]}"; done)
"$PY" - "$OUT" "$START" "$DETECT" <<PYEOF
import json, sys, time
out, start, detect = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3] or "{}")
steps = dict(line.split("\t", 1) for line in """$SUMMARY""".strip().splitlines() if "\t" in line)
summary = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - start),
           "detected": detect, "steps": steps,
           "ok": not any(v.startswith("failed") for v in steps.values())}
open(f"{out}/gpu_check.json", "w").write(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
sys.exit(0 if summary["ok"] else 1)
PYEOF
