// The per-segment kernel table the CPU ops call (see kernels.h for the loops themselves).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
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

// Kernels over one contiguous segment of n elements of one storage dtype.
struct SegmentKernels {
  double (*sumsq)(const void* x, const void* p_or_null, int64_t n, double eta);
  void (*perturb)(void* p, const void* g, void* b, int64_t n, double s, bool adaptive, double eta);
  void (*accumulate)(void* a, const void* g, int64_t n, double w);
  void (*gram)(const void* const* xs, int k, int64_t n, double* lower_triangle);
  void (*combine)(void* out, const void* const* xs, const double* w, int k, int64_t n);
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
