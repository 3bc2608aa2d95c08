// The warp-level attention of one query over a few dozen staged keys, shared by the chunk encoder's
// block attention (attention.cu) and HSA's sparse chunk attention (sparse_attention.cu); its warp
// reductions also serve the fused HSA block (hsa_block.cu).
#ifndef RAMBA_KERNELS_CUDA_WARP_ATTEND_CUH_
#define RAMBA_KERNELS_CUDA_WARP_ATTEND_CUH_

#include <cuda_runtime.h>

namespace ramba::kernels::cuda::warp_attend {

constexpr int kWarp = 32;

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int m = kWarp / 2; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}
__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int m = kWarp / 2; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

// Row stride of staged keys: conflict-free float4 reads (hd % 4 == 0) or scalar reads (odd).
__host__ __device__ inline int KeyStride(int hd) { return hd % 4 == 0 ? hd + 4 : hd + 1; }

// Copies n keys and values of one kv head to shared memory (keys at row stride KeyStride(hd),
// values at hd), the block's kThreads threads together. k and v point at the head's first key;
// keys are `stride` floats apart. vec: k and v 16-byte aligned and hd, stride multiples of 4.
template <int kThreads>
__device__ __forceinline__ void StageKeysValues(const float* k, const float* v, int64_t stride,
                                                int n, int hd, bool vec, float* kbuf, float* vbuf,
                                                int tid) {
  const int ks = KeyStride(hd);
  if (vec) {
    const int hv = hd / 4;
#pragma unroll 4
    for (int i = tid; i < n * hv; i += kThreads) {
      const int key = i / hv, t4 = i % hv;
      const float4 kx = __ldg(reinterpret_cast<const float4*>(k + key * stride) + t4);
      const float4 vx = __ldg(reinterpret_cast<const float4*>(v + key * stride) + t4);
      *reinterpret_cast<float4*>(kbuf + key * ks + 4 * t4) = kx;
      *reinterpret_cast<float4*>(vbuf + key * hd + 4 * t4) = vx;
    }
  } else {
    for (int i = tid; i < n * hd; i += kThreads) {
      const int key = i / hd, t = i % hd;
      kbuf[key * ks + t] = __ldg(k + key * stride + t);
      vbuf[key * hd + t] = __ldg(v + key * stride + t);
    }
  }
}

// One query against n staged keys/values, computed by one warp:
//   o[t] (+)= weight * softmax(scale q.K) V   (+= when accumulate).
// p: n floats of per-warp scratch. kHd > 0 fixes the head dim at compile time.
// kHd > 0 fixes the head dim at compile time (and implies the float4 path).
template <int kHd>
__device__ void WarpAttend(const float* qv, const float* ks, const float* vs, float* p, int kstride,
                           int n, int hd_rt, float scale, float weight, bool accumulate, float* o,
                           int lane) {
  const int hd = kHd > 0 ? kHd : hd_rt;
  const bool vec = kHd > 0 || hd % 4 == 0;
  // Two keys per lane at a time, so each query element read from shared memory serves both.
  float mx = -INFINITY;
  for (int i0 = 0; i0 < n; i0 += 2 * kWarp) {
    const int ia = i0 + lane, ib = ia + kWarp;
    const float* ka = ks + min(ia, n - 1) * kstride;  // clamped: rows past n are never used
    const float* kb = ks + min(ib, n - 1) * kstride;
    float acc_a = 0.0f, acc_b = 0.0f;
    if (vec) {
#pragma unroll
      for (int t4 = 0; t4 < hd / 4; ++t4) {
        const float4 x = reinterpret_cast<const float4*>(qv)[t4];
        const float4 a = reinterpret_cast<const float4*>(ka)[t4];
        const float4 b = reinterpret_cast<const float4*>(kb)[t4];
        acc_a = fmaf(x.x, a.x, acc_a);
        acc_a = fmaf(x.y, a.y, acc_a);
        acc_a = fmaf(x.z, a.z, acc_a);
        acc_a = fmaf(x.w, a.w, acc_a);
        acc_b = fmaf(x.x, b.x, acc_b);
        acc_b = fmaf(x.y, b.y, acc_b);
        acc_b = fmaf(x.z, b.z, acc_b);
        acc_b = fmaf(x.w, b.w, acc_b);
      }
    } else {
      for (int t = 0; t < hd; ++t) {
        acc_a = fmaf(qv[t], ka[t], acc_a);
        acc_b = fmaf(qv[t], kb[t], acc_b);
      }
    }
    if (ia < n) {
      p[ia] = acc_a * scale;
      mx = fmaxf(mx, p[ia]);
    }
    if (ib < n) {
      p[ib] = acc_b * scale;
      mx = fmaxf(mx, p[ib]);
    }
  }
  mx = WarpMax(mx);
  float sum = 0.0f;
  for (int i = lane; i < n; i += kWarp) {
    const float x = expf(p[i] - mx);
    p[i] = x;
    sum += x;
  }
  sum = WarpSum(sum);
  __syncwarp();  // p complete before every lane reads all of it
  const float wn = weight / sum;
#pragma unroll
  for (int t = lane; t < hd; t += kWarp) {
    float acc = 0.0f;
    for (int i = 0; i < n; ++i) acc = fmaf(p[i], vs[i * hd + t], acc);
    o[t] = accumulate ? o[t] + acc * wn : acc * wn;
  }
  __syncwarp();  // p is rewritten by the next call
}

}  // namespace ramba::kernels::cuda::warp_attend

#endif  // RAMBA_KERNELS_CUDA_WARP_ATTEND_CUH_
