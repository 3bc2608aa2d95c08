// RMSNorm and Mamba-2's gated RMSNorm: rows in parallel, each row's sum of squares reduced by one
// thread in a fixed (vectorised) order, so results do not depend on the thread count.
#include <cmath>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/vec.h"

namespace ramba::kernels::cpu {

void RmsNorm(const float* x, int64_t ldx, const float* weight, float* y, int64_t ldy,
             int64_t rows, int64_t dim, float eps) {
  // y may alias x (in-place q/k norms): the row's reduction finishes before it is overwritten.
#pragma omp parallel for schedule(static) if (rows * dim > kMinParallelWork)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    float* yr = y + r * ldy;
    const float ss = SumSquares(xr, dim);
    const float scale = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) yr[i] = weight[i] * (xr[i] * scale);
  }
}

void GatedRmsNorm(const float* y, int64_t ldy, const float* z, int64_t ldz, const float* weight,
                  float* out, int64_t ldo, int64_t rows, int64_t dim, int64_t group_size,
                  float eps) {
#pragma omp parallel for schedule(static) if (rows * dim > kMinParallelWork / 4)
  for (int64_t r = 0; r < rows; ++r) {
    const float* yr = y + r * ldy;
    const float* zr = z + r * ldz;
    float* o = out + r * ldo;
    // Gate first (into the output row), then normalise each group in place.
    for (int64_t i = 0; i < dim; ++i) o[i] = yr[i] * SiluF(zr[i]);
    for (int64_t g0 = 0; g0 < dim; g0 += group_size) {
      float* og = o + g0;
      const float ss = SumSquares(og, group_size);
      const float scale = 1.0f / std::sqrt(ss / static_cast<float>(group_size) + eps);
      const float* wg = weight + g0;
#pragma omp simd
      for (int64_t i = 0; i < group_size; ++i) og[i] = wg[i] * (og[i] * scale);
    }
  }
}

}  // namespace ramba::kernels::cpu
