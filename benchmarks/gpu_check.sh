#!/usr/bin/env bash
# One lease on a lent GPU machine: does jaxinfer work there, and how fast is it?
#
# Stages, each under its own time limit so that one stuck stage leaves the others' results:
#   env     the card, the Python packages, a smoke load+run of a fixture on the GPU
#   tests   the test suite on the GPU (JAX's default backend there), except the backend conformance
#   backend the ONNX backend conformance cases on the GPU
#   quant   benchmarks/quantization.py encoder: f32 / bf16 / int8 on the GPU
#   ort     benchmarks/onnx_vs_ort.py: jaxinfer on the GPU vs onnxruntime on the host's CPU cores
#           (ORT_ARGS: session 18 ran the exported fixtures only, --no-light; session 13 has the CNNs)
# Logs and JSON go to $OUT (or ./gpu_out). The lent machines' image (Python 3.12, jax with CUDA) lacks
# tflite, qwix, starlette, uvicorn, httptools, ai-edge-litert and tritonclient's client stack, and its
# onnxruntime (1.30) refuses the IR versions our oracle tests write: they travel as cp312 wheels in
# .whl/ (git-ignored through .git/info/exclude), made here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#       tflite qwix starlette uvicorn httptools ai-edge-litert backports.strenum onnxruntime==1.32.0
# (tritonclient, geventhttpclient, gevent, greenlet, zope.event, zope.interface, python-rapidjson and
# brotli too when they fit: the tree plus .whl must stay under 64 MiB). jaxinfer itself is imported
# from the checkout (PYTHONPATH). Session 13's H200 run and what it found: docs/status.md.
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
T_TESTS=${T_TESTS:-270}
T_BACKEND=${T_BACKEND:-80}
T_QUANT=${T_QUANT:-45}
T_ORT=${T_ORT:-70}
ORT_ARGS=${ORT_ARGS:-}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=python3
# a stuck test fails alone where pytest-timeout is installed (the GPU image has it)
PER_TEST=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout 90")

stage() { echo "=== $1 ($(date +%T))"; }

stage env
nvidia-smi -L
$PY -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|numpy|onnx|onnxruntime|flax|orbax-checkpoint|ml.dtypes) '
# into the image's own environment (a --target folder would be lost by tests that set PYTHONPATH)
[ -d .whl ] && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl >"$OUT/install.log" 2>&1 \
    || tail -5 "$OUT/install.log"
export PYTHONPATH=$PWD
$PY - <<'EOF' 2>&1 | tee "$OUT/env.log"
import time, numpy as np, jax, jaxlib
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "backend", jax.default_backend(), jax.devices())
import jaxinfer
t = time.perf_counter()
m = jaxinfer.load("tests/fixtures/onnx/bert_legacy.onnx")
feeds = {i.name: np.ones([d if isinstance(d, int) and d > 0 else (1 if k == 0 else 16)
                          for k, d in enumerate(i.shape)], i.dtype) for i in m.inputs}
out = m.run(feeds)
print("smoke: bert_legacy ran on", jax.default_backend(), {k: v.shape for k, v in out.items()},
      f"{time.perf_counter() - t:.1f}s incl. compile")
EOF

stage tests
timeout -k 10 "$T_TESTS" $PY -m pytest -n 14 $PER_TEST -o addopts= -v --tb=short -rfE -p no:cacheprovider tests \
    --ignore tests/converters/onnx/test_backend.py \
    >"$OUT/tests.log" 2>&1
echo "rc=$?"; grep -E " (FAILED|ERROR) " "$OUT/tests.log" | sed "s/^.*\(FAILED\|ERROR\) //" | head -60
grep -cE " PASSED " "$OUT/tests.log"; tail -1 "$OUT/tests.log"

stage backend
timeout -k 10 "$T_BACKEND" $PY -m pytest -n 14 $PER_TEST -o addopts= -v --tb=short -rf -p no:cacheprovider \
    tests/converters/onnx/test_backend.py >"$OUT/backend.log" 2>&1
echo "rc=$?"; grep -A8 "ONNX backend conformance" "$OUT/backend.log"; grep -E " FAILED " "$OUT/backend.log" | sed "s/^.*FAILED //" | head -40
echo "passed: $(grep -cE " PASSED " "$OUT/backend.log")"; tail -1 "$OUT/backend.log"

stage quant
timeout -k 10 "$T_QUANT" $PY benchmarks/quantization.py --parts encoder --shapes 1x8,4x32,32x128 --runs 10 \
    --json "$OUT/quant_gpu.json" --plot "$OUT/quant_gpu.png" >"$OUT/quant.log" 2>&1
echo "rc=$?"; tail -25 "$OUT/quant.log"
stage ort
timeout -k 10 "$T_ORT" $PY benchmarks/onnx_vs_ort.py --runs 10 --min-block-s 0.1 $ORT_ARGS --json "$OUT/onnx_vs_ort_gpu.json" \
    >"$OUT/ort.log" 2>&1
echo "rc=$?"; tail -45 "$OUT/ort.log"

stage done
