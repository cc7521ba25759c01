// adam_: torch.optim.Adam / AdamW's update (betas, eps, coupled or decoupled weight decay,
// bias correction from each tensor's step count, amsgrad, maximize) on the combined gradient,
// in one pass; see update.cuh for the table and common.h for the op.
#include <torch/library.h>

#include "../entry.h"
#include "update.cuh"

namespace roga {
namespace cuda {
namespace {
using namespace update;

template <typename T, int K>
struct AdamChunk {
  Common<T, K> c;
  double beta1, beta2, eps, weight_decay;
  bool decoupled, amsgrad;

  __device__ __forceinline__ void operator()(const Table<kFixedPtrs + K>& tab, int t, int64_t, int64_t lo,
                                             int64_t hi) const {
    using C = acc_t<T>;
    if (c.skip()) {  // AMP's skipped step: only the folded restore (source -> params) happens
      c.restore(tab, t, lo, hi);
      return;
    }
    C wk[K];
    c.weights(wk);
    // Bias corrections in double from this tensor's count, as torch computes them.
    const double step = static_cast<double>(*static_cast<const float*>(tab.ptr[6][t])) + 1.0;
    const double lr = c.lr.template get<double>();
    const C step_size = static_cast<C>(lr / (1.0 - pow(beta1, step)));
    const C bc2 = static_cast<C>(sqrt(1.0 - pow(beta2, step)));
    const C decay = static_cast<C>(1.0 - lr * weight_decay), wd = static_cast<C>(weight_decay);
    const C a1 = static_cast<C>(1 - beta1), b2 = static_cast<C>(beta2), a2 = static_cast<C>(1 - beta2),
            ep = static_cast<C>(eps);
    T* p = static_cast<T*>(tab.ptr[0][t]);
    const T* src = static_cast<const T*>(tab.ptr[1][t]);
    T* mp = static_cast<T*>(tab.ptr[3][t]);
    T* vp = static_cast<T*>(tab.ptr[4][t]);
    T* vmax = static_cast<T*>(tab.ptr[5][t]);
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
      C g = c.grad(tab, t, i, wk);
      C x = static_cast<C>(src[i]);
      if (weight_decay != 0) {
        if (decoupled)
          x = x * decay;
        else
          g = g + wd * x;
      }
      const C m0 = static_cast<C>(mp[i]);
      const C m = m0 + a1 * (g - m0);
      const C v = b2 * static_cast<C>(vp[i]) + a2 * g * g;
      mp[i] = static_cast<T>(m);
      vp[i] = static_cast<T>(v);
      C q = v;
      if (amsgrad) {
        const C q0 = static_cast<C>(vmax[i]);
        q = q0 > v ? q0 : v;
        vmax[i] = static_cast<T>(q);
      }
      p[i] = static_cast<T>(x - step_size * (m / (sqrt(q) / bc2 + ep)));
    }
  }
};

}  // namespace

void adam_(const UpdateArgs& a, const TensorList& exp_avgs, const TensorList& exp_avg_sqs,
           const TensorList& max_exp_avg_sqs, const AdamHyper& h) {
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
        for (int i : group.second)
          items.push_back(item<K>(a, i, exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                                  ptr_or_null(max_exp_avg_sqs, i)));
        AdamChunk<T, K> f{common<T, K>(a, h.maximize), h.beta1, h.beta2, h.eps, h.weight_decay, h.decoupled,
                          h.amsgrad};
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
  m.impl("adam_", &roga::entry::adam_<roga::cuda::adam_>);
}
