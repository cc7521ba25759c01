// norm: global (and per-tensor) L2 norm; with params the ASAM norm || (|p| + eta) * x ||.
//
// Two stages and no float atomics, so the same input gives the same bits. (1) The block of
// every chunk writes its sum of squares (float32 math per thread for 16/32-bit storage,
// double across the block) to its own slot of a partials array. Slots are laid out in list
// order whatever the dtype groups, at least one per tensor (0-element tensors get a block
// that writes 0), and the block of a tensor's first chunk records where the tensor's slots
// start. (2) One block sums each tensor's slots (a warp per tensor), then the tensors, in a
// fixed order, and writes the square roots. Nothing is copied to the host.
#include <torch/library.h>

#include "../entry.h"
#include "multi_tensor_apply.cuh"

namespace roga {
namespace cuda {
namespace {
using namespace mta;

template <typename T, bool kAsam>
struct SumSq {
  using C = acc_t<T>;
  C eta;
  C acc;
  __device__ __forceinline__ void operator()(T (&e)[kAsam ? 2 : 1]) {
    C x = static_cast<C>(e[0]);
    if (kAsam) x *= absv(static_cast<C>(e[kAsam ? 1 : 0])) + eta;
    acc += x * x;
  }
};

template <typename T, bool kAsam>
struct NormChunk {
  static constexpr int D = kAsam ? 2 : 1;  // x (and p)
  double* partial;
  int32_t* starts;
  double eta;

  __device__ __forceinline__ void operator()(const Table<D>& tab, int t, int64_t c, int64_t lo,
                                             int64_t hi) const {
    using C = acc_t<T>;
    T* p[D];
#pragma unroll
    for (int d = 0; d < D; ++d) p[d] = static_cast<T*>(tab.ptr[d][t]);
    SumSq<T, kAsam> op{static_cast<C>(eta), C(0)};
    for_each<T, D, (1u << D) - 1, 0u, unroll_for<T>(D)>(p, lo, hi, op);
    const double v[1] = {static_cast<double>(op.acc)};
    double s[1];
    block_sum<1>(v, s);
    if (threadIdx.x == 0) {
      partial[tab.slot[t] + c] = s[0];
      if (c == 0 && tab.tag[t] >= 0) starts[tab.tag[t]] = tab.slot[t];
    }
  }
};

constexpr int kFinalThreads = 1024;

template <typename OutT>
__global__ void __launch_bounds__(kFinalThreads)
    norm_finalize(const double* partial, const int32_t* starts, int n, int64_t nslots, double* sq,
                  OutT* total, OutT* per) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int t = warp; t < n; t += nwarps) {
    const int64_t b = starts[t], e = t + 1 < n ? starts[t + 1] : nslots;
    double s = 0;
    for (int64_t k = b + lane; k < e; k += 32) s += partial[k];
    s = warp_sum(s);
    if (lane == 0) sq[t] = s;
  }
  __syncthreads();  // sq is visible to the whole block after the barrier
  double s = 0;
  for (int t = threadIdx.x; t < n; t += blockDim.x) s += sq[t];
  const double v[1] = {s};
  double tot[1];
  block_sum<1>(v, tot);
  if (threadIdx.x == 0) *total = static_cast<OutT>(sqrt(tot[0]));
  if (per != nullptr)
    for (int t = threadIdx.x; t < n; t += blockDim.x) per[t] = static_cast<OutT>(sqrt(sq[t]));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> norm(const TensorList& ts, const TensorList* params, double eta,
                                        bool per_tensor) {
  const c10::cuda::CUDAGuard guard(ts[0].device());
  const cudaStream_t stream = current_stream();
  const int n = static_cast<int>(ts.size());
  const int64_t chunk = limits().chunk;
  std::vector<int32_t> slot(n);
  int64_t nslots = 0;
  for (int i = 0; i < n; ++i) {
    slot[i] = static_cast<int32_t>(nslots);
    nslots += std::max<int64_t>(1, num_chunks(ts[i].numel(), chunk));
    TORCH_CHECK(nslots < INT32_MAX, "norm: too many chunks for one call");
  }
  // Workspace from the caching allocator on this stream (graph-capturable): partials, per-tensor
  // sums of squares, per-tensor first slots.
  at::Tensor ws = at::empty({(nslots + n) * 8 + int64_t(n) * 4}, ts[0].options().dtype(at::kByte));
  double* partial = reinterpret_cast<double*>(ws.data_ptr<uint8_t>());
  double* sq = partial + nslots;
  int32_t* starts = reinterpret_cast<int32_t*>(sq + n);

  for (const auto& group : by_dtype(ts)) {
    dispatch_float(group.first, [&](auto tag) {
      using T = decltype(tag);
      if (params != nullptr) {
        std::vector<Item<2>> items;
        for (int i : group.second) items.push_back({{ts[i].data_ptr(), (*params)[i].data_ptr()}, ts[i].numel(), slot[i], i});
        launch(items, sizeof(T), true, NormChunk<T, true>{partial, starts, eta}, stream);
      } else {
        std::vector<Item<1>> items;
        for (int i : group.second) items.push_back({{ts[i].data_ptr()}, ts[i].numel(), slot[i], i});
        launch(items, sizeof(T), true, NormChunk<T, false>{partial, starts, eta}, stream);
      }
    });
  }

  const auto opts = ts[0].options().dtype(reduction_dtype(ts));
  at::Tensor total = at::empty({}, opts);
  at::Tensor per = per_tensor ? at::empty({n}, opts) : at::Tensor();
  if (opts.dtype() == at::kDouble) {
    norm_finalize<double><<<1, kFinalThreads, 0, stream>>>(partial, starts, n, nslots, sq, total.data_ptr<double>(),
                                                           per_tensor ? per.data_ptr<double>() : nullptr);
  } else {
    norm_finalize<float><<<1, kFinalThreads, 0, stream>>>(partial, starts, n, nslots, sq, total.data_ptr<float>(),
                                                          per_tensor ? per.data_ptr<float>() : nullptr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {total, per};
}

}  // namespace cuda
}  // namespace roga

TORCH_LIBRARY_IMPL(roga_cuda, CUDA, m) {
  using namespace roga;
  m.impl("norm", &roga::entry::norm<roga::cuda::norm>);
  m.impl("asam_norm", &roga::entry::asam_norm<roga::cuda::norm>);
}
