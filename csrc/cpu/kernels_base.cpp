// The CPU kernels compiled for the baseline ISA (portable; the fallback on any CPU).
#include "kernels.hpp"

// kernels.h's 32-byte vectors (Vec) are two 16-byte registers here. They never cross a call
// boundary (inline helpers only), so GCC's warning that returning them changes the ABI is
// moot. (Vec::sum takes its vector by reference: the note for passing one escapes this pragma.)
#pragma GCC diagnostic ignored "-Wpsabi"

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
