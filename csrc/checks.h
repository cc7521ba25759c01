// Input checks of every op, in one place. The registered ops (torch.ops.roga_cuda.*), the
// fast eager entry points and the Python backends (through roga_cuda._C) all call these,
// so every backend raises the same ValueError/TypeError, naming the op, the list and the
// position.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "common.h"

namespace roga {

struct ListArg {
  std::string name;
  TensorList ts;
  bool written = false;
  bool steps = false;  // one-element float32 step counters: no shape/dtype match with the first list
};

// What a check may look at. kMeta: metadata only (meta/fake tensors: FakeTensor tracing,
// torch.compile). kStrided: also data pointers (overlapping outputs), any strided layout
// (the Python backends). kMemory: also requires dense storage, tensors at one position
// sharing its layout (the compiled kernels walk raw storage).
enum class CheckLevel { kMeta, kStrided, kMemory };

// Validates the lists of one op and returns their device, or nullopt for empty lists (a
// no-op, when allow_empty). All lists have one length; tensors are defined, dense, float
// (16/32/64-bit) tensors on one device; tensors at one position agree in shape, dtype and
// memory layout. With kMemory, a written tensor may not share memory with any other tensor
// of the call, at any position, except that (alias_ok) it may *be* the tensor at its own
// position in a read list (combine_'s `out`), and written tensors are not inference
// tensors outside inference mode.
std::optional<at::Device> check_lists(const char* op, const std::vector<ListArg>& lists, bool allow_empty,
                                      bool alias_ok, CheckLevel level);

// A scalar argument: `value`, or the 0-d tensor `t` when given. A CPU tensor is read on the
// host (nothing to synchronise with); a device tensor must be on `dev` and is read by the
// kernels (other real dtypes than float32/64 are converted on the device).
Scalar scalar_arg(const char* op, const char* name, double value, const std::optional<at::Tensor>& t,
                  const std::optional<at::Device>& dev, CheckLevel level);

// K weights: host values, or a 1-d tensor of K (CPU: read on the host; else on `dev`);
// with direct_ok (the updates) also 2K: the combination's row, then the direct row.
Weights weights_arg(const char* op, c10::ArrayRef<double> values, const std::optional<at::Tensor>& t, int64_t k,
                    const std::optional<at::Device>& dev, CheckLevel level, bool direct_ok);

// The arguments of one op call, validated.
struct Checked {
  std::optional<at::Device> dev;  // nullopt: empty lists, nothing to do
  Scalar scalar;                  // perturb_'s scale, restore_accumulate_'s weight
  Weights weights;                // combine_
  std::vector<TensorList> lists;  // gram, combine_, updates: the K lists of the flat argument
  Scalar lr;                      // updates
  at::Tensor found_inf;           // updates: defined when it must be read on the device
  bool skip = false;              // updates: found_inf is a host value and nonzero
};

// One validator per op (the op's contract: which lists it writes, what may alias).
Checked check_norm(TensorList ts, const TensorList* params, CheckLevel level);
Checked check_perturb_(TensorList params, TensorList grads, TensorList backup, double scale,
                       const std::optional<at::Tensor>& scale_t, CheckLevel level);
Checked check_restore_(TensorList params, TensorList backup, CheckLevel level);
Checked check_restore_accumulate_(TensorList params, TensorList backup, TensorList acc, TensorList grads,
                                  double weight, const std::optional<at::Tensor>& weight_t, CheckLevel level);
Checked check_gram(TensorList lists, int64_t k, CheckLevel level);
Checked check_combine_(TensorList out, TensorList lists, c10::ArrayRef<double> weights,
                       const std::optional<at::Tensor>& weights_t, CheckLevel level);

// The fused updates: params, source (empty or n), grads (K * n), grad_out (empty or n), the
// optimizer's state lists (each n, or empty when not `required`), steps (n, or empty when
// not needed), lr, found_inf. Returns the K grad lists, weights, lr and found_inf.
struct StateArg {
  const char* name;
  TensorList ts;
  bool required;
};
Checked check_update(const char* op, TensorList params, TensorList source, TensorList grads,
                     c10::ArrayRef<double> grad_weights, const std::optional<at::Tensor>& grad_weight_t,
                     TensorList grad_out, const std::vector<StateArg>& states, TensorList steps, bool need_steps,
                     double lr, const std::optional<at::Tensor>& lr_t, const std::optional<at::Tensor>& found_inf,
                     CheckLevel level);

// Whether check_lists may reuse the sorted written ranges of a recent call that wrote the
// same tensors (on by default); returns the previous setting. For benchmarks and tests.
bool set_overlap_memo(bool on);

// True if every tensor is a plain CPU/CUDA tensor that the kernels may touch through raw
// pointers right now: no tensor subclass (DTensor, FakeTensor, ...), functional or
// functorch wrapper, meta or other device, and no TorchDispatchMode active. The fast eager
// entry points hand anything else to the dispatcher, which routes it to its own handling.
bool all_plain(std::initializer_list<TensorList> lists);

// Bumps the version counters of written tensors, as in-place ATen ops do, so autograd
// detects a stale saved tensor instead of silently reusing it.
void bump_versions(TensorList ts);

}  // namespace roga
