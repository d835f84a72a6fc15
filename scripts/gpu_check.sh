#!/usr/bin/env bash
# The GPU check: one command on the lent GPU machine (Python 3.12, torch 2.11, triton 3.6, no
# network), run from the repo root with the bundle folder (.whl/, `make gpu-bundle`) carried:
#
#   bash scripts/gpu_check.sh
#
# 1. installs the bundle without network into $GPU_SITE (--no-deps; torch/triton untouched),
# 2. imports every module of the project,
# 3. runs `pytest -m cuda` (tests/cuda),
# 4. runs the GPU benchmarks (scripts/bench/gpu.py),
# 5. on CUDA (or with GPU_CHECK_SERVE=1): the server stack (scripts/gpu_serve_check.py: the
#    api_server on a random-weight model with a real tokenizer, a short trace per LoRA mode,
#    CUDA graphs on, shut down; TTFT / TPOT, errors and leftovers in serve.json),
# writing check.log, env.json, imports.json, pytest_cuda.xml, bench_gpu.json, serve.json and
# summary.json under $OUT (default results/gpu_check). Time limits: $GPU_CHECK_PYTEST_S,
# $GPU_CHECK_BENCH_S and $GPU_CHECK_SERVE_S (defaults 300 s, 150 s and 200 s). GPU_CHECK_SERVE=0
# skips step 5.
# A partial rerun: GPU_CHECK_PYTEST_ARGS (extra pytest arguments, e.g. "-k sidecar") and
# GPU_CHECK_BENCH_ARGS (extra bench/gpu.py arguments, e.g. "--parts kernels").
#
# Without CUDA (CI, a laptop) it says so, checks what it can -- the bundle installs for
# CPython 3.12, every module imports, `pytest -m cuda` collects and skips every test, the
# benchmark runs on tiny shapes with the emulated link -- and exits 0 when those pass.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/results/gpu_check}
PY=${PYTHON:-python3}
WHL=${GPU_BUNDLE_DIR:-$REPO/.whl}
SITE=${GPU_SITE:-/tmp/site}
PYTEST_S=${GPU_CHECK_PYTEST_S:-300}
BENCH_S=${GPU_CHECK_BENCH_S:-150}
SERVE_S=${GPU_CHECK_SERVE_S:-200}
read -r -a PYTEST_EXTRA <<< "${GPU_CHECK_PYTEST_ARGS:-}"
read -r -a BENCH_EXTRA <<< "${GPU_CHECK_BENCH_ARGS:-}"
# no network there: never let a library try the Hugging Face hub; logs as they come
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec > >(tee "$OUT/check.log") 2>&1
START=$(date +%s)
declare -A RC DUR

step() {  # step NAME COMMAND...: run, record exit status and seconds
    local name=$1 t0=$(date +%s)
    shift
    echo "=== $name: $*"
    "$@"
    RC[$name]=$?
    DUR[$name]=$(( $(date +%s) - t0 ))
    echo "=== $name: exit ${RC[$name]} after ${DUR[$name]} s"
}

CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
PYVER=$($PY -c "import sys; print('%d.%d' % sys.version_info[:2])")
$PY - "$OUT/env.json" <<'EOF'
import json, platform, subprocess, sys
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
       "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda, "platform": platform.platform()}
if torch.cuda.is_available():
    env["device"] = torch.cuda.get_device_name()
    env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        env["nvidia_smi"] = repr(e)
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env, indent=1))
EOF

# 1. the bundle: installed where it is used (CPython 3.12), else only proven installable for 3.12
if [ ! -d "$WHL" ]; then
    echo "no bundle folder $WHL: run 'make gpu-bundle' and carry it"
    RC[install]=1; DUR[install]=0
elif [ "$PYVER" = "3.12" ]; then
    step install $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHL"/*.whl
    export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "Python $PYVER here: installing the bundle for CPython 3.12 into a scratch folder only"
    SCRATCH=$(mktemp -d)
    step install $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SCRATCH" \
        --python-version 3.12 --implementation cp --only-binary=:all: --platform any \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        "$WHL"/*.whl
    rm -rf "$SCRATCH"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. every module imports (a module needing a deliberately unbundled package is reported as skipped)
step imports $PY scripts/gpu_bundle.py imports --json "$OUT/imports.json"

# 3. the CUDA tests (on a CPU machine: every one collected and skipped)
step pytest timeout -k 10 "$PYTEST_S" $PY -m pytest -m cuda tests/cuda -q -p no:cacheprovider \
    --junitxml="$OUT/pytest_cuda.xml" "${PYTEST_EXTRA[@]}"
if [ "$CUDA" != "1" ] && [ "${RC[pytest]}" = "0" ]; then
    $PY - "$OUT/pytest_cuda.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
n, skipped = int(suite.get("tests")), int(suite.get("skipped"))
bad = int(suite.get("failures")) + int(suite.get("errors"))
print(f"pytest -m cuda without CUDA: {n} collected, {skipped} skipped, {bad} failed or errored")
sys.exit(0 if n > 0 and skipped == n and bad == 0 else 1)
EOF
    RC[pytest]=$?
fi

# 4. the benchmarks (without CUDA: tiny shapes, emulated link, one repeat: proves the script runs)
if [ "$CUDA" = "1" ]; then
    step bench timeout -k 10 "$BENCH_S" $PY scripts/bench/gpu.py --out "$OUT/bench_gpu.json" \
        --budget-s $(( BENCH_S * 2 / 3 )) "${BENCH_EXTRA[@]}"
else
    step bench timeout -k 10 "$BENCH_S" $PY scripts/bench/gpu.py --device cpu --dry-run --repeats 1 \
        --sidecar-workers 1 --out "$OUT/bench_gpu.json" "${BENCH_EXTRA[@]}"
fi

# 5. the server stack (CUDA; on a CPU machine only with GPU_CHECK_SERVE=1: tiny shapes)
STEPS=(install imports pytest bench)
SERVE=${GPU_CHECK_SERVE:-$CUDA}
if [ "$SERVE" = "1" ]; then
    if [ "$CUDA" = "1" ]; then
        step serve timeout -k 10 "$SERVE_S" $PY scripts/gpu_serve_check.py --out "$OUT/serve.json"
    else
        step serve timeout -k 10 "$SERVE_S" $PY scripts/gpu_serve_check.py --dry-run --out "$OUT/serve.json"
    fi
    STEPS+=(serve)
fi

TOTAL=$(( $(date +%s) - START ))
STATUS=0
CODES=() SECONDS_=()
for name in "${STEPS[@]}"; do
    [ "${RC[$name]:-1}" = "0" ] || STATUS=1
    CODES+=("$name=${RC[$name]:-1}")
    SECONDS_+=("$name=${DUR[$name]:-0}")
done
$PY - "$OUT/summary.json" "$CUDA" "$STATUS" "$TOTAL" "${#STEPS[@]}" "${CODES[@]}" "${SECONDS_[@]}" <<'EOF'
import json, sys
out, cuda, status, total, n, *rest = sys.argv[1:]
n = int(n)
pairs = lambda items: {k: int(v) for k, v in (item.split("=") for item in items)}
summary = {"cuda": cuda == "1", "ok": status == "0", "total_s": int(total),
           "exit": pairs(rest[:n]), "seconds": pairs(rest[n:])}
json.dump(summary, open(out, "w"), indent=1)
print(json.dumps(summary))
EOF
if [ "$CUDA" != "1" ]; then
    echo "no CUDA device here: checked the bundle, the imports, the collection of the CUDA tests and the" \
         "benchmark on tiny shapes; the GPU run itself is still to be done on a GPU machine"
fi
echo "gpu check: $([ $STATUS = 0 ] && echo PASSED || echo FAILED) in $TOTAL s (files in $OUT)"
exit $STATUS
