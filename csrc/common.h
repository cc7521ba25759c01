// Declarations shared by the frontend and the CPU/CUDA kernels.
//
// Every op takes lists of tensors that the frontend has already validated (one device,
// float16/bfloat16/float32/float64, equal shape/dtype/layout at each position, dense
// storage), so kernels walk each tensor's storage as a flat array of numel() elements.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

namespace roga {

// A borrowed list of tensors (the dispatcher's Tensor[] and pybind11's lists both convert).
using TensorList = at::TensorList;

// A scalar argument: a host value, or a 0-d float32/float64 tensor on the lists' device
// that kernels read themselves (no host synchronisation; CUDA-graph safe).
struct Scalar {
  double value = 0.0;
  at::Tensor tensor;  // defined: read on the device; undefined: use `value`
};

// Weights of combine_: K host values, or a contiguous 1-d float32/float64 tensor of K on the device.
struct Weights {
  std::vector<double> values;
  at::Tensor tensor;
  int64_t size() const { return tensor.defined() ? tensor.numel() : static_cast<int64_t>(values.size()); }
};

// Result dtype of reductions: float64 if any tensor is float64, else float32.
inline at::ScalarType reduction_dtype(TensorList ts) {
  for (const auto& t : ts)
    if (t.scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

// Hyper-parameters of the fused base updates (torch.optim.SGD / Adam / AdamW semantics).
struct SgdHyper {
  double momentum = 0, dampening = 0, weight_decay = 0;
  bool nesterov = false, maximize = false;
};
struct AdamHyper {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
  bool decoupled = false, amsgrad = false, maximize = false;
};

// What every fused update takes (validated by checks.cpp): the gradient is the combination
// sum_k weights[k] * grads[k][i] (K >= 1 lists; AMP's unscaling and clipping are folded into
// the weights); the parameter's value is read from `source` (e.g. SAM's backup: restore and
// update in one pass) or, when it is empty, from `params`; `grad_out`, when not empty,
// receives the combined gradient (before `maximize`). `steps` are the per-parameter step
// counts (one-element float32 tensors, torch's state['step']): read before the update and
// incremented after it. `found_inf` (a one-element device tensor, or undefined) and `skip`
// (the same read on the host): when nonzero the update is skipped (AMP's overflow): only
// `source` is copied into `params`, bit-exact, so a restore folded into the update still
// happens; nothing else is written, steps included. `weights` may hold 2K values: the second
// K are the direct row, d, and the update ends with params -= lr * sum_k d[k] * grads[k]
// (outside momentum, moments, weight decay and maximize: WSAM's decoupled sharpness term).
struct UpdateArgs {
  TensorList params, source, grad_out, steps;
  std::vector<TensorList> grads;
  Weights weights;
  Scalar lr;
  at::Tensor found_inf;
  bool skip = false;
};

#define ROGA_DECLARE_OPS                                                                   \
  std::tuple<at::Tensor, at::Tensor> norm(const TensorList& ts, const TensorList* params, \
                                          double eta, bool per_tensor);                   \
  void perturb_(const TensorList& params, const TensorList& grads, const TensorList& backup, \
                const Scalar& scale, bool adaptive, double eta);                          \
  void restore_(const TensorList& params, const TensorList& backup);                      \
  void restore_accumulate_(const TensorList& params, const TensorList& backup,            \
                           const TensorList& acc, const TensorList& grads,                \
                           const Scalar& weight);                                         \
  at::Tensor gram(const std::vector<TensorList>& lists);                                  \
  void combine_(const TensorList& out, const std::vector<TensorList>& lists,              \
                const Weights& weights);                                                  \
  void sgd_(const UpdateArgs& a, const TensorList& momentum_buffers, const SgdHyper& h);  \
  void adam_(const UpdateArgs& a, const TensorList& exp_avgs, const TensorList& exp_avg_sqs, \
             const TensorList& max_exp_avg_sqs, const AdamHyper& h);

namespace cpu {
ROGA_DECLARE_OPS
std::string isa();
bool set_isa(const std::string& name);
// Elements per block of the elementwise CPU kernels on float32/float64 (kernels.hpp); returns
// the previous value. Tests and benchmarks.
int64_t set_elementwise_block(int64_t n);
}  // namespace cpu

#ifdef ROGA_WITH_CUDA
namespace cuda {
ROGA_DECLARE_OPS
// Largest K gram/combine_ accept on CUDA.
constexpr int kMaxLists = 8;
// Tests only: sets the launch geometry (elements per block, a multiple of 64; tensors and
// blocks per launch; 0 = default) and returns the previous {chunk, max_tensors, max_blocks}.
std::vector<int64_t> launch_limits(int64_t chunk, int64_t max_tensors, int64_t max_blocks);
}  // namespace cuda
#endif

}  // namespace roga
