// Python bindings for every op, plus the input checks and the CPU/CUDA dispatch they share.
//
// Checks run here, once per call, in one C++ loop over the lists (a Python loop would cost
// more than the kernels on lists of small tensors). Failures raise ValueError/TypeError
// naming the op, the list and the position.
#include <torch/extension.h>

#include <algorithm>
#include <string>

#include "common.h"

namespace roga {
namespace {

struct Named {
  std::string name;
  const TensorList* ts;
  bool written;
};

bool float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Same element order in storage: strides agree on every dimension longer than 1.
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// Validates the lists of one op; returns their device, or nullopt for empty lists (a no-op).
c10::optional<at::Device> check(const char* op, const std::vector<Named>& lists, bool allow_empty,
                                bool alias_ok = false) {
  const Named& first = lists[0];
  const size_t n = first.ts->size();
  for (const auto& l : lists)
    TORCH_CHECK_VALUE(l.ts->size() == n, op, ": `", l.name, "` has ", l.ts->size(),
                      " tensors but `", first.name, "` has ", n);
  if (n == 0) {
    TORCH_CHECK_VALUE(allow_empty, op, ": `", first.name,
                      "` is an empty list; there is nothing to reduce (and no device to return a result on)");
    return c10::nullopt;
  }
  TORCH_CHECK_TYPE((*first.ts)[0].defined(), op, ": ", first.name, "[0] is an undefined tensor");
  const at::Device dev = (*first.ts)[0].device();
  for (const auto& l : lists) {
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& t = (*l.ts)[i];
      TORCH_CHECK_TYPE(t.defined(), op, ": ", l.name, "[", i, "] is an undefined tensor");
      TORCH_CHECK_TYPE(t.layout() == at::kStrided, op, ": ", l.name, "[", i, "] is a ", t.layout(),
                       " tensor; only dense (strided) tensors are supported");
      TORCH_CHECK_TYPE(float_dtype(t.scalar_type()), op, ": ", l.name, "[", i, "] has dtype ",
                       t.scalar_type(), "; supported: float16, bfloat16, float32, float64");
      TORCH_CHECK_VALUE(t.device() == dev, op, ": ", l.name, "[", i, "] is on ", t.device(), " but ",
                        first.name, "[0] is on ", dev, "; all tensors must be on one device");
      TORCH_CHECK_VALUE(t.is_non_overlapping_and_dense(), op, ": ", l.name, "[", i,
                        "] is not contiguous (sizes ", t.sizes(), ", strides ", t.strides(),
                        "); the compiled kernels walk raw storage: pass .contiguous() tensors "
                        "or use backend='foreach'");
      if (&l == &first) continue;
      const at::Tensor& r = (*first.ts)[i];
      TORCH_CHECK_VALUE(t.sizes() == r.sizes(), op, ": ", l.name, "[", i, "] has shape ", t.sizes(),
                        " but ", first.name, "[", i, "] has shape ", r.sizes());
      TORCH_CHECK_TYPE(t.scalar_type() == r.scalar_type(), op, ": ", l.name, "[", i, "] has dtype ",
                       t.scalar_type(), " but ", first.name, "[", i, "] has ", r.scalar_type(),
                       "; tensors at one position must share a dtype");
      TORCH_CHECK_VALUE(same_layout(t, r), op, ": ", l.name, "[", i, "] has strides ", t.strides(),
                        " but ", first.name, "[", i, "] has ", r.strides(),
                        "; tensors at one position must share a memory layout");
    }
  }
  // A written tensor may not share memory with another tensor at its position, except
  // combine_'s `out`, which may *be* one of its inputs. Byte ranges are read once per
  // tensor (const_data_ptr: no copy-on-write materialisation).
  bool any_written = false;
  for (const auto& l : lists) any_written |= l.written;
  if (!any_written) return dev;
  std::vector<std::vector<std::pair<const char*, int64_t>>> ranges(lists.size());
  for (size_t j = 0; j < lists.size(); ++j) {
    ranges[j].resize(n);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& t = (*lists[j].ts)[i];
      ranges[j][i] = {static_cast<const char*>(t.const_data_ptr()), t.numel() * t.element_size()};
    }
  }
  for (size_t wj = 0; wj < lists.size(); ++wj) {
    if (!lists[wj].written) continue;
    for (size_t j = 0; j < lists.size(); ++j) {
      if (j == wj) continue;
      for (size_t i = 0; i < n; ++i) {
        const auto [a0, bytes] = ranges[wj][i];
        const char* b0 = ranges[j][i].first;
        if (bytes == 0) continue;
        if (a0 < b0 + bytes && b0 < a0 + bytes)
          TORCH_CHECK_VALUE(alias_ok && a0 == b0, op, ": ", lists[wj].name, "[", i, "] shares memory with ",
                            lists[j].name, "[", i, "]", alias_ok ? " without being the same tensor" : "");
      }
    }
  }
  return dev;
}

void bump_versions(const TensorList& ts) {
  // The kernels write storage behind autograd's back: bump version counters like in-place
  // ATen ops do, so a stale saved tensor is detected instead of silently reused.
  for (const auto& t : ts)
    if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

Scalar make_scalar(const char* op, const char* name, double value, const c10::optional<at::Tensor>& t,
                   const at::Device& dev) {
  Scalar s{value, nullptr};
  if (t.has_value() && t->defined()) {
    TORCH_CHECK_VALUE(t->dim() == 0, op, ": `", name, "` must be a 0-d tensor, got shape ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, op, ": `", name,
                     "` must be float32 or float64, got ", t->scalar_type());
    if (t->device().is_cpu()) {
      s.value = t->item<double>();  // a host read: nothing to synchronise with
    } else {
      TORCH_CHECK_VALUE(t->device() == dev, op, ": `", name, "` is on ", t->device(),
                        " but the tensors are on ", dev);
      s.tensor = &*t;
    }
  }
  return s;
}

#ifdef ROGA_WITH_CUDA
#define ROGA_DISPATCH(dev, fn, ...) ((dev).is_cuda() ? cuda::fn(__VA_ARGS__) : cpu::fn(__VA_ARGS__))
#else
void require_cpu(const at::Device& dev) {
  TORCH_CHECK_VALUE(!dev.is_cuda(), "roga_cuda._C was built without CUDA kernels; "
                                    "use backend='foreach' or 'triton' for CUDA tensors");
}
#define ROGA_DISPATCH(dev, fn, ...) (require_cpu(dev), cpu::fn(__VA_ARGS__))
#endif

void check_device_supported(const char* op, const at::Device& dev) {
  TORCH_CHECK_VALUE(dev.is_cpu() || dev.is_cuda(), op, ": the compiled kernels run on CPU and CUDA tensors, not ",
                    dev.type());
}

std::vector<Named> named_lists(const char* prefix, const std::vector<TensorList>& lists) {
  std::vector<Named> out;
  for (size_t k = 0; k < lists.size(); ++k)
    out.push_back({std::string(prefix) + "[" + std::to_string(k) + "]", &lists[k], false});
  return out;
}

}  // namespace

std::tuple<at::Tensor, c10::optional<at::Tensor>> py_norm(const TensorList& ts,
                                                          const c10::optional<TensorList>& params,
                                                          double eta, bool per_tensor) {
  std::vector<Named> lists{{"ts", &ts, false}};
  if (params) lists.push_back({"params", &*params, false});
  auto dev = *check("norm", lists, /*allow_empty=*/false);
  check_device_supported("norm", dev);
  auto r = ROGA_DISPATCH(dev, norm, ts, params ? &*params : nullptr, eta, per_tensor);
  if (!per_tensor) return {std::get<0>(r), c10::nullopt};
  return {std::get<0>(r), std::get<1>(r)};
}

void py_perturb_(const TensorList& params, const TensorList& grads, const TensorList& backup, double scale,
                 const c10::optional<at::Tensor>& scale_t, bool adaptive, double eta) {
  auto dev = check("perturb_", {{"params", &params, true}, {"grads", &grads, false}, {"backup", &backup, true}},
                   true);
  if (!dev) return;
  check_device_supported("perturb_", *dev);
  auto s = make_scalar("perturb_", "scale", scale, scale_t, *dev);
  ROGA_DISPATCH(*dev, perturb_, params, grads, backup, s, adaptive, eta);
  bump_versions(params);
  bump_versions(backup);
}

void py_restore_(const TensorList& params, const TensorList& backup) {
  auto dev = check("restore_", {{"params", &params, true}, {"backup", &backup, false}}, true);
  if (!dev) return;
  check_device_supported("restore_", *dev);
  ROGA_DISPATCH(*dev, restore_, params, backup);
  bump_versions(params);
}

void py_restore_accumulate_(const TensorList& params, const TensorList& backup, const TensorList& acc,
                            const TensorList& grads, double weight, const c10::optional<at::Tensor>& weight_t) {
  auto dev = check("restore_accumulate_",
                   {{"params", &params, true}, {"backup", &backup, false}, {"acc", &acc, true}, {"grads", &grads, false}},
                   true);
  if (!dev) return;
  check_device_supported("restore_accumulate_", *dev);
  auto w = make_scalar("restore_accumulate_", "weight", weight, weight_t, *dev);
  ROGA_DISPATCH(*dev, restore_accumulate_, params, backup, acc, grads, w);
  bump_versions(params);
  bump_versions(acc);
}

at::Tensor py_gram(const std::vector<TensorList>& lists) {
  TORCH_CHECK_VALUE(!lists.empty(), "gram: `lists` is empty; give at least one tensor list");
  auto dev = *check("gram", named_lists("lists", lists), false);
  check_device_supported("gram", dev);
#ifdef ROGA_WITH_CUDA
  TORCH_CHECK_VALUE(!dev.is_cuda() || lists.size() <= static_cast<size_t>(cuda::kMaxLists),
                    "gram: ", lists.size(), " lists; the CUDA kernel takes at most ", cuda::kMaxLists);
#endif
  return ROGA_DISPATCH(dev, gram, lists);
}

void py_combine_(const TensorList& out, const std::vector<TensorList>& lists, const std::vector<double>& weights,
                 const c10::optional<at::Tensor>& weights_t) {
  TORCH_CHECK_VALUE(!lists.empty(), "combine_: `lists` is empty; give at least one tensor list");
  auto named = named_lists("lists", lists);
  named.insert(named.begin(), {"out", &out, true});
  auto dev = check("combine_", named, true, /*alias_ok=*/true);
  const size_t k = lists.size();
  Weights w;
  if (weights_t && weights_t->defined()) {
    const at::Tensor& t = *weights_t;
    TORCH_CHECK_VALUE(t.dim() == 1 && static_cast<size_t>(t.numel()) == k, "combine_: `weights` must hold ", k,
                      " values (one per list), got shape ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                     "combine_: `weights` must be float32 or float64, got ", t.scalar_type());
    if (t.device().is_cpu() || !dev) {
      auto c = t.to(at::kDouble).contiguous();
      w.values.assign(c.data_ptr<double>(), c.data_ptr<double>() + k);
    } else {
      TORCH_CHECK_VALUE(t.device() == *dev, "combine_: `weights` is on ", t.device(), " but the tensors are on ", *dev);
      TORCH_CHECK_VALUE(t.is_contiguous(), "combine_: `weights` must be contiguous");
      w.tensor = &t;
    }
  } else {
    TORCH_CHECK_VALUE(weights.size() == k, "combine_: got ", weights.size(), " weights for ", k, " lists");
    w.values = weights;
  }
  if (!dev) return;
  check_device_supported("combine_", *dev);
#ifdef ROGA_WITH_CUDA
  TORCH_CHECK_VALUE(!dev->is_cuda() || k <= static_cast<size_t>(cuda::kMaxLists), "combine_: ", k,
                    " lists; the CUDA kernel takes at most ", cuda::kMaxLists);
#endif
  ROGA_DISPATCH(*dev, combine_, out, lists, w);
  bump_versions(out);
}

}  // namespace roga

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace roga;
  m.doc() = "roga_cuda compiled multi-tensor kernels (C++ CPU, CUDA). Use roga_cuda.ops, not this module.";
  m.attr("TORCH_VERSION") = ROGA_TORCH_VERSION;
#ifdef ROGA_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("_cpu_isa", &cpu::isa, "Which compiled variant of the CPU loops is active (avx2 or baseline).");
  m.def("_set_cpu_isa", &cpu::set_isa, py::arg("name"),
        "Switch the CPU loops to 'avx2' or 'baseline' (tests); False if this CPU cannot run it.");
#ifdef ROGA_WITH_CUDA
  m.def("_cuda_launch_limits", &cuda::launch_limits, py::arg("chunk") = 0, py::arg("max_tensors") = 0,
        py::arg("max_blocks") = 0,
        "Tests only: set the CUDA launch geometry (0 = default); returns the previous [chunk, max_tensors, max_blocks].");
#endif
  m.def("norm", &py_norm, py::arg("ts"), py::arg("params"), py::arg("eta"), py::arg("per_tensor"));
  m.def("perturb_", &py_perturb_, py::arg("params"), py::arg("grads"), py::arg("backup"), py::arg("scale"),
        py::arg("scale_t"), py::arg("adaptive"), py::arg("eta"));
  m.def("restore_", &py_restore_, py::arg("params"), py::arg("backup"));
  m.def("restore_accumulate_", &py_restore_accumulate_, py::arg("params"), py::arg("backup"), py::arg("acc"),
        py::arg("grads"), py::arg("weight"), py::arg("weight_t"));
  m.def("gram", &py_gram, py::arg("lists"));
  m.def("combine_", &py_combine_, py::arg("out"), py::arg("lists"), py::arg("weights"), py::arg("weights_t"));
}
