// restore_: params <- backup, bit-exact. Elements are copied as raw unsigned integers of
// their size (no float round trip can touch NaN payloads), so lists are grouped by element
// size, not dtype: float32 and float16/bfloat16 mixes cost one launch per size.
#include <torch/library.h>

#include "../entry.h"
#include "multi_tensor_apply.cuh"

namespace roga {
namespace cuda {
namespace {
using namespace mta;

template <typename U>
struct CopyOp {
  __device__ __forceinline__ void operator()(U (&e)[2]) const { e[0] = e[1]; }
};

template <typename U>
struct RestoreChunk {
  __device__ __forceinline__ void operator()(const Table<2>& tab, int t, int64_t, int64_t lo, int64_t hi) const {
    U* p[2] = {static_cast<U*>(tab.ptr[0][t]), static_cast<U*>(tab.ptr[1][t])};
    CopyOp<U> op;
    for_each<U, 2, 0b10u, 0b01u, unroll_for<U>(1)>(p, lo, hi, op);
  }
};

template <typename U>
void run(const TensorList& params, const TensorList& backup, const std::vector<int>& pos, cudaStream_t stream) {
  std::vector<Item<2>> items;
  for (int i : pos) items.push_back({{params[i].data_ptr(), backup[i].data_ptr()}, params[i].numel()});
  launch(items, sizeof(U), false, RestoreChunk<U>{}, stream);
}

}  // namespace

void restore_(const TensorList& params, const TensorList& backup) {
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = current_stream();
  std::vector<int> by_size[3];  // 2, 4, 8 bytes
  for (int i = 0; i < static_cast<int>(params.size()); ++i) {
    const auto e = params[i].element_size();
    by_size[e == 2 ? 0 : e == 4 ? 1 : 2].push_back(i);
  }
  if (!by_size[0].empty()) run<uint16_t>(params, backup, by_size[0], stream);
  if (!by_size[1].empty()) run<uint32_t>(params, backup, by_size[1], stream);
  if (!by_size[2].empty()) run<uint64_t>(params, backup, by_size[2], stream);
}

}  // namespace cuda
}  // namespace roga

TORCH_LIBRARY_IMPL(roga_cuda, CUDA, m) {
  using namespace roga;
  m.impl("restore_", &roga::entry::restore_<roga::cuda::restore_>);
}
