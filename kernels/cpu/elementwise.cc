// Embedding lookup and element-wise ops: one OpenMP loop over contiguous data each, vectorised
// with `omp simd`; small inputs stay on the calling thread.
#include <cmath>
#include <cstring>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/vec.h"

namespace ramba::kernels::cpu {

float Softplus(float x, float threshold) { return x > threshold ? x : std::log1p(std::exp(x)); }

float Silu(float x) { return SiluF(x); }

void Embed(const int32_t* tokens, int64_t n, const MatrixView& table, float* out) {
  const int64_t cols = table.cols;
#pragma omp parallel for schedule(static) if (n * cols > kMinParallelWork)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = tokens[i];
    float* dst = out + i * cols;
    switch (table.dtype) {
      case DType::kF32:
        std::memcpy(dst, static_cast<const float*>(table.data) + t * cols, cols * sizeof(float));
        break;
      case DType::kBF16:
        Bf16RowToF32(static_cast<const uint16_t*>(table.data) + t * cols, cols, dst);
        break;
      case DType::kF16:
        F16RowToF32(static_cast<const uint16_t*>(table.data) + t * cols, cols, dst);
        break;
    }
  }
}

void Add(float* y, const float* x, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n > kMinParallelWork)
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void SwiGlu(const float* gate, const float* up, float* out, int64_t n) {
  // out may alias gate or up: each element is read before it is written.
#pragma omp parallel for schedule(static) if (n > kMinParallelWork / 8)
  for (int64_t i = 0; i < n; ++i) out[i] = SiluF(gate[i]) * up[i];
}

void BlockMean(const float* x, int64_t num_blocks, int64_t block_len, int64_t dim, float* out) {
#pragma omp parallel for schedule(static) if (num_blocks * block_len * dim > kMinParallelWork)
  for (int64_t b = 0; b < num_blocks; ++b) {
    float* __restrict o = out + b * dim;
    std::memset(o, 0, dim * sizeof(float));
    for (int64_t r = 0; r < block_len; ++r) {
      const float* __restrict row = x + (b * block_len + r) * dim;
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) o[i] += row[i];
    }
    const float len = static_cast<float>(block_len);
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) o[i] /= len;
  }
}

}  // namespace ramba::kernels::cpu
