#!/usr/bin/env bash
# On a GPU machine (the device tool): build the extension in place, run the CUDA tests, then
# the quick bandwidth check. Logs go to $OUT (or ./gpu_out). Usage: bash csrc/cuda/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
out="${OUT:-gpu_out}"
mkdir -p "$out"
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
stamp build
if ! TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    python3 setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  grep -E "error|Error" "$out/build.log" | head -40
  exit 1
fi
stamp tests
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -n 8 -p no:cacheprovider --tb=short -rfEs \
  -k "cuda-cuda or test_cuda" tests/test_ops.py tests/test_ops_errors.py tests/test_cuda.py \
  > "$out/pytest.log" 2>&1
echo "pytest rc=$?"
grep -E "^(FAILED|ERROR|SKIPPED)" "$out/pytest.log" | cut -c1-300 | head -40
tail -n 3 "$out/pytest.log"
stamp bench
timeout "${BENCH_TIMEOUT:-90}" python3 csrc/cuda/bench_bandwidth.py --sweep --json "$out/bench.json" 2>&1 | tee "$out/bench.log"
stamp done
