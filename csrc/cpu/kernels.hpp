// The per-segment kernel table the CPU ops call (see kernels.h for the loops themselves).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ROGA_X86 1
#endif

namespace roga {
namespace cpu {

// Elements per block of the elementwise kernels (perturb, accumulate, combine, the updates) on
// float32/float64 storage, which they use in place. A block runs one loop per operand group,
// so a core reads one stream at a time for a block's length, and one core keeps one stream
// well under its share of the bandwidth (EPYC here: ~13 GB/s for one stream, ~21 for nine
// read together). Short blocks keep an update's streams in flight together; below ~64 the
// per-block overhead wins. Results do not depend on it (every element is computed alone); the
// reductions (sumsq, gram) keep kBlock, whose float partial sums set their rounding. A knob
// for tests and benchmarks (_C._cpu_block).
constexpr int64_t kBlock = 512;  // the longest block of kernels.h, and its buffers' length
inline std::atomic<int64_t> elementwise_block{128};

// Copies an output the op does not read. stream=true uses non-temporal stores: the
// destination's cache lines are not read first (a write-allocate would move 50% more
// bytes for a copy) and the caches keep the inputs. For lists far larger than the caches
// only (ops.cpp decides): streamed data is not in cache afterwards.
inline void copy_out(void* dst, const void* src, int64_t bytes, bool stream) {
#ifdef ROGA_X86
  if (stream && bytes >= 256) {
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
    int64_t head = static_cast<int64_t>((16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15);
    std::memcpy(d, s, head);
    int64_t i = head;
    for (; i + 16 <= bytes; i += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    std::memcpy(d + i, s + i, bytes - i);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

// Orders the non-temporal stores before anything that follows (e.g. another thread's reads).
inline void stream_fence() {
#ifdef ROGA_X86
  _mm_sfence();
#endif
}

// Per-tensor constants of the fused updates (the step count makes them per tensor).
// direct: w holds 2K weights, the second K the direct row (common.h UpdateArgs).
struct SgdSeg {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first, direct;  // first: the momentum buffer starts as the gradient
};
struct AdamSeg {
  double lr, weight_decay, decay_factor;  // decoupled: x * decay_factor (1 - lr * weight_decay)
  double beta1, beta2, eps, bc2_sqrt, step_size;  // step_size = lr / (1 - beta1^step)
  bool decoupled, amsgrad, maximize, direct;
};

// Kernels over one contiguous segment of n elements of one storage dtype.
struct SegmentKernels {
  double (*sumsq)(const void* x, const void* p_or_null, int64_t n, double eta);
  void (*perturb)(void* p, const void* g, void* b, int64_t n, double s, bool adaptive, double eta, bool stream);
  void (*accumulate)(void* a, const void* g, int64_t n, double w);
  void (*gram)(const void* const* xs, int k, int64_t n, double* lower_triangle);
  void (*combine)(void* out, const void* const* xs, const double* w, int k, int64_t n, bool stream);
  // p <- update(src, sum_k w[k] gs[k]); gout (may be null) <- the combined gradient
  void (*sgd)(void* p, const void* src, const void* const* gs, const double* w, int k, void* gout, void* buf,
              int64_t n, const SgdSeg& s);
  void (*adam)(void* p, const void* src, const void* const* gs, const double* w, int k, void* gout, void* m, void* v,
               void* vmax, int64_t n, const AdamSeg& s);
};

struct KernelTable {
  const char* isa;
  SegmentKernels f32, f64, f16, bf16;
};

namespace base {
const KernelTable& table();
}
#ifdef ROGA_X86
namespace avx2 {
const KernelTable& table();
}
#endif

}  // namespace cpu
}  // namespace roga
