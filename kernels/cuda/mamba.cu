// Placeholder until the Mamba kernels land.
#include "kernels/cuda/ops.h"
namespace ramba::kernels::cuda {
absl::Status CausalConv1dSilu(Context&, const float*, int64_t, const int64_t*, int64_t, float* const*, const float*, const float*, int64_t, int64_t, float*, const int64_t*) { return absl::UnimplementedError("cuda CausalConv1dSilu"); }
absl::Status SsmScan(Context&, const float*, int64_t, const float*, int64_t, const int64_t*, int64_t, float* const*, const SsmParams&, float*, const int64_t*) { return absl::UnimplementedError("cuda SsmScan"); }
}  // namespace ramba::kernels::cuda
