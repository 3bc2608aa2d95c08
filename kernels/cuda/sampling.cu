// Placeholder until the sampling kernel lands.
#include "kernels/cuda/ops.h"
namespace ramba::kernels::cuda {
absl::Status Sample(Context&, const float*, int64_t, int64_t, const SamplingParams*, const float*, int32_t*) { return absl::UnimplementedError("cuda Sample"); }
}  // namespace ramba::kernels::cuda
