// Matmul y[m, n] (+)= x[m, k] W[n, k]^T (+ bias) on the GPU, three paths:
//  - bf16 weights and 5 <= m <= 32 (batched decode): our tensor-core kernel (SmallMTensorKernel,
//    below), when k is a multiple of 256 and the operands are aligned.
//  - 16-bit weights and m <= 16 (batched decode, memory-bound): our own kernel. Each block owns a
//    tile of output columns and a range of k; groups of 8 lanes stream 128-byte pieces of weight
//    rows with 16-byte loads and multiply them with every input row of x, kept in float32 and
//    staged in shared memory. Small n is split over k (partial sums in scratch, then reduced in a
//    fixed order by a second kernel, so results are deterministic; letting the last block of a
//    column tile reduce instead was measured slower, 1.50 vs 1.44 ms per batch-1 decode step and
//    4.06 vs 3.42 ms at batch 16: its serial tail outweighs a launch). Launched with PDL
//    (launch.cuh), a block issues its first weight loads before waiting for the kernel that
//    produces x.
//  - Everything else: cuBLASLt, with x converted to the weights' 16-bit type in scratch as
//    hi + lo (a GemmInput, ops.h; f32 weights: plain FP32 GEMM, no TF32). The two products run
//    as one GEMM over [hi | lo] and the weights stacked twice when m is large (prefill), else as
//    two, the second adding into y. If cuBLASLt offers no algorithm for a 16-bit shape, the
//    small-m kernel runs on slabs of 16 rows instead. RmsNormMatmul / GatedRmsNormMatmul with
//    many rows let the norm write the GemmInput (elementwise.cu).
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string_view>
#include <tuple>

#include "base/status_macros.h"
#include "kernels/cuda/cublaslt_api.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm_input.cuh"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/ops.h"

namespace ramba::kernels::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Small-m kernel.

constexpr int kSmallM = 16;          // largest m on the small-m path
constexpr int kThreads = 128;        // threads per block
constexpr int kGroupLanes = 8;       // lanes that share one weight row (8 x 16 B = 128 B per load)
constexpr int kGroups = kThreads / kGroupLanes;  // weight-row groups per block
constexpr int kVec = 8;              // 16-bit weights per 16-byte load
constexpr int kStep = kGroupLanes * kVec;        // k covered by a group in one step (64)

// Per-m shape: columns per group (each loaded weight chunk and x value is reused that many times
// from registers) and steps per k tile (16-byte loads in flight per column). C * kSteps = 8 keeps
// the weight registers at 32 per thread.
template <int M>
struct SmallMShape {
  static constexpr int kCols = M <= 2 ? 2 : 4;
  static constexpr int kSteps = 8 / kCols;
  static constexpr int kTile = kStep * kSteps;  // k elements staged per tile
};

struct SmallMArgs {
  const float* x;
  int ldx;
  const uint16_t* w;
  int n;
  int k;
  int k_per_split;  // multiple of the tile; gridDim.y splits cover [0, k)
  bool vec_w;       // w 16-byte aligned and k % 8 == 0: every row chunk can be loaded as a uint4
  bool vec_x;       // x 16-byte aligned and ldx % 4 == 0
  const float* bias;
  float* y;
  int ldy;
  bool accumulate;
  float* partials;  // [splits, M, n] when gridDim.y > 1, else null (write y directly)
  // RMSNorm prologue (RmsNormMatmul): x's rows are normalised as they are staged,
  // x[i, kk] -> norm_w[kk] * (x[i, kk] * rsqrt(mean_k(x[i, :]^2) + eps)); null: plain x.
  const float* norm_w;
  float norm_eps;
  bool vec_norm;  // the row sums of squares in RmsNormKernel's float4 order
};

// Rows up to which the norm prologue runs (a warp per row recomputes it in every block).
constexpr int kFusedNormMaxRows = kThreads / 32;

// The 8 weights w[row][kk .. kk + 8), clipped to kk + i < end (zeros beyond).
__device__ __forceinline__ uint4 LoadWeightChunk(const uint16_t* row, int kk, int end, bool vec) {
  if (vec && kk + kVec <= end) return __ldg(reinterpret_cast<const uint4*>(row + kk));
  uint32_t h[kVec];
#pragma unroll
  for (int q = 0; q < kVec; ++q) h[q] = kk + q < end ? row[kk + q] : 0u;
  return make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16),
                    h[6] | (h[7] << 16));
}

// Element 2p of the chunk is the low half of word p (little endian).
template <bool kBf16>
__device__ __forceinline__ void ChunkToFloat(const uint4& v, float f[kVec]) {
  const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    if constexpr (kBf16) {
      f[2 * p] = __uint_as_float(u[p] << 16);
      f[2 * p + 1] = __uint_as_float(u[p] & 0xffff0000u);
    } else {
      f[2 * p] = __half2float(__ushort_as_half(static_cast<unsigned short>(u[p] & 0xffffu)));
      f[2 * p + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(u[p] >> 16)));
    }
  }
}

// x values of one tile are stored permuted so that lane l of a group, which needs k elements
// [8l, 8l + 8) of each 64-wide step, reads them as float4 slots l and 8 + l: the 8 lanes of a
// group then read 128 contiguous bytes per instruction (no bank conflicts).
__device__ __forceinline__ int PermutedSlot(int cl) {  // cl: tile column, multiple of 4
  const int r = cl % kStep;
  return (cl / kStep) * (kStep / 4) + ((r % kVec) / 4) * kGroupLanes + r / kVec;
}

// Columns kg .. kg + 3 of a row at p (pointing at column kg); those at or past t1 read as 0.
// vec: p is 16-byte aligned.
__device__ __forceinline__ float4 Load4(const float* p, int kg, int t1, bool vec) {
  float4 v;
  if (vec && kg + 4 <= t1) {
    v = *reinterpret_cast<const float4*>(p);
  } else {
    v.x = kg < t1 ? p[0] : 0.0f;
    v.y = kg + 1 < t1 ? p[1] : 0.0f;
    v.z = kg + 2 < t1 ? p[2] : 0.0f;
    v.w = kg + 3 < t1 ? p[3] : 0.0f;
  }
  return v;
}

template <bool kBf16, int M>
__global__ void __launch_bounds__(kThreads) SmallMMatmulKernel(SmallMArgs a) {
  constexpr int C = SmallMShape<M>::kCols;
  constexpr int S = SmallMShape<M>::kSteps;
  constexpr int KT = SmallMShape<M>::kTile;
  constexpr int kSlots = KT / 4;  // float4 slots per staged x row
  __shared__ float4 xs[M][kSlots];
  __shared__ float norm_scale[M];

  const int tid = threadIdx.x;
  const int lane = tid % kGroupLanes;
  const int col0 = blockIdx.x * (kGroups * C) + (tid / kGroupLanes) * C;
  const int kb = blockIdx.y * a.k_per_split;
  const int ke = min(a.k, kb + a.k_per_split);

  const uint16_t* rows[C];
#pragma unroll
  for (int c = 0; c < C; ++c) rows[c] = a.w + static_cast<int64_t>(col0 + c) * a.k;

  float acc[M][C];
#pragma unroll
  for (int i = 0; i < M; ++i) {
#pragma unroll
    for (int c = 0; c < C; ++c) acc[i][c] = 0.0f;
  }

  // Issues the weight loads of the tile starting at t0 (k elements [t0, t1)).
  uint4 wr[S][C];
  auto load_weights = [&](int t0, int t1) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int kk = t0 + s * kStep + lane * kVec;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        wr[s][c] = (col0 + c < a.n && kk < t1) ? LoadWeightChunk(rows[c], kk, t1, a.vec_w)
                                               : make_uint4(0u, 0u, 0u, 0u);
      }
    }
  };
  // Weights are never written by earlier kernels: the first tile's loads go out before waiting.
  if (kb < ke) load_weights(kb, min(ke, kb + KT));
  AllowDependentGrids();
  WaitForPriorGrids();
  if (a.norm_w != nullptr) {
    // Every block needs whole rows for the scales: a warp per row, summed as RmsNormKernel does
    // (decode-sized RmsNorm calls take its block-per-row kernel, so values may differ from
    // RmsNorm's in the last bit).
    const int warp = tid / 32, wl = tid % 32;
    for (int i = warp; i < M; i += kThreads / 32) {
      const float* xr = a.x + static_cast<int64_t>(i) * a.ldx;
      float ss = 0.0f;
      if (a.vec_norm) {
        for (int v = wl; v < a.k / 4; v += 32) {
          const float4 q = reinterpret_cast<const float4*>(xr)[v];
          ss = fmaf(q.x, q.x, ss);
          ss = fmaf(q.y, q.y, ss);
          ss = fmaf(q.z, q.z, ss);
          ss = fmaf(q.w, q.w, ss);
        }
      } else {
        for (int kk = wl; kk < a.k; kk += 32) ss = fmaf(xr[kk], xr[kk], ss);
      }
#pragma unroll
      for (int o = 16; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, o);
      if (wl == 0) norm_scale[i] = 1.0f / sqrtf(ss / static_cast<float>(a.k) + a.norm_eps);
    }
    // Read after the staging loop's first barrier.
  }

  for (int t0 = kb; t0 < ke; t0 += KT) {
    const int t1 = min(ke, t0 + KT);
    // Issue this tile's weight loads first so they are in flight while x is staged.
    if (t0 != kb) load_weights(t0, t1);
    __syncthreads();  // the previous tile's readers are done with xs
    for (int u = tid; u < M * kSlots; u += kThreads) {
      const int i = u / kSlots;
      const int cl = (u % kSlots) * 4;
      const int kg = t0 + cl;
      float4 v = Load4(a.x + static_cast<int64_t>(i) * a.ldx + kg, kg, t1, a.vec_x);
      if (a.norm_w != nullptr) {
        const float sc = norm_scale[i];
        const float* nw = a.norm_w + kg;
        v.x = kg < t1 ? nw[0] * (v.x * sc) : 0.0f;
        v.y = kg + 1 < t1 ? nw[1] * (v.y * sc) : 0.0f;
        v.z = kg + 2 < t1 ? nw[2] * (v.z * sc) : 0.0f;
        v.w = kg + 3 < t1 ? nw[3] * (v.w * sc) : 0.0f;
      }
      xs[i][PermutedSlot(cl)] = v;
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < S; ++s) {
      float wf[C][kVec];
#pragma unroll
      for (int c = 0; c < C; ++c) ChunkToFloat<kBf16>(wr[s][c], wf[c]);
#pragma unroll
      for (int i = 0; i < M; ++i) {
        const float4 lo = xs[i][s * (kStep / 4) + lane];
        const float4 hi = xs[i][s * (kStep / 4) + kGroupLanes + lane];
        const float xv[kVec] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
        for (int c = 0; c < C; ++c) {
#pragma unroll
          for (int q = 0; q < kVec; ++q) acc[i][c] = fmaf(wf[c][q], xv[q], acc[i][c]);
        }
      }
    }
  }

  // Sum over the 8 lanes of the group (xor offsets < 8 stay inside the group); every lane of the
  // warp takes part, including groups whose columns are past n.
#pragma unroll
  for (int i = 0; i < M; ++i) {
#pragma unroll
    for (int c = 0; c < C; ++c) {
      float v = acc[i][c];
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      acc[i][c] = v;
    }
  }
  // The lanes of a group share the stores.
#pragma unroll
  for (int i = 0; i < M; ++i) {
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int j = col0 + c;
      if ((i * C + c) % kGroupLanes != lane || j >= a.n) continue;
      if (a.partials != nullptr) {
        a.partials[(static_cast<int64_t>(blockIdx.y) * M + i) * a.n + j] = acc[i][c];
      } else {
        float* out = a.y + static_cast<int64_t>(i) * a.ldy + j;
        // Same order as the CPU: (y + x.w) + bias.
        float v = a.accumulate ? *out + acc[i][c] : acc[i][c];
        if (a.bias != nullptr) v += a.bias[j];
        *out = v;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Small-m kernel on tensor cores (bf16 weights, up to 32 rows). At 16 rows the CUDA-core kernel
// above does 16 FMAs per weight and reads x from shared memory for each: compute-bound at ~3x the
// weight bytes' time (370M decode at batch 16). Here a warp multiplies 16-row tiles of x (f32
// split into bf16 hi + lo, two products: f32-grade like the cuBLASLt path) by n8 tiles of weight
// rows with mma.sync m16n8k16, the weights going straight from global memory into B fragments:
// a lane's 16-byte load (8 consecutive k of one row) serves two k16 steps, with k permuted the
// same way in x's A fragments (the reduction's order does not matter). Each block owns NT n8
// tiles and the whole k, split over kTensorWarps warps and summed in warp order (deterministic,
// no split-K kernel).
struct TensorSmallMArgs {
  const float* x;
  int ldx;
  int m;
  const uint16_t* w;
  int n;
  int k;  // a multiple of kTensorWarps * 32
  const float* bias;
  float* y;
  int ldy;
  bool accumulate;
  bool split;  // x as hi + lo (two products); false: hi only (RAMBA_CUDA_BF16_ACTIVATIONS=1)
  // RMSNorm folded in (RmsNormMatmul), or null: x[i, kk] -> norm_w[kk] x[i, kk] in the products,
  // each row's rsqrt(mean(x^2) + eps) applied to its sums (the block reads every x once anyway).
  const float* norm_w;
  float norm_eps;
};

constexpr int kTensorWarps = 8;
// Up to 32 rows: at 64 (four m tiles, ~250 registers) it lost to cuBLASLt (370M decode at batch
// 64: 5.17-5.37 vs 4.59-4.61 ms per step).
constexpr int kTensorMaxM = 32;

template <int MT, int NT, bool kNorm>
__global__ void __launch_bounds__(kTensorWarps * 32) SmallMTensorKernel(TensorSmallMArgs a) {
  // k blocks (32 wide: one 16-byte load per lane and n8 tile) per load batch, two batches in
  // flight. Measured at 16 rows (docs/benchmarks.md): a second k block at NT = 4 took the kernel
  // to 182 registers and one block per SM, and the 4384 x 1024 product from 5.1 to 7.6 us.
  constexpr int U = MT == 1 && NT == 1 ? 3 : (MT == 1 && NT == 2 ? 2 : 1);
  __shared__ float red[kTensorWarps - 1][MT][NT][4][32];
  __shared__ float red_ss[kTensorWarps][MT][16];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int n0 = blockIdx.x * 8 * NT;
  const int kq = a.k / kTensorWarps;
  const int kb = warp * kq + t * 8;  // this lane's first k
  const int nblk = kq / 32;
  const uint16_t* wrow[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    wrow[j] = a.w + static_cast<int64_t>(min(n0 + 8 * j + g, a.n - 1)) * a.k + kb;
  }
  uint4 wa[U][NT], wb[U][NT];
  float4 xa[U][MT][4], xb[U][MT][4];  // rows g, g + 8 of each m tile: k [0, 4), [4, 8)
  auto load_w = [&](uint4(&buf)[U][NT], int b0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        buf[u][j] = b0 + u < nblk ? __ldg(reinterpret_cast<const uint4*>(wrow[j] + (b0 + u) * 32))
                                  : make_uint4(0u, 0u, 0u, 0u);
      }
    }
  };
  const float* xr[MT][2];
  bool xok[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = mt * 16 + g + 8 * h;
      xok[mt][h] = row < a.m;
      xr[mt][h] = a.x + static_cast<int64_t>(xok[mt][h] ? row : 0) * a.ldx + kb;
    }
  }
  auto load_x = [&](float4(&buf)[U][MT][4], int b0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const bool ok = xok[mt][h] && b0 + u < nblk;
          const float4* p = reinterpret_cast<const float4*>(xr[mt][h] + (b0 + u) * 32);
          buf[u][mt][2 * h] = ok ? p[0] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          buf[u][mt][2 * h + 1] = ok ? p[1] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
      }
    }
  };
  const float* nwp = kNorm ? a.norm_w + kb : nullptr;
  float ss[MT][2] = {};  // sums of squares of this lane's x, rows g and g + 8 of each m tile
  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][j][i] = 0.0f;
    }
  }
  // A fragment regs of k16 step s: (g, 2c..) (g + 8, 2c..) (g, 2c + 8..) (g + 8, 2c + 8..) hold
  // x at k 8c + 4s + {0, 1}, the same for g + 8, then 8c + 4s + {2, 3}: the k order of the
  // weight load's words 2s and 2s + 1.
  auto compute = [&](const uint4(&wv)[U][NT], const float4(&xv)[U][MT][4], int b0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (b0 + u >= nblk) break;
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        uint32_t hi[MT][4], lo[MT][4];
        float4 nw = make_float4(1.0f, 1.0f, 1.0f, 1.0f);
        if constexpr (kNorm) nw = __ldg(reinterpret_cast<const float4*>(nwp + (b0 + u) * 32) + s);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          float4 r0 = xv[u][mt][s], r1 = xv[u][mt][2 + s];
          if constexpr (kNorm) {
            ss[mt][0] += r0.x * r0.x + r0.y * r0.y + r0.z * r0.z + r0.w * r0.w;
            ss[mt][1] += r1.x * r1.x + r1.y * r1.y + r1.z * r1.z + r1.w * r1.w;
            r0 = make_float4(nw.x * r0.x, nw.y * r0.y, nw.z * r0.z, nw.w * r0.w);
            r1 = make_float4(nw.x * r1.x, nw.y * r1.y, nw.z * r1.z, nw.w * r1.w);
          }
          PackSplitBf16(r0.x, r0.y, &hi[mt][0], &lo[mt][0]);
          PackSplitBf16(r1.x, r1.y, &hi[mt][1], &lo[mt][1]);
          PackSplitBf16(r0.z, r0.w, &hi[mt][2], &lo[mt][2]);
          PackSplitBf16(r1.z, r1.w, &hi[mt][3], &lo[mt][3]);
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint32_t b0w = s == 0 ? wv[u][j].x : wv[u][j].z;
          const uint32_t b1w = s == 0 ? wv[u][j].y : wv[u][j].w;
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            Mma16816(acc[mt][j], hi[mt], b0w, b1w);
            if (a.split) Mma16816(acc[mt][j], lo[mt], b0w, b1w);
          }
        }
      }
    }
  };
  // Weights are never written by earlier kernels: the first batch goes out before waiting.
  load_w(wa, 0);
  AllowDependentGrids();
  WaitForPriorGrids();
  load_x(xa, 0);
  for (int b0 = 0; b0 < nblk; b0 += 2 * U) {
    if (b0 + U < nblk) {
      load_w(wb, b0 + U);
      load_x(xb, b0 + U);
    }
    compute(wa, xa, b0);
    if (b0 + U < nblk) {
      if (b0 + 2 * U < nblk) {
        load_w(wa, b0 + 2 * U);
        load_x(xa, b0 + 2 * U);
      }
      compute(wb, xb, b0 + U);
    }
  }
  if (warp > 0) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) red[warp - 1][mt][j][i][lane] = acc[mt][j][i];
      }
    }
  }
  if constexpr (kNorm) {  // a row's squares: the quad's lanes, then the warps (in warp order)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float v = ss[mt][h];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if (t == 0) red_ss[warp][mt][g + 8 * h] = v;
      }
    }
  }
  __syncthreads();
  if (warp != 0) return;
  float scale[MT][2];  // each of this lane's rows' norm scale (1 without the norm)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      scale[mt][h] = 1.0f;
      if constexpr (kNorm) {
        float t2 = 0.0f;
#pragma unroll
        for (int w = 0; w < kTensorWarps; ++w) t2 += red_ss[w][mt][g + 8 * h];
        scale[mt][h] = 1.0f / sqrtf(t2 / static_cast<float>(a.k) + a.norm_eps);
      }
    }
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float v = acc[mt][j][i];
#pragma unroll
        for (int w = 0; w < kTensorWarps - 1; ++w) v += red[w][mt][j][i][lane];
        const int row = mt * 16 + g + (i >= 2 ? 8 : 0);
        const int col = n0 + 8 * j + 2 * t + (i & 1);
        if (row >= a.m || col >= a.n) continue;
        if constexpr (kNorm) v *= scale[mt][i >= 2];
        float* out = a.y + static_cast<int64_t>(row) * a.ldy + col;
        // Same order as the CPU: (y + x.w) + bias.
        float r = a.accumulate ? *out + v : v;
        if (a.bias != nullptr) r += a.bias[col];
        *out = r;
      }
    }
  }
}

// y[i, j] (+)= sum over splits of partials[s, i, j] (+ bias[j]), summed in split order.
__global__ void SplitKReduceKernel(const float* partials, int splits, int m, int n,
                                   const float* bias, float* y, int ldy, bool accumulate) {
  AllowDependentGrids();
  WaitForPriorGrids();
  const int64_t total = static_cast<int64_t>(m) * n;
  const int64_t plane = total;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = partials[idx];
    for (int z = 1; z < splits; ++z) s += partials[z * plane + idx];
    const int64_t i = idx / n;
    const int j = static_cast<int>(idx - i * n);
    float* out = y + i * ldy + j;
    float v = accumulate ? *out + s : s;
    if (bias != nullptr) v += bias[j];
    *out = v;
  }
}

// y[i, j] = (zero_first ? 0 : y[i, j]) + (bias ? bias[j] : 0): the k == 0 product and the bias of
// the cuBLASLt path (added after the GEMM, in the CPU's order).
__global__ void BiasEpilogueKernel(float* y, int ldy, int m, int n, const float* bias,
                                   bool zero_first) {
  AllowDependentGrids();
  WaitForPriorGrids();
  const int64_t total = static_cast<int64_t>(m) * n;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / n;
    const int j = static_cast<int>(idx - i * n);
    float* out = y + i * ldy + j;
    float v = zero_first ? 0.0f : *out;
    if (bias != nullptr) v += bias[j];
    *out = v;
  }
}

int GridFor(int64_t work, int threads, const Context& ctx) {
  const int64_t blocks = (work + threads - 1) / threads;
  const int64_t cap = std::max<int64_t>(1, static_cast<int64_t>(ctx.num_sms) * 16);
  return static_cast<int>(std::max<int64_t>(1, std::min(blocks, cap)));
}

bool Aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

absl::Status LaunchBiasEpilogue(Context& ctx, float* y, int ldy, int m, int n, const float* bias,
                                bool zero_first) {
  constexpr int kEpilogueThreads = 256;
  return Launch(ctx, BiasEpilogueKernel,
                dim3(GridFor(static_cast<int64_t>(m) * n, kEpilogueThreads, ctx)),
                dim3(kEpilogueThreads), 0, y, ldy, m, n, bias, zero_first);
}

// RMSNorm prologue of the small-m kernel (null weight: none).
struct NormPrologue {
  const float* weight = nullptr;
  float eps = 0.0f;
};

template <bool kBf16, int M>
absl::Status LaunchSmallM(Context& ctx, const float* x, int ldx, const uint16_t* w, int n, int k,
                          const float* bias, float* y, int ldy, bool accumulate,
                          NormPrologue norm) {
  using Shape = SmallMShape<M>;
  const int col_tile = kGroups * Shape::kCols;
  const int64_t col_blocks = (static_cast<int64_t>(n) + col_tile - 1) / col_tile;
  const int64_t tiles = (static_cast<int64_t>(k) + Shape::kTile - 1) / Shape::kTile;
  // Split k until one full wave of blocks is resident (small n), at least one tile per split.
  // Resident blocks per SM from the register counts ptxas reports (64-66 registers for m <= 2,
  // 91-128 up to m = 8, about 168 above); a constant rather than an occupancy query, which keeps
  // the launch free of extra runtime calls (it may be recorded into a CUDA graph).
  constexpr int blocks_per_sm = M <= 2 ? 8 : M <= 8 ? 4 : 3;
  const int64_t target = static_cast<int64_t>(blocks_per_sm) * std::max(ctx.num_sms, 1);
  int64_t splits = std::min<int64_t>({(target + col_blocks - 1) / col_blocks, tiles, 65535});
  splits = std::max<int64_t>(splits, 1);
  const int64_t tiles_per_split = (tiles + splits - 1) / splits;
  splits = (tiles + tiles_per_split - 1) / tiles_per_split;

  SmallMArgs a;
  a.x = x;
  a.ldx = ldx;
  a.w = w;
  a.n = n;
  a.k = k;
  a.k_per_split = static_cast<int>(tiles_per_split * Shape::kTile);
  a.vec_w = Aligned(w, 16) && k % kVec == 0;
  a.vec_x = Aligned(x, 16) && ldx % 4 == 0;
  a.bias = bias;
  a.y = y;
  a.ldy = ldy;
  a.accumulate = accumulate;
  a.partials = nullptr;
  a.norm_w = norm.weight;
  a.norm_eps = norm.eps;
  a.vec_norm = k % 4 == 0 && ldx % 4 == 0 && Aligned(x, 16) && Aligned(norm.weight, 16);
  if (splits > 1) {
    const size_t bytes = static_cast<size_t>(splits) * M * static_cast<size_t>(n) * sizeof(float);
    absl::StatusOr<void*> scratch = ctx.Scratch(ScratchSlot::kMatmulInput, bytes);
    if (!scratch.ok()) return scratch.status();
    a.partials = static_cast<float*>(*scratch);
  }
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(splits));
  RETURN_IF_ERROR(Launch(ctx, SmallMMatmulKernel<kBf16, M>, grid, dim3(kThreads), 0, a));
  if (a.partials == nullptr) return absl::OkStatus();
  constexpr int kReduceThreads = 256;
  return Launch(ctx, SplitKReduceKernel,
                dim3(GridFor(static_cast<int64_t>(M) * n, kReduceThreads, ctx)),
                dim3(kReduceThreads), 0, static_cast<const float*>(a.partials),
                static_cast<int>(splits), M, n, bias, y, ldy, accumulate);
}

template <bool kBf16>
absl::Status SmallMMatmul(Context& ctx, const float* x, int ldx, int m, const uint16_t* w, int n,
                          int k, const float* bias, float* y, int ldy, bool accumulate,
                          NormPrologue norm = {}) {
  switch (m) {
#define RAMBA_SMALL_M_CASE(M) \
  case M:                     \
    return LaunchSmallM<kBf16, M>(ctx, x, ldx, w, n, k, bias, y, ldy, accumulate, norm);
    RAMBA_SMALL_M_CASE(1)
    RAMBA_SMALL_M_CASE(2)
    RAMBA_SMALL_M_CASE(3)
    RAMBA_SMALL_M_CASE(4)
    RAMBA_SMALL_M_CASE(5)
    RAMBA_SMALL_M_CASE(6)
    RAMBA_SMALL_M_CASE(7)
    RAMBA_SMALL_M_CASE(8)
    RAMBA_SMALL_M_CASE(9)
    RAMBA_SMALL_M_CASE(10)
    RAMBA_SMALL_M_CASE(11)
    RAMBA_SMALL_M_CASE(12)
    RAMBA_SMALL_M_CASE(13)
    RAMBA_SMALL_M_CASE(14)
    RAMBA_SMALL_M_CASE(15)
    RAMBA_SMALL_M_CASE(16)
#undef RAMBA_SMALL_M_CASE
    default:
      return absl::InternalError("SmallMMatmul: m out of range");
  }
}

bool SplitActivations();

// Rows from which bf16 products take the tensor-core small-m kernel (up to kTensorMaxM; beyond,
// cuBLASLt). RAMBA_CUDA_TENSOR_SMALL_M: 0 never, N from N rows (default kTensorMinRowsDefault).
// From 5 rows: at 4 the CUDA-core kernel still reads the LM head faster (45 vs 51 us) and the
// decode step gained nothing clear; at 8 the tensor-core one is faster on every 370M shape.
constexpr int kTensorMinRowsDefault = 5;
int TensorMinRows() {
  const char* e = std::getenv("RAMBA_CUDA_TENSOR_SMALL_M");
  if (e == nullptr || e[0] == '\0') return kTensorMinRowsDefault;
  const int v = std::atoi(e);
  return v <= 0 ? kTensorMaxM + 1 : v;
}

template <int MT, int NT>
absl::Status LaunchTensorSmallM(Context& ctx, const TensorSmallMArgs& a) {
  const int blocks = (a.n + 8 * NT - 1) / (8 * NT);
  if constexpr (MT == 1) {  // the folded norm: up to 16 rows (TensorSmallM)
    if (a.norm_w != nullptr) {
      return Launch(ctx, SmallMTensorKernel<MT, NT, true>, dim3(blocks), dim3(kTensorWarps * 32), 0,
                    a);
    }
  }
  return Launch(ctx, SmallMTensorKernel<MT, NT, false>, dim3(blocks), dim3(kTensorWarps * 32), 0,
                a);
}

// The tensor-core small-m kernel when it takes the product (bf16 weights, k a multiple of
// kTensorWarps * 32, aligned vector loads; a folded RMSNorm up to 16 rows only: at 17-32 it made
// the 370M decode step at batch 32 slower, 3.88-3.90 vs 3.19-3.20 ms, against 1.95-1.97 vs
// 1.98-2.02 at 16); *taken = false otherwise.
absl::Status TensorSmallM(Context& ctx, const float* x, int ldx, int m, const MatrixView& w,
                          const float* bias, float* y, int ldy, bool accumulate, bool* taken,
                          NormPrologue norm = {}) {
  const int n = static_cast<int>(w.rows), k = static_cast<int>(w.cols);
  *taken = w.dtype == DType::kBF16 && m >= TensorMinRows() && m <= kTensorMaxM &&
           k % (kTensorWarps * 32) == 0 && Aligned(w.data, 16) && Aligned(x, 16) && ldx % 4 == 0 &&
           (norm.weight == nullptr || (m <= 16 && Aligned(norm.weight, 16)));
  if (!*taken) return absl::OkStatus();
  TensorSmallMArgs a;
  a.x = x;
  a.ldx = ldx;
  a.m = m;
  a.w = static_cast<const uint16_t*>(w.data);
  a.n = n;
  a.k = k;
  a.bias = bias;
  a.y = y;
  a.ldy = ldy;
  a.accumulate = accumulate;
  a.split = SplitActivations();
  a.norm_w = norm.weight;
  a.norm_eps = norm.eps;
  // The most n8 tiles per block that still give every SM a block (more tiles per block reuse
  // each x fragment more; fewer blocks than SMs leave bandwidth unused).
  const int tiles = (n + 7) / 8, sms = std::max(ctx.num_sms, 1);
  const int nt = tiles >= 4 * sms ? 4 : tiles >= 2 * sms ? 2 : 1;
  if (m <= 16) {
    return nt == 4   ? LaunchTensorSmallM<1, 4>(ctx, a)
           : nt == 2 ? LaunchTensorSmallM<1, 2>(ctx, a)
                     : LaunchTensorSmallM<1, 1>(ctx, a);
  }
  return nt == 4   ? LaunchTensorSmallM<2, 4>(ctx, a)
         : nt == 2 ? LaunchTensorSmallM<2, 2>(ctx, a)
                   : LaunchTensorSmallM<2, 1>(ctx, a);
}

// The small-m kernel for 16-bit weights w (bf16 or f16), m <= kSmallM.
absl::Status SmallM(Context& ctx, const float* x, int ldx, int m, const MatrixView& w,
                    const float* bias, float* y, int ldy, bool accumulate,
                    NormPrologue norm = {}) {
  const auto* w16 = static_cast<const uint16_t*>(w.data);
  const int n = static_cast<int>(w.rows), k = static_cast<int>(w.cols);
  return w.dtype == DType::kBF16
             ? SmallMMatmul<true>(ctx, x, ldx, m, w16, n, k, bias, y, ldy, accumulate, norm)
             : SmallMMatmul<false>(ctx, x, ldx, m, w16, n, k, bias, y, ldy, accumulate, norm);
}

// Any m, 16 rows at a time (the fallback when cuBLASLt has no algorithm).
absl::Status SmallMSlabs(Context& ctx, const float* x, int ldx, int m, const MatrixView& w,
                         const float* bias, float* y, int ldy, bool accumulate) {
  for (int r0 = 0; r0 < m; r0 += kSmallM) {
    RETURN_IF_ERROR(SmallM(ctx, x + static_cast<int64_t>(r0) * ldx, ldx,
                           std::min(kSmallM, m - r0), w, bias,
                           y + static_cast<int64_t>(r0) * ldy, ldy, accumulate));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// cuBLASLt path.

constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;

// x[m, k] (stride ldx) -> the GemmInput `in` (in.ldh % 8 == 0, so each thread writes one aligned
// 16-byte chunk of 8 hi values, and one of lo).
template <bool kBf16>
__global__ void ConvertXKernel(const float* x, int ldx, int m, int k, bool vec_x, GemmInput in) {
  AllowDependentGrids();
  WaitForPriorGrids();
  const int chunks = in.ldh / kVec;
  const int64_t total = static_cast<int64_t>(m) * chunks;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < total;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = u / chunks;
    const int c0 = static_cast<int>(u - i * chunks) * kVec;
    const float* src = x + i * ldx + c0;
    float v[kVec];
    if (vec_x && c0 + kVec <= k) {
      const float4 lo = *reinterpret_cast<const float4*>(src);
      const float4 hi = *reinterpret_cast<const float4*>(src + 4);
      v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w;
      v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
    } else {
#pragma unroll
      for (int q = 0; q < kVec; ++q) v[q] = c0 + q < k ? src[q] : 0.0f;
    }
    uint32_t h[kVec], l[kVec];
#pragma unroll
    for (int q = 0; q < kVec; ++q) SplitTo16<kBf16>(v[q], &h[q], &l[q]);
    uint16_t* row = GemmInputRow(in, i);
    *reinterpret_cast<uint4*>(row + c0) =
        make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16),
                   h[6] | (h[7] << 16));
    if (in.split) {
      *reinterpret_cast<uint4*>(row + in.ldh + c0) =
          make_uint4(l[0] | (l[1] << 16), l[2] | (l[3] << 16), l[4] | (l[5] << 16),
                     l[6] | (l[7] << 16));
    }
  }
}

// Stacked weights for the one-GEMM hi + lo product: row j of ws = [w_j, 0.., w_j, 0..], each half
// ldh wide (w [n, k] row-major), so that [hi | lo] . ws_j = hi . w_j + lo . w_j.
__global__ void StackWeightsKernel(const uint16_t* w, int n, int k, bool vec_w, int ldh,
                                   uint16_t* ws) {
  AllowDependentGrids();
  WaitForPriorGrids();  // the previous stacked GEMM may still read ws
  const int chunks = ldh / kVec;
  const int64_t total = static_cast<int64_t>(n) * chunks;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < total;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = u / chunks;
    const int c0 = static_cast<int>(u - j * chunks) * kVec;
    const uint4 v = LoadWeightChunk(w + j * k, c0, k, vec_w);
    uint16_t* row = ws + j * 2 * static_cast<int64_t>(ldh);
    *reinterpret_cast<uint4*>(row + c0) = v;
    *reinterpret_cast<uint4*>(row + ldh + c0) = v;
  }
}

// Activations enter the 16-bit GEMM as hi + lo (two products) unless
// RAMBA_CUDA_BF16_ACTIVATIONS=1 asks for the plain one-product form (half the tensor-core work,
// activations rounded to 8 mantissa bits: about 1e-2 relative error at the logits of a deep model).
bool SplitActivations() {
  static const bool split = [] {
    const char* e = std::getenv("RAMBA_CUDA_BF16_ACTIVATIONS");
    return !(e != nullptr && e[0] == '1');
  }();
  return split;
}

uint32_t PointerAlignment(const void* p) {
  const uintptr_t v = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 256;
  while (a > 1 && v % a != 0) a /= 2;
  return a;
}

struct DescDeleter {
  void operator()(cublasLtMatmulDescOpaque_t* d) const {
    CublasLt().cublasLtMatmulDescDestroy(d);
  }
  void operator()(cublasLtMatrixLayoutOpaque_t* d) const {
    CublasLt().cublasLtMatrixLayoutDestroy(d);
  }
  void operator()(cublasLtMatmulPreferenceOpaque_t* d) const {
    CublasLt().cublasLtMatmulPreferenceDestroy(d);
  }
};
using MatmulDesc = std::unique_ptr<cublasLtMatmulDescOpaque_t, DescDeleter>;
using Layout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, DescDeleter>;
using Preference = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, DescDeleter>;

// Heuristic results per problem (the query costs tens of microseconds of host time).
using AlgoKey = std::tuple<int, int, int, int, int, int64_t, int64_t, int64_t, uint32_t, uint32_t,
                           uint32_t>;
struct AlgoEntry {
  bool found = false;
  cublasLtMatmulAlgo_t algo = {};
};
std::mutex& AlgoCacheMutex() {
  static std::mutex* mu = new std::mutex;
  return *mu;
}
std::map<AlgoKey, AlgoEntry>& AlgoCache() {
  static auto* cache = new std::map<AlgoKey, AlgoEntry>;
  return *cache;
}
constexpr size_t kMaxCachedAlgos = 4096;

// Row-major y[m, n] is column-major Y^T [n, m] with ld ldy. Y^T = op(A) * B with A the weights
// W[n, k] row-major = column-major [k, n] (ld lda) transposed, and B = X^T: row-major x[m, k] =
// column-major [k, m] (ld ldb). Sets *found = false (and does nothing) when cuBLASLt offers no
// algorithm.
absl::Status LtMatmul(Context& ctx, cudaDataType_t ab_type, const void* A, int64_t lda,
                      const void* B, int64_t ldb, int m, int n, int k, float* y, int64_t ldy,
                      bool accumulate, bool* found) {
  *found = false;
  cublasLtMatmulDesc_t op_raw = nullptr;
  RAMBA_CUBLAS_RETURN_IF_ERROR(
      CublasLt().cublasLtMatmulDescCreate(&op_raw, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  MatmulDesc op(op_raw);
  const int32_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  RAMBA_CUBLAS_RETURN_IF_ERROR(CublasLt().cublasLtMatmulDescSetAttribute(
      op.get(), CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)));
  RAMBA_CUBLAS_RETURN_IF_ERROR(CublasLt().cublasLtMatmulDescSetAttribute(
      op.get(), CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)));

  cublasLtMatrixLayout_t a_raw = nullptr, b_raw = nullptr, c_raw = nullptr;
  RAMBA_CUBLAS_RETURN_IF_ERROR(CublasLt().cublasLtMatrixLayoutCreate(&a_raw, ab_type, k, n, lda));
  Layout a_layout(a_raw);
  RAMBA_CUBLAS_RETURN_IF_ERROR(CublasLt().cublasLtMatrixLayoutCreate(&b_raw, ab_type, k, m, ldb));
  Layout b_layout(b_raw);
  RAMBA_CUBLAS_RETURN_IF_ERROR(
      CublasLt().cublasLtMatrixLayoutCreate(&c_raw, CUDA_R_32F, n, m, ldy));
  Layout c_layout(c_raw);

  const uint32_t align_a = PointerAlignment(A), align_b = PointerAlignment(B),
                 align_c = PointerAlignment(y);
  const AlgoKey key{ctx.device, static_cast<int>(ab_type), m, n, k, lda, ldb, ldy,
                    align_a, align_b, align_c};
  AlgoEntry entry;
  bool cached = false;
  {
    std::lock_guard<std::mutex> lock(AlgoCacheMutex());
    auto it = AlgoCache().find(key);
    if (it != AlgoCache().end()) {
      entry = it->second;
      cached = true;
    }
  }
  if (!cached) {
    cublasLtMatmulPreference_t pref_raw = nullptr;
    RAMBA_CUBLAS_RETURN_IF_ERROR(CublasLt().cublasLtMatmulPreferenceCreate(&pref_raw));
    Preference pref(pref_raw);
    const uint64_t ws = kCublasWorkspaceBytes;
    RAMBA_CUBLAS_RETURN_IF_ERROR(CublasLt().cublasLtMatmulPreferenceSetAttribute(
        pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    // The default assumes 256-byte aligned matrices; y may be a column slice of a wider matrix.
    RAMBA_CUBLAS_RETURN_IF_ERROR(CublasLt().cublasLtMatmulPreferenceSetAttribute(
        pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a)));
    RAMBA_CUBLAS_RETURN_IF_ERROR(CublasLt().cublasLtMatmulPreferenceSetAttribute(
        pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b)));
    RAMBA_CUBLAS_RETURN_IF_ERROR(CublasLt().cublasLtMatmulPreferenceSetAttribute(
        pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c, sizeof(align_c)));
    RAMBA_CUBLAS_RETURN_IF_ERROR(CublasLt().cublasLtMatmulPreferenceSetAttribute(
        pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c, sizeof(align_c)));
    cublasLtMatmulHeuristicResult_t result = {};
    int returned = 0;
    const cublasStatus_t st = CublasLt().cublasLtMatmulAlgoGetHeuristic(
        ctx.cublaslt, op.get(), a_layout.get(), b_layout.get(), c_layout.get(), c_layout.get(),
        pref.get(), 1, &result, &returned);
    // NOT_SUPPORTED (or no result) means no algorithm for this problem, not a failure.
    if (st != CUBLAS_STATUS_SUCCESS && st != CUBLAS_STATUS_NOT_SUPPORTED) {
      RAMBA_CUBLAS_RETURN_IF_ERROR(st);
    }
    entry.found = st == CUBLAS_STATUS_SUCCESS && returned > 0 &&
                  result.state == CUBLAS_STATUS_SUCCESS;
    if (entry.found) entry.algo = result.algo;
    std::lock_guard<std::mutex> lock(AlgoCacheMutex());
    if (AlgoCache().size() >= kMaxCachedAlgos) AlgoCache().clear();
    AlgoCache()[key] = entry;
  }
  if (!entry.found) return absl::OkStatus();

  absl::StatusOr<void*> ws = ctx.Scratch(ScratchSlot::kCublasWorkspace, kCublasWorkspaceBytes);
  if (!ws.ok()) return ws.status();
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  // beta == 0: C is not read, so y may hold anything (NaN) beforehand.
  RAMBA_CUBLAS_RETURN_IF_ERROR(CublasLt().cublasLtMatmul(
      ctx.cublaslt, op.get(), &alpha, A, a_layout.get(), B, b_layout.get(), &beta, y,
      c_layout.get(), y, c_layout.get(), &entry.algo, *ws, kCublasWorkspaceBytes, ctx.stream));
  *found = true;
  return absl::OkStatus();
}

// Switches read per call, so that tests force each path and the fusions step (scripts/gpu-steps)
// times them side by side.
//
// The one-GEMM hi + lo product pays from m >= ldh: stacking the weights moves ~6 bytes per
// weight, while the second product of the two-GEMM form re-reads and rewrites C, 8 bytes per
// output. Measured (370M prefill at 64K, docs/benchmarks.md): 157K vs 139K tok/s.
// RAMBA_CUDA_STACKED_GEMM: 0 never, 1 always, 2 (default) from m >= ldh.
bool UseStackedProduct(int m, int ldh) {
  const char* e = std::getenv("RAMBA_CUDA_STACKED_GEMM");
  const char mode = e != nullptr && e[0] >= '0' && e[0] <= '2' ? e[0] : '2';
  return mode == '1' || (mode == '2' && m >= ldh);
}

// Norms feeding a projection (RmsNormMatmul, GatedRmsNormMatmul). RAMBA_CUDA_FUSED_NORM: 0 runs
// the norm as its own op, then Matmul; 1 (default) folds RMSNorm into the small-m GEMM's staging
// and, with many rows, lets either norm write the cuBLASLt input (GemmInput) itself (370M
// prefill at 64K: 147K vs 139K tok/s alone, 167K vs 157K with the stacked product). Folding the
// gated norm into the small-m GEMM too was measured slower (batch-1 decode 1.40 vs 1.17 ms:
// every block recomputes the 2048-wide gated row) and removed.
bool FuseNorms() { return EnvSwitchOn("RAMBA_CUDA_FUSED_NORM"); }

absl::StatusOr<GemmInput> GemmInputScratch(Context& ctx, int m, int k, DType dtype) {
  GemmInput in;
  if (k > INT32_MAX / 2 - kVec) return absl::InvalidArgumentError("Matmul: k too large");
  in.ldh = (k + kVec - 1) / kVec * kVec;
  in.split = SplitActivations();
  in.bf16 = dtype == DType::kBF16;
  const size_t bytes = static_cast<size_t>(m) * in.ld() * sizeof(uint16_t);
  ASSIGN_OR_RETURN(void* data, ctx.Scratch(ScratchSlot::kMatmulInput, bytes));
  in.data = static_cast<uint16_t*>(data);
  return in;
}

// y (+)= in * w^T (+ bias) on cuBLASLt: one GEMM over [hi | lo] and the stacked weights, or hi
// and lo as two products. *found = false, with nothing written to y, when cuBLASLt offers no
// algorithm for the shape.
absl::Status GemmFromInput(Context& ctx, const GemmInput& in, int m, const MatrixView& w,
                           const float* bias, float* y, int ldy, bool accumulate, bool* found) {
  const cudaDataType_t type = in.bf16 ? CUDA_R_16BF : CUDA_R_16F;
  const int n = static_cast<int>(w.rows), k = static_cast<int>(w.cols);
  *found = false;
  if (in.split && UseStackedProduct(m, in.ldh)) {
    const int kk = 2 * in.ldh;
    ASSIGN_OR_RETURN(void* scratch,
                     ctx.Scratch(ScratchSlot::kMatmulWeights,
                                 static_cast<size_t>(n) * kk * sizeof(uint16_t)));
    auto* ws = static_cast<uint16_t*>(scratch);
    constexpr int kStackThreads = 256;
    RETURN_IF_ERROR(Launch(ctx, StackWeightsKernel,
                           dim3(GridFor(static_cast<int64_t>(n) * (in.ldh / kVec), kStackThreads,
                                        ctx)),
                           dim3(kStackThreads), 0, static_cast<const uint16_t*>(w.data), n, k,
                           Aligned(w.data, 16) && k % kVec == 0, in.ldh, ws));
    RETURN_IF_ERROR(
        LtMatmul(ctx, type, ws, kk, in.data, kk, m, n, kk, y, ldy, accumulate, found));
    // Without an algorithm for k = 2 ldh, the two products below (the stacked copy goes unused).
  }
  if (!*found) {
    RETURN_IF_ERROR(
        LtMatmul(ctx, type, w.data, k, in.data, in.ld(), m, n, k, y, ldy, accumulate, found));
    if (!*found) return absl::OkStatus();
    if (in.split) {
      bool lo_found = false;
      RETURN_IF_ERROR(LtMatmul(ctx, type, w.data, k, in.data + in.ldh, in.ld(), m, n, k, y, ldy,
                               /*accumulate=*/true, &lo_found));
      if (!lo_found) {
        return absl::InternalError("Matmul: cuBLASLt lost its algorithm for the residue");
      }
    }
  }
  return bias != nullptr ? LaunchBiasEpilogue(ctx, y, ldy, m, n, bias, false) : absl::OkStatus();
}

// Many rows with a norm in front: `write_input` (the norm) fills the GEMM input itself instead of
// an f32 output that the GEMM's conversion would read back. False, with nothing written to y,
// when cuBLASLt offers no algorithm.
template <class WriteInput>
absl::StatusOr<bool> NormedGemm(Context& ctx, int m, const MatrixView& w, float* y, int ldy,
                                bool accumulate, WriteInput write_input) {
  ASSIGN_OR_RETURN(const GemmInput in, GemmInputScratch(ctx, m, static_cast<int>(w.cols), w.dtype));
  RETURN_IF_ERROR(write_input(in));
  bool found = false;
  RETURN_IF_ERROR(GemmFromInput(ctx, in, m, w, nullptr, y, ldy, accumulate, &found));
  return found;
}

}  // namespace

absl::Status Matmul(Context& ctx, const float* x, int64_t ldx, int64_t m, MatrixView w,
                    const float* bias, float* y, int64_t ldy, bool accumulate) {
  // CudaBackend checked: m, n > 0, all sizes and strides fit in int, ldx >= k, ldy >= n.
  const int mi = static_cast<int>(m), n = static_cast<int>(w.rows), k = static_cast<int>(w.cols);
  const int ldxi = static_cast<int>(ldx), ldyi = static_cast<int>(ldy);
  if (k == 0) return LaunchBiasEpilogue(ctx, y, ldyi, mi, n, bias, !accumulate);

  if (w.dtype == DType::kF32) {
    bool found = false;
    absl::Status s = LtMatmul(ctx, CUDA_R_32F, w.data, k, x, ldx, mi, n, k, y, ldy, accumulate,
                              &found);
    if (!s.ok()) return s;
    if (!found) return absl::InternalError("Matmul: cuBLASLt has no FP32 algorithm for this shape");
    return bias != nullptr ? LaunchBiasEpilogue(ctx, y, ldyi, mi, n, bias, false)
                           : absl::OkStatus();
  }

  const bool bf16 = w.dtype == DType::kBF16;
  bool tensor = false;
  RETURN_IF_ERROR(TensorSmallM(ctx, x, ldxi, mi, w, bias, y, ldyi, accumulate, &tensor));
  if (tensor) return absl::OkStatus();
  if (mi <= kSmallM) return SmallM(ctx, x, ldxi, mi, w, bias, y, ldyi, accumulate);

  ASSIGN_OR_RETURN(const GemmInput in, GemmInputScratch(ctx, mi, k, w.dtype));
  constexpr int kConvertThreads = 256;
  const int convert_grid =
      GridFor(static_cast<int64_t>(mi) * (in.ldh / kVec), kConvertThreads, ctx);
  const bool vec_x = Aligned(x, 16) && ldx % 4 == 0;
  RETURN_IF_ERROR(Launch(ctx, bf16 ? ConvertXKernel<true> : ConvertXKernel<false>,
                         dim3(convert_grid), dim3(kConvertThreads), 0, x, ldxi, mi, k, vec_x, in));
  bool found = false;
  RETURN_IF_ERROR(GemmFromInput(ctx, in, mi, w, bias, y, ldyi, accumulate, &found));
  return found ? absl::OkStatus() : SmallMSlabs(ctx, x, ldxi, mi, w, bias, y, ldyi, accumulate);
}

absl::Status RmsNormMatmul(Context& ctx, const float* x, int64_t ldx, int64_t m,
                           const float* norm_weight, float eps, float* xn, MatrixView w, float* y,
                           int64_t ldy, bool accumulate) {
  // CudaBackend checked as for Matmul, plus norm_weight and xn (ldx-strided, k columns).
  const int k = static_cast<int>(w.cols);
  const int mi = static_cast<int>(m);
  const int ldxi = static_cast<int>(ldx), ldyi = static_cast<int>(ldy);
  const bool fuse = w.dtype != DType::kF32 && k > 0 && FuseNorms();
  // Every block of the GEMM recomputes the rows' norms before its first tile: a warp per row, so
  // up to 4 rows cost one row's latency. Measured at batch 16 (4 rows per warp) the fused step
  // was slower (2.52 vs 2.44 ms), at batch 1 faster (1.199 vs 1.290 ms).
  if (fuse) {
    bool tensor = false;
    RETURN_IF_ERROR(TensorSmallM(ctx, x, ldxi, mi, w, nullptr, y, ldyi, accumulate, &tensor,
                                 NormPrologue{norm_weight, eps}));
    if (tensor) return absl::OkStatus();
  }
  if (fuse && m <= kFusedNormMaxRows) {
    return SmallM(ctx, x, ldxi, mi, w, nullptr, y, ldyi, accumulate,
                  NormPrologue{norm_weight, eps});
  }
  if (fuse && m > kSmallM && !NormRowsUseBlocks(ctx, m, k)) {
    ASSIGN_OR_RETURN(const bool done,
                     NormedGemm(ctx, mi, w, y, ldyi, accumulate, [&](const GemmInput& in) {
                       return RmsNormToGemmInput(ctx, x, ldx, norm_weight, m, k, eps, in);
                     }));
    if (done) return absl::OkStatus();
  }
  RETURN_IF_ERROR(RmsNorm(ctx, x, ldx, norm_weight, xn, ldx, m, w.cols, eps));
  return Matmul(ctx, xn, ldx, m, w, nullptr, y, ldy, accumulate);
}

absl::Status GatedRmsNormMatmul(Context& ctx, const float* y, int64_t ldy, const float* z,
                                int64_t ldz, const float* norm_weight, int64_t group_size,
                                float eps, int64_t m, float* g, MatrixView w, float* out,
                                int64_t ldo, bool accumulate) {
  // CudaBackend checked as for Matmul (g as x, stride dim), plus the norm's arguments.
  const int64_t dim = w.cols;
  const int mi = static_cast<int>(m), ldoi = static_cast<int>(ldo);
  const bool fuse = w.dtype != DType::kF32 && FuseNorms();
  if (fuse && m > kSmallM && !NormRowsUseBlocks(ctx, m * (dim / group_size), group_size)) {
    ASSIGN_OR_RETURN(const bool done,
                     NormedGemm(ctx, mi, w, out, ldoi, accumulate, [&](const GemmInput& in) {
                       return GatedRmsNormToGemmInput(ctx, y, ldy, z, ldz, norm_weight, m, dim,
                                                      group_size, eps, in);
                     }));
    if (done) return absl::OkStatus();
  }
  RETURN_IF_ERROR(GatedRmsNorm(ctx, y, ldy, z, ldz, norm_weight, g, dim, m, dim, group_size, eps));
  return Matmul(ctx, g, dim, m, w, nullptr, out, ldo, accumulate);
}

}  // namespace ramba::kernels::cuda
