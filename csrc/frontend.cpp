// roga_cuda._C: the fast eager entry points, the checks for the Python backends, and test knobs.
//
// The operators themselves are torch.ops.roga_cuda.* (library.cpp). Through the dispatcher a
// call costs a few microseconds more per list than a direct call (boxing every tensor), which
// on lists of hundreds of small tensors is a real share of an optimizer step (measured in
// benchmarks/bench_host.py). So eager calls on plain CPU/CUDA tensors come here and run the
// very same entry (checks + kernel, entry.h); anything else (tensor subclasses, fake or
// functional tensors, meta tensors, an active TorchDispatchMode) makes these return
// False / None untouched, and roga_cuda.ops goes through the dispatcher instead.
#include <torch/extension.h>

#include "checks.h"
#include "entry.h"

namespace roga {
namespace {

// A Python list (or tuple) of tensors seen as a TensorList without touching reference
// counts. Copying a tensor into a std::vector<at::Tensor> moves its count from 1 to 2, and
// torch then takes the GIL to keep its PyObject alive (and again to let go): two GIL round
// trips per tensor per list, most of a call's host cost on lists of small tensors. A
// borrow costs a pointer copy. A tuple snapshot of the sequence keeps every element alive
// while the kernels run without the GIL, whatever other threads do to the list.
// `splits` (lists of lists only): where each inner list starts in `ts`, and its end.
struct Borrowed {
  py::list keep;
  std::vector<at::Tensor> ts;
  std::vector<size_t> splits;

  Borrowed() = default;
  Borrowed(const Borrowed&) = delete;
  Borrowed& operator=(const Borrowed&) = delete;
  Borrowed(Borrowed&& o) noexcept : keep(std::move(o.keep)), ts(std::move(o.ts)), splits(std::move(o.splits)) {
    o.ts.clear();
  }
  Borrowed& operator=(Borrowed&& o) noexcept {
    if (this != &o) {
      release();
      keep = std::move(o.keep);
      ts = std::move(o.ts);
      splits = std::move(o.splits);
      o.ts.clear();
    }
    return *this;
  }
  ~Borrowed() { release(); }

  operator TensorList() const { return ts; }
  int64_t lists() const { return static_cast<int64_t>(splits.size()) - 1; }

  // Appends the tensors of a list or tuple; false (nothing kept) if an element is not a tensor.
  bool add(PyObject* seq) {
    py::object snap = PyTuple_Check(seq) ? py::reinterpret_borrow<py::object>(seq)
                                         : py::reinterpret_steal<py::object>(PyList_AsTuple(seq));
    if (!snap) throw py::error_already_set();
    const Py_ssize_t n = PyTuple_GET_SIZE(snap.ptr());
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* o = PyTuple_GET_ITEM(snap.ptr(), i);
      if (!THPVariable_Check(o)) return false;
      ts.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(THPVariable_Unpack(o)));
    }
    keep.append(std::move(snap));  // a list of lists has one snapshot per list
    return true;
  }

 private:
  void release() {
    for (auto& t : ts) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
    ts.clear();
  }
};

// The same for a list of lists (gram, combine_): all tensors in one flat borrowed list.
struct BorrowedLists : Borrowed {};

}  // namespace
}  // namespace roga

namespace pybind11 {
namespace detail {

inline bool is_seq(handle h) { return PyList_Check(h.ptr()) || PyTuple_Check(h.ptr()); }

template <>
struct type_caster<roga::Borrowed> {
  PYBIND11_TYPE_CASTER(roga::Borrowed, const_name("list[Tensor]"));
  bool load(handle src, bool) {
    value = roga::Borrowed();
    if (!is_seq(src)) return false;
    value.splits = {0};
    if (!value.add(src.ptr())) return false;
    value.splits.push_back(value.ts.size());
    return true;
  }
};

template <>
struct type_caster<roga::BorrowedLists> {
  PYBIND11_TYPE_CASTER(roga::BorrowedLists, const_name("list[list[Tensor]]"));
  bool load(handle src, bool) {
    value = roga::BorrowedLists();
    if (!is_seq(src)) return false;
    value.splits = {0};
    for (handle l : reinterpret_borrow<sequence>(src)) {
      if (!is_seq(l) || !value.add(l.ptr())) return false;
      value.splits.push_back(value.ts.size());
    }
    return true;
  }
};

}  // namespace detail
}  // namespace pybind11

namespace roga {
namespace {

using Vec = Borrowed;
using Lists = BorrowedLists;

#ifdef ROGA_WITH_CUDA
#define ROGA_ENTRY(dev, op, ...) \
  ((dev).is_cuda() ? entry::op<cuda::op>(__VA_ARGS__) : entry::op<cpu::op>(__VA_ARGS__))
#define ROGA_ENTRY2(dev, op, kernel, ...) \
  ((dev).is_cuda() ? entry::op<cuda::kernel>(__VA_ARGS__) : entry::op<cpu::kernel>(__VA_ARGS__))
#else
#define ROGA_ENTRY(dev, op, ...) (require_cpu(dev), entry::op<cpu::op>(__VA_ARGS__))
#define ROGA_ENTRY2(dev, op, kernel, ...) (require_cpu(dev), entry::op<cpu::kernel>(__VA_ARGS__))
void require_cpu(const at::Device& dev) {
  TORCH_CHECK_VALUE(!dev.is_cuda(), "roga_cuda._C was built without CUDA kernels; "
                                    "use backend='foreach' or 'triton' for CUDA tensors");
}
#endif

at::Device first_device(TensorList ts) {
  return !ts.empty() && ts[0].defined() ? ts[0].device() : at::Device(at::kCPU);
}

bool plain_opt(std::initializer_list<c10::optional<at::Tensor>> ts) {
  for (const auto& t : ts)
    if (t && t->defined() && !all_plain({TensorList(*t)})) return false;
  return true;
}

py::object fast_norm(const Vec& ts, const c10::optional<Vec>& params,
                     double eta, bool per_tensor) {
  if (!all_plain({ts, params ? TensorList(*params) : TensorList()})) return py::none();
  std::tuple<at::Tensor, at::Tensor> r;
  {
    py::gil_scoped_release nogil;
    r = params ? ROGA_ENTRY2(first_device(ts), asam_norm, norm, ts, *params, eta, per_tensor)
               : ROGA_ENTRY(first_device(ts), norm, ts, per_tensor);
  }
  return py::make_tuple(std::get<0>(r), std::get<1>(r));
}

bool fast_perturb_(const Vec& params, const Vec& grads,
                   const Vec& backup, double scale, const c10::optional<at::Tensor>& scale_t,
                   bool adaptive, double eta) {
  if (!all_plain({params, grads, backup}) || (scale_t && !all_plain({TensorList(*scale_t)}))) return false;
  py::gil_scoped_release nogil;
  if (adaptive)
    ROGA_ENTRY2(first_device(params), asam_perturb_, perturb_, params, grads, backup, scale, scale_t, eta);
  else
    ROGA_ENTRY(first_device(params), perturb_, params, grads, backup, scale, scale_t);
  return true;
}

bool fast_restore_(const Vec& params, const Vec& backup) {
  if (!all_plain({params, backup})) return false;
  py::gil_scoped_release nogil;
  ROGA_ENTRY(first_device(params), restore_, params, backup);
  return true;
}

bool fast_restore_accumulate_(const Vec& params, const Vec& backup,
                              const Vec& acc, const Vec& grads, double weight,
                              const c10::optional<at::Tensor>& weight_t) {
  if (!all_plain({params, backup, acc, grads}) || (weight_t && !all_plain({TensorList(*weight_t)}))) return false;
  py::gil_scoped_release nogil;
  ROGA_ENTRY(first_device(params), restore_accumulate_, params, backup, acc, grads, weight, weight_t);
  return true;
}

py::object fast_gram(const Lists& lists) {
  const TensorList flat = lists;
  if (!all_plain({flat})) return py::none();
  at::Tensor g;
  {
    py::gil_scoped_release nogil;
    g = ROGA_ENTRY(first_device(flat), gram, flat, lists.lists());
  }
  return py::cast(g);
}

bool fast_combine_(const Vec& out, const Lists& lists, const std::vector<double>& weights,
                   const c10::optional<at::Tensor>& weights_t) {
  const TensorList flat = lists;
  if (!all_plain({out, flat}) || (weights_t && !all_plain({TensorList(*weights_t)}))) return false;
  py::gil_scoped_release nogil;
  ROGA_ENTRY(first_device(out), combine_, out, flat, weights, weights_t);
  return true;
}

using OptT = c10::optional<at::Tensor>;

bool fast_sgd_(const Vec& params, const Vec& source, const Vec& grads, const std::vector<double>& gw, const OptT& gwt,
               const Vec& grad_out, const Vec& bufs, const Vec& steps, double lr, const OptT& lr_t, double momentum,
               double dampening, bool nesterov, double weight_decay, bool maximize, const OptT& found_inf) {
  if (!all_plain({params, source, grads, grad_out, bufs, steps}) || !plain_opt({gwt, lr_t, found_inf})) return false;
  py::gil_scoped_release nogil;
  ROGA_ENTRY(first_device(params), sgd_, params, source, grads, gw, gwt, grad_out, bufs, steps, lr, lr_t, momentum,
             dampening, nesterov, weight_decay, maximize, found_inf);
  return true;
}

bool fast_adam_(const Vec& params, const Vec& source, const Vec& grads, const std::vector<double>& gw, const OptT& gwt,
                const Vec& grad_out, const Vec& m, const Vec& v, const Vec& vmax, const Vec& steps, double lr,
                const OptT& lr_t, double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                bool amsgrad, bool maximize, const OptT& found_inf) {
  if (!all_plain({params, source, grads, grad_out, m, v, vmax, steps}) || !plain_opt({gwt, lr_t, found_inf}))
    return false;
  py::gil_scoped_release nogil;
  ROGA_ENTRY(first_device(params), adam_, params, source, grads, gw, gwt, grad_out, m, v, vmax, steps, lr, lr_t, beta1,
             beta2, eps, weight_decay, decoupled, amsgrad, maximize, found_inf);
  return true;
}

// ---- optimizer helpers (eager only): one C++ loop per step instead of a Python loop per
// parameter. They read Python lists in place (no conversion of every element to a vector).

const at::Tensor& tensor_at(const py::handle& seq, Py_ssize_t i, const char* what) {
  PyObject* o = PyList_Check(seq.ptr()) ? PyList_GET_ITEM(seq.ptr(), i) : PyTuple_GET_ITEM(seq.ptr(), i);
  TORCH_CHECK_TYPE(THPVariable_Check(o), what, "[", i, "] is not a tensor");
  return THPVariable_Unpack(o);
}

Py_ssize_t seq_len(const py::handle& seq, const char* what) {
  TORCH_CHECK_TYPE(PyList_Check(seq.ptr()) || PyTuple_Check(seq.ptr()), what, " must be a list or tuple");
  return PySequence_Fast_GET_SIZE(seq.ptr());
}

// [p.grad for p in params] (None where missing) and how many are missing.
// take: also p.grad = None (the grads_of, then set_grads(params, None), of one loop).
py::tuple grads_of(const py::handle& params, bool take) {
  const Py_ssize_t n = seq_len(params, "params");
  py::list out(n);
  int64_t missing = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& p = tensor_at(params, i, "params");
    const at::Tensor& g = p.grad();
    if (g.defined()) {
      out[i] = py::reinterpret_steal<py::object>(THPVariable_Wrap(g));
      if (take) p.mutable_grad().reset();
    } else {
      out[i] = py::none();
      ++missing;
    }
  }
  return py::make_tuple(out, missing);
}

// p.grad = g for each pair (g None: no gradient), or p.grad = None for all (grads None).
// The caller guarantees each g matches its p (its own buffers); no Python-level checks run.
void set_grads(const py::handle& params, const py::handle& grads) {
  const Py_ssize_t n = seq_len(params, "params");
  const bool clear = grads.is_none();
  if (!clear) TORCH_CHECK_VALUE(seq_len(grads, "grads") == n, "set_grads: lengths differ");
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& p = tensor_at(params, i, "params");
    PyObject* g = clear ? Py_None : (PyList_Check(grads.ptr()) ? PyList_GET_ITEM(grads.ptr(), i)
                                                               : PyTuple_GET_ITEM(grads.ptr(), i));
    if (g == Py_None)
      p.mutable_grad().reset();
    else
      p.mutable_grad() = tensor_at(grads, i, "grads");
  }
}

// p.data = t for each pair; returns the old p.data tensors (the swap strategy's storage swap).
py::list swap_data(const py::handle& params, const py::handle& data) {
  const Py_ssize_t n = seq_len(params, "params");
  TORCH_CHECK_VALUE(seq_len(data, "data") == n, "swap_data: lengths differ");
  py::list old(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& p = tensor_at(params, i, "params");
    old[i] = py::reinterpret_steal<py::object>(THPVariable_Wrap(p.variable_data()));
    p.set_data(tensor_at(data, i, "data"));
  }
  return old;
}

}  // namespace
}  // namespace roga

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace roga;
  m.doc() = "roga_cuda compiled kernels (C++ CPU, CUDA). Use roga_cuda.ops (or torch.ops.roga_cuda), not this module.";
  m.attr("TORCH_VERSION") = ROGA_TORCH_VERSION;
#ifdef ROGA_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("_remember_overlaps", &set_overlap_memo, py::arg("on"),
        "Whether calls that write the same tensors as a recent call may reuse its sorted, checked written ranges "
        "(default True); returns the previous setting. A benchmark and test knob.");
  m.def("_cpu_isa", &cpu::isa, "Which compiled variant of the CPU loops is active (avx2 or baseline).");
  m.def("_set_cpu_isa", &cpu::set_isa, py::arg("name"),
        "Switch the CPU loops to 'avx2' or 'baseline' (tests); False if this CPU cannot run it.");
  m.def("_cpu_block", &cpu::set_elementwise_block, py::arg("n"),
        "Elements per block of the elementwise CPU loops on float32/float64 storage (default 128); returns the "
        "previous value. A benchmark and test knob: results do not depend on it.");
#ifdef ROGA_WITH_CUDA
  m.def("_cuda_launch_limits", &cuda::launch_limits, py::arg("chunk") = 0, py::arg("max_tensors") = 0,
        py::arg("max_blocks") = 0,
        "Tests only: set the CUDA launch geometry (0 = default); returns the previous [chunk, max_tensors, max_blocks].");
#endif
  // Fast eager entries: same checks and kernels as torch.ops.roga_cuda.*, without boxing.
  // They return None/False, having done nothing, when an input needs the dispatcher.
  m.def("norm", &fast_norm, py::arg("ts"), py::arg("params"), py::arg("eta"), py::arg("per_tensor"));
  m.def("perturb_", &fast_perturb_, py::arg("params"), py::arg("grads"), py::arg("backup"), py::arg("scale"),
        py::arg("scale_tensor"), py::arg("adaptive"), py::arg("eta"));
  m.def("restore_", &fast_restore_, py::arg("params"), py::arg("backup"));
  m.def("restore_accumulate_", &fast_restore_accumulate_, py::arg("params"), py::arg("backup"), py::arg("acc"),
        py::arg("grads"), py::arg("weight"), py::arg("weight_tensor"));
  m.def("gram", &fast_gram, py::arg("lists"));
  m.def("combine_", &fast_combine_, py::arg("out"), py::arg("lists"), py::arg("weights"), py::arg("weight_tensor"));

  m.def("sgd_", &fast_sgd_);
  m.def("adam_", &fast_adam_);

  m.def("grads_of", &grads_of, py::arg("params"), py::arg("take") = false,
        "([p.grad for p in params], number of None) in one C++ loop; take=True also sets every p.grad to None");
  m.def("set_grads", &set_grads, "p.grad = g for each pair, or p.grad = None for all (grads=None)");
  m.def("swap_data", &swap_data, "p.data = t for each pair; returns the old p.data tensors");

  // The checks alone, for the Python backends (reference, foreach, triton): one
  // implementation of every check, one text of every message.
  const auto real = CheckLevel::kStrided;  // the Python backends take any strided layout
  m.def("check_norm", [real](const Vec& ts, const c10::optional<Vec>& params) {
    const TensorList p = params ? TensorList(*params) : TensorList();
    check_norm(ts, params ? &p : nullptr, real);
  });
  m.def("check_perturb_", [real](const Vec& p, const Vec& g,
                                 const Vec& b, const c10::optional<at::Tensor>& s) {
    check_perturb_(p, g, b, 0.0, s, real);
  });
  m.def("check_restore_", [real](const Vec& p, const Vec& b) {
    check_restore_(p, b, real);
  });
  m.def("check_restore_accumulate_",
        [real](const Vec& p, const Vec& b, const Vec& a,
               const Vec& g, const c10::optional<at::Tensor>& w) {
          check_restore_accumulate_(p, b, a, g, 0.0, w, real);
        });
  m.def("check_gram", [real](const Lists& lists) {
    check_gram(lists, lists.lists(), real);
  });
  m.def("check_combine_", [real](const Vec& out, const Lists& lists, int64_t nweights,
                                 const c10::optional<at::Tensor>& w) {
    check_combine_(out, lists, std::vector<double>(w ? 0 : nweights, 0.0), w, real);
  });
  m.def("check_sgd_", [real](const Vec& params, const Vec& source, const Vec& grads, int64_t nweights, const OptT& gwt,
                             const Vec& grad_out, const Vec& bufs, const Vec& steps, double momentum, const OptT& lr_t,
                             const OptT& found_inf) {
    check_update("sgd_", params, source, grads, std::vector<double>(gwt ? 0 : nweights, 0.0), gwt, grad_out,
                 {{"momentum_buffers", bufs, momentum != 0}}, steps, momentum != 0, 0.0, lr_t, found_inf, real);
  });
  m.def("check_adam_", [real](const Vec& params, const Vec& source, const Vec& grads, int64_t nweights,
                              const OptT& gwt, const Vec& grad_out, const Vec& m, const Vec& v, const Vec& vmax,
                              const Vec& steps, bool amsgrad, const OptT& lr_t, const OptT& found_inf) {
    check_update("adam_", params, source, grads, std::vector<double>(gwt ? 0 : nweights, 0.0), gwt, grad_out,
                 {{"exp_avgs", m, true}, {"exp_avg_sqs", v, true}, {"max_exp_avg_sqs", vmax, amsgrad}}, steps, true,
                 0.0, lr_t, found_inf, real);
  });
}
