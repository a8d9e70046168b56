#!/usr/bin/env bash
# GPU acceptance run for the CUDA kernels, in one go (~8 minutes at most): installs a built
# bofrs wheel into a throw-away venv that sees the system packages (torch, CuPy, pytest; no
# internet needed), runs the NVRTC compile test, the GPU tests (-m gpu) and the CUDA bench.
#
#   maturin build --release                        # here, on any machine: target/wheels/*.whl
#   bash benches/gpu_check.sh [path/to/bofrs-*.whl] # on the GPU machine, from the repo root
#
# Logs and bench results go to $OUT (if set) and to benches/results/.
set -u
cd "$(dirname "$0")/.."
WHEEL="${1:-$(ls -t target/wheels/bofrs-*.whl dist/bofrs-*.whl 2>/dev/null | head -1)}"
OUTDIR="${OUT:-benches/results}"
mkdir -p "$OUTDIR" benches/results
PY="${PYTHON:-python3}"
if [ -z "$WHEEL" ] || [ ! -f "$WHEEL" ]; then
    echo "no wheel found (build one with: maturin build --release)"; exit 2
fi
echo "== wheel: $WHEEL"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
VENV=/tmp/bofrs-gpu-venv
rm -rf "$VENV"
"$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q --no-deps --no-index --force-reinstall "$WHEEL" || exit 3
# pytest and safetensors from a local wheelhouse when the machine lacks them (no internet):
#   pip download pytest pluggy iniconfig packaging pygments safetensors -d target/wheelhouse \
#       --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps
for mod in pytest safetensors; do
    "$VENV/bin/python" -c "import $mod" 2>/dev/null || \
        "$VENV/bin/python" -m pip install -q --no-index --find-links target/wheelhouse "$mod" || true
done
cd /tmp && "$VENV/bin/python" - <<'PY'
import bofrs, torch
print("bofrs", bofrs.__file__)
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
try:
    import cupy
    print("cupy", cupy.__version__)
except Exception as e:
    print("CuPy missing:", e)
PY
cd - >/dev/null
status=0
echo "== NVRTC compile test (no GPU needed)"
timeout 120 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_cuda_compile.py 2>&1 \
    | tee "$OUTDIR/gpu_check_compile.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== GPU tests"
BOFRS_REQUIRE_GPU=1 timeout 330 "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m gpu -rfE tests/test_cuda.py 2>&1 \
    | tee "$OUTDIR/gpu_check_tests.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== CUDA bench"
timeout 240 "$VENV/bin/python" benches/bench_cuda.py 2>&1 | tee "$OUTDIR/gpu_check_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
cp benches/results/cuda_* "$OUTDIR/" 2>/dev/null || true
echo "== done: status $status"
exit $status
