// The CPU kernels compiled for AVX2 + FMA + F16C, chosen at run time when the CPU has them.
// Every header is included above the target pragma, so only our loops get the wider ISA.
#include "kernels.hpp"

#ifdef ROGA_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define ROGA_F16C 1

namespace roga {
namespace cpu {
namespace avx2 {
#include "kernels.h"

const KernelTable& table() {
  static const KernelTable t = make_table("avx2");
  return t;
}
}  // namespace avx2
}  // namespace cpu
}  // namespace roga

#undef ROGA_F16C
#pragma GCC pop_options
#endif
