#!/usr/bin/env bash
# On a GPU machine (the device tool): build the extension in place, run the CUDA tests, then
# the quick bandwidth check. Logs and junit files go to $OUT (or ./gpu_out).
#     bash csrc/cuda/gpu_check.sh          (about 4-5 minutes on an H100 machine)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
out="${OUT:-gpu_out}"
mkdir -p "$out"
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# The device image's default CXX (/opt/gcc/bin/g++, a wrapper) links libstdc++ statically into
# the extension (ldd shows no libstdc++.so.6): any C++ error with a formatted message then
# segfaults python (seen 2026-11-22, also with a 3-line pybind11 + c10 module). Build with the
# distribution's g++ instead; ROGA_KEEP_CXX=1 keeps the environment's compiler.
if [ -z "${ROGA_KEEP_CXX:-}" ]; then
  for c in /usr/bin/x86_64-linux-gnu-g++-13 /usr/bin/g++-13 /usr/bin/x86_64-linux-gnu-g++-12 /usr/bin/g++-12; do
    if [ -x "$c" ] && [ -x "${c/g++/gcc}" ]; then export CXX="$c" CC="${c/g++/gcc}"; break; fi
  done
fi
echo "CXX=${CXX:-default} CC=${CC:-default}"
stamp build
if ! TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    python3 setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  grep -E "error|Error" "$out/build.log" | head -40
  exit 1
fi
ldd roga_cuda/_C*.so | grep -q "libstdc++" || echo "!! roga_cuda/_C links libstdc++ statically"
# A formatted C++ error from the frontend checks must arrive as a Python TypeError.
probe='import torch
from roga_cuda import _C
try:
    _C.norm([torch.ones(2, dtype=torch.int64)], None, 0.0, False)
except TypeError:
    print("throw probe: TypeError raised, no crash")'
desel_cuda=() ; files_ops="tests/test_ops.py tests/test_ops_errors.py" ; k_ops="cuda-cuda"
if ! timeout 60 python3 -c "$probe"; then
  echo "!! a C++ exception from roga_cuda._C crashes python here: error-path tests deselected"
  desel_cuda=(-k "not (more_lists or knob_checks)")
  files_ops="tests/test_ops.py" ; k_ops="cuda-cuda and not channels_last"
fi

summary() {  # failures and counts from a junit file
  python3 - "$1" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception as e:
    print("  (no junit:", e, ")"); sys.exit()
n = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
for tc in root.iter("testcase"):
    kind = next((c.tag for c in tc if c.tag in ("failure", "error", "skipped")), "passed")
    n["failed" if kind == "failure" else kind] += 1
    if kind in ("failure", "error"):
        c = next(c for c in tc if c.tag == kind)
        print(f"  {kind.upper()} {tc.get('name')}: {(c.get('message') or '').splitlines()[0][:240] if c.get('message') else ''}")
    if kind == "skipped":
        c = next(c for c in tc if c.tag == "skipped")
        print(f"  SKIP {tc.get('name')}: {(c.get('message') or '')[:160]}")
print("  counts:", n)
PY
}
stamp "tests: test_cuda.py"
timeout "${CUDA_TEST_TIMEOUT:-90}" python3 -m pytest -q -n 6 --timeout 80 -p no:cacheprovider --tb=short \
  --junitxml="$out/junit_cuda.xml" "${desel_cuda[@]}" tests/test_cuda.py > "$out/pytest_cuda.log" 2>&1
echo "pytest rc=$?"; summary "$out/junit_cuda.xml"
stamp "tests: $files_ops -k $k_ops"
timeout "${OPS_TEST_TIMEOUT:-120}" python3 -m pytest -q -n 12 --timeout 100 -p no:cacheprovider --tb=short \
  --junitxml="$out/junit_ops.xml" -k "$k_ops" $files_ops > "$out/pytest_ops.log" 2>&1
echo "pytest rc=$?"; summary "$out/junit_ops.xml"
stamp bench
PYTHONPATH="$PWD" timeout "${BENCH_TIMEOUT:-60}" python3 csrc/cuda/bench_bandwidth.py --json "$out/bench.json" 2>&1 \
  | tee "$out/bench.log"
stamp done
