// Multi-tensor apply: one kernel launch walks many tensors.
//
// Every tensor is cut into chunks of `chunk` elements and every chunk is one thread block.
// A launch carries in its kernel arguments a table of tensors (D data pointers per tensor,
// its element count and its first block). Since CUDA 12.1 kernel arguments may take
// 32764 bytes on sm_70+, so one launch holds hundreds of tensors: a ~400-tensor model is one
// launch. A block finds its tensor by binary search over the first-block column (uniform
// across the block: constant-cache broadcasts). A launch holds at most Table<D>::kMax
// tensors and limits().max_blocks blocks; a tensor that does not fit the rest of a launch
// continues in the next one, its entry there starting at a chunk boundary (pointers
// advanced, count cut), so kernels never see the split.
//
// Indices are 64-bit throughout (tensors over 2^31 elements). Kernels copy nothing to the
// host and allocate nothing: the table travels by value, so a launch is capturable in a
// CUDA graph.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common.h"

namespace roga {
namespace cuda {
namespace mta {

constexpr int kThreads = 512;           // threads per block of the apply kernels
constexpr int kArgBytes = 32764;        // kernel-argument limit (CUDA >= 12.1, sm_70+)
constexpr int kTableBytes = 31 * 1024;  // the rest of kArgBytes is the op's own arguments

// Launch geometry; tests shrink it (roga_cuda._C._cuda_launch_limits) to force many launches,
// split tensors and chunk boundaries on small inputs.
struct Limits {
  int64_t chunk;        // elements per block; a multiple of 64, so every chunk of a 16-byte
                        // aligned tensor starts 16-byte aligned, whatever the dtype
  int64_t max_tensors;  // table entries per launch (also capped by the table's capacity)
  int64_t max_blocks;   // blocks per launch
};
constexpr Limits kDefaultLimits{32768, int64_t(1) << 30, int64_t(1) << 16};

inline Limits& limits() {
  static Limits l = kDefaultLimits;
  return l;
}

template <int D>
struct Table {
  static constexpr int kMax = (kTableBytes - 16) / (8 * D + 20);
  void* ptr[D][kMax];
  int64_t numel[kMax];
  int32_t first_block[kMax];
  int32_t slot[kMax];  // reductions: index of the entry's first chunk among the partials
  int32_t tag[kMax];   // op-specific (norm: list position on a tensor's first chunk, else -1)
  int32_t ntensors;
  int32_t chunk;
};

// One tensor (D pointers at one list position) as the host hands it to launch().
template <int D>
struct Item {
  void* ptr[D];
  int64_t numel;
  int32_t slot = 0;
  int32_t tag = -1;
};

inline int64_t num_chunks(int64_t numel, int64_t chunk) { return (numel + chunk - 1) / chunk; }

template <int D>
__device__ __forceinline__ int find_tensor(const Table<D>& tab) {
  // Largest t with first_block[t] <= blockIdx.x (every entry owns at least one block).
  int lo = 0, hi = tab.ntensors - 1;
  const int b = static_cast<int>(blockIdx.x);
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (tab.first_block[mid] <= b)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// F::operator()(tab, t, c, lo, hi): block works on elements [lo, hi) of entry t (its chunk c).
template <int D, typename F>
__global__ void __launch_bounds__(kThreads) apply_kernel(const __grid_constant__ Table<D> tab,
                                                         const __grid_constant__ F f) {
  const int t = find_tensor(tab);
  const int64_t c = static_cast<int64_t>(blockIdx.x) - tab.first_block[t];
  const int64_t lo = c * tab.chunk;
  const int64_t end = tab.numel[t];
  const int64_t hi = lo + tab.chunk < end ? lo + tab.chunk : end;
  f(tab, t, c, lo, hi);
}

// Runs f over items in list order, in as few launches as the table and limits allow.
// empty_gets_block: 0-element items still get one block (norm writes their partial and
// position); otherwise they are skipped. Pointers d with bit d of `fixed` set are per-tensor
// values (e.g. a step count), not arrays: a split tensor's later entries keep them as is.
template <int D, typename F>
void launch(const std::vector<Item<D>>& items, int64_t elem_size, bool empty_gets_block, const F& f,
            cudaStream_t stream, unsigned fixed = 0u) {
  static_assert(sizeof(Table<D>) + sizeof(F) <= kArgBytes, "kernel arguments over the CUDA limit");
  const Limits lim = limits();
  const int64_t chunk = lim.chunk;
  const int64_t max_t = std::min<int64_t>(lim.max_tensors, Table<D>::kMax);
  const int64_t max_b = lim.max_blocks;
  Table<D> tab;  // ~31 KiB on the host stack, copied into the launch
  tab.chunk = static_cast<int32_t>(chunk);
  int nt = 0;
  int64_t nb = 0;
  auto flush = [&]() {
    if (nt == 0) return;
    tab.ntensors = nt;
    apply_kernel<D, F><<<static_cast<unsigned>(nb), kThreads, 0, stream>>>(tab, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    nt = 0;
    nb = 0;
  };
  for (const auto& it : items) {
    int64_t nc = num_chunks(it.numel, chunk);
    if (nc == 0) {
      if (!empty_gets_block) continue;
      nc = 1;
    }
    for (int64_t c0 = 0; c0 < nc;) {
      const int64_t take = std::min(nc - c0, max_b - nb);
      const int64_t first = c0 * chunk;  // element offset of this piece
      for (int d = 0; d < D; ++d)
        tab.ptr[d][nt] = it.ptr[d] == nullptr || ((fixed >> d) & 1u) ? it.ptr[d]
                                                                     : static_cast<char*>(it.ptr[d]) + first * elem_size;
      tab.numel[nt] = std::min(it.numel - first, take * chunk);
      tab.first_block[nt] = static_cast<int32_t>(nb);
      tab.slot[nt] = static_cast<int32_t>(it.slot + c0);
      tab.tag[nt] = c0 == 0 ? it.tag : -1;
      ++nt;
      nb += take;
      c0 += take;
      if (nt == max_t || nb == max_b) flush();
    }
  }
  flush();
}

// ----------------------------------------------------------------------------- device helpers

template <typename T>
struct Acc {
  using type = float;  // float16, bfloat16, float32 storage: float32 math
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

__device__ __forceinline__ float absv(float x) { return fabsf(x); }
__device__ __forceinline__ double absv(double x) { return fabs(x); }

template <typename T>
struct alignas(16) Pack {
  T v[16 / sizeof(T)];
};

// Vectors per array per thread and iteration (1..4): about 32 elements of all loaded arrays
// in flight per thread, so that registers stay near 64 (two 512-thread blocks per SM) when
// 16-bit storage is widened to float32.
template <typename T>
constexpr int unroll_for(int loads) {
  const int u = 32 / (loads * static_cast<int>(16 / sizeof(T)));
  return u < 1 ? 1 : u > 4 ? 4 : u;
}

// For every element i of [lo, hi): e[d] = p[d][i] for each d in kLoad, op(e), then
// p[d][i] = e[d] for each d in kStore. Each element is loaded, transformed and stored by one
// thread, loads first, so an output may be one of the inputs. 16-byte vectors when every
// pointer is 16-byte aligned (chunks start at multiples of 64 elements), scalars otherwise.
// op sees only real elements (reductions accumulate in it).
template <typename T, int D, unsigned kLoad, unsigned kStore, int kU, typename Op>
__device__ __forceinline__ void for_each(T* const* p, int64_t lo, int64_t hi, Op& op) {
  constexpr int N = 16 / sizeof(T);
  using P = Pack<T>;
  uintptr_t bits = 0;
#pragma unroll
  for (int d = 0; d < D; ++d) bits |= reinterpret_cast<uintptr_t>(p[d]);
  const int64_t step = static_cast<int64_t>(blockDim.x);
  if ((bits & 15) == 0) {
    const int64_t nvec = (hi - lo) / N;
    const int64_t v0 = lo / N;
    for (int64_t i = threadIdx.x; i < nvec; i += kU * step) {
      P r[kU][D];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t j = i + u * step;
        if (j < nvec) {
#pragma unroll
          for (int d = 0; d < D; ++d)
            if ((kLoad >> d) & 1u) r[u][d] = reinterpret_cast<const P*>(p[d])[v0 + j];
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t j = i + u * step;
        if (j < nvec) {
#pragma unroll
          for (int k = 0; k < N; ++k) {
            T e[D];
#pragma unroll
            for (int d = 0; d < D; ++d)
              if ((kLoad >> d) & 1u) e[d] = r[u][d].v[k];
            op(e);
#pragma unroll
            for (int d = 0; d < D; ++d)
              if ((kStore >> d) & 1u) r[u][d].v[k] = e[d];
          }
#pragma unroll
          for (int d = 0; d < D; ++d)
            if ((kStore >> d) & 1u) reinterpret_cast<P*>(p[d])[v0 + j] = r[u][d];
        }
      }
    }
    lo += nvec * N;  // the tail (fewer than N elements, only at a tensor's end) goes below
    if (lo + threadIdx.x < hi) {
      const int64_t i = lo + threadIdx.x;
      T e[D];
#pragma unroll
      for (int d = 0; d < D; ++d)
        if ((kLoad >> d) & 1u) e[d] = p[d][i];
      op(e);
#pragma unroll
      for (int d = 0; d < D; ++d)
        if ((kStore >> d) & 1u) p[d][i] = e[d];
    }
    return;
  }
  for (int64_t i = lo + threadIdx.x; i < hi; i += kU * step) {
    T r[kU][D];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t j = i + u * step;
      if (j < hi) {
#pragma unroll
        for (int d = 0; d < D; ++d)
          if ((kLoad >> d) & 1u) r[u][d] = p[d][j];
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t j = i + u * step;
      if (j < hi) {
        op(r[u]);
#pragma unroll
        for (int d = 0; d < D; ++d)
          if ((kStore >> d) & 1u) p[d][j] = r[u][d];
      }
    }
  }
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums every thread's v[e] (e < M) over the block in a fixed order (same input, same bits);
// thread e (< M) writes the sum to out[e]. Every thread of the block must call it.
template <int M>
__device__ __forceinline__ void block_sum(const double (&v)[M], double* out) {
  __shared__ double sh[32][M];  // up to 1024 threads
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // a previous call's readers are done with sh
#pragma unroll
  for (int e = 0; e < M; ++e) {
    const double s = warp_sum(v[e]);
    if (lane == 0) sh[warp][e] = s;
  }
  __syncthreads();
  if (threadIdx.x < M) {
    double s = 0;
    const int nw = blockDim.x >> 5;
    for (int w = 0; w < nw; ++w) s += sh[w][threadIdx.x];
    out[threadIdx.x] = s;
  }
}

// A scalar argument as kernels see it: a host value, or a 0-d float32/float64 device tensor
// read by the kernel itself (no host synchronisation; a graph replay reads the current value).
struct DevScalar {
  const void* ptr;
  int is_double;
  double value;

  template <typename C>
  __device__ __forceinline__ C get() const {
    if (ptr == nullptr) return static_cast<C>(value);
    return is_double ? static_cast<C>(*static_cast<const double*>(ptr))
                     : static_cast<C>(*static_cast<const float*>(ptr));
  }
};

inline DevScalar dev_scalar(const Scalar& s) {
  if (!s.tensor.defined()) return {nullptr, 0, s.value};
  return {s.tensor.data_ptr(), s.tensor.scalar_type() == at::kDouble, 0.0};
}

// ------------------------------------------------------------------------------ host helpers

// List positions grouped by dtype (list order within a group), groups by first appearance.
inline std::vector<std::pair<at::ScalarType, std::vector<int>>> by_dtype(const TensorList& ts) {
  std::vector<std::pair<at::ScalarType, std::vector<int>>> groups;
  for (int i = 0; i < static_cast<int>(ts.size()); ++i) {
    const at::ScalarType t = ts[i].scalar_type();
    auto g = std::find_if(groups.begin(), groups.end(), [&](const auto& x) { return x.first == t; });
    if (g == groups.end()) {
      groups.push_back({t, {}});
      g = groups.end() - 1;
    }
    g->second.push_back(i);
  }
  return groups;
}

// f(T{}) with T the storage type of dtype t.
template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float()); break;
    case at::kDouble: f(double()); break;
    case at::kHalf: f(c10::Half()); break;
    case at::kBFloat16: f(c10::BFloat16()); break;
    default: TORCH_CHECK_TYPE(false, "roga_cuda: unsupported dtype ", t);
  }
}

// f(std::integral_constant<int, K>{}) for 1 <= k <= kMaxLists.
template <typename F>
void dispatch_k(int k, F&& f) {
  static_assert(kMaxLists == 8, "extend dispatch_k");
  switch (k) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 6: f(std::integral_constant<int, 6>()); break;
    case 7: f(std::integral_constant<int, 7>()); break;
    case 8: f(std::integral_constant<int, 8>()); break;
    default: TORCH_CHECK_VALUE(false, "roga_cuda: ", k, " lists; the CUDA kernels take 1 to ", kMaxLists);
  }
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace mta
}  // namespace cuda
}  // namespace roga
