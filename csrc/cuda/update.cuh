// Shared by the fused base updates (sgd.cu, adam.cu): the table layout, the combined
// gradient, AMP's skip, the step counters, the kernel functor (Chunk) and the
// host-side launcher (launch_update).
//
// Each tensor's entry holds kFixedPtrs pointers and then its K gradients:
//   0 params (written)  1 source (read; == params without a source)  2 grad_out (or null)
//   3, 4, 5 optimizer state (or null)  6 the step count (a float, not an array: fixed)
// A thread owns an element from its loads to its stores, so any written list may be the
// read list at its own position (grad_out may be grads[0]). The element loop is scalar and
// grid-strided (coalesced): the updates read and write 5 to 9 arrays and are memory bound.
#pragma once

#include <array>

#include "multi_tensor_apply.cuh"

namespace roga {
namespace cuda {
namespace update {
using namespace mta;

constexpr int kFixedPtrs = 7;
constexpr unsigned kStepBit = 1u << 6;

template <typename T, int K>
struct Common {
  using C = acc_t<T>;
  double w[2 * K];  // the combination's row, then (with `direct`) the direct row
  const void* wt;  // device weights, or nullptr
  int wt_double;
  bool direct;  // params -= lr * sum_k w[K + k] * grads[k] after the update (common.h UpdateArgs)
  DevScalar lr;
  const float* found_inf;  // or nullptr
  bool maximize;

  __device__ __forceinline__ bool skip() const { return found_inf != nullptr && *found_inf != 0.0f; }

  // params <- source, bit-exact (a skipped update still undoes a perturbation it folded in)
  __device__ __forceinline__ void restore(const Table<kFixedPtrs + K>& tab, int t, int64_t lo, int64_t hi) const {
    T* p = static_cast<T*>(tab.ptr[0][t]);
    const T* src = static_cast<const T*>(tab.ptr[1][t]);
    if (src == p) return;
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) p[i] = src[i];
  }

  __device__ __forceinline__ void weights(C (&out)[2 * K]) const {
#pragma unroll
    for (int a = 0; a < 2 * K; ++a)
      out[a] = a >= K && !direct ? C(0)  // a K-weight tensor has no second row to read
               : wt == nullptr   ? static_cast<C>(w[a])
               : wt_double       ? static_cast<C>(static_cast<const double*>(wt)[a])
                                 : static_cast<C>(static_cast<const float*>(wt)[a]);
  }

  // The combined gradient of element i (stored to grad_out before `maximize` applies) and,
  // with `direct`, the direct row's combination in d.
  __device__ __forceinline__ C grad(const Table<kFixedPtrs + K>& tab, int t, int64_t i, const C (&wk)[2 * K],
                                    C& d) const {
    C g = 0;
    d = 0;
#pragma unroll
    for (int a = 0; a < K; ++a) {
      const C x = static_cast<C>(static_cast<const T*>(tab.ptr[kFixedPtrs + a][t])[i]);
      g = a == 0 ? wk[0] * x : g + wk[a] * x;
      if (direct) d = a == 0 ? wk[K] * x : d + wk[K + a] * x;
    }
    if (tab.ptr[2][t] != nullptr) static_cast<T*>(tab.ptr[2][t])[i] = static_cast<T>(g);
    return maximize ? -g : g;
  }
};

// steps[i] += 1 unless found_inf: after the update kernel, which read the old counts.
struct StepChunk {
  const float* found_inf;
  __device__ __forceinline__ void operator()(const Table<1>& tab, int t, int64_t, int64_t, int64_t) const {
    if (threadIdx.x == 0 && (found_inf == nullptr || *found_inf == 0.0f)) *static_cast<float*>(tab.ptr[0][t]) += 1.0f;
  }
};

inline void increment_steps(const TensorList& steps, const float* found_inf, cudaStream_t stream) {
  std::vector<Item<1>> items;
  for (const auto& s : steps) items.push_back({{s.data_ptr()}, 1});
  if (!items.empty()) launch(items, sizeof(float), false, StepChunk{found_inf}, stream);
}

inline void* ptr_or_null(const TensorList& ts, int i) { return ts.empty() ? nullptr : ts[i].data_ptr(); }

// The optimizer-state lists of table rows 3, 4, 5; an empty list leaves its row null.
using StateLists = std::array<TensorList, 3>;

template <int K>
Item<kFixedPtrs + K> item(const UpdateArgs& a, int i, const StateLists& state) {
  Item<kFixedPtrs + K> it;
  it.ptr[0] = a.params[i].data_ptr();
  it.ptr[1] = a.source.empty() ? it.ptr[0] : a.source[i].data_ptr();
  it.ptr[2] = a.grad_out.empty() ? nullptr : a.grad_out[i].data_ptr();
  for (int s = 0; s < 3; ++s) it.ptr[3 + s] = ptr_or_null(state[s], i);
  it.ptr[6] = a.steps.empty() ? nullptr : a.steps[i].data_ptr();
  for (int k = 0; k < K; ++k) it.ptr[kFixedPtrs + k] = a.grads[k][i].data_ptr();
  it.numel = a.params[i].numel();
  return it;
}

template <typename T, int K>
Common<T, K> common(const UpdateArgs& a, bool maximize) {
  Common<T, K> c{};
  c.direct = a.weights.size() == 2 * K;
  for (int k = 0; k < (c.direct ? 2 * K : K); ++k) c.w[k] = a.weights.tensor.defined() ? 0.0 : a.weights.values[k];
  c.wt = a.weights.tensor.defined() ? a.weights.tensor.data_ptr() : nullptr;
  c.wt_double = a.weights.tensor.defined() && a.weights.tensor.scalar_type() == at::kDouble;
  c.lr = dev_scalar(a.lr);
  c.found_inf = a.found_inf.defined() ? a.found_inf.data_ptr<float>() : nullptr;
  c.maximize = maximize;
  return c;
}

// The functor an update launches. Op (sgd.cu's Sgd, adam.cu's Adam) holds the
// hyper-parameters `h` and, in tile(), the element loop of one tile with the weights read.
template <typename Op, typename T, int K>
struct Chunk {
  Common<T, K> c;
  Op op;

  __device__ __forceinline__ void operator()(const Table<kFixedPtrs + K>& tab, int t, int64_t, int64_t lo,
                                             int64_t hi) const {
    if (c.skip()) {  // AMP's skipped step: only the folded restore (source -> params) happens
      c.restore(tab, t, lo, hi);
      return;
    }
    acc_t<T> wk[2 * K];
    c.weights(wk);
    op.tile(c, tab, t, lo, hi, wk);
  }
};

// The host side of an update: one launch series per (K, dtype), then the step counters.
template <typename Op>
void launch_update(const UpdateArgs& a, const StateLists& state, const Op& op) {
  if (a.skip) {  // found_inf read on the host: only the folded restore happens
    if (!a.source.empty()) restore_(a.params, a.source);
    return;
  }
  const c10::cuda::CUDAGuard guard(a.params[0].device());
  const cudaStream_t stream = current_stream();
  dispatch_k(static_cast<int>(a.grads.size()), [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    for (const auto& group : by_dtype(a.params)) {
      dispatch_float(group.first, [&](auto tag) {
        using T = decltype(tag);
        std::vector<Item<kFixedPtrs + K>> items;
        for (int i : group.second) items.push_back(item<K>(a, i, state));
        launch(items, sizeof(T), false, Chunk<Op, T, K>{common<T, K>(a, op.h.maximize), op}, stream, kStepBit);
      });
    }
  });
  increment_steps(a.steps, a.found_inf.defined() ? a.found_inf.data_ptr<float>() : nullptr, stream);
}

}  // namespace update
}  // namespace cuda
}  // namespace roga
