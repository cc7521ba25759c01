// The launch geometry knob (tests only): shrinking it forces many launches, tensors split
// across launches and chunk boundaries on small inputs.
#include "multi_tensor_apply.cuh"

namespace roga {
namespace cuda {

std::vector<int64_t> launch_limits(int64_t chunk, int64_t max_tensors, int64_t max_blocks) {
  mta::Limits& l = mta::limits();
  std::vector<int64_t> old{l.chunk, l.max_tensors, l.max_blocks};
  TORCH_CHECK_VALUE(chunk >= 0 && chunk % 64 == 0 && chunk < (int64_t(1) << 30),
                    "chunk must be a multiple of 64 below 2^30 (0: default)");
  TORCH_CHECK_VALUE(max_tensors >= 0 && max_blocks >= 0 && max_blocks < (int64_t(1) << 31),
                    "max_tensors and max_blocks must be >= 0 (0: default) and max_blocks < 2^31");
  l.chunk = chunk ? chunk : mta::kDefaultLimits.chunk;
  l.max_tensors = max_tensors ? max_tensors : mta::kDefaultLimits.max_tensors;
  l.max_blocks = max_blocks ? max_blocks : mta::kDefaultLimits.max_blocks;
  return old;
}

}  // namespace cuda
}  // namespace roga
