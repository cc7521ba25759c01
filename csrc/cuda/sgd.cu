// sgd_: torch.optim.SGD's update (momentum, dampening, Nesterov, weight decay, maximize) on
// the combined gradient, in one pass; see update.cuh for the table and common.h for the op.
#include <torch/library.h>

#include "../entry.h"
#include "update.cuh"

namespace roga {
namespace cuda {
namespace {
using namespace update;

template <typename T, int K>
struct SgdChunk {
  Common<T, K> c;
  double momentum, dampening, weight_decay;
  bool nesterov;

  __device__ __forceinline__ void operator()(const Table<kFixedPtrs + K>& tab, int t, int64_t, int64_t lo,
                                             int64_t hi) const {
    using C = acc_t<T>;
    if (c.skip()) {  // AMP's skipped step: only the folded restore (source -> params) happens
      c.restore(tab, t, lo, hi);
      return;
    }
    C wk[K];
    c.weights(wk);
    const C lr = c.lr.template get<C>(), mom = static_cast<C>(momentum), damp = static_cast<C>(1 - dampening),
            wd = static_cast<C>(weight_decay);
    T* p = static_cast<T*>(tab.ptr[0][t]);
    const T* src = static_cast<const T*>(tab.ptr[1][t]);
    T* buf = static_cast<T*>(tab.ptr[3][t]);
    const float* step = static_cast<const float*>(tab.ptr[6][t]);
    const bool first = step != nullptr && *step == 0.0f;
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
      C g = c.grad(tab, t, i, wk);
      const C x = static_cast<C>(src[i]);
      if (weight_decay != 0) g = g + wd * x;
      if (buf != nullptr) {
        const C b = first ? g : mom * static_cast<C>(buf[i]) + damp * g;
        buf[i] = static_cast<T>(b);
        g = nesterov ? g + mom * b : b;
      }
      p[i] = static_cast<T>(x - lr * g);
    }
  }
};

}  // namespace

void sgd_(const UpdateArgs& a, const TensorList& momentum_buffers, const SgdHyper& h) {
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
        for (int i : group.second) items.push_back(item<K>(a, i, ptr_or_null(momentum_buffers, i), nullptr, nullptr));
        SgdChunk<T, K> f{common<T, K>(a, h.maximize), h.momentum, h.dampening, h.weight_decay, h.nesterov};
        launch(items, sizeof(T), false, f, stream, kStepBit);
      });
    }
  });
  increment_steps(a.steps, a.found_inf.defined() ? a.found_inf.data_ptr<float>() : nullptr, stream);
}

}  // namespace cuda
}  // namespace roga

TORCH_LIBRARY_IMPL(roga_cuda, CUDA, m) {
  using namespace roga;
  m.impl("sgd_", &roga::entry::sgd_<roga::cuda::sgd_>);
}
