#!/usr/bin/env bash
# Compile and link the CUDA kernels against the CUDA 13.0 build of torch, and import the
# result. No GPU is needed (nor used): this proves the build, the GPU tests prove the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${XDG_CACHE_HOME:-$HOME/.cache}/roga_cuda/venv-cu130"
if ! "$venv/bin/python" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.14.1 ninja setuptools wheel numpy
fi
# CUDA_HOME must be the real toolkit folder (the nvcc on PATH may be a wrapper script).
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_path=$(command -v nvcc)
  real=$(sed -n 's/^exec \(.*\)\/bin\/nvcc .*/\1/p' "$nvcc_path" 2>/dev/null | head -1)
  export CUDA_HOME="${real:-$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")}"
fi
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "no nvcc under CUDA_HOME=$CUDA_HOME"; exit 1; }
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
git ls-files -z | xargs -0 -I{} cp --parents {} "$build/"  # the tracked sources only
cd "$build"
echo "CUDA build: CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
"$venv/bin/python" setup.py -q build_ext --inplace 2>&1 | grep -vE "^(ninja: |\[[0-9]+/[0-9]+\] )" | tail -40
"$venv/bin/python" - <<'PY'
import torch
from roga_cuda import _C, ops
assert _C.WITH_CUDA, "the extension was built without the CUDA kernels"
print("CUDA build OK: torch", torch.__version__, "| cuda backend:", ops.backends()["cuda"])
PY
