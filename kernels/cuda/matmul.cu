// Placeholder until the matmul kernels land.
#include "kernels/cuda/ops.h"
namespace ramba::kernels::cuda {
absl::Status Matmul(Context&, const float*, int64_t, int64_t, MatrixView, const float*, float*,
                    int64_t, bool) {
  return absl::UnimplementedError("cuda Matmul");
}
}  // namespace ramba::kernels::cuda
