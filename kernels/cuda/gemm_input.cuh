// Device side of the GemmInput format (ops.h): rounding f32 activations to the weights' 16-bit
// type as hi + lo and storing them where the cuBLASLt path reads them. Shared by the GEMM's own
// conversion (matmul.cu) and the norms that feed a projection directly (elementwise.cu), so all
// of them round alike.
#ifndef RAMBA_KERNELS_CUDA_GEMM_INPUT_CUH_
#define RAMBA_KERNELS_CUDA_GEMM_INPUT_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/ops.h"

namespace ramba::kernels::cuda {

// v = hi + lo, each rounded to nearest even; returns the bit patterns.
template <bool kBf16>
__device__ __forceinline__ void SplitTo16(float v, uint32_t* hi, uint32_t* lo) {
  if constexpr (kBf16) {
    const __nv_bfloat16 h = __float2bfloat16_rn(v);
    *hi = __bfloat16_as_ushort(h);
    *lo = __bfloat16_as_ushort(__float2bfloat16_rn(v - __bfloat162float(h)));
  } else {
    const __half h = __float2half_rn(v);
    *hi = __half_as_ushort(h);
    *lo = __half_as_ushort(__float2half_rn(v - __half2float(h)));
  }
}

__device__ __forceinline__ uint16_t* GemmInputRow(const GemmInput& in, int64_t row) {
  return in.data + row * static_cast<int64_t>(in.ld());
}

// Columns [c, c + 4) of a row (c % 4 == 0): one 8-byte store for hi, one for lo.
template <bool kBf16>
__device__ __forceinline__ void StoreGemmInput4(const GemmInput& in, uint16_t* row, int64_t c,
                                                float4 v) {
  uint32_t h[4], l[4];
  SplitTo16<kBf16>(v.x, &h[0], &l[0]);
  SplitTo16<kBf16>(v.y, &h[1], &l[1]);
  SplitTo16<kBf16>(v.z, &h[2], &l[2]);
  SplitTo16<kBf16>(v.w, &h[3], &l[3]);
  *reinterpret_cast<uint2*>(row + c) = make_uint2(h[0] | (h[1] << 16), h[2] | (h[3] << 16));
  if (in.split) {
    *reinterpret_cast<uint2*>(row + in.ldh + c) =
        make_uint2(l[0] | (l[1] << 16), l[2] | (l[3] << 16));
  }
}

// One column (the scalar paths).
template <bool kBf16>
__device__ __forceinline__ void StoreGemmInput1(const GemmInput& in, uint16_t* row, int64_t c,
                                                float v) {
  uint32_t h, l;
  SplitTo16<kBf16>(v, &h, &l);
  row[c] = static_cast<uint16_t>(h);
  if (in.split) row[in.ldh + c] = static_cast<uint16_t>(l);
}

// Zeroes the padding columns [dim, ldh) of a row, lanes t < ldh - dim of the caller's group.
__device__ __forceinline__ void ZeroGemmInputPad(const GemmInput& in, uint16_t* row, int64_t dim,
                                                 int t, int threads) {
  for (int64_t c = dim + t; c < in.ldh; c += threads) {
    row[c] = 0;
    if (in.split) row[in.ldh + c] = 0;
  }
}

}  // namespace ramba::kernels::cuda

#endif  // RAMBA_KERNELS_CUDA_GEMM_INPUT_CUH_
