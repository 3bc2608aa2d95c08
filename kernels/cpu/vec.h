// Small inline helpers shared by the CPU kernels (internal to kernels/cpu/).
#ifndef RAMBA_KERNELS_CPU_VEC_H_
#define RAMBA_KERNELS_CPU_VEC_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace ramba::kernels::cpu {

// Below this many scalar operations an op runs on the calling thread: waking the OpenMP team
// costs more than it saves (decode steps are full of tiny ops).
constexpr int64_t kMinParallelWork = 1 << 15;

// Dot product. `omp simd` lets the compiler keep several partial sums in vector lanes; the
// summation order is fixed by the compiled code, never by thread scheduling.
inline float Dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline float SumSquares(const float* __restrict a, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * a[i];
  return s;
}

// y += a * x.
inline void Axpy(float a, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

inline float SiluF(float x) { return x / (1.0f + std::exp(-x)); }

// bf16 -> f32 for a row; written as a bit shift so it vectorises.
inline void Bf16RowToF32(const uint16_t* __restrict src, int64_t n, float* __restrict dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    dst[i] = f;
  }
}

// f16 -> f32 for a row, branch-free (handles subnormals, inf and NaN) so it vectorises.
// The method is the well-known "magic number" conversion: normals are rebased by one multiply,
// subnormals are built as (1.mantissa * 2^-1) - 0.5 scaled into place.
inline void F16RowToF32(const uint16_t* __restrict src, int64_t n, float* __restrict dst) {
  const float exp_scale = 0x1.0p-112f;
  const float magic_bias = 0.5f;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t w = static_cast<uint32_t>(src[i]) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const uint32_t norm_bits = (two_w >> 4) + (0xE0u << 23);
    float normalized;
    std::memcpy(&normalized, &norm_bits, sizeof(float));
    normalized *= exp_scale;
    const uint32_t denorm_bits = (two_w >> 17) | (126u << 23);
    float denormalized;
    std::memcpy(&denormalized, &denorm_bits, sizeof(float));
    denormalized -= magic_bias;
    uint32_t nb, db;
    std::memcpy(&nb, &normalized, sizeof(nb));
    std::memcpy(&db, &denormalized, sizeof(db));
    const uint32_t bits = sign | (two_w < (1u << 27) ? db : nb);
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    dst[i] = f;
  }
}

// out[0..hd) += weight * softmax_i(scale * q . k_i) v_i over n keys, where key i starts at
// k + i * stride and value i at v + i * stride. `p` is scratch of n floats. Shared by the block
// (encoder) attention and the sparse chunk attention.
inline void AttendAccumulate(const float* q, const float* k, const float* v, int64_t stride,
                             int64_t n, int64_t hd, float scale, float weight, float* p,
                             float* out) {
  float mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    p[i] = Dot(q, k + i * stride, hd) * scale;
    mx = std::max(mx, p[i]);
  }
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    p[i] = std::exp(p[i] - mx);
    sum += p[i];
  }
  const float w = weight / sum;
  for (int64_t i = 0; i < n; ++i) Axpy(p[i] * w, v + i * stride, out, hd);
}

}  // namespace ramba::kernels::cpu

#endif  // RAMBA_KERNELS_CPU_VEC_H_
