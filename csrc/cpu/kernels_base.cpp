// The CPU kernels compiled for the baseline ISA (portable; the fallback on any CPU).
#include "kernels.hpp"

namespace roga {
namespace cpu {
namespace base {
#include "kernels.h"

const KernelTable& table() {
  static const KernelTable t = make_table("baseline");
  return t;
}
}  // namespace base
}  // namespace cpu
}  // namespace roga
