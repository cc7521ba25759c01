#!/usr/bin/env bash
# One short call on the lent GPU (the device tool): build the CUDA extension in the
# background while the Triton GPU tests run, then the primitive benchmark for every
# backend, the CUDA tests with failures named, and the optimizer-step benchmarks (graphed
# and eager, memory-bound, end to end). Logs go to $OUT as they are written. About 8
# minutes at most (the timeouts); give the call 9.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
out="${OUT:-gpu_out}"; mkdir -p "$out"
t0=$(date +%s); stamp() { echo "== [$(( $(date +%s) - t0 ))s] $*" | tee -a "$out/steps.log"; }
# the image's default g++ wrapper links libstdc++ statically, which crashes C++ errors (csrc/cuda/gpu_check.sh)
for c in /usr/bin/x86_64-linux-gnu-g++-13 /usr/bin/g++-13 /usr/bin/x86_64-linux-gnu-g++-12 /usr/bin/g++-12; do
  if [ -x "$c" ] && [ -x "${c/g++/gcc}" ]; then export CXX="$c" CC="${c/g++/gcc}"; break; fi
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
stamp "build (background)"
(TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=12 python3 setup.py build_ext --inplace > "$out/build.log" 2>&1; echo "build rc=$?" >> "$out/build.log") &
build=$!
stamp "triton tests"
timeout 75 python3 -m pytest -q -n 6 -p no:cacheprovider -rfE --tb=line tests/test_triton.py tests/test_ops.py \
  -k "triton" > "$out/triton_tests.log" 2>&1; echo "triton tests rc=$?" >> "$out/triton_tests.log"
tail -5 "$out/triton_tests.log"
wait $build; tail -1 "$out/build.log"
stamp "bench_ops"
timeout 60 python3 -m benchmarks.bench_ops --lists resnet34 aasist --reps 10 --json "$out/bench_ops.json" > "$out/bench_ops.log" 2>&1
grep -E "roga_cycle|pcgrad_pair|^bandwidth" "$out/bench_ops.log"
stamp "cuda tests"
timeout 70 python3 -m pytest -q -n 8 -p no:cacheprovider -rfE --tb=line tests/test_cuda.py tests/test_ops.py tests/test_ops_errors.py \
  tests/test_aggregator.py tests/test_weightings.py \
  -k "cuda" > "$out/cuda_tests.log" 2>&1; echo "cuda tests rc=$?" >> "$out/cuda_tests.log"
grep -E "FAILED|ERROR|passed|failed" "$out/cuda_tests.log" | tail -25
# issue 12: optimizer steps replayed from CUDA graphs vs eager, the memory-bound steps and
# the public-code ratio, then the end-to-end training steps (eager and graphed RoGA)
stamp "bench_graphs"
timeout 60 python3 -m benchmarks.bench_graphs --lists aasist resnet34 --json "$out/bench_graphs.json" \
  > "$out/bench_graphs.log" 2>&1; echo "bench_graphs rc=$?" >> "$out/bench_graphs.log"; tail -20 "$out/bench_graphs.log"
stamp "bench_optim"
timeout 60 python3 -m benchmarks.bench_optim --device cuda --lists aasist resnet34 --json "$out/bench_optim.json" \
  > "$out/bench_optim.log" 2>&1; echo "bench_optim rc=$?" >> "$out/bench_optim.log"; tail -30 "$out/bench_optim.log"
stamp "bench_e2e"
timeout 120 python3 -m benchmarks.bench_e2e --device cuda --json "$out/bench_e2e.json" \
  > "$out/bench_e2e.log" 2>&1; echo "bench_e2e rc=$?" >> "$out/bench_e2e.log"; tail -14 "$out/bench_e2e.log"
stamp done
