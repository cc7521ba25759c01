// combine_: out[i] = sum_k weights[k] * lists[k][i] for K <= kMaxLists lists, one pass. out
// may be one of the inputs: each element is read by the thread that writes it, loads first.
// Weights are host values (in the kernel arguments) or a float32/float64 device tensor that
// the kernel reads (no host synchronisation).
#include <torch/library.h>

#include "../entry.h"
#include "multi_tensor_apply.cuh"

namespace roga {
namespace cuda {
namespace {
using namespace mta;

template <typename T, int K>
struct CombineOp {
  using C = acc_t<T>;
  C w[K];
  __device__ __forceinline__ void operator()(T (&e)[K + 1]) const {  // out, x_0 .. x_{K-1}
    C acc = w[0] * static_cast<C>(e[1]);
#pragma unroll
    for (int a = 1; a < K; ++a) acc += w[a] * static_cast<C>(e[a + 1]);
    e[0] = static_cast<T>(acc);
  }
};

template <typename T, int K>
struct CombineChunk {
  double w[K];
  const void* wt;  // device weights, or nullptr
  int wt_double;

  __device__ __forceinline__ void operator()(const Table<K + 1>& tab, int t, int64_t, int64_t lo,
                                             int64_t hi) const {
    using C = acc_t<T>;
    T* p[K + 1];
#pragma unroll
    for (int d = 0; d <= K; ++d) p[d] = static_cast<T*>(tab.ptr[d][t]);
    CombineOp<T, K> op;
#pragma unroll
    for (int a = 0; a < K; ++a)
      op.w[a] = wt == nullptr ? static_cast<C>(w[a])
                : wt_double   ? static_cast<C>(static_cast<const double*>(wt)[a])
                              : static_cast<C>(static_cast<const float*>(wt)[a]);
    constexpr unsigned kLoad = ((1u << (K + 1)) - 1) & ~1u;
    for_each<T, K + 1, kLoad, 1u, unroll_for<T>(K)>(p, lo, hi, op);
  }
};

}  // namespace

void combine_(const TensorList& out, const std::vector<TensorList>& lists, const Weights& weights) {
  const int k = static_cast<int>(lists.size());
  const c10::cuda::CUDAGuard guard(out[0].device());
  const cudaStream_t stream = current_stream();
  dispatch_k(k, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    const void* wt = weights.tensor.defined() ? weights.tensor.data_ptr() : nullptr;
    const int wt_double = weights.tensor.defined() && weights.tensor.scalar_type() == at::kDouble;
    for (const auto& group : by_dtype(out)) {
      dispatch_float(group.first, [&](auto tag) {
        using T = decltype(tag);
        std::vector<Item<K + 1>> items;
        for (int i : group.second) {
          Item<K + 1> it;
          it.ptr[0] = out[i].data_ptr();
          for (int a = 0; a < K; ++a) it.ptr[a + 1] = lists[a][i].data_ptr();
          it.numel = out[i].numel();
          items.push_back(it);
        }
        CombineChunk<T, K> f{};
        for (int a = 0; a < K; ++a) f.w[a] = wt == nullptr ? weights.values[a] : 0.0;
        f.wt = wt;
        f.wt_double = wt_double;
        launch(items, sizeof(T), false, f, stream);
      });
    }
  });
}

}  // namespace cuda
}  // namespace roga

TORCH_LIBRARY_IMPL(roga_cuda, CUDA, m) {
  using namespace roga;
  m.impl("combine_", &roga::entry::combine_<roga::cuda::combine_>);
}
