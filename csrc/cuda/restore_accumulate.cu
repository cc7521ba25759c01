// restore_accumulate_: params <- backup; acc += weight * grads, one pass (b, a, g read once,
// p, a written once: 20 bytes per float32 element).
#include <torch/library.h>

#include "../entry.h"
#include "multi_tensor_apply.cuh"

namespace roga {
namespace cuda {
namespace {
using namespace mta;

template <typename T>
struct RestoreAccOp {
  using C = acc_t<T>;
  C w;
  __device__ __forceinline__ void operator()(T (&e)[4]) const {  // p, b, a, g
    e[0] = e[1];  // raw storage copy: bit-exact
    e[2] = static_cast<T>(static_cast<C>(e[2]) + w * static_cast<C>(e[3]));
  }
};

template <typename T>
struct RestoreAccChunk {
  DevScalar weight;
  __device__ __forceinline__ void operator()(const Table<4>& tab, int t, int64_t, int64_t lo, int64_t hi) const {
    using C = acc_t<T>;
    T* p[4];
#pragma unroll
    for (int d = 0; d < 4; ++d) p[d] = static_cast<T*>(tab.ptr[d][t]);
    RestoreAccOp<T> op{weight.get<C>()};
    for_each<T, 4, 0b1110u, 0b0101u, unroll_for<T>(3)>(p, lo, hi, op);
  }
};

}  // namespace

void restore_accumulate_(const TensorList& params, const TensorList& backup, const TensorList& acc,
                         const TensorList& grads, const Scalar& weight) {
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = current_stream();
  const DevScalar w = dev_scalar(weight);
  for (const auto& group : by_dtype(params)) {
    dispatch_float(group.first, [&](auto tag) {
      using T = decltype(tag);
      std::vector<Item<4>> items;
      for (int i : group.second)
        items.push_back({{params[i].data_ptr(), backup[i].data_ptr(), acc[i].data_ptr(), grads[i].data_ptr()},
                         params[i].numel()});
      launch(items, sizeof(T), false, RestoreAccChunk<T>{w}, stream);
    });
  }
}

}  // namespace cuda
}  // namespace roga

TORCH_LIBRARY_IMPL(roga_cuda, CUDA, m) {
  using namespace roga;
  m.impl("restore_accumulate_", &roga::entry::restore_accumulate_<roga::cuda::restore_accumulate_>);
}
