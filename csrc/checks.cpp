#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <algorithm>
#include <array>
#include <atomic>

namespace roga {
namespace {

bool float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Same element order in storage: strides agree on every dimension longer than 1.
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_contiguous() && b.is_contiguous()) return true;  // the common case, from cached flags
  const auto sa = a.sizes(), ta = a.strides(), tb = b.strides();
  for (size_t d = 0; d < sa.size(); ++d)
    if (sa[d] > 1 && ta[d] != tb[d]) return false;
  return true;
}

struct Range {
  uintptr_t lo, hi;  // [lo, hi) bytes
  int list;
  int64_t pos;
};

// The bytes a (non-empty) strided tensor can touch, from its data pointer (const_data_ptr:
// reading the address never materialises a copy-on-write storage); for dense tensors exactly
// numel * element_size.
Range range_of(const at::Tensor& t, int list, int64_t pos) {
  const auto lo = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  int64_t span = 1;
  if (t.is_non_overlapping_and_dense()) {
    span = t.numel();
  } else {
    const auto s = t.sizes(), st = t.strides();
    for (size_t d = 0; d < s.size(); ++d) span += (s[d] - 1) * st[d];
  }
  return {lo, lo + static_cast<uintptr_t>(span * t.element_size()), list, pos};
}

bool exact_alias(const at::Tensor& a, const at::Tensor& b) {
  return a.const_data_ptr() == b.const_data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides();
}

[[noreturn]] void overlap_error(const char* op, const std::vector<ListArg>& lists, const Range& w, const Range& r,
                                bool alias_ok) {
  const std::string where = lists[w.list].name + "[" + std::to_string(w.pos) + "]";
  const std::string other = lists[r.list].name + "[" + std::to_string(r.pos) + "]";
  const bool same_pos = w.pos == r.pos;
  TORCH_CHECK_VALUE(false, op, ": ", where, " shares memory with ", other,
                    alias_ok && same_pos && !lists[r.list].written ? " without being the same tensor" : "",
                    !same_pos ? " (a written tensor may not overlap any other tensor of the call, "
                                "e.g. a parameter listed twice)"
                              : "");
}

// The written tensors' byte ranges of recent calls, sorted and found disjoint. An optimizer
// writes the same tensors step after step (parameters, backups, optimizer state), and
// sorting their ranges was a fifth of the host cost of an update on small tensors
// (callgrind, 400 one-element tensors). The gradients it reads are new tensors after every
// backward (measured: no step repeated the last 16 steps' gradient addresses), so each call
// still checks every read tensor against these ranges. The key is the call's list structure
// and every written range: the written-vs-written verdict depends on nothing else. Per
// thread, so no lock.
class WrittenRanges {
 public:
  // The memo key: the op, every list's size and role, and every written tensor's byte range
  // ({0, 0} for an empty one, so a range's position in its list is part of the key too).
  static std::vector<uintptr_t> key(const char* op, const std::vector<ListArg>& lists) {
    size_t nw = 0;
    for (const auto& l : lists) nw += l.written ? l.ts.size() : 0;
    std::vector<uintptr_t> k;
    k.reserve(1 + lists.size() + 2 * nw);
    k.push_back(reinterpret_cast<uintptr_t>(op));
    for (size_t j = 0; j < lists.size(); ++j) {
      const auto& l = lists[j];
      k.push_back(l.ts.size() << 1 | l.written);
      if (!l.written) continue;
      for (size_t i = 0; i < l.ts.size(); ++i) {
        const Range r = l.ts[i].numel() > 0 ? range_of(l.ts[i], static_cast<int>(j), i) : Range{0, 0, 0, 0};
        k.push_back(r.lo);
        k.push_back(r.hi);
      }
    }
    return k;
  }
  // The non-empty written ranges a key holds, in list order (a miss reads them from the key
  // rather than from the tensors again).
  static std::vector<Range> ranges(const std::vector<uintptr_t>& k) {
    std::vector<Range> out;
    out.reserve((k.size() - 1) / 2);
    size_t at = 1;
    for (int j = 0; at < k.size(); ++j) {
      const size_t n = k[at] >> 1;
      const bool written = k[at++] & 1;
      if (!written) continue;
      for (size_t i = 0; i < n; ++i, at += 2)
        if (k[at + 1] > k[at]) out.push_back(Range{k[at], k[at + 1], j, static_cast<int64_t>(i)});
    }
    return out;
  }
  const std::vector<Range>* find(const std::vector<uintptr_t>& k) const {
    for (const auto& e : seen_)
      if (e.key == k) return &e.sorted;
    return nullptr;
  }
  const std::vector<Range>& add(std::vector<uintptr_t> k, std::vector<Range> sorted) {
    Entry& e = seen_[next_];
    next_ = (next_ + 1) % seen_.size();
    e = Entry{std::move(k), std::move(sorted)};
    return e.sorted;
  }

 private:
  struct Entry {
    std::vector<uintptr_t> key;
    std::vector<Range> sorted;
  };
  std::array<Entry, 16> seen_;  // a step's distinct calls (phases x parameter groups)
  size_t next_ = 0;
};

std::atomic<bool> remember_written{true};  // the benchmarks' and tests' switch (set_overlap_memo)

void check_overlaps(const char* op, const std::vector<ListArg>& lists, bool alias_ok) {
  const auto by_lo = [](const Range& a, const Range& b) { return a.lo < b.lo; };
  const bool memo = remember_written.load(std::memory_order_relaxed);
  thread_local WrittenRanges remembered;
  std::vector<uintptr_t> key = WrittenRanges::key(op, lists);
  const std::vector<Range>* found = memo ? remembered.find(key) : nullptr;
  std::vector<Range> own;
  if (!found) {
    own = WrittenRanges::ranges(key);
    if (!std::is_sorted(own.begin(), own.end(), by_lo)) std::sort(own.begin(), own.end(), by_lo);
    for (size_t i = 1; i < own.size(); ++i)
      if (own[i].lo < own[i - 1].hi) overlap_error(op, lists, own[i - 1], own[i], alias_ok);
    found = memo ? &remembered.add(std::move(key), std::move(own)) : &own;
  }
  const std::vector<Range>& w = *found;
  if (w.empty()) return;
  // Written ranges are disjoint and sorted by both ends: one binary search per read tensor
  // finds the only written range it could alias.
  for (size_t j = 0; j < lists.size(); ++j) {
    if (lists[j].written) continue;
    for (size_t i = 0; i < lists[j].ts.size(); ++i) {
      const at::Tensor& t = lists[j].ts[i];
      if (t.numel() == 0) continue;
      const Range r = range_of(t, static_cast<int>(j), i);
      auto it = std::upper_bound(w.begin(), w.end(), r.lo, [](uintptr_t v, const Range& x) { return v < x.hi; });
      if (it == w.end() || it->lo >= r.hi) continue;
      const bool allowed = alias_ok && it->pos == r.pos && exact_alias(lists[it->list].ts[it->pos], t);
      if (!allowed) overlap_error(op, lists, *it, r, alias_ok);
    }
  }
}

}  // namespace

std::optional<at::Device> check_lists(const char* op, const std::vector<ListArg>& lists, bool allow_empty,
                                      bool alias_ok, CheckLevel level) {
  const ListArg& first = lists[0];
  const size_t n = first.ts.size();
  for (const auto& l : lists)
    TORCH_CHECK_VALUE(l.ts.size() == n, op, ": `", l.name, "` has ", l.ts.size(), " tensors but `", first.name,
                      "` has ", n);
  if (n == 0) {
    TORCH_CHECK_VALUE(allow_empty, op, ": `", first.name,
                      "` is an empty list; there is nothing to reduce (and no device to return a result on)");
    return std::nullopt;
  }
  TORCH_CHECK_TYPE(first.ts[0].defined(), op, ": ", first.name, "[0] is an undefined tensor");
  const at::Device dev = first.ts[0].device();
  const bool memory = level != CheckLevel::kMeta;
  const bool dense = level == CheckLevel::kMemory;
  const bool inference_mode = c10::InferenceMode::is_enabled();
  for (const auto& l : lists) {
    const bool is_first = &l == &first;
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& t = l.ts[i];
      TORCH_CHECK_TYPE(t.defined(), op, ": ", l.name, "[", i, "] is an undefined tensor");
      TORCH_CHECK_TYPE(t.layout() == at::kStrided, op, ": ", l.name, "[", i, "] is a ", t.layout(),
                       " tensor; only dense (strided) tensors are supported");
      TORCH_CHECK_TYPE(float_dtype(t.scalar_type()), op, ": ", l.name, "[", i, "] has dtype ", t.scalar_type(),
                       "; supported: float16, bfloat16, float32, float64");
      TORCH_CHECK_VALUE(t.device() == dev, op, ": ", l.name, "[", i, "] is on ", t.device(), " but ", first.name,
                        "[0] is on ", dev, "; all tensors must be on one device");
      if (dense)
        TORCH_CHECK_VALUE(t.is_non_overlapping_and_dense(), op, ": ", l.name, "[", i, "] is not contiguous (sizes ",
                          t.sizes(), ", strides ", t.strides(),
                          "); the compiled kernels walk raw storage: pass .contiguous() tensors or use "
                          "backend='foreach'");
      if (memory && l.written) {
        TORCH_CHECK_VALUE(inference_mode || !t.is_inference(), op, ": ", l.name, "[", i,
                          "] is an inference tensor (made under torch.inference_mode()); it cannot be updated "
                          "in place outside inference mode");
        TORCH_CHECK_VALUE(dense || at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", l.name, "[", i,
                          "] has elements that share memory (e.g. an expanded view); it cannot be written");
      }
      if (l.steps) {
        // (real tensors: plain numel; sym_numel would go through a SymInt comparison)
        const bool one = memory ? t.numel() == 1 : t.sym_numel() == 1;
        TORCH_CHECK_VALUE(one && t.scalar_type() == at::kFloat, op, ": ", l.name, "[", i,
                          "] must be a one-element float32 tensor (a step count), got shape ", t.sym_sizes(),
                          " and dtype ", t.scalar_type());
        continue;
      }
      if (is_first) continue;
      const at::Tensor& r = first.ts[i];
      // Real tensors compare plain sizes (sym_sizes would go through SymInt guards per dim).
      TORCH_CHECK_VALUE(memory ? t.sizes() == r.sizes() : t.sym_sizes() == r.sym_sizes(), op, ": ", l.name, "[",
                        i, "] has shape ", t.sym_sizes(), " but ", first.name, "[", i, "] has shape ", r.sym_sizes());
      TORCH_CHECK_TYPE(t.scalar_type() == r.scalar_type(), op, ": ", l.name, "[", i, "] has dtype ",
                       t.scalar_type(), " but ", first.name, "[", i, "] has ", r.scalar_type(),
                       "; tensors at one position must share a dtype");
      if (dense)
        TORCH_CHECK_VALUE(same_layout(t, r), op, ": ", l.name, "[", i, "] has strides ", t.strides(), " but ",
                          first.name, "[", i, "] has ", r.strides(),
                          "; tensors at one position must share a memory layout");
    }
  }
  if (memory) check_overlaps(op, lists, alias_ok);
  return dev;
}

namespace {

// The K lists of a flat argument of K * n tensors, named "prefix[k]".
std::vector<ListArg> split_lists(const char* op, const char* prefix, TensorList flat, int64_t k, bool written) {
  TORCH_CHECK_VALUE(k >= 1, op, ": `", prefix, "` is empty; give at least one tensor list");
  TORCH_CHECK_VALUE(static_cast<int64_t>(flat.size()) % k == 0, op, ": the ", flat.size(), " tensors of `", prefix,
                    "` do not split into ", k, " lists of one length");
  const size_t n = flat.size() / k;
  std::vector<ListArg> out;
  out.reserve(k);
  for (int64_t j = 0; j < k; ++j)
    out.push_back({std::string(prefix) + "[" + std::to_string(j) + "]", flat.slice(j * n, n), written});
  return out;
}

std::vector<TensorList> views(const std::vector<ListArg>& lists, size_t from) {
  std::vector<TensorList> out;
  for (size_t j = from; j < lists.size(); ++j) out.push_back(lists[j].ts);
  return out;
}

}  // namespace

Scalar scalar_arg(const char* op, const char* name, double value, const std::optional<at::Tensor>& t,
                  const std::optional<at::Device>& dev, CheckLevel level) {
  Scalar s{value, {}};
  if (!t.has_value() || !t->defined()) return s;
  TORCH_CHECK_VALUE(t->dim() == 0, op, ": `", name, "` must be a Python number or a 0-d tensor, got shape ",
                    t->sym_sizes());
  const auto dt = t->scalar_type();
  TORCH_CHECK_TYPE(!at::isComplexType(dt) && dt != at::kBool, op, ": `", name, "` has dtype ", dt,
                   "; use a real floating-point value");
  const bool host = t->device().is_cpu();
  if (dev)
    TORCH_CHECK_VALUE(host || t->device() == *dev, op, ": `", name, "` is on ", t->device(),
                      " but the tensors are on ", *dev);
  if (host && level != CheckLevel::kMeta) {
    s.value = t->item<double>();  // a host read: nothing to synchronise with
    return s;
  }
  s.tensor = (dt == at::kFloat || dt == at::kDouble || level == CheckLevel::kMeta) ? *t : t->to(at::kFloat);
  return s;
}

Weights weights_arg(const char* op, c10::ArrayRef<double> values, const std::optional<at::Tensor>& t, int64_t k,
                    const std::optional<at::Device>& dev, CheckLevel level, bool direct_ok) {
  Weights w;
  if (!t.has_value() || !t->defined()) {
    const int64_t got = static_cast<int64_t>(values.size());
    TORCH_CHECK_VALUE(got == k || (direct_ok && got == 2 * k), op, ": got ", got, " weights for ", k, " lists",
                      direct_ok ? " (give K, or 2K with the direct row)" : "");
    w.values.assign(values.begin(), values.end());
    return w;
  }
  TORCH_CHECK_VALUE(t->dim() == 1 && (t->sym_numel() == k || (direct_ok && t->sym_numel() == 2 * k)), op,
                    ": `weights` must hold ", k, direct_ok ? " or 2K" : "", " values (one per list",
                    direct_ok ? ", then the direct row" : "", "), got shape ", t->sym_sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), op, ": `weights` has dtype ", t->scalar_type(),
                   "; use a floating-point tensor");
  const bool host = t->device().is_cpu();
  if (dev)
    TORCH_CHECK_VALUE(host || t->device() == *dev, op, ": `weights` is on ", t->device(), " but the tensors are on ",
                      *dev);
  if (host && level != CheckLevel::kMeta) {
    const at::Tensor c = t->to(at::kDouble).contiguous();
    w.values.assign(c.const_data_ptr<double>(), c.const_data_ptr<double>() + c.numel());
    return w;
  }
  if (level == CheckLevel::kMeta) {
    w.tensor = *t;
    return w;
  }
  const bool as_is = (t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble) && t->is_contiguous();
  w.tensor = as_is ? *t : t->to(at::kFloat).contiguous();
  return w;
}

Checked check_norm(TensorList ts, const TensorList* params, CheckLevel level) {
  std::vector<ListArg> lists{{"ts", ts, false}};
  if (params) lists.push_back({"params", *params, false});
  Checked c;
  c.dev = check_lists("norm", lists, /*allow_empty=*/false, false, level);
  return c;
}

Checked check_perturb_(TensorList params, TensorList grads, TensorList backup, double scale,
                       const std::optional<at::Tensor>& scale_t, CheckLevel level) {
  Checked c;
  c.dev = check_lists("perturb_", {{"params", params, true}, {"grads", grads, false}, {"backup", backup, true}}, true,
                      false, level);
  c.scalar = scalar_arg("perturb_", "scale", scale, scale_t, c.dev, level);
  return c;
}

Checked check_restore_(TensorList params, TensorList backup, CheckLevel level) {
  Checked c;
  c.dev = check_lists("restore_", {{"params", params, true}, {"backup", backup, false}}, true, false, level);
  return c;
}

Checked check_restore_accumulate_(TensorList params, TensorList backup, TensorList acc, TensorList grads,
                                  double weight, const std::optional<at::Tensor>& weight_t, CheckLevel level) {
  Checked c;
  c.dev = check_lists("restore_accumulate_",
                      {{"params", params, true}, {"backup", backup, false}, {"acc", acc, true}, {"grads", grads, false}},
                      true, false, level);
  c.scalar = scalar_arg("restore_accumulate_", "weight", weight, weight_t, c.dev, level);
  return c;
}

Checked check_gram(TensorList lists, int64_t k, CheckLevel level) {
  const auto named = split_lists("gram", "lists", lists, k, false);
  Checked c;
  c.dev = check_lists("gram", named, /*allow_empty=*/false, false, level);
  c.lists = views(named, 0);
  return c;
}

Checked check_combine_(TensorList out, TensorList lists, c10::ArrayRef<double> weights,
                       const std::optional<at::Tensor>& weights_t, CheckLevel level) {
  // K follows from the flat list's length: K lists as long as `out`.
  const int64_t n = static_cast<int64_t>(out.size());
  const bool wt = weights_t.has_value() && weights_t->defined();
  TORCH_CHECK_VALUE(n > 0 ? lists.size() % n == 0 && !lists.empty() : lists.empty(), "combine_: `lists` holds ",
                    lists.size(), " tensors, not K >= 1 lists of ", n, " tensors (the length of `out`)");
  // (with no lists, K is the number of weights; a weight tensor's length may be symbolic)
  const int64_t k = n > 0 ? static_cast<int64_t>(lists.size()) / n
                  : wt ? weights_t->sym_numel().guard_int(__FILE__, __LINE__)
                       : static_cast<int64_t>(weights.size());
  Checked c;
  std::vector<ListArg> named{{"out", out, true}};
  if (n > 0) {
    auto ls = split_lists("combine_", "lists", lists, k, false);
    named.insert(named.end(), ls.begin(), ls.end());
  }
  c.dev = check_lists("combine_", named, true, /*alias_ok=*/true, level);
  c.weights = weights_arg("combine_", weights, weights_t, k, c.dev, level, false);
  c.lists = views(named, 1);
  return c;
}

Checked check_update(const char* op, TensorList params, TensorList source, TensorList grads,
                     c10::ArrayRef<double> grad_weights, const std::optional<at::Tensor>& grad_weight_t,
                     TensorList grad_out, const std::vector<StateArg>& states, TensorList steps, bool need_steps,
                     double lr, const std::optional<at::Tensor>& lr_t, const std::optional<at::Tensor>& found_inf,
                     CheckLevel level) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(n > 0 ? grads.size() % n == 0 && !grads.empty() : grads.empty(), op, ": `grads` holds ",
                    grads.size(), " tensors, not K >= 1 lists of ", n, " tensors (the length of `params`)");
  auto optional_list = [&](const char* name, TensorList ts, bool required) {
    TORCH_CHECK_VALUE(ts.empty() ? !required || n == 0 : static_cast<int64_t>(ts.size()) == n, op, ": `", name,
                      "` has ", ts.size(), " tensors but `params` has ", n,
                      required ? "" : " (give it empty to leave it out)");
  };
  optional_list("source", source, false);
  optional_list("grad_out", grad_out, false);
  optional_list("steps", steps, need_steps);
  for (const auto& st : states) {
    optional_list(st.name, st.ts, st.required);
    TORCH_CHECK_VALUE(st.required || st.ts.empty(), op, ": `", st.name,
                      "` must be empty with these hyper-parameters, got ", st.ts.size(), " tensors");
  }
  const int64_t k = n > 0 ? static_cast<int64_t>(grads.size()) / n
                  : grad_weight_t.has_value() && grad_weight_t->defined()
                      ? grad_weight_t->sym_numel().guard_int(__FILE__, __LINE__)
                      : static_cast<int64_t>(grad_weights.size());
  std::vector<ListArg> named{{"params", params, true}};
  if (!source.empty()) named.push_back({"source", source, false});
  const size_t grads_at = named.size();
  if (n > 0) {
    auto gl = split_lists(op, "grads", grads, k, false);
    named.insert(named.end(), gl.begin(), gl.end());
  }
  const size_t grads_end = named.size();
  if (!grad_out.empty()) named.push_back({"grad_out", grad_out, true});
  for (const auto& st : states)
    if (!st.ts.empty()) named.push_back({st.name, st.ts, true});
  if (!steps.empty()) named.push_back({"steps", steps, true, /*steps=*/true});
  Checked c;
  c.dev = check_lists(op, named, true, /*alias_ok=*/true, level);
  for (size_t j = grads_at; j < grads_end; ++j) c.lists.push_back(named[j].ts);
  c.weights = weights_arg(op, grad_weights, grad_weight_t, k, c.dev, level, true);
  c.lr = scalar_arg(op, "lr", lr, lr_t, c.dev, level);
  if (found_inf.has_value() && found_inf->defined()) {
    const at::Tensor& f = *found_inf;
    TORCH_CHECK_VALUE(f.sym_numel() == 1 && at::isFloatingType(f.scalar_type()), op,
                      ": `found_inf` must be a one-element floating-point tensor, got shape ", f.sym_sizes(),
                      " and dtype ", f.scalar_type());
    if (c.dev)
      TORCH_CHECK_VALUE(f.device() == *c.dev || f.device().is_cpu(), op, ": `found_inf` is on ", f.device(),
                        " but the tensors are on ", *c.dev);
    if (f.device().is_cpu() && level != CheckLevel::kMeta)
      c.skip = f.item<double>() != 0.0;  // a host read: nothing to synchronise with
    else
      c.found_inf = f.scalar_type() == at::kFloat || level == CheckLevel::kMeta ? f : f.to(at::kFloat);
  }
  return c;
}

bool set_overlap_memo(bool on) { return remember_written.exchange(on); }

bool all_plain(std::initializer_list<TensorList> lists) {
  if (c10::impl::TorchDispatchModeTLS::stack_len() > 0) return false;
  const c10::DispatchKeySet wrapped({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                     c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
                                     c10::DispatchKey::FuncTorchGradWrapper});
  for (const auto& l : lists)
    for (const auto& t : l) {
      if (!t.defined()) continue;  // check_lists names it
      if (t.key_set().has_any(wrapped)) return false;
      const auto type = t.device().type();
      if (type != c10::DeviceType::CPU && type != c10::DeviceType::CUDA) return false;
    }
  return true;
}

void bump_versions(TensorList ts) {
  for (const auto& t : ts)
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace roga
