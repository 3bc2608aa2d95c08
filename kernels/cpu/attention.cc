// RoPE (rotate-half, HF numerics) and bidirectional block attention for the chunk encoder.
// Both parallelise over independent rows / (block, head) pairs; inner loops run over contiguous
// head_dim values.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/vec.h"

namespace ramba::kernels::cpu {

void RopeInChunk(float* x, int64_t rows, int64_t heads, int64_t head_dim, int64_t period,
                 float theta) {
  if (rows <= 0 || heads <= 0 || head_dim <= 0) return;
  const int64_t half = head_dim / 2;
  // Same float32 steps as HF: inv_freq = 1 / theta^(float(2i) / dim), angle = float(pos) *
  // inv_freq, cos/sin in float32.
  std::vector<float> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    const float e = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv_freq[i] = 1.0f / powf(theta, e);
  }
  const int64_t positions = std::min(period, rows);
  std::vector<float> cos_t(static_cast<size_t>(positions * half));
  std::vector<float> sin_t(static_cast<size_t>(positions * half));
  for (int64_t pos = 0; pos < positions; ++pos) {
    for (int64_t i = 0; i < half; ++i) {
      const float a = static_cast<float>(pos) * inv_freq[i];
      cos_t[pos * half + i] = cosf(a);
      sin_t[pos * half + i] = sinf(a);
    }
  }
#pragma omp parallel for schedule(static) if (rows * heads * head_dim > kMinParallelWork)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = r % period;
    const float* __restrict c = cos_t.data() + pos * half;
    const float* __restrict s = sin_t.data() + pos * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* __restrict x1 = x + (r * heads + h) * head_dim;
      float* __restrict x2 = x1 + half;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float a = x1[i], b = x2[i];
        x1[i] = a * c[i] - b * s[i];
        x2[i] = b * c[i] + a * s[i];
      }
    }
  }
}

void BlockAttention(const float* q, const float* k, const float* v, float* out,
                    int64_t num_blocks, int64_t block_len, int64_t nh, int64_t nkv, int64_t hd) {
  if (num_blocks <= 0 || block_len <= 0 || nh <= 0) return;
  const int64_t group = nh / nkv;
  const int64_t qstride = nh * hd, kvstride = nkv * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
#pragma omp parallel if (num_blocks * nh * block_len * block_len * hd > kMinParallelWork)
  {
    std::vector<float> p(static_cast<size_t>(block_len));
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < num_blocks; ++b) {
      for (int64_t h = 0; h < nh; ++h) {
        const int64_t g = h / group;
        const int64_t r0 = b * block_len;
        for (int64_t i = 0; i < block_len; ++i) {
          const float* qi = q + (r0 + i) * qstride + h * hd;
          float* oi = out + (r0 + i) * qstride + h * hd;
          std::fill(oi, oi + hd, 0.0f);
          AttendAccumulate(qi, k + r0 * kvstride + g * hd, v + r0 * kvstride + g * hd, kvstride,
                           block_len, hd, scale, 1.0f, p.data(), oi);
        }
      }
    }
  }
}

}  // namespace ramba::kernels::cpu
