// HSA's sparse chunk attention (the query side) on the GPU: every query row attends, per kv head,
// to the top-K chunks its retrieval picked, a softmax within each chunk, weighted by the
// stick-breaking weights.
//
// Three paths:
//  - f32 (every shape; decode): a block per (row, kv head) stages each selected chunk's f32 K/V in
//    shared memory once and its warps run the group's query heads over it on CUDA cores. When
//    that is too few blocks for the GPU (decode), a block per (row, kv head, slot) instead, the
//    item's last block summing the slots.
//  - bf16 tensor cores, per warp (RAMBA_CUDA_SPARSE_ATTENTION=bf16; the fallback for top-K beyond
//    the block-shared path's): for the 370M shapes (head dim 64, chunks of 64 keys, 16 query heads
//    per kv head, as in the paper's kernel). One pass converts the batch's chunks to bf16 (K as
//    stored, V transposed) once per call; then a warp per (row, kv head) computes
//    S = Q K^T and O += w softmax(S) V with mma.sync m16n8k16, the 16 query heads being the M
//    dimension, reading each selected chunk's bf16 fragments straight from L2 (L1 serves rows of a
//    block that picked the same chunk). Keys and dims are permuted so that every lane's fragment
//    is one 16- or 8-byte load; the permutation is applied identically on both sides of each
//    product, so results are unaffected. Inputs are rounded to bf16 (Q, K, V, P) with f32
//    accumulation, which is the precision of the reference kernel; RAMBA_CUDA_SPARSE_ATTENTION=f32
//    forces the f32 path.
//  - bf16 tensor cores, block-shared (the default for prefill-shaped calls of those shapes): a
//    block per query block of 8 (or 16) rows reads each distinct chunk its rows picked once, into
//    shared memory, instead of once per (row, chunk); see its section below. Measured on the H100
//    (docs/benchmarks.md) against the per-warp kernel at 64K: 0.76 vs 1.18 ms on selections
//    shared between neighbouring rows as a trained model's are, 1.17 vs 1.22 ms on random ones.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/cuda/async_copy.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/warp_attend.cuh"

namespace ramba::kernels::cuda {
namespace {

constexpr int kWarp = 32;

// ---- f32 path: a block per (row, kv head) ----

// Warps per block: 8 for a block per (row, kv head); 16 for a block per slot as well (decode),
// where the block's heads run side by side rather than two per warp (1M-token decode, retrieval
// + sparse attention in a CUDA graph: 0.046 vs 0.050 ms with 8).
constexpr int kAttnWarps = 8;
constexpr int kSplitWarps = 16;

using warp_attend::KeyStride;

size_t SparseSmemBytes(int cs, int hd, int group, int warps) {
  return sizeof(float) * (static_cast<size_t>(cs) * KeyStride(hd) + static_cast<size_t>(cs) * hd +
                          2 * static_cast<size_t>(group) * hd + static_cast<size_t>(warps) * cs);
}

template <int kHd, int kWarps>
__global__ void __launch_bounds__(kWarps* kWarp, 16 / kWarps)
    SparseChunkAttentionKernel(const float* __restrict__ q, ChunkMemoryBatch mem,
                               const int32_t* __restrict__ indices,
                               const float* __restrict__ weights, int rheads, int k, int nh,
                               int nkv, int hd_rt, int cs, float scale,
                               float* __restrict__ partials, unsigned* __restrict__ counters,
                               float* __restrict__ out) {
  constexpr int kThreads = kWarps * kWarp;
  AllowDependentGrids();
  WaitForPriorGrids();
  const int hd = kHd > 0 ? kHd : hd_rt;
  const int ks = KeyStride(hd);
  const int group = nh / nkv;
  extern __shared__ float4 smem4[];
  float* kbuf = reinterpret_cast<float*>(smem4);  // [cs][ks]
  float* vbuf = kbuf + cs * ks;                   // [cs][hd]
  float* qbuf = vbuf + cs * hd;                   // [group][hd]
  float* obuf = qbuf + group * hd;                // [group][hd]
  float* pbuf = obuf + group * hd;                // [warps][cs]
  // split (partials given): a block per (row, kv head, slot), writing that slot's weighted output
  // as a partial [blocks][group][hd]; the item's last block adds them up. Else a block per
  // (row, kv head).
  const bool split = partials != nullptr;
  __shared__ bool s_last;
  const int64_t item = split ? blockIdx.x / k : blockIdx.x;
  const int j_begin = split ? static_cast<int>(blockIdx.x % k) : 0;
  const int j_end = split ? j_begin + 1 : k;
  const int64_t row = item / nkv;
  const int g = static_cast<int>(item % nkv);
  const int e = g * rheads / nkv;
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;

  const float* qrow = q + (row * nh + static_cast<int64_t>(g) * group) * hd;
  for (int i = tid; i < group * hd; i += kThreads) {
    qbuf[i] = qrow[i];
    obuf[i] = 0.0f;
  }
  const int32_t seq = mem.row_seq[row];
  const float* const* table = mem.chunk_kv[seq];
  // The CPU backend rejects out-of-range indices; here they are skipped rather than read.
  const int64_t num_chunks = mem.num_chunks != nullptr ? mem.num_chunks[seq] : INT64_MAX;
  const int32_t* idx = indices + (row * rheads + e) * k;
  const float* wt = weights + (row * rheads + e) * k;
  const int64_t stride = static_cast<int64_t>(nkv) * hd;  // between keys of one chunk
  const int64_t kv_half = static_cast<int64_t>(cs) * stride;

  for (int j = j_begin; j < j_end; ++j) {
    // Block-uniform: every thread reads the same slot.
    const int32_t c = idx[j];
    const float w = wt[j];
    if (c < 0 || c >= num_chunks || w == 0.0f) continue;  // a zero weight adds nothing
    const float* kc = table[c];
    if (kc == nullptr) continue;
    const float* vc = kc + kv_half;
    __syncthreads();  // the previous slot's readers are done with kbuf / vbuf
    warp_attend::StageKeysValues<kThreads>(
        kc + static_cast<int64_t>(g) * hd, vc + static_cast<int64_t>(g) * hd, stride, cs, hd,
        hd % 4 == 0 && reinterpret_cast<uintptr_t>(kc) % 16 == 0, kbuf, vbuf, tid);
    __syncthreads();
    for (int hh = warp; hh < group; hh += kWarps) {
      warp_attend::WarpAttend<kHd>(qbuf + hh * hd, kbuf, vbuf, pbuf + warp * cs, ks, cs, hd,
                                   scale, w, /*accumulate=*/true, obuf + hh * hd, lane);
    }
  }
  __syncthreads();
  float* orow = out + (row * nh + static_cast<int64_t>(g) * group) * hd;
  if (!split) {
    for (int i = tid; i < group * hd; i += kThreads) orow[i] = obuf[i];
    return;
  }
  float* mine = partials + static_cast<int64_t>(blockIdx.x) * group * hd;
  for (int i = tid; i < group * hd; i += kThreads) mine[i] = obuf[i];
  // Publish the partial, count this block in; the item's last block sums the slots in slot order
  // from 0: the same additions as the one-block-per-row kernel, so the same bits.
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(&counters[item], 1u) == static_cast<unsigned>(k - 1);
  __syncthreads();
  if (!s_last) return;
  __threadfence();  // see the other slots' partials
  const float* first = partials + item * k * group * hd;
  for (int i = tid; i < group * hd; i += kThreads) {
    float acc = 0.0f;
    for (int jj = 0; jj < k; ++jj) acc += __ldcg(first + static_cast<int64_t>(jj) * group * hd + i);
    orow[i] = acc;
  }
  if (tid == 0) counters[item] = 0u;
}

template <int kHd, class... Args>
absl::Status LaunchSparse(Context& ctx, unsigned blocks, int warps, size_t smem, Args... args) {
  const auto kernel = warps == kSplitWarps ? SparseChunkAttentionKernel<kHd, kSplitWarps>
                                           : SparseChunkAttentionKernel<kHd, kAttnWarps>;
  RETURN_IF_ERROR(PrepareSmem(ctx, kernel, smem, "SparseChunkAttention"));
  return Launch(ctx, kernel, blocks, warps * kWarp, smem, args...);
}

// ---- bf16 tensor-core path ----

constexpr int kMmaHd = 64;     // head dim
constexpr int kMmaKeys = 64;   // keys per chunk
constexpr int kMmaGroup = 16;  // query heads per kv head: the MMA's M
constexpr int kStagedElems = 2 * kMmaKeys * kMmaHd;  // bf16 K [key][dim], then V^T [dim][key]
constexpr int kMmaWarps = 4;
constexpr int kStageThreads = 256;

// Staged block of (sequence, chunk, kv head) = item, in [num_seqs][max_chunks][nkv] order.
__device__ __forceinline__ const __nv_bfloat16* StagedChunk(const __nv_bfloat16* staging,
                                                            int64_t seq, int64_t chunk,
                                                            int64_t max_chunks, int nkv, int g) {
  return staging + ((seq * max_chunks + chunk) * nkv + g) * kStagedElems;
}

// Element offset of (row, col) in a staged [64][64] bf16 tile. Swizzled (the block-shared path,
// which copies tiles to shared memory as they are and reads them with ldmatrix): the row's eight
// 16-byte units are permuted by XOR with row % 8, so the 8 row addresses of an ldmatrix at one
// logical column fall in distinct bank groups.
template <bool kSwizzled>
__device__ __forceinline__ int StagedOffset(int row, int col) {
  if constexpr (kSwizzled) return row * 64 + ((((col >> 3) ^ row) & 7) << 3) + (col & 7);
  return row * 64 + col;
}

// The 32-bit word of a staged tile holding (row, col) and (row, col + 1), col even; `i` is that
// word's index in the unswizzled tile.
template <bool kSwizzled>
__device__ __forceinline__ int StagedWord(int row, int col, int i) {
  if constexpr (kSwizzled) return StagedOffset<true>(row, col) / 2;
  return i;
}

// One block per (sequence, chunk, kv head): K row-major as stored, V transposed through shared
// memory. Chunks past a sequence's count or without K/V are left unwritten (never read).
template <bool kSwizzled>
__global__ void __launch_bounds__(kStageThreads)
    StageChunksBf16Kernel(ChunkMemoryBatch mem, int nkv, int64_t max_chunks,
                          __nv_bfloat16* __restrict__ staging) {
  AllowDependentGrids();
  WaitForPriorGrids();  // K/V may come from earlier kernels; staging may still be read
  __shared__ float vs[kMmaKeys][kMmaHd + 1];
  const int64_t item = blockIdx.x;
  const int g = static_cast<int>(item % nkv);
  const int64_t seq = item / nkv / max_chunks, c = item / nkv % max_chunks;
  if (c >= mem.num_chunks[seq]) return;
  const float* kc = mem.chunk_kv[seq][c];
  if (kc == nullptr) return;
  const int64_t stride = static_cast<int64_t>(nkv) * kMmaHd;  // between keys
  const float* vc = kc + kMmaKeys * stride;
  __nv_bfloat16* dst = staging + item * kStagedElems;
  uint32_t* kdst = reinterpret_cast<uint32_t*>(dst);
  for (int i = threadIdx.x; i < kMmaKeys * kMmaHd / 2; i += kStageThreads) {
    const int key = i / (kMmaHd / 2), d = 2 * (i % (kMmaHd / 2));
    const float* src = kc + key * stride + g * kMmaHd + d;
    kdst[StagedWord<kSwizzled>(key, d, i)] = PackBf16(__ldg(src), __ldg(src + 1));
    vs[key][d] = __ldg(vc + key * stride + g * kMmaHd + d);
    vs[key][d + 1] = __ldg(vc + key * stride + g * kMmaHd + d + 1);
  }
  __syncthreads();
  uint32_t* vdst = reinterpret_cast<uint32_t*>(dst + kMmaKeys * kMmaHd);
  for (int i = threadIdx.x; i < kMmaHd * kMmaKeys / 2; i += kStageThreads) {
    const int d = i / (kMmaKeys / 2), key = 2 * (i % (kMmaKeys / 2));
    vdst[StagedWord<kSwizzled>(d, key, i)] = PackBf16(vs[key][d], vs[key + 1][d]);
  }
}

// Loads 8 consecutive floats (16-byte aligned) as bf16 pairs.
__device__ __forceinline__ void LoadRow8(const float* p, float (&x)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
}

// 2^x, flushing subnormal results to 0.
__device__ __forceinline__ float Exp2Ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Softmax within a chunk of an S tile [16 heads][64 keys] in the m16n8 accumulator layout
// (s[n][0..1]: head g8 = lane / 4, s[n][2..3]: head g8 + 8, keys of tile n; a head's row is
// spread over the 4 lanes of a quad): s becomes exp2((s - row max) * scale_log2), and the
// returned factors w / (row sum) for heads g8 and g8 + 8 fold the chunk's weight into P.
// kLean: one FFMA and the bare MUFU.EX2 per score and a fast divide (exp2f adds a range check
// and two multiplies for subnormal results, which a softmax can flush to 0): a quarter of the
// block-shared kernel's loop instructions, 4-7% of its time on an H100. The per-warp kernel
// keeps exp2f: it is at its register limit, and the lean form's extra live values spill there.
template <bool kLean = false>
__device__ __forceinline__ float2 ChunkSoftmax(float (&s)[8][4], float scale_log2, float w) {
  float m0 = -INFINITY, m1 = -INFINITY;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    m0 = fmaxf(m0, fmaxf(s[i][0], s[i][1]));
    m1 = fmaxf(m1, fmaxf(s[i][2], s[i][3]));
  }
#pragma unroll
  for (int m = 1; m <= 2; m <<= 1) {
    m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, m));
    m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, m));
  }
  const float b0 = m0 * scale_log2, b1 = m1 * scale_log2;
  float l0 = 0.0f, l1 = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if constexpr (kLean) {
      s[i][0] = Exp2Ftz(fmaf(s[i][0], scale_log2, -b0));
      s[i][1] = Exp2Ftz(fmaf(s[i][1], scale_log2, -b0));
      s[i][2] = Exp2Ftz(fmaf(s[i][2], scale_log2, -b1));
      s[i][3] = Exp2Ftz(fmaf(s[i][3], scale_log2, -b1));
    } else {
      s[i][0] = exp2f((s[i][0] - m0) * scale_log2);
      s[i][1] = exp2f((s[i][1] - m0) * scale_log2);
      s[i][2] = exp2f((s[i][2] - m1) * scale_log2);
      s[i][3] = exp2f((s[i][3] - m1) * scale_log2);
    }
    l0 += s[i][0] + s[i][1];
    l1 += s[i][2] + s[i][3];
  }
#pragma unroll
  for (int m = 1; m <= 2; m <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, m);
    l1 += __shfl_xor_sync(0xffffffffu, l1, m);
  }
  if constexpr (kLean) return make_float2(__fdividef(w, l0), __fdividef(w, l1));  // l0, l1 >= 1
  return make_float2(w / l0, w / l1);
}

// P's A fragment for the k-step over keys 16j..16j + 15 (S tiles 2j and 2j + 1), scaled by f.
__device__ __forceinline__ void PackP(const float (&s)[8][4], int j, float2 f, uint32_t (&pa)[4]) {
  pa[0] = PackBf16(s[2 * j][0] * f.x, s[2 * j][1] * f.x);
  pa[1] = PackBf16(s[2 * j][2] * f.y, s[2 * j][3] * f.y);
  pa[2] = PackBf16(s[2 * j + 1][0] * f.x, s[2 * j + 1][1] * f.x);
  pa[3] = PackBf16(s[2 * j + 1][2] * f.y, s[2 * j + 1][3] * f.y);
}

// A warp per (row, kv head) item; lane = 4 * g8 + t in the MMA fragment layouts.
//
// Dims: in the QK^T product, 32-dim block `blk` and k-step `st`, the logical k index 2t + e maps
// to dim 32 blk + 8t + 4st + e and 2t + 8 + e to 32 blk + 8t + 4st + 2 + e, so a lane's Q and K
// operands for both k-steps of a block are the 8 consecutive dims 32 blk + 8t ... + 7.
// Keys: column c = 2t' + e of S tile i (8 keys) is key 16 (i / 2) + 4t' + 2 (i % 2) + e, so in the
// PV product (k-step j = S tiles 2j and 2j + 1) a lane's V^T operand is the 4 consecutive keys
// 16j + 4t ... + 3 of one dim.
__global__ void __launch_bounds__(kMmaWarps * kWarp)
    SparseChunkAttentionMmaKernel(const float* __restrict__ q, ChunkMemoryBatch mem,
                                  const int32_t* __restrict__ indices,
                                  const float* __restrict__ weights, int rheads, int k, int nkv,
                                  int64_t items, int64_t max_chunks,
                                  const __nv_bfloat16* __restrict__ staging, float scale_log2,
                                  float* __restrict__ out) {
  AllowDependentGrids();
  WaitForPriorGrids();
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int g8 = lane / 4, t = lane % 4;
  const int nh = nkv * kMmaGroup;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kMmaWarps + warp; item < items;
       item += static_cast<int64_t>(gridDim.x) * kMmaWarps) {
    const int64_t row = item / nkv;
    const int g = static_cast<int>(item % nkv);
    const int e = g * rheads / nkv;
    const float* qg = q + (row * nh + g * kMmaGroup) * kMmaHd;

    uint32_t qa[2][2][4];  // [dim block][k-step][A register]
#pragma unroll
    for (int blk = 0; blk < 2; ++blk) {
      float x0[8], x1[8];  // heads g8 and g8 + 8
      LoadRow8(qg + g8 * kMmaHd + 32 * blk + 8 * t, x0);
      LoadRow8(qg + (g8 + 8) * kMmaHd + 32 * blk + 8 * t, x1);
#pragma unroll
      for (int st = 0; st < 2; ++st) {
        qa[blk][st][0] = PackBf16(x0[4 * st], x0[4 * st + 1]);
        qa[blk][st][1] = PackBf16(x1[4 * st], x1[4 * st + 1]);
        qa[blk][st][2] = PackBf16(x0[4 * st + 2], x0[4 * st + 3]);
        qa[blk][st][3] = PackBf16(x1[4 * st + 2], x1[4 * st + 3]);
      }
    }

    float o[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;

    const int32_t seq = mem.row_seq[row];
    const int64_t num_chunks = mem.num_chunks[seq];
    const float* const* table = mem.chunk_kv[seq];
    const int32_t* idx = indices + (row * rheads + e) * k;
    const float* wt = weights + (row * rheads + e) * k;
    for (int j = 0; j < k; ++j) {
      const int32_t c = idx[j];
      const float w = wt[j];
      // Same skips as the f32 path (and the CPU, which rejects what is out of range).
      if (c < 0 || c >= num_chunks || w == 0.0f || table[c] == nullptr) continue;
      const __nv_bfloat16* kb = StagedChunk(staging, seq, c, max_chunks, nkv, g);
      const __nv_bfloat16* vt = kb + kMmaKeys * kMmaHd;

      uint4 kf[8][2];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int key = 16 * (i / 2) + 4 * (g8 / 2) + 2 * (i % 2) + g8 % 2;
        const uint4* kr = reinterpret_cast<const uint4*>(kb + key * kMmaHd + 8 * t);
        kf[i][0] = __ldg(kr);
        kf[i][1] = __ldg(kr + 4);  // dims 32 + 8t ...
      }
      uint2 vf[4][8];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          vf[jj][nt] =
              __ldg(reinterpret_cast<const uint2*>(vt + (8 * nt + g8) * kMmaKeys + 16 * jj + 4 * t));
        }
      }

      float s[8][4];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
        Mma16816(s[i], qa[0][0], kf[i][0].x, kf[i][0].y);
        Mma16816(s[i], qa[0][1], kf[i][0].z, kf[i][0].w);
        Mma16816(s[i], qa[1][0], kf[i][1].x, kf[i][1].y);
        Mma16816(s[i], qa[1][1], kf[i][1].z, kf[i][1].w);
      }
      const float2 f = ChunkSoftmax(s, scale_log2, w);
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        uint32_t pa[4];
        PackP(s, jj, f, pa);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) Mma16816(o[nt], pa, vf[jj][nt].x, vf[jj][nt].y);
      }
    }

    float* og = out + (row * nh + g * kMmaGroup) * kMmaHd;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      *reinterpret_cast<float2*>(og + g8 * kMmaHd + 8 * nt + 2 * t) = make_float2(o[nt][0], o[nt][1]);
      *reinterpret_cast<float2*>(og + (g8 + 8) * kMmaHd + 8 * nt + 2 * t) =
          make_float2(o[nt][2], o[nt][3]);
    }
  }
}

// ---- bf16 tensor cores, block-shared chunk reads (the paper's Algorithm 1, per query block) ----
//
// Neighbouring tokens of a trained model pick many of the same chunks (ramba-tiny at 64K, by
// tools/selection-reuse: 8 consecutive rows' 64 picks name 20-31 distinct chunks, 16 rows' 128
// name 25-43), while
// the per-warp kernel above reads a chunk from L2 once per (row, chunk) pair, and is bound by
// that traffic. Here a block owns kRows consecutive rows (one kv head): it forms the union of
// their selections, most recent chunk first, and each distinct chunk streams
// once through a ring of shared-memory slots with the bulk copy engine; warp r owns row r (its Q
// fragments and O accumulators stay in registers) and computes only the chunks its row picked, in
// union order. Every warp passes every chunk (waits for its copy, computes if its row uses it,
// then counts itself out of the slot); the last one out issues the copy of the chunk kSlots
// further on into that slot, so warps run up to kSlots chunks apart and no warp is set aside to
// produce (kRows warps per block keep 128 registers each: 16 warps per SM). Rows that share
// nothing cost what the per-warp kernel does.
//
// Fragments come from the swizzled staging (StagedOffset<true>) by ldmatrix in the standard
// mma.cuh layouts. A row's chunks are added in union order, which is its slot order when the
// selection is sorted by chunk, most recent first (as retrieval returns it).
constexpr int kSharedMaxTopK = 16;
constexpr int kStagedBytes = kStagedElems * static_cast<int>(sizeof(__nv_bfloat16));

template <int kRows, int kRingSlots>
struct SharedAttentionSmem {
  static constexpr int kSlots = kRingSlots;
  static constexpr int kEntries = kRows * kSharedMaxTopK;
  __nv_bfloat16 ring[kSlots][kStagedElems];    // first member: 128-byte aligned
  __nv_bfloat16 q[kRows][kMmaGroup * kMmaHd];  // each row's Q [head][dim], swizzled like K
  static constexpr int kTable = 2 * kEntries;  // hash set of the picked chunks (-1: free)
  uint64_t full[kSlots];                       // phase done: the slot's chunk has landed
  int32_t passed[kSlots];                      // warps done with the slot's current chunk
  int32_t table[kTable];
  int32_t distinct[kEntries];  // the distinct chunks (staged indices), in no particular order
  int32_t chunks[kEntries];    // union position -> staged chunk index, most recent first
  int32_t pos[kEntries];       // (row, slot) -> position in the union, or -1 when unused
  int num_distinct;
};

template <int kRows, int kSlots>
size_t SharedAttentionSmemBytes() {
  return sizeof(SharedAttentionSmem<kRows, kSlots>);
}

// The first row of this block's rows; volatile so that the compiler recomputes it where used.
template <int kRows>
__device__ __forceinline__ int64_t RowBlockStart(int nkv) {
  uint32_t block;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(block));
  return static_cast<int64_t>(block / nkv) * kRows;
}

__device__ __forceinline__ int AtomicAddAcqRel(int32_t* p, int32_t v) {
  int32_t old;
  asm volatile("atom.acq_rel.cta.shared::cta.add.s32 %0, [%1], %2;"
               : "=r"(old)
               : "r"(SharedAddress(p)), "r"(v)
               : "memory");
  return old;
}

// Issues the bulk copy of union chunk p into its slot (one thread).
template <class Smem>
__device__ __forceinline__ void CopyChunkToSlot(Smem& sm, int p, const __nv_bfloat16* staging) {
  const int slot = p % Smem::kSlots;
  MbarrierArriveExpectTx(&sm.full[slot], kStagedBytes);
  BulkCopyToShared(sm.ring[slot], staging + static_cast<int64_t>(sm.chunks[p]) * kStagedElems,
                   kStagedBytes, &sm.full[slot]);
}

template <int kRows, int kRingSlots>
__global__ void __launch_bounds__(kRows * kWarp, 16 / kRows)
    SparseChunkAttentionSharedKernel(const float* __restrict__ q, ChunkMemoryBatch mem,
                                     const int32_t* __restrict__ indices,
                                     const float* __restrict__ weights, int rheads, int k, int nkv,
                                     int64_t rows, int64_t max_chunks,
                                     const __nv_bfloat16* __restrict__ staging, float scale_log2,
                                     float* __restrict__ out) {
  using Smem = SharedAttentionSmem<kRows, kRingSlots>;
  constexpr int kSlots = Smem::kSlots;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  AllowDependentGrids();
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int g = static_cast<int>(blockIdx.x % nkv);
  const int64_t row0 = RowBlockStart<kRows>(nkv);
  const int e = g * rheads / nkv;
  const int entries = kRows * k;

  if (tid < kSlots) {
    MbarrierInit(&sm.full[tid], 1);  // the issuer's arrival, then the copy's bytes
    sm.passed[tid] = 0;
  }
  if (tid == 0) sm.num_distinct = 0;
  for (int i = tid; i < Smem::kTable; i += blockDim.x) sm.table[i] = -1;
  WaitForPriorGrids();  // indices, weights, q and the staging come from earlier kernels

  // Warp r owns row row0 + r; lane = 4 * g8 + t in the MMA fragment layouts. Its Q goes to
  // shared memory first, so the loads overlap the union's construction below.
  const int64_t row = row0 + warp;
  const int g8 = lane / 4, t = lane % 4;
  const int nh = nkv * kMmaGroup;
  const bool live = row < rows;
  // The row's Q in bf16, read back by ldmatrix per chunk: 16 registers fewer than holding its
  // fragments, which keeps the warp within 128 registers without spills.
  __nv_bfloat16* qs = sm.q[warp];
  if (live) {
    const float* qg = q + (row * nh + g * kMmaGroup) * kMmaHd;
    for (int i = lane; i < kMmaGroup * kMmaHd / 2; i += kWarp) {
      const int head = i / (kMmaHd / 2), d = 2 * (i % (kMmaHd / 2));
      const float2 x = *reinterpret_cast<const float2*>(qg + head * kMmaHd + d);
      *reinterpret_cast<uint32_t*>(qs + StagedOffset<true>(head, d)) = PackBf16(x.x, x.y);
    }
  }

  // The union: each used (row, slot) entry puts its staged chunk index into a shared hash set;
  // the thread that inserts a value lists it once. Every thread owns at most one entry.
  int32_t key = -1;
  if (tid < entries && row0 + tid / k < rows) {
    const int64_t erow = row0 + tid / k;
    const int32_t c = indices[(erow * rheads + e) * k + tid % k];
    const float w = weights[(erow * rheads + e) * k + tid % k];
    const int32_t seq = mem.row_seq[erow];
    // Same skips as the other paths (the CPU rejects what is out of range).
    if (c >= 0 && c < mem.num_chunks[seq] && w != 0.0f && mem.chunk_kv[seq][c] != nullptr) {
      key = static_cast<int32_t>((seq * max_chunks + c) * nkv + g);
    }
  }
  __syncthreads();  // the table is cleared
  bool lists_it = false;
  if (key >= 0) {
    for (uint32_t h = (static_cast<uint32_t>(key) * 2654435761u) >> 16;; ++h) {
      const int32_t old = atomicCAS(&sm.table[h % Smem::kTable], -1, key);
      if (old == key) break;
      if (old == -1) {
        lists_it = true;
        sm.distinct[atomicAdd(&sm.num_distinct, 1)] = key;
        break;
      }
    }
  }
  __syncthreads();
  // A chunk's union position is the number of distinct chunks more recent (larger index) than it,
  // so the order does not depend on which thread listed what first.
  const int num_chunks = sm.num_distinct;
  if (tid < entries) {
    int32_t at = -1;
    if (key >= 0) {
      at = 0;
      for (int j = 0; j < num_chunks; ++j) at += sm.distinct[j] > key;
      if (lists_it) sm.chunks[at] = key;
    }
    sm.pos[tid] = at;
  }
  FenceMbarrierInit();
  __syncthreads();

  if (tid == 0) {
    for (int u = 0; u < min(num_chunks, kSlots); ++u) CopyChunkToSlot(sm, u, staging);
  }
  float o[8][4];  // [dims 8n..8n + 7][C register]
#pragma unroll
  for (int n = 0; n < 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  // Lane j < k holds the row's slot j: its union position and weight.
  const int my_pos = lane < k ? sm.pos[warp * k + lane] : -1;
  const float my_w = lane < k && live ? weights[(row * rheads + e) * k + lane] : 0.0f;
  // ldmatrix rows: lane l addresses row l % 8 of matrix l / 8; the swizzle is by row % 8 = l % 8.
  const int l8 = lane % 8, unit_lo = lane / 8;
  const uint32_t ring0 = SharedAddress(sm.ring[0]), qbase = SharedAddress(qs);

  for (int p = 0; p < num_chunks; ++p) {
    const int slot = p % kSlots;
    MbarrierWait(&sm.full[slot], (p / kSlots) & 1);
    unsigned uses = __ballot_sync(0xffffffffu, my_pos == p);
    const uint32_t kbase = ring0 + slot * kStagedBytes, vbase = kbase + kStagedBytes / 2;
    while (uses != 0) {
      const int j = __ffs(uses) - 1;
      uses &= uses - 1;
      const float w = __shfl_sync(0xffffffffu, my_w, j);
      float s[8][4];
#pragma unroll
      for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {  // dims 16ks..16ks + 15
        // A: matrices (heads 0-7 | 8-15) x (dims 16ks.. | 16ks + 8..): lane l addresses head
        // l % 8 + 8 (l / 8 % 2), unit 2ks + l / 16.
        uint32_t qa[4];
        const int head = l8 + 8 * (unit_lo % 2);
        Ldsm4<false>(qa, qbase + head * 128 + (((2 * ks + unit_lo / 2) ^ l8) * 16));
#pragma unroll
        for (int n = 0; n < 8; n += 2) {  // keys 8n..8n + 15: one ldmatrix, two B tiles
          // B: matrices (keys 8n.. | 8n + 8..) x (dims 16ks.. | 16ks + 8..): lane l addresses
          // key 8n + l % 8 + 8 (l / 16), unit 2ks + l / 8 % 2.
          uint32_t r[4];
          const int key_row = 8 * n + l8 + 8 * (unit_lo / 2);
          Ldsm4<false>(r, kbase + key_row * 128 + (((2 * ks + unit_lo % 2) ^ l8) * 16));
          Mma16816(s[n], qa, r[0], r[1]);
          Mma16816(s[n + 1], qa, r[2], r[3]);
        }
      }
      const float2 f = ChunkSoftmax<true>(s, scale_log2, w);
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // keys 32h..32h + 31: k-steps 2h and 2h + 1
        uint32_t pa[2][4];
        PackP(s, 2 * h, f, pa[0]);
        PackP(s, 2 * h + 1, f, pa[1]);
#pragma unroll
        for (int n = 0; n < 8; ++n) {  // dims 8n..8n + 7
          // B: V^T rows (dims) 8n + l % 8, units (keys / 8) 4h + l / 8.
          uint32_t r[4];
          Ldsm4<false>(r, vbase + (8 * n + l8) * 128 + (((4 * h + unit_lo) ^ l8) * 16));
          Mma16816(o[n], pa[0], r[0], r[1]);
          Mma16816(o[n], pa[1], r[2], r[3]);
        }
      }
    }
    __syncwarp();  // every lane's reads of the slot are done
    if (lane == 0) {
      // acq_rel: each warp's count releases its reads of the slot, and the last warp out,
      // acquiring them all through the counter's chain of increments, refills the slot.
      if (AtomicAddAcqRel(&sm.passed[slot], 1) == kRows - 1) {
        sm.passed[slot] = 0;
        if (p + kSlots < num_chunks) {
          asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // reads before the copy
          CopyChunkToSlot(sm, p + kSlots, staging);
        }
      }
    }
  }

  if (!live) return;
  // The row again from the block index rather than kept in registers across the loop.
  float* og = out + ((RowBlockStart<kRows>(nkv) + warp) * nh + g * kMmaGroup) * kMmaHd;
#pragma unroll
  for (int n = 0; n < 8; ++n) {
    *reinterpret_cast<float2*>(og + g8 * kMmaHd + 8 * n + 2 * t) = make_float2(o[n][0], o[n][1]);
    *reinterpret_cast<float2*>(og + (g8 + 8) * kMmaHd + 8 * n + 2 * t) =
        make_float2(o[n][2], o[n][3]);
  }
}

// Prefill-shaped: enough rows that staging every chunk of the batch once costs less than the
// attention reads it saves (each staged chunk is read at least once on average). Decode batches
// (a row per sequence) never qualify.
constexpr int64_t kMmaMinRows = 257;
// Largest staging buffer the path may hold (1M tokens of one sequence need 256 MiB).
constexpr int64_t kMaxStagingBytes = int64_t{1} << 30;

// "f32" forces the CUDA-core path, "bf16" the per-warp tensor-core path and "shared" the
// block-shared one, where their shapes allow; read per call so tests and benchmarks can switch.
// Unset: block-shared for prefill-shaped calls, f32 for decode.
enum class SparsePath { kAuto, kF32, kBf16, kShared };
SparsePath RequestedSparsePath() {
  const char* v = std::getenv("RAMBA_CUDA_SPARSE_ATTENTION");
  if (v == nullptr) return SparsePath::kAuto;
  if (std::strcmp(v, "f32") == 0) return SparsePath::kF32;
  if (std::strcmp(v, "bf16") == 0) return SparsePath::kBf16;
  if (std::strcmp(v, "shared") == 0) return SparsePath::kShared;
  return SparsePath::kAuto;
}

// Rows per block of the block-shared path: RAMBA_CUDA_SPARSE_ROWS = 8 (the default: two blocks
// per SM) or 16 (one block, more rows to share chunks between). 8 was faster on every selection
// measured (64K: 0.76 vs 0.85 ms on neighbour-shared selections, 1.17 vs 1.38 ms on random).
int SharedPathRows() {
  const char* v = std::getenv("RAMBA_CUDA_SPARSE_ROWS");
  return v != nullptr && std::strcmp(v, "16") == 0 ? 16 : 8;
}

template <int kRows, int kSlots>
absl::Status LaunchShared(Context& ctx, int64_t rows, int64_t nkv, const float* q,
                          const ChunkMemoryBatch& mem, const int32_t* indices, const float* weights,
                          int64_t rheads, int64_t top_k, const __nv_bfloat16* staging,
                          float scale_log2, float* out) {
  static_assert(kRows * kSharedMaxTopK <= kRows * kWarp, "an entry per thread");
  const size_t smem = SharedAttentionSmemBytes<kRows, kSlots>();
  const auto kernel = SparseChunkAttentionSharedKernel<kRows, kSlots>;
  RETURN_IF_ERROR(PrepareSmem(ctx, kernel, smem, "SparseChunkAttention"));
  const int64_t blocks = (rows + kRows - 1) / kRows * nkv;
  if (blocks > INT32_MAX) return absl::UnimplementedError("SparseChunkAttention: too many rows");
  return Launch(ctx, kernel, static_cast<unsigned>(blocks), kRows * kWarp, smem, q, mem, indices,
                weights, static_cast<int>(rheads), static_cast<int>(top_k), static_cast<int>(nkv),
                rows, mem.max_num_chunks, staging, scale_log2, out);
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Returns false (nothing launched) when the call does not fit the tensor-core path.
absl::StatusOr<bool> SparseAttentionMma(Context& ctx, const float* q, int64_t rows,
                                        const ChunkMemoryBatch& mem, const int32_t* indices,
                                        const float* weights, int64_t rheads, int64_t top_k,
                                        int64_t nh, int64_t nkv, int64_t hd, int64_t chunk_size,
                                        float* out) {
  const SparsePath path = RequestedSparsePath();
  if (path == SparsePath::kF32) return false;
  if (hd != kMmaHd || chunk_size != kMmaKeys || nh != kMmaGroup * nkv) return false;
  if (mem.num_seqs <= 0 || mem.max_num_chunks <= 0 || !Aligned16(q) || !Aligned16(out)) {
    return false;
  }
  const int64_t staged = mem.num_seqs * mem.max_num_chunks * nkv;
  const int64_t bytes = staged * kStagedElems * static_cast<int64_t>(sizeof(__nv_bfloat16));
  if (bytes > kMaxStagingBytes || staged > INT32_MAX) return false;
  if (path == SparsePath::kAuto &&
      (rows < kMmaMinRows || rows * top_k < mem.num_seqs * mem.max_num_chunks)) {
    return false;
  }
  ASSIGN_OR_RETURN(void* scratch, ctx.Scratch(ScratchSlot::kSparseKv, static_cast<size_t>(bytes)));
  auto* staging = static_cast<__nv_bfloat16*>(scratch);
  const float scale_log2 = 1.4426950408889634f / std::sqrt(static_cast<float>(hd));
  if (path != SparsePath::kBf16 && top_k <= kSharedMaxTopK) {
    RETURN_IF_ERROR(Launch(ctx, StageChunksBf16Kernel<true>, static_cast<unsigned>(staged),
                           kStageThreads, 0, mem, static_cast<int>(nkv), mem.max_num_chunks,
                           staging));
    // Ring slots: as many as two blocks of 8 rows per SM can hold (5 x 16 KiB each; 5 were 3-4%
    // faster than 4 on every selection measured at 64K, 3 slower), 8 for one block of 16.
    const auto launch = SharedPathRows() == 16 ? LaunchShared<16, 8> : LaunchShared<8, 5>;
    RETURN_IF_ERROR(launch(ctx, rows, nkv, q, mem, indices, weights, rheads, top_k, staging,
                           scale_log2, out));
    return true;
  }
  RETURN_IF_ERROR(Launch(ctx, StageChunksBf16Kernel<false>, static_cast<unsigned>(staged),
                         kStageThreads, 0, mem, static_cast<int>(nkv), mem.max_num_chunks,
                         staging));
  const int64_t items = rows * nkv;
  const int64_t blocks = std::min<int64_t>((items + kMmaWarps - 1) / kMmaWarps, INT32_MAX);
  RETURN_IF_ERROR(Launch(ctx, SparseChunkAttentionMmaKernel, static_cast<unsigned>(blocks),
                         kMmaWarps * kWarp, 0, q, mem, indices, weights, static_cast<int>(rheads),
                         static_cast<int>(top_k), static_cast<int>(nkv), items,
                         mem.max_num_chunks, staging, scale_log2, out));
  return true;
}

}  // namespace

absl::Status SparseChunkAttention(Context& ctx, const float* q, int64_t rows,
                                  const ChunkMemoryBatch& mem, const int32_t* indices,
                                  const float* weights, int64_t retrieval_heads, int64_t top_k,
                                  int64_t nh, int64_t nkv, int64_t hd, int64_t chunk_size,
                                  float* out) {
  if (rows == 0) return absl::OkStatus();
  if (hd > 4096 || nh > 65536 || chunk_size > 65536 || top_k > INT32_MAX ||
      rows * nkv > INT32_MAX) {
    return absl::UnimplementedError("SparseChunkAttention: sizes beyond the CUDA kernel's limits");
  }
  ASSIGN_OR_RETURN(const bool done, SparseAttentionMma(ctx, q, rows, mem, indices, weights,
                                                      retrieval_heads, top_k, nh, nkv, hd,
                                                      chunk_size, out));
  if (done) return absl::OkStatus();
  const int ihd = static_cast<int>(hd), cs = static_cast<int>(chunk_size);
  const int group = static_cast<int>(nh / nkv);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int rheads = static_cast<int>(retrieval_heads), k = static_cast<int>(top_k);
  const int inh = static_cast<int>(nh), inkv = static_cast<int>(nkv);
  // Too few (row, kv head) blocks to fill the GPU (decode): a block per slot as well, so a row's
  // chunks are read by K SMs at once instead of one after another, then a sum over the slots.
  const int64_t items = rows * nkv;
  const bool split = k > 1 && items < 2 * std::max(ctx.num_sms, 1) && items * k <= INT32_MAX &&
                     items <= Context::kCountersPerSlot && EnvSwitchOn("RAMBA_CUDA_SPARSE_SPLIT");
  float* partials = nullptr;
  if (split) {
    const size_t bytes = static_cast<size_t>(items * k * group * hd) * sizeof(float);
    ASSIGN_OR_RETURN(void* scratch, ctx.Scratch(ScratchSlot::kAttention, bytes));
    partials = static_cast<float*>(scratch);
  }
  unsigned* counters = ctx.Counters(Context::CounterSlot::kAttention);
  const unsigned blocks = static_cast<unsigned>(split ? items * k : items);
  const int warps = split && group >= kSplitWarps ? kSplitWarps : kAttnWarps;
  const size_t smem = SparseSmemBytes(cs, ihd, group, warps);
  // Specialised head dims unroll the dot products; the generic kernel handles the rest.
  if (hd == 64) {
    RETURN_IF_ERROR(LaunchSparse<64>(ctx, blocks, warps, smem, q, mem, indices, weights, rheads, k,
                                     inh, inkv, ihd, cs, scale, partials, counters, out));
  } else if (hd == 32) {
    RETURN_IF_ERROR(LaunchSparse<32>(ctx, blocks, warps, smem, q, mem, indices, weights, rheads, k,
                                     inh, inkv, ihd, cs, scale, partials, counters, out));
  } else {
    RETURN_IF_ERROR(LaunchSparse<0>(ctx, blocks, warps, smem, q, mem, indices, weights, rheads, k,
                                    inh, inkv, ihd, cs, scale, partials, counters, out));
  }
  return absl::OkStatus();
}

}  // namespace ramba::kernels::cuda
