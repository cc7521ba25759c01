// gram: G[a, b] = sum_i <lists[a][i], lists[b][i]> for K <= kMaxLists lists in one pass: each
// element of every list is read once, and each thread keeps the K(K+1)/2 running products.
//
// Deterministic two stages, no float atomics: every chunk's block writes its K(K+1)/2 sums
// (float32 math per thread for 16/32-bit storage, double across the block) to its own slot;
// one block then sums the slots in a fixed order (a warp per entry) and writes both halves
// of the symmetric matrix from one value, so G is exactly symmetric.
#include <torch/library.h>

#include "../entry.h"
#include "multi_tensor_apply.cuh"

namespace roga {
namespace cuda {
namespace {
using namespace mta;

template <typename T, int K>
struct GramOp {
  using C = acc_t<T>;
  static constexpr int kTri = K * (K + 1) / 2;
  C acc[kTri];
  __device__ __forceinline__ void operator()(T (&e)[K]) {
    C x[K];
#pragma unroll
    for (int a = 0; a < K; ++a) x[a] = static_cast<C>(e[a]);
    int idx = 0;
#pragma unroll
    for (int a = 0; a < K; ++a)
#pragma unroll
      for (int b = 0; b <= a; ++b, ++idx) acc[idx] += x[a] * x[b];
  }
};

template <typename T, int K>
struct GramChunk {
  static constexpr int kTri = K * (K + 1) / 2;
  double* partial;  // [slot][kTri]

  __device__ __forceinline__ void operator()(const Table<K>& tab, int t, int64_t c, int64_t lo, int64_t hi) const {
    using C = acc_t<T>;
    T* p[K];
#pragma unroll
    for (int a = 0; a < K; ++a) p[a] = static_cast<T*>(tab.ptr[a][t]);
    GramOp<T, K> op;
#pragma unroll
    for (int e = 0; e < kTri; ++e) op.acc[e] = C(0);
    for_each<T, K, (1u << K) - 1, 0u, unroll_for<T>(K)>(p, lo, hi, op);
    double v[kTri];
#pragma unroll
    for (int e = 0; e < kTri; ++e) v[e] = static_cast<double>(op.acc[e]);
    block_sum<kTri>(v, partial + (tab.slot[t] + c) * kTri);
  }
};

constexpr int kFinalThreads = 1024;

template <typename OutT>
__global__ void __launch_bounds__(kFinalThreads)
    gram_finalize(const double* partial, int64_t nslots, int k, OutT* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int tri = k * (k + 1) / 2;
  for (int e = warp; e < tri; e += nwarps) {
    double s = 0;
    for (int64_t j = lane; j < nslots; j += 32) s += partial[j * tri + e];
    s = warp_sum(s);
    if (lane == 0) {
      int a = 0;
      while ((a + 1) * (a + 2) / 2 <= e) ++a;  // e = a(a+1)/2 + b, b <= a
      const int b = e - a * (a + 1) / 2;
      out[a * k + b] = out[b * k + a] = static_cast<OutT>(s);
    }
  }
}

}  // namespace

at::Tensor gram(const std::vector<TensorList>& lists) {
  const int k = static_cast<int>(lists.size());
  const TensorList& first = lists[0];
  const c10::cuda::CUDAGuard guard(first[0].device());
  const cudaStream_t stream = current_stream();
  const int n = static_cast<int>(first.size());
  const int64_t chunk = limits().chunk;
  const int tri = k * (k + 1) / 2;
  std::vector<int32_t> slot(n);
  int64_t nslots = 0;
  for (int i = 0; i < n; ++i) {
    slot[i] = static_cast<int32_t>(nslots);
    nslots += num_chunks(first[i].numel(), chunk);  // 0-element tensors: no slot, no block
    TORCH_CHECK(nslots < INT32_MAX, "gram: too many chunks for one call");
  }
  at::Tensor ws = at::empty({std::max<int64_t>(1, nslots * tri)}, first[0].options().dtype(at::kDouble));
  double* partial = ws.data_ptr<double>();

  dispatch_k(k, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    for (const auto& group : by_dtype(first)) {
      dispatch_float(group.first, [&](auto tag) {
        using T = decltype(tag);
        std::vector<Item<K>> items;
        for (int i : group.second) {
          Item<K> it;
          for (int a = 0; a < K; ++a) it.ptr[a] = lists[a][i].data_ptr();
          it.numel = first[i].numel();
          it.slot = slot[i];
          items.push_back(it);
        }
        launch(items, sizeof(T), false, GramChunk<T, K>{partial}, stream);
      });
    }
  });

  at::Tensor out = at::empty({k, k}, first[0].options().dtype(reduction_dtype(first)));
  if (out.scalar_type() == at::kDouble)
    gram_finalize<double><<<1, kFinalThreads, 0, stream>>>(partial, nslots, k, out.data_ptr<double>());
  else
    gram_finalize<float><<<1, kFinalThreads, 0, stream>>>(partial, nslots, k, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace cuda
}  // namespace roga

TORCH_LIBRARY_IMPL(roga_cuda, CUDA, m) {
  using namespace roga;
  m.impl("gram", &roga::entry::gram<roga::cuda::gram>);
}
