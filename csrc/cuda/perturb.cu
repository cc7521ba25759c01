// perturb_: backup <- params; params += scale * grads (ASAM: scale * (|p| + eta)^2 * grads),
// one pass: p and g read once, p and b written once (16 bytes per float32 element).
#include <torch/library.h>

#include "../entry.h"
#include "multi_tensor_apply.cuh"

namespace roga {
namespace cuda {
namespace {
using namespace mta;

template <typename T, bool kAdaptive>
struct PerturbOp {
  using C = acc_t<T>;
  C s, eta;
  __device__ __forceinline__ void operator()(T (&e)[3]) const {  // p, g, b
    e[2] = e[0];  // the backup is the storage value itself: bit-exact
    const C p = static_cast<C>(e[0]);
    C g = static_cast<C>(e[1]);
    if (kAdaptive) {
      const C w = absv(p) + eta;
      g = (w * w) * g;
    }
    e[0] = static_cast<T>(p + s * g);
  }
};

template <typename T, bool kAdaptive>
struct PerturbChunk {
  DevScalar scale;
  double eta;
  __device__ __forceinline__ void operator()(const Table<3>& tab, int t, int64_t, int64_t lo, int64_t hi) const {
    using C = acc_t<T>;
    T* p[3] = {static_cast<T*>(tab.ptr[0][t]), static_cast<T*>(tab.ptr[1][t]), static_cast<T*>(tab.ptr[2][t])};
    PerturbOp<T, kAdaptive> op{scale.get<C>(), static_cast<C>(eta)};
    for_each<T, 3, 0b011u, 0b101u, unroll_for<T>(2)>(p, lo, hi, op);
  }
};

}  // namespace

void perturb_(const TensorList& params, const TensorList& grads, const TensorList& backup, const Scalar& scale,
              bool adaptive, double eta) {
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = current_stream();
  const DevScalar s = dev_scalar(scale);
  for (const auto& group : by_dtype(params)) {
    dispatch_float(group.first, [&](auto tag) {
      using T = decltype(tag);
      std::vector<Item<3>> items;
      for (int i : group.second)
        items.push_back({{params[i].data_ptr(), grads[i].data_ptr(), backup[i].data_ptr()}, params[i].numel()});
      if (adaptive)
        launch(items, sizeof(T), false, PerturbChunk<T, true>{s, eta}, stream);
      else
        launch(items, sizeof(T), false, PerturbChunk<T, false>{s, eta}, stream);
    });
  }
}

}  // namespace cuda
}  // namespace roga

TORCH_LIBRARY_IMPL(roga_cuda, CUDA, m) {
  using namespace roga;
  m.impl("perturb_", &roga::entry::perturb_<roga::cuda::perturb_>);
  m.impl("asam_perturb_", &roga::entry::asam_perturb_<roga::cuda::perturb_>);
}
