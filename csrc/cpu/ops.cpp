// CPU multi-tensor ops: one call walks a whole tensor list.
//
// The elements of all tensors are cut, in list order, into fixed chunks of kChunk elements
// (a chunk may span many small tensors; a big tensor spans many chunks), and threads take
// contiguous ranges of chunks. Small tensors therefore share one parallel region instead
// of each paying for one, and the work is balanced by elements, not by tensors. Because
// chunk boundaries depend only on the tensor sizes, every reduction is summed in the same
// order whatever the thread count: same input, same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "../common.h"
#include "../entry.h"
#include "kernels.hpp"

namespace roga {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1 << 15;        // elements per work item
// Lists smaller than this run on the calling thread: below it, waking the pool's sleeping
// workers (~50-100 us after the serial checks of a many-tensor call) costs more than the
// second core saves (measured: 400 tensors / 300k elements, 106 us on one thread, 260 on two).
constexpr int64_t kSerialBelow = 1 << 19;

struct Piece {
  int32_t tensor;
  int64_t begin, end;  // element range within the tensor
};

struct Plan {
  std::vector<Piece> pieces;         // in list order
  std::vector<int64_t> chunk_first;  // chunk c holds pieces [chunk_first[c], chunk_first[c+1])
  int64_t total = 0;
};

Plan make_plan(const TensorList& ts) {
  Plan plan;
  plan.pieces.reserve(ts.size());
  plan.chunk_first.push_back(0);
  int64_t fill = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    const int64_t n = ts[i].numel();
    for (int64_t s = 0; s < n;) {
      const int64_t take = std::min(kChunk - fill, n - s);
      plan.pieces.push_back({static_cast<int32_t>(i), s, s + take});
      s += take;
      fill += take;
      plan.total += take;
      if (fill == kChunk) {
        plan.chunk_first.push_back(static_cast<int64_t>(plan.pieces.size()));
        fill = 0;
      }
    }
  }
  if (fill) plan.chunk_first.push_back(static_cast<int64_t>(plan.pieces.size()));
  return plan;
}

// Pieces ahead of the current one whose first bytes are prefetched. A list of many small
// tensors is scattered over the heap: each tensor starts a new stream that the hardware
// prefetcher has to discover, so without this a cold 400-tensor list reads at ~6 GB/s.
constexpr int64_t kPrefetchAhead = 4;
constexpr int64_t kPrefetchBytes = 4096;

// Write-only outputs larger than this go out with non-temporal stores (see copy_out): far
// over the 1 MB L2 and most of an L3, so nothing written would still be cached for the
// next op anyway. Measured: 21M-element out = a + s*b, 46.6 -> 59.9 GB/s.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

int64_t list_bytes(const TensorList& ts) {
  int64_t b = 0;
  for (const auto& t : ts) b += t.numel() * t.element_size();
  return b;
}

struct Slot;

struct Streams {  // the data pointers of every list an op touches, per tensor
  std::vector<const std::vector<char*>*> lists;
  const std::vector<Slot>* slots;
};

inline void prefetch_piece(const Streams& st, const Piece& pc);

// f(piece_index, piece) for every piece, chunks spread over torch's intra-op threads.
template <class F>
void run(const Plan& plan, const Streams& st, const F& f) {
  const int64_t nc = static_cast<int64_t>(plan.chunk_first.size()) - 1;
  auto body = [&](int64_t c0, int64_t c1) {
    const int64_t k0 = plan.chunk_first[c0], k1 = plan.chunk_first[c1];
    for (int64_t k = k0; k < std::min(k1, k0 + kPrefetchAhead); ++k) prefetch_piece(st, plan.pieces[k]);
    for (int64_t k = k0; k < k1; ++k) {
      if (k + kPrefetchAhead < k1) prefetch_piece(st, plan.pieces[k + kPrefetchAhead]);
      f(k, plan.pieces[k]);
    }
  };
  if (plan.total < kSerialBelow || nc < 2)
    body(0, nc);
  else
    at::parallel_for(0, nc, 1, body);
}

const KernelTable* pick_table() {
  const char* env = std::getenv("ROGA_CPU_ISA");
  const std::string want = env ? env : "";
#ifdef ROGA_X86
  if (want != "baseline" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return &avx2::table();
#endif
  return &base::table();
}

const KernelTable*& active_table() {
  static const KernelTable* t = pick_table();
  return t;
}

const SegmentKernels& kernels(at::ScalarType t) {
  const KernelTable& k = *active_table();
  switch (t) {
    case at::kFloat: return k.f32;
    case at::kDouble: return k.f64;
    case at::kHalf: return k.f16;
    case at::kBFloat16: return k.bf16;
    default: TORCH_CHECK_TYPE(false, "roga_cuda: unsupported dtype ", t);
  }
}

// Per-tensor facts hoisted out of the piece loop (no tensor method calls in the hot path).
struct Slot {
  const SegmentKernels* k;
  int64_t elem;
};

std::vector<Slot> slots(const TensorList& ts) {
  std::vector<Slot> s(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) s[i] = {&kernels(ts[i].scalar_type()), ts[i].element_size()};
  return s;
}

inline void prefetch_piece(const Streams& st, const Piece& pc) {
  const int64_t e = (*st.slots)[pc.tensor].elem;
  const int64_t bytes = std::min((pc.end - pc.begin) * e, kPrefetchBytes);
  for (const auto* l : st.lists) {
    const char* p = (*l)[pc.tensor] + pc.begin * e;
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 1);
  }
}

std::vector<char*> ptrs(const TensorList& ts) {
  std::vector<char*> p(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) p[i] = static_cast<char*>(ts[i].data_ptr());
  return p;
}

template <typename T>
void write_sqrt(const at::Tensor& out, const double* v, int64_t n) {
  T* o = out.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<T>(std::sqrt(v[i]));
}

}  // namespace

// Which compiled variant of the CPU loops is active ("avx2" or "baseline").
std::string isa() { return active_table()->isa; }

bool set_isa(const std::string& name) {
  if (name == "baseline") {
    active_table() = &base::table();
    return true;
  }
#ifdef ROGA_X86
  if (name == "avx2" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    active_table() = &avx2::table();
    return true;
  }
#endif
  return false;
}

int64_t set_elementwise_block(int64_t n) {
  TORCH_CHECK_VALUE(n >= 1 && n <= kBlock, "_cpu_block: a block of 1 to ", kBlock, " elements, got ", n);
  return elementwise_block.exchange(n);
}

std::tuple<at::Tensor, at::Tensor> norm(const TensorList& ts, const TensorList* params, double eta,
                                        bool per_tensor) {
  const Plan plan = make_plan(ts);
  const auto sl = slots(ts);
  const auto xp = ptrs(ts);
  const auto pp = params ? ptrs(*params) : std::vector<char*>(ts.size(), nullptr);
  std::vector<double> part(plan.pieces.size());
  Streams st{{&xp}, &sl};
  if (params) st.lists.push_back(&pp);
  run(plan, st, [&](int64_t k, const Piece& pc) {
    const Slot& s = sl[pc.tensor];
    const int64_t off = pc.begin * s.elem;
    const char* p = pp[pc.tensor] ? pp[pc.tensor] + off : nullptr;
    part[k] = s.k->sumsq(xp[pc.tensor] + off, p, pc.end - pc.begin, eta);
  });
  const int64_t n = static_cast<int64_t>(ts.size());
  std::vector<double> sq(n + 1, 0.0);
  for (size_t k = 0; k < plan.pieces.size(); ++k) sq[plan.pieces[k].tensor] += part[k];
  for (int64_t i = 0; i < n; ++i) sq[n] += sq[i];
  const auto opts = ts[0].options().dtype(reduction_dtype(ts));
  at::Tensor total = at::empty({}, opts);
  at::Tensor per = per_tensor ? at::empty({n}, opts) : at::Tensor();
  if (opts.dtype() == at::kDouble) {
    write_sqrt<double>(total, &sq[n], 1);
    if (per_tensor) write_sqrt<double>(per, sq.data(), n);
  } else {
    write_sqrt<float>(total, &sq[n], 1);
    if (per_tensor) write_sqrt<float>(per, sq.data(), n);
  }
  return {total, per};
}

void perturb_(const TensorList& params, const TensorList& grads, const TensorList& backup, const Scalar& scale,
              bool adaptive, double eta) {
  const Plan plan = make_plan(params);
  const auto sl = slots(params);
  const auto p = ptrs(params), g = ptrs(grads), b = ptrs(backup);
  const bool stream = list_bytes(params) > kStreamBytes;
  run(plan, {{&p, &g}, &sl}, [&](int64_t, const Piece& pc) {
    const Slot& s = sl[pc.tensor];
    const int64_t off = pc.begin * s.elem;
    s.k->perturb(p[pc.tensor] + off, g[pc.tensor] + off, b[pc.tensor] + off, pc.end - pc.begin, scale.value,
                 adaptive, eta, stream);
    if (stream) stream_fence();
  });
}

void restore_(const TensorList& params, const TensorList& backup) {
  const Plan plan = make_plan(params);
  const auto sl = slots(params);
  const auto p = ptrs(params), b = ptrs(backup);
  const bool stream = list_bytes(params) > kStreamBytes;
  run(plan, {{&b}, &sl}, [&](int64_t, const Piece& pc) {
    const int64_t e = sl[pc.tensor].elem;
    copy_out(p[pc.tensor] + pc.begin * e, b[pc.tensor] + pc.begin * e, (pc.end - pc.begin) * e, stream);
    if (stream) stream_fence();
  });
}

void restore_accumulate_(const TensorList& params, const TensorList& backup, const TensorList& acc,
                         const TensorList& grads, const Scalar& weight) {
  const Plan plan = make_plan(params);
  const auto sl = slots(params);
  const auto p = ptrs(params), b = ptrs(backup), a = ptrs(acc), g = ptrs(grads);
  const bool stream = list_bytes(params) > kStreamBytes;
  run(plan, {{&b, &a, &g}, &sl}, [&](int64_t, const Piece& pc) {
    const Slot& s = sl[pc.tensor];
    const int64_t off = pc.begin * s.elem, len = pc.end - pc.begin;
    copy_out(p[pc.tensor] + off, b[pc.tensor] + off, len * s.elem, stream);
    if (stream) stream_fence();
    s.k->accumulate(a[pc.tensor] + off, g[pc.tensor] + off, len, weight.value);
  });
}

at::Tensor gram(const std::vector<TensorList>& lists) {
  const int k = static_cast<int>(lists.size());
  const int tri = k * (k + 1) / 2;
  const Plan plan = make_plan(lists[0]);
  const auto sl = slots(lists[0]);
  std::vector<std::vector<char*>> xp;
  for (const auto& l : lists) xp.push_back(ptrs(l));
  std::vector<double> part(plan.pieces.size() * tri, 0.0);
  Streams st{{}, &sl};
  for (const auto& x : xp) st.lists.push_back(&x);
  run(plan, st, [&](int64_t idx, const Piece& pc) {
    const Slot& s = sl[pc.tensor];
    const int64_t off = pc.begin * s.elem;
    std::vector<const void*> x(k);
    for (int a = 0; a < k; ++a) x[a] = xp[a][pc.tensor] + off;
    s.k->gram(x.data(), k, pc.end - pc.begin, &part[idx * tri]);
  });
  std::vector<double> g(tri, 0.0);
  for (size_t p = 0; p < plan.pieces.size(); ++p)
    for (int t = 0; t < tri; ++t) g[t] += part[p * tri + t];
  at::Tensor out = at::empty({k, k}, lists[0][0].options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int a = 0, t = 0; a < k; ++a)
    for (int b = 0; b <= a; ++b, ++t) o[a * k + b] = o[b * k + a] = g[t];
  const auto dt = reduction_dtype(lists[0]);
  return dt == at::kDouble ? out : out.to(dt);
}

void combine_(const TensorList& out, const std::vector<TensorList>& lists, const Weights& weights) {
  const int k = static_cast<int>(lists.size());
  const Plan plan = make_plan(out);
  const auto sl = slots(out);
  const auto op = ptrs(out);
  std::vector<std::vector<char*>> xp;
  for (const auto& l : lists) xp.push_back(ptrs(l));
  const double* w = weights.values.data();
  bool aliased = false;  // streaming stores only when out is none of the inputs (else its lines are cached)
  for (const auto& x : xp)
    for (size_t i = 0; i < x.size() && !aliased; ++i) aliased = out[i].numel() > 0 && x[i] == op[i];
  const bool stream = !aliased && list_bytes(out) > kStreamBytes;
  Streams st{{}, &sl};
  for (const auto& x : xp) st.lists.push_back(&x);
  run(plan, st, [&](int64_t, const Piece& pc) {
    const Slot& s = sl[pc.tensor];
    const int64_t off = pc.begin * s.elem;
    const void* x[64];
    std::vector<const void*> xv;
    const void** xs = x;
    if (k > 64) {
      xv.resize(k);
      xs = xv.data();
    }
    for (int a = 0; a < k; ++a) xs[a] = xp[a][pc.tensor] + off;
    s.k->combine(op[pc.tensor] + off, xs, w, k, pc.end - pc.begin, stream);
    if (stream) stream_fence();
  });
}

namespace {

// The data pointers and per-tensor constants shared by the fused updates.
struct UpdatePlan {
  Plan plan;
  std::vector<Slot> sl;
  std::vector<char*> p, src, gout;
  std::vector<std::vector<char*>> g;
  std::vector<double> w;
  std::vector<float> step;  // the step count before this update, per tensor (0 without steps)
  bool direct;              // w holds the direct row too (2K weights)
};

UpdatePlan update_plan(const UpdateArgs& a) {
  UpdatePlan u{make_plan(a.params), slots(a.params), ptrs(a.params), {}, {}, {}, a.weights.values, {}, false};
  u.src = a.source.empty() ? u.p : ptrs(a.source);
  u.gout = a.grad_out.empty() ? std::vector<char*>(a.params.size(), nullptr) : ptrs(a.grad_out);
  for (const auto& l : a.grads) u.g.push_back(ptrs(l));
  u.direct = a.weights.size() == 2 * static_cast<int64_t>(a.grads.size());
  u.step.assign(a.params.size(), 0.0f);
  // (untyped pointers: check_update verified float32, and the typed accessors re-check per call)
  for (size_t i = 0; i < a.steps.size(); ++i) u.step[i] = *static_cast<const float*>(a.steps[i].const_data_ptr());
  return u;
}

// Runs f(piece, tensor, grads' pointers at the piece) over every piece; then the steps.
template <class F>
void run_update(const UpdateArgs& a, const UpdatePlan& u, std::vector<const std::vector<char*>*> extra, const F& f) {
  Streams st{{&u.src}, &u.sl};
  for (const auto& x : u.g) st.lists.push_back(&x);
  for (const auto* x : extra) st.lists.push_back(x);
  const int k = static_cast<int>(u.g.size());
  run(u.plan, st, [&](int64_t, const Piece& pc) {
    const int64_t off = pc.begin * u.sl[pc.tensor].elem;
    const void* gs[64];
    std::vector<const void*> gv;
    const void** gp = gs;
    if (k > 64) {
      gv.resize(k);
      gp = gv.data();
    }
    for (int j = 0; j < k; ++j) gp[j] = u.g[j][pc.tensor] + off;
    f(pc, off, gp);
  });
  for (const auto& t : a.steps) *static_cast<float*>(t.data_ptr()) += 1.0f;
}

char* at_off(const std::vector<char*>& v, int32_t i, int64_t off) { return v[i] ? v[i] + off : nullptr; }

}  // namespace

// AMP's skipped step (found_inf): only the folded restore happens.
bool skipped(const UpdateArgs& a) {
  if (!a.skip) return false;
  if (!a.source.empty()) restore_(a.params, a.source);
  return true;
}

void sgd_(const UpdateArgs& a, const TensorList& momentum_buffers, const SgdHyper& h) {
  if (skipped(a)) return;
  const UpdatePlan u = update_plan(a);
  const auto buf = momentum_buffers.empty() ? std::vector<char*>(a.params.size(), nullptr) : ptrs(momentum_buffers);
  const int k = static_cast<int>(u.g.size());
  std::vector<SgdSeg> seg(a.params.size());
  for (size_t i = 0; i < seg.size(); ++i)
    seg[i] = SgdSeg{a.lr.value, h.momentum, h.dampening, h.weight_decay, h.nesterov, h.maximize, u.step[i] == 0.0f,
                    u.direct};
  std::vector<const std::vector<char*>*> extra;
  if (!momentum_buffers.empty()) extra.push_back(&buf);
  run_update(a, u, extra, [&](const Piece& pc, int64_t off, const void** gp) {
    const int32_t i = pc.tensor;
    u.sl[i].k->sgd(u.p[i] + off, u.src[i] + off, gp, u.w.data(), k, at_off(u.gout, i, off), at_off(buf, i, off),
                   pc.end - pc.begin, seg[i]);
  });
}

void adam_(const UpdateArgs& a, const TensorList& exp_avgs, const TensorList& exp_avg_sqs,
           const TensorList& max_exp_avg_sqs, const AdamHyper& h) {
  if (skipped(a)) return;
  const UpdatePlan u = update_plan(a);
  const auto m = ptrs(exp_avgs), v = ptrs(exp_avg_sqs);
  const auto vmax = max_exp_avg_sqs.empty() ? std::vector<char*>(a.params.size(), nullptr) : ptrs(max_exp_avg_sqs);
  const int k = static_cast<int>(u.g.size());
  std::vector<AdamSeg> seg(a.params.size());
  for (size_t i = 0; i < seg.size(); ++i) {
    const double step = static_cast<double>(u.step[i]) + 1.0;  // as torch: bias corrections in double
    const double bc1 = 1.0 - std::pow(h.beta1, step), bc2 = 1.0 - std::pow(h.beta2, step);
    seg[i] = AdamSeg{a.lr.value, h.weight_decay, 1.0 - a.lr.value * h.weight_decay, h.beta1, h.beta2, h.eps,
                     std::sqrt(bc2), a.lr.value / bc1, h.decoupled, h.amsgrad, h.maximize, u.direct};
  }
  std::vector<const std::vector<char*>*> extra{&m, &v};
  if (!max_exp_avg_sqs.empty()) extra.push_back(&vmax);
  run_update(a, u, extra, [&](const Piece& pc, int64_t off, const void** gp) {
    const int32_t i = pc.tensor;
    u.sl[i].k->adam(u.p[i] + off, u.src[i] + off, gp, u.w.data(), k, at_off(u.gout, i, off), m[i] + off, v[i] + off,
                    at_off(vmax, i, off), pc.end - pc.begin, seg[i]);
  });
}

}  // namespace cpu
}  // namespace roga

// The CPU kernels of the roga_cuda operators (schemas in library.cpp).
TORCH_LIBRARY_IMPL(roga_cuda, CPU, m) {
  using namespace roga;
  m.impl("norm", &entry::norm<cpu::norm>);
  m.impl("asam_norm", &entry::asam_norm<cpu::norm>);
  m.impl("perturb_", &entry::perturb_<cpu::perturb_>);
  m.impl("asam_perturb_", &entry::asam_perturb_<cpu::perturb_>);
  m.impl("restore_", &entry::restore_<cpu::restore_>);
  m.impl("restore_accumulate_", &entry::restore_accumulate_<cpu::restore_accumulate_>);
  m.impl("gram", &entry::gram<cpu::gram>);
  m.impl("combine_", &entry::combine_<cpu::combine_>);
  m.impl("sgd_", &entry::sgd_<cpu::sgd_>);
  m.impl("adam_", &entry::adam_<cpu::adam_>);
}
