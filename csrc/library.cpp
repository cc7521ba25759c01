// The operators: torch.ops.roga_cuda.*, declared once here with schemas that name every
// list an op writes (`Tensor(a!)[]`), plus their Meta kernels (shapes only), which is what
// FakeTensor tracing, torch.compile and torch.export run. The CPU and CUDA kernels register
// themselves beside their code (cpu/ops.cpp, one TORCH_LIBRARY_IMPL per cuda/*.cu).
//
// Lists of lists (gram, combine_) travel flat: K lists of n tensors as one list of K * n
// (the schema language has no Tensor[][]). Scalars that may live on the device are a float
// plus an optional 0-d tensor that wins when given (read on the device: no host sync).
#include <torch/library.h>

#include "checks.h"

namespace roga {
namespace {

constexpr CheckLevel kMeta = CheckLevel::kMeta;

std::tuple<at::Tensor, at::Tensor> norm_result(TensorList ts, bool per_tensor) {
  const auto opts = ts[0].options().dtype(reduction_dtype(ts));
  return {at::empty({}, opts), at::empty({per_tensor ? static_cast<int64_t>(ts.size()) : 0}, opts)};
}

std::tuple<at::Tensor, at::Tensor> norm_meta(TensorList ts, bool per_tensor) {
  check_norm(ts, nullptr, kMeta);
  return norm_result(ts, per_tensor);
}

std::tuple<at::Tensor, at::Tensor> asam_norm_meta(TensorList ts, TensorList params, double, bool per_tensor) {
  check_norm(ts, &params, kMeta);
  return norm_result(ts, per_tensor);
}

void perturb_meta(TensorList params, TensorList grads, TensorList backup, double scale,
                  const std::optional<at::Tensor>& scale_t) {
  check_perturb_(params, grads, backup, scale, scale_t, kMeta);
}

void asam_perturb_meta(TensorList params, TensorList grads, TensorList backup, double scale,
                       const std::optional<at::Tensor>& scale_t, double) {
  check_perturb_(params, grads, backup, scale, scale_t, kMeta);
}

void restore_meta(TensorList params, TensorList backup) { check_restore_(params, backup, kMeta); }

void restore_accumulate_meta(TensorList params, TensorList backup, TensorList acc, TensorList grads, double weight,
                             const std::optional<at::Tensor>& weight_t) {
  check_restore_accumulate_(params, backup, acc, grads, weight, weight_t, kMeta);
}

at::Tensor gram_meta(TensorList lists, int64_t k) {
  const Checked c = check_gram(lists, k, kMeta);
  return at::empty({k, k}, c.lists[0][0].options().dtype(reduction_dtype(c.lists[0])));
}

void combine_meta(TensorList out, TensorList lists, c10::ArrayRef<double> weights,
                  const std::optional<at::Tensor>& weights_t) {
  check_combine_(out, lists, weights, weights_t, kMeta);
}

void sgd_meta(TensorList params, TensorList source, TensorList grads, c10::ArrayRef<double> grad_weights,
              const std::optional<at::Tensor>& grad_weight_t, TensorList grad_out, TensorList momentum_buffers,
              TensorList steps, double lr, const std::optional<at::Tensor>& lr_t, double momentum, double,
              bool, double, bool, const std::optional<at::Tensor>& found_inf) {
  check_update("sgd_", params, source, grads, grad_weights, grad_weight_t, grad_out,
               {{"momentum_buffers", momentum_buffers, momentum != 0}}, steps, momentum != 0, lr, lr_t, found_inf,
               kMeta);
}

void adam_meta(TensorList params, TensorList source, TensorList grads, c10::ArrayRef<double> grad_weights,
               const std::optional<at::Tensor>& grad_weight_t, TensorList grad_out, TensorList exp_avgs,
               TensorList exp_avg_sqs, TensorList max_exp_avg_sqs, TensorList steps, double lr,
               const std::optional<at::Tensor>& lr_t, double, double, double, double, bool, bool amsgrad, bool,
               const std::optional<at::Tensor>& found_inf) {
  check_update("adam_", params, source, grads, grad_weights, grad_weight_t, grad_out,
               {{"exp_avgs", exp_avgs, true}, {"exp_avg_sqs", exp_avg_sqs, true},
                {"max_exp_avg_sqs", max_exp_avg_sqs, amsgrad}},
               steps, true, lr, lr_t, found_inf, kMeta);
}

}  // namespace
}  // namespace roga

TORCH_LIBRARY(roga_cuda, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("norm(Tensor[] ts, bool per_tensor=False) -> (Tensor, Tensor)", tags);
  m.def("asam_norm(Tensor[] ts, Tensor[] params, float eta=0., bool per_tensor=False) -> (Tensor, Tensor)", tags);
  m.def("perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backup, float scale, "
        "Tensor? scale_tensor=None) -> ()",
        tags);
  m.def("asam_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backup, float scale, "
        "Tensor? scale_tensor=None, float eta=0.) -> ()",
        tags);
  m.def("restore_(Tensor(a!)[] params, Tensor[] backup) -> ()", tags);
  m.def("restore_accumulate_(Tensor(a!)[] params, Tensor[] backup, Tensor(b!)[] acc, Tensor[] grads, "
        "float weight, Tensor? weight_tensor=None) -> ()",
        tags);
  m.def("gram(Tensor[] lists, int k) -> Tensor", tags);
  m.def("combine_(Tensor(a!)[] out, Tensor[] lists, float[] weights, Tensor? weight_tensor=None) -> ()", tags);
  // The fused base updates (torch.optim.SGD / Adam / AdamW), see common.h UpdateArgs.
  m.def("sgd_(Tensor(a!)[] params, Tensor[] source, Tensor[] grads, float[] grad_weights, "
        "Tensor? grad_weight_tensor, Tensor(b!)[] grad_out, Tensor(c!)[] momentum_buffers, Tensor(d!)[] steps, "
        "float lr, Tensor? lr_tensor, float momentum, float dampening, bool nesterov, float weight_decay, "
        "bool maximize, Tensor? found_inf) -> ()",
        tags);
  m.def("adam_(Tensor(a!)[] params, Tensor[] source, Tensor[] grads, float[] grad_weights, "
        "Tensor? grad_weight_tensor, Tensor(b!)[] grad_out, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
        "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] steps, float lr, Tensor? lr_tensor, float beta1, float beta2, "
        "float eps, float weight_decay, bool decoupled, bool amsgrad, bool maximize, Tensor? found_inf) -> ()",
        tags);
}

TORCH_LIBRARY_IMPL(roga_cuda, Meta, m) {
  using namespace roga;
  m.impl("norm", &norm_meta);
  m.impl("asam_norm", &asam_norm_meta);
  m.impl("perturb_", &perturb_meta);
  m.impl("asam_perturb_", &asam_perturb_meta);
  m.impl("restore_", &restore_meta);
  m.impl("restore_accumulate_", &restore_accumulate_meta);
  m.impl("gram", &gram_meta);
  m.impl("combine_", &combine_meta);
  m.impl("sgd_", &sgd_meta);
  m.impl("adam_", &adam_meta);
}
