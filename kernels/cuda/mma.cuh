// Warp-level bf16 tensor-core pieces (mma.sync m16n8k16, sm_80+), shared by the sparse attention
// and the SSD chunk kernel. Fragment layouts (PTX ISA, "mma.m16n8k16"), g = lane / 4, c = lane % 4:
//   A (16 x 16, row): a[0] = (g, 2c..2c+1), a[1] = (g + 8, 2c..), a[2] = (g, 2c + 8..),
//                     a[3] = (g + 8, 2c + 8..)
//   B (16 x 8, col):  b0 = (k 2c..2c+1, n g), b1 = (k 2c + 8.., n g)
//   C/D (16 x 8):     d[0..1] = (g, 2c..2c+1), d[2..3] = (g + 8, 2c..)
// so two adjacent n8 accumulator tiles, packed to bf16, are the A fragment of a k16 step.
#ifndef RAMBA_KERNELS_CUDA_MMA_CUH_
#define RAMBA_KERNELS_CUDA_MMA_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace ramba::kernels::cuda {

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // lo in the low half
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}

// The hi and lo bf16 packs of (x0, x1): x = hi + lo + O(2^-17 |x|), the two terms of a 3-product
// (hi*hi + hi*lo + lo*hi) f32-grade tensor-core product.
__device__ __forceinline__ void PackSplitBf16(float x0, float x1, uint32_t* hi, uint32_t* lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
  const float2 hf = __bfloat1622float2(h);
  const __nv_bfloat162 l = __floats2bfloat162_rn(x0 - hf.x, x1 - hf.y);
  memcpy(hi, &h, sizeof(*hi));
  memcpy(lo, &l, sizeof(*lo));
}

// d += a (16x16, row) * b (16x8, col); bf16 in, f32 accumulate.
__device__ __forceinline__ void Mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 bf16 matrices from shared memory; lane l gives the address of row l % 8 of matrix
// l / 8 (16-byte aligned; a shared-state-space address, 32 bits) and receives r[i] = (row g,
// cols 2c..2c+1) of matrix i, or with Trans (rows 2c..2c+1, col g).
template <bool Trans>
__device__ __forceinline__ void Ldsm4(uint32_t (&r)[4], uint32_t a) {
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  }
}

// The same from a generic pointer into shared memory.
template <bool Trans>
__device__ __forceinline__ void Ldsm4(uint32_t (&r)[4], const void* row_addr) {
  Ldsm4<Trans>(r, static_cast<uint32_t>(__cvta_generic_to_shared(row_addr)));
}

}  // namespace ramba::kernels::cuda

#endif  // RAMBA_KERNELS_CUDA_MMA_CUH_
