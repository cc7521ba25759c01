// The kernel entry of every op for one device: validate (checks.h), run the device's kernel,
// bump the version counters of what it wrote. The CPU and CUDA registrations
// (TORCH_LIBRARY_IMPL beside the kernels) and the fast eager entry points (frontend.cpp) are
// instantiations of these templates with the device's kernel functions, so every path runs
// the same checks. Arguments follow the op schemas in library.cpp.
#pragma once

#include "checks.h"

namespace roga {
namespace entry {

using NormFn = std::tuple<at::Tensor, at::Tensor> (*)(const TensorList&, const TensorList*, double, bool);
using PerturbFn = void (*)(const TensorList&, const TensorList&, const TensorList&, const Scalar&, bool, double);
using RestoreFn = void (*)(const TensorList&, const TensorList&);
using RestoreAccFn = void (*)(const TensorList&, const TensorList&, const TensorList&, const TensorList&,
                              const Scalar&);
using GramFn = at::Tensor (*)(const std::vector<TensorList>&);
using CombineFn = void (*)(const TensorList&, const std::vector<TensorList>&, const Weights&);
using SgdFn = void (*)(const UpdateArgs&, const TensorList&, const SgdHyper&);
using AdamFn = void (*)(const UpdateArgs&, const TensorList&, const TensorList&, const TensorList&, const AdamHyper&);

constexpr CheckLevel kReal = CheckLevel::kMemory;

// The schema returns two tensors; without per_tensor the second is empty.
inline std::tuple<at::Tensor, at::Tensor> with_per(std::tuple<at::Tensor, at::Tensor> r) {
  if (!std::get<1>(r).defined()) std::get<1>(r) = at::empty({0}, std::get<0>(r).options());
  return r;
}

template <NormFn K>
std::tuple<at::Tensor, at::Tensor> norm(TensorList ts, bool per_tensor) {
  check_norm(ts, nullptr, kReal);
  return with_per(K(ts, nullptr, 0.0, per_tensor));
}

template <NormFn K>
std::tuple<at::Tensor, at::Tensor> asam_norm(TensorList ts, TensorList params, double eta, bool per_tensor) {
  check_norm(ts, &params, kReal);
  return with_per(K(ts, &params, eta, per_tensor));
}

template <PerturbFn K>
void perturb_(TensorList params, TensorList grads, TensorList backup, double scale,
              const std::optional<at::Tensor>& scale_t) {
  const Checked c = check_perturb_(params, grads, backup, scale, scale_t, kReal);
  if (!c.dev) return;
  K(params, grads, backup, c.scalar, false, 0.0);
  bump_versions(params);
  bump_versions(backup);
}

template <PerturbFn K>
void asam_perturb_(TensorList params, TensorList grads, TensorList backup, double scale,
                   const std::optional<at::Tensor>& scale_t, double eta) {
  const Checked c = check_perturb_(params, grads, backup, scale, scale_t, kReal);
  if (!c.dev) return;
  K(params, grads, backup, c.scalar, true, eta);
  bump_versions(params);
  bump_versions(backup);
}

template <RestoreFn K>
void restore_(TensorList params, TensorList backup) {
  if (!check_restore_(params, backup, kReal).dev) return;
  K(params, backup);
  bump_versions(params);
}

template <RestoreAccFn K>
void restore_accumulate_(TensorList params, TensorList backup, TensorList acc, TensorList grads, double weight,
                         const std::optional<at::Tensor>& weight_t) {
  const Checked c = check_restore_accumulate_(params, backup, acc, grads, weight, weight_t, kReal);
  if (!c.dev) return;
  K(params, backup, acc, grads, c.scalar);
  bump_versions(params);
  bump_versions(acc);
}

template <GramFn K>
at::Tensor gram(TensorList lists, int64_t k) {
  const Checked c = check_gram(lists, k, kReal);
  return K(c.lists);
}

template <CombineFn K>
void combine_(TensorList out, TensorList lists, c10::ArrayRef<double> weights,
              const std::optional<at::Tensor>& weights_t) {
  const Checked c = check_combine_(out, lists, weights, weights_t, kReal);
  if (!c.dev) return;
  K(out, c.lists, c.weights);
  bump_versions(out);
}

inline UpdateArgs update_args(const Checked& c, TensorList params, TensorList source, TensorList grad_out,
                              TensorList steps) {
  return UpdateArgs{params, source, grad_out, steps, c.lists, c.weights, c.lr, c.found_inf, c.skip};
}

inline void bump_update(const UpdateArgs& a, std::initializer_list<TensorList> states) {
  bump_versions(a.params);
  bump_versions(a.grad_out);
  bump_versions(a.steps);
  for (const auto& s : states) bump_versions(s);
}

template <SgdFn K>
void sgd_(TensorList params, TensorList source, TensorList grads, c10::ArrayRef<double> grad_weights,
          const std::optional<at::Tensor>& grad_weight_t, TensorList grad_out, TensorList momentum_buffers,
          TensorList steps, double lr, const std::optional<at::Tensor>& lr_t, double momentum, double dampening,
          bool nesterov, double weight_decay, bool maximize, const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0 && dampening == 0),
                    "sgd_: Nesterov momentum requires a momentum and zero dampening");
  const Checked c = check_update("sgd_", params, source, grads, grad_weights, grad_weight_t, grad_out,
                                 {{"momentum_buffers", momentum_buffers, momentum != 0}}, steps, momentum != 0, lr,
                                 lr_t, found_inf, kReal);
  if (!c.dev) return;
  const UpdateArgs a = update_args(c, params, source, grad_out, steps);
  K(a, momentum_buffers, SgdHyper{momentum, dampening, weight_decay, nesterov, maximize});
  bump_update(a, {momentum_buffers});
}

template <AdamFn K>
void adam_(TensorList params, TensorList source, TensorList grads, c10::ArrayRef<double> grad_weights,
           const std::optional<at::Tensor>& grad_weight_t, TensorList grad_out, TensorList exp_avgs,
           TensorList exp_avg_sqs, TensorList max_exp_avg_sqs, TensorList steps, double lr,
           const std::optional<at::Tensor>& lr_t, double beta1, double beta2, double eps, double weight_decay,
           bool decoupled, bool amsgrad, bool maximize, const std::optional<at::Tensor>& found_inf) {
  const Checked c = check_update("adam_", params, source, grads, grad_weights, grad_weight_t, grad_out,
                                 {{"exp_avgs", exp_avgs, true},
                                  {"exp_avg_sqs", exp_avg_sqs, true},
                                  {"max_exp_avg_sqs", max_exp_avg_sqs, amsgrad}},
                                 steps, true, lr, lr_t, found_inf, kReal);
  if (!c.dev) return;
  const UpdateArgs a = update_args(c, params, source, grad_out, steps);
  K(a, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, AdamHyper{beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize});
  bump_update(a, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs});
}

}  // namespace entry
}  // namespace roga
