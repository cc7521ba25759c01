// sgd_: torch.optim.SGD's update (momentum, dampening, Nesterov, weight decay, maximize) on
// the combined gradient, in one pass; see update.cuh for the table and common.h for the op.
#include <torch/library.h>

#include "../entry.h"
#include "update.cuh"

namespace roga {
namespace cuda {
namespace {
using namespace update;

struct Sgd {
  SgdHyper h;

  template <typename T, int K>
  __device__ __forceinline__ void tile(const Common<T, K>& c, const Table<kFixedPtrs + K>& tab, int t, int64_t lo,
                                       int64_t hi, const acc_t<T> (&wk)[2 * K]) const {
    using C = acc_t<T>;
    const C lr = c.lr.template get<C>(), mom = static_cast<C>(h.momentum), damp = static_cast<C>(1 - h.dampening),
            wd = static_cast<C>(h.weight_decay);
    T* p = static_cast<T*>(tab.ptr[0][t]);
    const T* src = static_cast<const T*>(tab.ptr[1][t]);
    T* buf = static_cast<T*>(tab.ptr[3][t]);
    const float* step = static_cast<const float*>(tab.ptr[6][t]);
    const bool first = step != nullptr && *step == 0.0f;
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
      C d;
      C g = c.grad(tab, t, i, wk, d);
      const C x = static_cast<C>(src[i]);
      if (h.weight_decay != 0) g = g + wd * x;
      if (buf != nullptr) {
        const C b = first ? g : mom * static_cast<C>(buf[i]) + damp * g;
        buf[i] = static_cast<T>(b);
        g = h.nesterov ? g + mom * b : b;
      }
      C y = x - lr * g;
      if (c.direct) y = y - lr * d;
      p[i] = static_cast<T>(y);
    }
  }
};

}  // namespace

void sgd_(const UpdateArgs& a, const TensorList& momentum_buffers, const SgdHyper& h) {
  launch_update(a, {momentum_buffers, {}, {}}, Sgd{h});
}

}  // namespace cuda
}  // namespace roga

TORCH_LIBRARY_IMPL(roga_cuda, CUDA, m) {
  using namespace roga;
  m.impl("sgd_", &roga::entry::sgd_<roga::cuda::sgd_>);
}
