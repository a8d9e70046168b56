#!/usr/bin/env bash
# GPU acceptance run for the CUDA kernels, in one go (about 4 minutes, every step under its own
# timeout, well inside one 600 s device command): installs the carried wheels into a folder on
# PYTHONPATH (the machine's python3 is itself a venv holding torch, CuPy and pytest; a new venv
# would not see them), then runs the NVRTC compile test, the GPU tests (-m gpu), one call of
# every kernel under compute-sanitizer's memcheck, and the CUDA bench.
#
# Here, on any machine (wheels of other packages, e.g. bitsandbytes for the bench, can sit
# beside bofrs's in the same folder; see the device README for `pip download` options):
#   maturin build --release && mkdir -p .gpu && cp target/wheels/bofrs-*.whl .gpu/
# On the GPU machine, from the repository root (device tool: carry [".gpu"]):
#   bash benches/gpu_check.sh [WHEEL_DIR]
#
# Logs and bench results go to $OUT (if set) and to benches/results/.
set -u
cd "$(dirname "$0")/.."
WHEELS="${1:-.gpu}"
OUTDIR="${OUT:-benches/results}"
mkdir -p "$OUTDIR" benches/results
PY="${PYTHON:-python3}"
SITE=/tmp/bofrs-site
export PYTHONUNBUFFERED=1
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
bofrs_wheel=("$WHEELS"/bofrs-*.whl)
if [ "${#bofrs_wheel[@]}" -ne 1 ]; then
    echo "need exactly one bofrs wheel in $WHEELS (found ${#bofrs_wheel[@]}): maturin build --release"; exit 2
fi
echo "== wheels: ${wheels[*]}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
rm -rf "$SITE"
"$PY" -m pip install -q --no-deps --no-index --no-compile --target "$SITE" "${wheels[@]}" || exit 3
export PYTHONPATH="$SITE"
cd /tmp && "$PY" - <<'PY'
import bofrs, torch
print("bofrs", bofrs.__file__)
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
try:
    import cupy
    print("cupy", cupy.__version__, "from_external", hasattr(cupy.cuda.Stream, "from_external"))
except Exception as e:
    print("CuPy missing:", e)
PY
cd - >/dev/null
status=0
step() {  # step NAME SECONDS LOG COMMAND...: runs with a timeout, keeps going, records failures
    local name=$1 seconds=$2 log=$3; shift 3
    echo "== $name (at most ${seconds}s)"
    local t0=$SECONDS
    timeout "$seconds" "$@" > "$OUTDIR/$log" 2>&1
    local rc=$?
    tail -n 25 "$OUTDIR/$log"
    echo "== $name: exit $rc after $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || status=1
}
step "NVRTC compile test" 60 gpu_check_compile.log \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_compile.py
step "GPU tests" 150 gpu_check_tests.log \
    env BOFRS_REQUIRE_GPU=1 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rfE --maxfail=25 tests/test_cuda.py
if command -v compute-sanitizer >/dev/null; then
    step "memcheck, one call of each kernel" 90 gpu_check_memcheck.log \
        compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" benches/cuda_kernel_smoke.py
else
    echo "== compute-sanitizer not found: memcheck skipped"; status=1
fi
step "CUDA bench" 150 gpu_check_bench.log "$PY" benches/bench_cuda.py --out "$OUTDIR/cuda_bench.txt"
cp "$OUTDIR"/cuda_bench.* benches/results/ 2>/dev/null || true
echo "== done in ${SECONDS}s: status $status"
exit $status
