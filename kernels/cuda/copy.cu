// Small data-movement kernels that are not ops of one model layer.
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/ops.h"

namespace ramba::kernels::cuda {
namespace {

__global__ void ScatterRowsKernel(const float* __restrict__ src, int64_t ld,
                                  float* const* __restrict__ dst, int64_t cols) {
  AllowDependentGrids();
  WaitForPriorGrids();
  const int64_t r = blockIdx.y;
  float* d = dst[r];
  const float* s = src + r * ld;
  for (int64_t c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
    d[c] = s[c];
  }
}

}  // namespace

absl::Status ScatterRows(Context& ctx, const float* src, int64_t ld, float* const* dst,
                         int64_t rows, int64_t cols) {
  if (rows > 65535) return absl::InvalidArgumentError("ScatterRows: more than 65535 rows");
  constexpr int kThreads = 256;
  const unsigned blocks_x =
      static_cast<unsigned>(std::min<int64_t>((cols + kThreads - 1) / kThreads, 64));
  return Launch(ctx, ScatterRowsKernel, dim3(blocks_x, static_cast<unsigned>(rows)), kThreads, 0,
                src, ld, dst, cols);
}

}  // namespace ramba::kernels::cuda
