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

struct Adam {
  AdamHyper h;

  template <typename T, int K>
  __device__ __forceinline__ void tile(const Common<T, K>& c, const Table<kFixedPtrs + K>& tab, int t, int64_t lo,
                                       int64_t hi, const acc_t<T> (&wk)[2 * K]) const {
    using C = acc_t<T>;
    // Bias corrections in double from this tensor's count, as torch computes them.
    const double step = static_cast<double>(*static_cast<const float*>(tab.ptr[6][t])) + 1.0;
    const double lr = c.lr.template get<double>();
    const C step_size = static_cast<C>(lr / (1.0 - pow(h.beta1, step)));
    const C bc2 = static_cast<C>(sqrt(1.0 - pow(h.beta2, step)));
    const C decay = static_cast<C>(1.0 - lr * h.weight_decay), wd = static_cast<C>(h.weight_decay);
    const C a1 = static_cast<C>(1 - h.beta1), b2 = static_cast<C>(h.beta2), a2 = static_cast<C>(1 - h.beta2),
            ep = static_cast<C>(h.eps);
    T* p = static_cast<T*>(tab.ptr[0][t]);
    const T* src = static_cast<const T*>(tab.ptr[1][t]);
    T* mp = static_cast<T*>(tab.ptr[3][t]);
    T* vp = static_cast<T*>(tab.ptr[4][t]);
    T* vmax = static_cast<T*>(tab.ptr[5][t]);
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
      C d;
      C g = c.grad(tab, t, i, wk, d);
      C x = static_cast<C>(src[i]);
      if (h.weight_decay != 0) {
        if (h.decoupled)
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
      if (h.amsgrad) {
        const C q0 = static_cast<C>(vmax[i]);
        q = q0 > v ? q0 : v;
        vmax[i] = static_cast<T>(q);
      }
      C y = x - step_size * (m / (sqrt(q) / bc2 + ep));
      if (c.direct) y = y - static_cast<C>(lr) * d;
      p[i] = static_cast<T>(y);
    }
  }
};

}  // namespace

void adam_(const UpdateArgs& a, const TensorList& exp_avgs, const TensorList& exp_avg_sqs,
           const TensorList& max_exp_avg_sqs, const AdamHyper& h) {
  launch_update(a, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, Adam{h});
}

}  // namespace cuda
}  // namespace roga

TORCH_LIBRARY_IMPL(roga_cuda, CUDA, m) {
  using namespace roga;
  m.impl("adam_", &roga::entry::adam_<roga::cuda::adam_>);
}
