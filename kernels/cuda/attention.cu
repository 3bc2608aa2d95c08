// Placeholder until the attention kernels land.
#include "kernels/cuda/ops.h"
namespace ramba::kernels::cuda {
absl::Status BlockAttention(Context&, const float*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t) { return absl::UnimplementedError("cuda BlockAttention"); }
}  // namespace ramba::kernels::cuda
