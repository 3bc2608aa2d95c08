// A decode step's run of Mamba blocks as one persistent kernel (Backend::MambaBlocks, a few
// one-token sequences). Launched layer by layer, a block is 7 kernels (in_proj with its norm,
// its split-K reduce, conv, SSM update, gated norm, out_proj, its reduce) and each boundary costs
// a grid's drain and the next one's first dependent round trip (~2-3 us), ~21 us per layer for
// ~4.4 us of weight bytes on an H100. Here one block per SM stays resident for every layer, in
// three phases per layer:
//   A: RMSNorm of h, in_proj for the block's own columns, and for those columns the conv update
//      (an xBC column has one owner, so its conv state too);
//   B: SSM update of (row, head, 16 state rows) items, gate, per-item sums of squares;
//   C: gated norm scale from the sums (the same fixed order in every block: deterministic) and
//      out_proj for the block's own columns of h (h += ..., no atomics).
// A phase's outputs reach the next as tagged words (value | layer tag, see Tag): a consumer
// polls exactly the words it needs, so no grid-wide barrier; the first version met at three
// grid barriers and was no faster than block by block (2-4 us per barrier plus the loads after
// it). Weights never change, so each block streams its next tiles (its in_proj and out_proj
// columns, one contiguous range each) into shared memory with the bulk copy engine a phase or
// more before it needs them; the SSM states it will update are prefetched the same way. No
// split-K over blocks: a block's columns are whole weight rows, each a warp's (WarpColumnsGemv).
//
// Measured (bench-mamba-blocks, docs/benchmarks.md): 11.9 vs 20.7 us per 370M layer at batch 1,
// 16.2 vs 22.2 at 2, 28.0 vs 23.3 at 4, so the backend uses it for 1 row (2 rows: the cluster
// variant below). Where a layer's time goes (--trace): ~5 us of local phases (GEMVs 1.7 and
// 0.5 us) and ~6 us in the three polls, which is handoff latency, not the weight bytes: with the
// weight and state copies switched off (an experiment) a layer took 10.0 us, and moving or
// splitting the copies moved the delay to whichever handoff they overlapped (bulk traffic in flight
// slows the tagged stores and polls). Shorter GEMVs only lengthened the polls after them.
//
// One row with one gated-norm group (370M, ramba-tiny at batch 1) takes a two-phase variant
// (kRed): phase B's block also multiplies its item's 16 gated values by their 16 out_proj
// columns, a partial of every h column, and adds it into per-layer-parity sums as 2^-32 fixed
// point integers (exact in any order, so every block reads the same bits) whose top 8 bits
// count the adds; phase A of the next layer polls the sums until their counts say every item
// has added, and applies the row's gated-norm scale (from the items' sums of squares) itself.
// Handoffs: A -> B (tagged words) and B -> A (the counted sums), not three. Sums go back to
// zero without a barrier: each item adds the difference to what it added two layers before, and
// at the launch's end each block zeroes the last layer's sums for its own h columns (only it
// reads them) while the items take their partials and counts out of the layer before's (every
// block read those before the last layer's items could finish). Measured: 10.9-11.2 vs
// 11.9-12.2 us per layer with three phases; counting in the sums instead of a fence and a
// counter per item, 10.4-10.8 vs 10.8-11.1 (docs/benchmarks.md, eighteenth and nineteenth
// sessions); RAMBA_CUDA_MAMBA_REDUCE=0 keeps three phases.
//
// ClusterMambaBlocks (below) is the same work with thread-block clusters: one grid-wide exchange
// per layer instead of three; CudaBackend uses it for 2 rows.
//
// Co-residency: the grid is one block per SM and the block needs most of an SM's shared memory,
// so every block of the grid fits at once; a block waits only for blocks of its own grid, and
// the kernels around it on the stream never wait for it, so all blocks become resident and
// every poll completes. Both kernels leave out AllowDependentGrids(), so their successor is
// launched only when they end: launched early it sat on the SMs a cluster grid leaves free and
// streamed its weights during the layers, slowing the handoffs (decode step with the cluster
// kernel, docs/benchmarks.md: 0.794 -> 0.760 ms at batch 1, 0.934 -> 0.89-0.90 at batch 2).
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "base/status_macros.h"
#include "kernels/cuda/async_copy.cuh"
#include "kernels/cuda/counted_sum.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/mamba_common.cuh"

namespace ramba::kernels::cuda::mamba {
namespace {

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
constexpr int kSlice = kWarps;  // state rows per phase-B item: one warp each
constexpr int kMaxRows = 4;     // rows (one-token sequences) per launch
constexpr int kMaxLayers = 24;  // layers per launch; longer runs take several launches
constexpr int kMaxState = 128;  // d_state: four values per lane
constexpr int kMaxNormGroups = 8;
constexpr int kMaxItems = 4;        // phase-B items per block
constexpr int kMaxPartials = 1024;  // rows x items per row (rows x d_inner / kSlice)
// The thread that issues the bulk copies (outside warp 0, whose thread 0 writes the trace).
constexpr int kCopyThread = 32;
constexpr int kMaxACols = 64;  // in_proj (and out_proj) columns per block
constexpr int kItemVals = 2 * kMaxState + 2 * kSlice + 1;  // a phase-B item's inputs
// Threads from kLoadFirst load the next layer's conv inputs (a column each), the kMaxItems below
// them its head constants; phase B's pollers (a thread per item input) stay below both.
constexpr int kLoadFirst = kThreads - kMaxACols;

struct LayerParams {
  const __nv_bfloat16* in_w;   // [in_dim, d]
  const __nv_bfloat16* out_w;  // [d, d_inner]
  const float* norm_w;         // [d]
  const float* conv_w;         // [conv_dim, 4]
  const float* conv_b;         // [conv_dim] or null
  float* const* conv_states;   // [rows] -> [3, conv_dim]
  float* const* ssm_states;    // [rows] -> [H, P, N]
  const float* A_log;
  const float* D;
  const float* dt_bias;
  const float* gnorm_w;  // [d_inner]
};

struct BlocksArgs {
  LayerParams layer[kMaxLayers];
  int num_layers;
  float* h;  // [rows, ldh]: the residual stream (read by the first layer, written by the last)
  int64_t ldh;
  // Tagged exchange buffers (value | tag << 32, see Tag): what one phase hands the next.
  uint64_t* x_in;      // [rows, in_dim]: in_proj outputs, the xBC ones after the conv
  uint64_t* x_g;       // [rows, d_inner]: gated values before the norm
  uint64_t* x_part;    // [rows, d_inner / kSlice]: per-item sums of g^2
  uint64_t* x_h;       // [rows, d]: the residual between layers of a launch
  // One-row variant (kRed): out_proj partial sums (counted_sum.h), per layer parity; zero
  // between launches.
  unsigned long long* x_acc;  // [2][d]
  unsigned* counters;         // kEpoch, kExits; zero-initialised
  long long* trace;   // null, or [layers][kMambaBlocksTracePoints][grid]: clock64 per phase
  int d, H, P, N, ngroups, d_inner, conv_dim, in_dim;  // N: d_state
  int group_size;
  float eps, geps, dt_min, dt_max;
  // Shared memory plan (byte offsets), fixed by the host for the grid size.
  int off_a, off_a_norm, off_c, off_c_norm, off_st, off_act, off_h;
};

__host__ __device__ __forceinline__ int RangeBegin(int n, int parts, int i) {
  return static_cast<int>(static_cast<int64_t>(n) * i / parts);
}

// Counters: the launch epoch (tags differ between launches) and the blocks that have exited.
constexpr int kEpoch = 0, kExits = 32;
// kRed: out_proj partials are added as counted fixed-point sums (counted_sum.h): exact in any
// order, so deterministic, and each sum tells its reader when every item has added to it.
constexpr int kRedMaxItems = 2;
// A partial in counted_sum units, saturated (NaN gives -2^47: fmaxf takes the number).
__device__ __forceinline__ long long ToFixed(float v) {
  long long q;
  asm("cvt.rni.s64.f32 %0, %1;"
      : "=l"(q)
      : "f"(fminf(fmaxf(v * counted_sum::kScale, -counted_sum::kPartialMax),
                  counted_sum::kPartialMax)));
  return q;
}
// Phases hand values over as 64-bit words {float bits, tag}: a consumer polls the words it
// needs until each carries the tag of the layer it wants, so one L2 round trip after the
// producer's store delivers both the value and the news that it is ready (a flag or a barrier
// costs three or four: release, atomic, flag, poll, then the load). Every word of a buffer is
// written once per layer, and no producer can rewrite a word before its consumers have read it
// (each rewrite is causally after every consumer's use: see the phase comments), so a tag only
// has to differ from the word's previous one. Odd, so never the buffers' initial zero.
__device__ __forceinline__ uint32_t Tag(uint32_t epoch, int layer) {
  return ((epoch * kMaxLayers + static_cast<uint32_t>(layer)) << 1) | 1u;
}
__device__ __forceinline__ uint64_t LoadTagged(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ void StoreTagged(uint64_t* p, float v, uint32_t tag) {
  const uint64_t w = (static_cast<uint64_t>(tag) << 32) | __float_as_uint(v);
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(w));
}
__device__ __forceinline__ bool Ready(uint64_t v, uint32_t tag) {
  return static_cast<uint32_t>(v >> 32) == tag;
}

// The values of up to kN tagged words, word j at at(j) (null: no word j), once each carries
// `tag`: all loads in flight at once, and each retry re-polls every word not yet ready together,
// so waiting costs one round trip per retry, not one per word.
template <int kN, typename At>
__device__ __forceinline__ void PollWords(uint32_t tag, At at, float (&out)[kN]) {
  uint64_t v[kN];
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    const uint64_t* p = at(j);
    v[j] = p != nullptr ? LoadTagged(p) : static_cast<uint64_t>(tag) << 32;
  }
  for (;;) {
    bool ready = true;
#pragma unroll
    for (int j = 0; j < kN; ++j) ready &= Ready(v[j], tag);
    if (ready) break;
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      if (!Ready(v[j], tag)) v[j] = LoadTagged(at(j));  // only real words can be unready
    }
  }
#pragma unroll
  for (int j = 0; j < kN; ++j) out[j] = __uint_as_float(static_cast<uint32_t>(v[j]));
}

// The block waits for n tagged values, element i read from at(i) and handed to put(i, value);
// a thread takes i = tid, tid + kThreads, ... in batches of PollWords.
template <typename At, typename Put>
__device__ __forceinline__ void PollGather(int n, uint32_t tag, At at, Put put) {
  constexpr int kBatch = 4;
  for (int base = static_cast<int>(threadIdx.x); base < n; base += kBatch * kThreads) {
    float v[kBatch];
    PollWords(
        tag,
        [&](int j) -> const uint64_t* {
          const int i = base + j * kThreads;
          return i < n ? at(i) : nullptr;
        },
        v);
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      if (base + j * kThreads < n) put(base + j * kThreads, v[j]);
    }
  }
}

__device__ __forceinline__ float Bf16Lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float Bf16Hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }

// GEMV k parts: a lane holds GemvJ(R) groups of 8 consecutive k of each of the R rows' x in
// registers (at most 32 floats), so a part is up to GemvPartK(R) of k and a phase splits its k
// into ceil(k / that) parts, each taken by kWarps / parts warps.
__host__ __device__ constexpr int GemvJ(int rows) { return rows == 1 ? 4 : (rows == 2 ? 2 : 1); }
__host__ __device__ constexpr int GemvPartK(int rows) { return 256 * GemvJ(rows); }

// GEMV inputs in shared memory are f32 rows, already scaled by the norms, padded to a multiple
// of 256 and permuted within each 256 so that the 8 consecutive k a lane multiplies with one
// 16-byte weight load sit in two float4s that the warp reads as 512 contiguous bytes:
// k = 256 b + 8 l + e (lane l, e < 8) is stored at 256 b + 128 (e / 4) + 4 l + e % 4.
__device__ __forceinline__ int XPos(int k) {
  const int w = k & 255, e = w & 7;
  return (k & ~255) | ((e >> 2) << 7) | ((w >> 3) << 2) | (e & 3);
}
__host__ __device__ constexpr int PaddedK(int k) { return (k + 255) / 256 * 256; }
__host__ __device__ constexpr int64_t Align128(int64_t x) { return (x + 127) / 128 * 128; }

// One warp's columns of a GEMV tile in shared memory: for columns c = c_first, c_first + c_step,
// ... < ncols of w ([ncols][ldw] bf16) and the R rows of x ([R][ldx], laid out as XPos says),
// the sums over k in [k0, k1) (k0 a multiple of 256), written to dot[c * R + r]. Lane l holds
// x at k0 + 256 j + 8 l (+0..7) in registers and reads the same k of each column's weight row,
// so every shared-memory load of the warp is 512 contiguous bytes (no bank conflicts), and a
// column costs one 5-step shuffle reduction, kCols columns' interleaved (kCols: the most columns
// a warp gets for 370M shapes, so that no warp makes a second pass). Each column's sum is one
// warp's, in a fixed order: deterministic. (Before: k split over all 16 warps with a shuffle
// reduction per column and k chunk, and every warp re-reading the norm weights with x: 2.6-3.1
// us for in_proj's 34 columns, bound by shared-memory wavefronts. A tensor-core version,
// m16n8k16 with x split into bf16 hi + lo and the tiles copied row by row into padded rows for
// conflict-free ldmatrix, was slower: 15.2 vs 13.1 us per layer.)
template <int R, int kCols>
__device__ __forceinline__ void WarpColumnsGemv(const __nv_bfloat16* w, int ldw, int ncols,
                                                int c_first, int c_step, const float* x, int ldx,
                                                int k0, int k1, int lane, float* dot) {
  constexpr int J = GemvJ(R);
  float xv[R][J][8] = {};  // zero past k1: the clamped weight loads below then add nothing
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int base = k0 + 256 * j;
    if (base + 8 * lane < k1) {  // k1 - k0 is a multiple of 8
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float4 a0 = *reinterpret_cast<const float4*>(x + r * ldx + base + 4 * lane);
        const float4 a1 = *reinterpret_cast<const float4*>(x + r * ldx + base + 128 + 4 * lane);
        xv[r][j][0] = a0.x;
        xv[r][j][1] = a0.y;
        xv[r][j][2] = a0.z;
        xv[r][j][3] = a0.w;
        xv[r][j][4] = a1.x;
        xv[r][j][5] = a1.y;
        xv[r][j][6] = a1.z;
        xv[r][j][7] = a1.w;
      }
    }
  }
  for (int cb = c_first; cb < ncols; cb += kCols * c_step) {  // the same trip count in every lane
    // Every load of the pass first, unconditionally (a column past ncols reads column cb and a k
    // past k1 reads k0: both inside the tile; the first's sums are never written, the second's
    // x is zero), so the warp waits for shared memory once, not once per load (a branch and a
    // wait per load: in_proj's pass at one row 1.65 vs 1.51 us, docs/benchmarks.md).
    uint4 wv[kCols][J];
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      const int c = cb + i * c_step < ncols ? cb + i * c_step : cb;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int k = k0 + 256 * j + 8 * lane;
        wv[i][j] = *reinterpret_cast<const uint4*>(w + static_cast<int64_t>(c) * ldw +
                                                   (k < k1 ? k : k0));
      }
    }
    float acc[kCols][R];
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
#pragma unroll
      for (int r = 0; r < R; ++r) acc[i][r] = 0.0f;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const uint4 v = wv[i][j];
        const float wf[8] = {Bf16Lo(v.x), Bf16Hi(v.x), Bf16Lo(v.y), Bf16Hi(v.y),
                             Bf16Lo(v.z), Bf16Hi(v.z), Bf16Lo(v.w), Bf16Hi(v.w)};
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float t = 0.0f;
#pragma unroll
          for (int e = 0; e < 8; ++e) t += wf[e] * xv[r][j][e];
          acc[i][r] += t;
        }
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
#pragma unroll
      for (int i = 0; i < kCols; ++i) {
#pragma unroll
        for (int r = 0; r < R; ++r) acc[i][r] += __shfl_xor_sync(0xffffffffu, acc[i][r], o);
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < kCols; ++i) {
        const int c = cb + i * c_step;
        if (c < ncols) {
#pragma unroll
          for (int r = 0; r < R; ++r) dot[c * R + r] = acc[i][r];
        }
      }
    }
  }
}

// How a GEMV phase of k = K splits over the warps: `parts` k parts of `len` (a multiple of 256),
// part p taken by warps [p * per, (p + 1) * per).
struct GemvSplit {
  int parts, len, per;
};
template <int R>
__device__ __forceinline__ GemvSplit SplitK(int K) {
  int parts = (K + GemvPartK(R) - 1) / GemvPartK(R);
  const int len = PaddedK((K + parts - 1) / parts);
  parts = (K + len - 1) / len;
  return {parts, len, kWarps / parts};
}

// ---- GEMV probe (bench-mamba-blocks --gemv_probe): one GEMV phase alone, in cycles ----
// Variant 0: WarpColumnsGemv as the kernels run it. 1: the same with each 8-k product summed
// in two chains (less dependent-FMA latency). 2: the loads alone (the tile and x read as the
// GEMV reads them, summed bitwise), a floor for shared-memory traffic. 3, 4: the kernels' GEMV
// with k split into 2 / 4 parts over the warps (less x read per warp, more columns each).
template <int kCols>
__device__ __forceinline__ void ProbeGemvIlp(const __nv_bfloat16* w, int ldw, int ncols,
                                             int c_first, int c_step, const float* x, int k1,
                                             int lane, float* dot) {
  constexpr int J = 4;
  float xv[J][8];
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int base = 256 * j;
    if (base + 8 * lane < k1) {
      const float4 a0 = *reinterpret_cast<const float4*>(x + base + 4 * lane);
      const float4 a1 = *reinterpret_cast<const float4*>(x + base + 128 + 4 * lane);
      xv[j][0] = a0.x, xv[j][1] = a0.y, xv[j][2] = a0.z, xv[j][3] = a0.w;
      xv[j][4] = a1.x, xv[j][5] = a1.y, xv[j][6] = a1.z, xv[j][7] = a1.w;
    }
  }
  for (int cb = c_first; cb < ncols; cb += kCols * c_step) {
    float acc[kCols];
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      const int c = cb + i * c_step;
      float t0 = 0.0f, t1 = 0.0f;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int k = 256 * j + 8 * lane;
        if (c < ncols && k < k1) {
          const uint4 wv = *reinterpret_cast<const uint4*>(w + static_cast<int64_t>(c) * ldw + k);
          t0 += Bf16Lo(wv.x) * xv[j][0];
          t1 += Bf16Hi(wv.x) * xv[j][1];
          t0 += Bf16Lo(wv.y) * xv[j][2];
          t1 += Bf16Hi(wv.y) * xv[j][3];
          t0 += Bf16Lo(wv.z) * xv[j][4];
          t1 += Bf16Hi(wv.z) * xv[j][5];
          t0 += Bf16Lo(wv.w) * xv[j][6];
          t1 += Bf16Hi(wv.w) * xv[j][7];
        }
      }
      acc[i] = t0 + t1;
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
#pragma unroll
      for (int i = 0; i < kCols; ++i) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
    }
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < kCols; ++i) {
        if (cb + i * c_step < ncols) dot[cb + i * c_step] = acc[i];
      }
    }
  }
}

__device__ __forceinline__ void ProbeLoadsOnly(const __nv_bfloat16* w, int ldw, int ncols,
                                               int c_first, int c_step, const float* x, int k1,
                                               int lane, float* dot) {
  uint32_t s = 0;
  for (int j = 0; 256 * j < k1; ++j) {
    const uint4 a0 = *reinterpret_cast<const uint4*>(x + 256 * j + 4 * lane);
    const uint4 a1 = *reinterpret_cast<const uint4*>(x + 256 * j + 128 + 4 * lane);
    s ^= a0.x ^ a0.y ^ a0.z ^ a0.w ^ a1.x ^ a1.y ^ a1.z ^ a1.w;
  }
  for (int c = c_first; c < ncols; c += c_step) {
    for (int k = 8 * lane; k < k1; k += 256) {
      const uint4 wv = *reinterpret_cast<const uint4*>(w + static_cast<int64_t>(c) * ldw + k);
      s ^= wv.x ^ wv.y ^ wv.z ^ wv.w;
    }
  }
  if (s == 0x12345678u) dot[lane] = 1.0f;  // keeps the loads
}

template <int kVariant>
__global__ void __launch_bounds__(kThreads, 1)
    GemvProbeKernel(int ncols, int k, int reps, long long* cycles) {
  extern __shared__ __align__(128) char smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  auto* w = reinterpret_cast<__nv_bfloat16*>(smem);
  float* x = reinterpret_cast<float*>(smem + Align128(static_cast<int64_t>(ncols) * k * 2));
  float* dot = x + PaddedK(k);  // [4][ncols]
  for (int i = tid; i < ncols * k; i += kThreads) w[i] = __float2bfloat16((i % 17 - 8) * 0.01f);
  for (int i = tid; i < PaddedK(k); i += kThreads) x[i] = (i % 13 - 6) * 0.1f;
  long long own = 0, all = 0;
  for (int rep = 0; rep < reps; ++rep) {
    __syncthreads();
    const long long t0 = clock64();
    if constexpr (kVariant == 0) {
      WarpColumnsGemv<1, 4>(w, k, ncols, warp, kWarps, x, 0, 0, k, lane, dot);
    } else if constexpr (kVariant == 1) {
      ProbeGemvIlp<4>(w, k, ncols, warp, kWarps, x, k, lane, dot);
    } else if constexpr (kVariant == 3 || kVariant == 4) {  // k split into 2 or 4 parts
      constexpr int parts = kVariant == 3 ? 2 : 4, per = kWarps / parts;
      const int len = PaddedK((k + parts - 1) / parts), part = warp / per;
      WarpColumnsGemv<1, 4>(w, k, ncols, warp % per, per, x, 0, part * len,
                            min(k, (part + 1) * len), lane, dot + part * ncols);
    } else {
      ProbeLoadsOnly(w, k, ncols, warp, kWarps, x, k, lane, dot);
    }
    const long long t1 = clock64();
    __syncthreads();
    const long long t2 = clock64();
    if (rep > 0) own += t1 - t0, all += t2 - t0;
  }
  if (tid == 0) cycles[2 * blockIdx.x] = own, cycles[2 * blockIdx.x + 1] = all;
}

struct Plan {
  int a0, a1;  // in_proj columns [a0, a1)
  int c0, c1;  // out_proj columns (h columns) [c0, c1)
};

// Copies of layer l's constant tiles (no kernel writes weights), issued by one thread: in_proj's
// rows [a0, a1) with the RMSNorm weight after them, and out_proj's rows [c0, c1) with the gated
// norm's weight.
__device__ __forceinline__ void PrefetchInProj(const BlocksArgs& a, int l, const Plan& p,
                                               char* smem, uint64_t* bar) {
  const uint32_t tile = static_cast<uint32_t>(p.a1 - p.a0) * a.d * 2, norm = a.d * 4;
  MbarrierArriveExpectTx(bar, tile + norm);
  if (tile > 0) {
    BulkCopyToShared(smem + a.off_a, a.layer[l].in_w + static_cast<int64_t>(p.a0) * a.d, tile, bar);
  }
  BulkCopyToShared(smem + a.off_a_norm, a.layer[l].norm_w, norm, bar);
}
__device__ __forceinline__ void PrefetchOutProj(const BlocksArgs& a, int l, const Plan& p,
                                                char* smem, uint64_t* bar) {
  const uint32_t tile = static_cast<uint32_t>(p.c1 - p.c0) * a.d_inner * 2, norm = a.d_inner * 4;
  MbarrierArriveExpectTx(bar, tile + norm);
  if (tile > 0) {
    BulkCopyToShared(smem + a.off_c, a.layer[l].out_w + static_cast<int64_t>(p.c0) * a.d_inner,
                     tile, bar);
  }
  BulkCopyToShared(smem + a.off_c_norm, a.layer[l].gnorm_w, norm, bar);
}

// R: the rows and kTrace (a.trace is set) are fixed at compile time: every per-row loop
// unrolls exactly and no trace code sits among the hot instructions. The layer loop's code has to
// stay small: at 142 KB (runtime rows, unrolled column loops, index arithmetic inlined per
// element) its phases ran measurably slower than their work.
template <int R, bool kTrace, bool kRed>
__global__ void __launch_bounds__(kThreads, 1)
    MambaBlocksKernel(const __grid_constant__ BlocksArgs a) {
  static_assert(!kRed || R == 1, "the reduce variant is for one row");
  extern __shared__ __align__(128) char smem[];
  // kRed: per layer parity, each item's gated-norm weights; its g times them.
  __shared__ float s_gw[2][kRedMaxItems][kSlice];
  __shared__ float s_gq[kRedMaxItems][kSlice];
  __shared__ uint64_t bars[3];  // in_proj tile, out_proj tile, states
  __shared__ float s_red[kWarps][R];
  __shared__ float s_scale[R][kMaxNormGroups];    // phase C: per (row, norm group) scales
  __shared__ float s_ascale[R];                   // phase A: per row RMSNorm scale
  __shared__ float s_hown[R][kMaxACols];          // h at this block's out_proj columns
  __shared__ float s_dot[kWarps][kMaxACols * R];  // GEMV sums per k part (at most kWarps)
  // Phase B, per item: [B | C of its group | its 16 x channels | 16 z channels | raw dt].
  __shared__ float s_in[kMaxItems][kItemVals];
  __shared__ float s_dt[kMaxItems], s_da[kMaxItems];
  // Per layer parity (loaded a layer ahead): D, dt bias, A = -exp(A_log) of each item's head.
  __shared__ float s_d[2][kMaxItems], s_dtb[2][kMaxItems], s_a[2][kMaxItems];
  __shared__ float s_part[kMaxItems][kWarps];
  // Per item (fixed for the launch): x_in offsets of its four kinds of inputs, its row, its
  // first channel, its state rows' offset in the row's SSM state.
  __shared__ int s_item_src[kMaxItems][4];
  __shared__ int s_item_r[kMaxItems], s_item_ch[kMaxItems];
  __shared__ int64_t s_item_st[kMaxItems];
  __shared__ float s_ps[kMaxPartials];  // phase C: every item's g^2 sum, [row][item of the row]
  __shared__ uint32_t s_epoch;
  // Every layer's state pointers of each row, read once (each use would be a dependent load).
  __shared__ float* s_cptr[kMaxLayers][R];
  __shared__ float* s_sptr[kMaxLayers][R];
  // Phase A, per layer parity (loaded a layer ahead): the conv inputs of this block's xBC
  // columns (weights, bias, each row's old state).
  __shared__ float4 s_cw[2][kMaxACols];
  __shared__ float s_cb[2][kMaxACols];
  __shared__ float s_cst[2][R][3][kMaxACols];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int G = gridDim.x;
  const int d = a.d, d_inner = a.d_inner, conv_dim = a.conv_dim, N = a.N;
  const Plan p{RangeBegin(a.in_dim, G, blockIdx.x), RangeBegin(a.in_dim, G, blockIdx.x + 1),
               RangeBegin(d, G, blockIdx.x), RangeBegin(d, G, blockIdx.x + 1)};
  const int slices = a.P / kSlice, per_row = a.H * slices, items_total = R * per_row;
  const int items = (items_total - static_cast<int>(blockIdx.x) + G - 1) / G;  // may be 0
  const int groups = d_inner / a.group_size, per_group = a.group_size / kSlice;
  const int per_item = 2 * N + 2 * kSlice + 1;
  // This block's xBC columns: in_proj columns [x0, x1), conv channels [x0, x1) - d_inner.
  const int x0 = max(p.a0, d_inner), x1 = min(p.a1, d_inner + conv_dim);
  const int a_cols = p.a1 - p.a0, c_cols = p.c1 - p.c0;
  const __nv_bfloat16* a_w = reinterpret_cast<const __nv_bfloat16*>(smem + a.off_a);
  const __nv_bfloat16* c_w = reinterpret_cast<const __nv_bfloat16*>(smem + a.off_c);
  const float* norm_s = reinterpret_cast<const float*>(smem + a.off_a_norm);
  const float* gnorm_s = reinterpret_cast<const float*>(smem + a.off_c_norm);
  const float* st_s = reinterpret_cast<const float*>(smem + a.off_st);
  float* act = reinterpret_cast<float*>(smem + a.off_act);
  float* h_s = reinterpret_cast<float*>(smem + a.off_h);  // kRed: the residual stream, [d]
  // GEMV k parts (the host checks that there are at most kWarps), and act's row strides.
  const GemvSplit a_split = SplitK<R>(d), c_split = SplitK<R>(d_inner);
  const int lda = PaddedK(d), ldg = PaddedK(d_inner);
  // Phase B: this thread's element of every item's inputs (tid < per_item): its kind and offset.
  int b_kind = 0, b_off = 0;
  if (tid < 2 * N) {
    b_kind = 0;
    b_off = tid < N ? tid : a.ngroups * N + tid - N;  // B of the group, then C of the group
  } else if (tid < 2 * N + kSlice) {
    b_kind = 1;
    b_off = tid - 2 * N;
  } else if (tid < 2 * N + 2 * kSlice) {
    b_kind = 2;
    b_off = tid - 2 * N - kSlice;
  } else {
    b_kind = 3;
  }

  if (tid == 0) {
    for (uint64_t& b : bars) MbarrierInit(&b, 1);
    FenceMbarrierInit();
  }
  __syncthreads();
  if (tid == kCopyThread) {
    PrefetchInProj(a, 0, p, smem, &bars[0]);
    if (!kRed) PrefetchOutProj(a, 0, p, smem, &bars[1]);
  }
  // No AllowDependentGrids(): the successor starts when this grid ends (see the top comment).
  WaitForPriorGrids();
  if (tid == 0) s_epoch = __ldcg(a.counters + kEpoch);
  for (int i = tid; i < a.num_layers * R; i += kThreads) {
    const int l = i / R, r = i % R;
    s_cptr[l][r] = a.layer[l].conv_states[r];
    s_sptr[l][r] = a.layer[l].ssm_states[r];
  }
  if (tid < items) {
    const int it = blockIdx.x + tid * G;
    const int r = it / per_row, hs = it % per_row, hd = hs / slices;
    const int grp = hd / (a.H / a.ngroups), row = r * a.in_dim;
    s_item_src[tid][0] = row + 2 * d_inner + grp * N;
    s_item_src[tid][1] = row + d_inner + hs * kSlice;
    s_item_src[tid][2] = row + hs * kSlice;
    s_item_src[tid][3] = row + d_inner + conv_dim + hd;
    s_item_r[tid] = r;
    s_item_ch[tid] = hs * kSlice;
    s_item_st[tid] = static_cast<int64_t>(hs) * kSlice * N;
  }
  __syncthreads();
  const uint32_t epoch = s_epoch;
  const uint32_t st_bytes = static_cast<uint32_t>(kSlice) * N * 4;
  // The state rows of this block's phase-B items of layer l (written by earlier steps only).
  auto prefetch_states = [&](int l) {
    if (items == 0) return;
    MbarrierArriveExpectTx(&bars[2], st_bytes * items);
    for (int i = 0; i < items; ++i) {
      BulkCopyToShared(smem + a.off_st + i * st_bytes, s_sptr[l][s_item_r[i]] + s_item_st[i],
                       st_bytes, &bars[2]);
    }
  };
  if (tid == kCopyThread) prefetch_states(0);
  // Layer l's conv inputs and head constants, loaded by threads that do not poll in phase B
  // (kLoadFirst and up: conv columns; the kMaxItems below: items) while the pollers wait, into
  // the buffers of l's parity; read after the next block barrier.
  auto load_layer_inputs = [&](int l) {
    const LayerParams& L = a.layer[l];
    const int b = l & 1, i = tid - kLoadFirst;
    if (i >= 0 && i < x1 - x0) {
      const int j = x0 + i - d_inner;
      s_cw[b][i] = __ldg(reinterpret_cast<const float4*>(L.conv_w) + j);
      s_cb[b][i] = L.conv_b != nullptr ? L.conv_b[j] : 0.0f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float* st = s_cptr[l][r];
        s_cst[b][r][0][i] = st[j];
        s_cst[b][r][1][i] = st[conv_dim + j];
        s_cst[b][r][2][i] = st[2 * conv_dim + j];
      }
    }
    const int it = tid - (kLoadFirst - kMaxItems);
    if (it >= 0 && it < items) {
      const int hd = s_item_ch[it] / a.P;
      s_dtb[b][it] = L.dt_bias[hd];
      s_a[b][it] = -expf(L.A_log[hd]);
      s_d[b][it] = L.D[hd];
      if (kRed) {
        for (int c = 0; c < kSlice; ++c) s_gw[b][it][c] = L.gnorm_w[s_item_ch[it] + c];
      }
    }
  };
  // kRed: h after layer lp for k in [k0, k1) (at most 2 kThreads), to put(k, value), once every
  // item of lp has added its out_proj partial: h before it + the row's gated-norm scale times the
  // partials' sum. Every block computes the same bits. Each thread polls its sums until their
  // count says complete: every item of this parity's layers so far (lp / 2 + 1) added once.
  auto red_h = [&](int lp, int k0, int k1, auto put) {
    const uint64_t* acc = reinterpret_cast<const uint64_t*>(a.x_acc) + (lp & 1) * d;
    const unsigned long long want =
        counted_sum::Expected(static_cast<unsigned>(items_total * (lp / 2 + 1)));
    unsigned long long q[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int k = k0 + tid + j * kThreads;
      q[j] = k < k1 ? LoadTagged(acc + k) - want : 0ull;
    }
    while (!counted_sum::Complete(q[0]) || !counted_sum::Complete(q[1])) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if (!counted_sum::Complete(q[j])) q[j] = LoadTagged(acc + k0 + tid + j * kThreads) - want;
      }
    }
    PollGather(
        per_row, Tag(epoch, lp), [&](int i) { return a.x_part + i; },
        [&](int i, float v) { s_ps[i] = v; });
    __syncthreads();
    if (warp == 0) {
      float t = 0.0f;
      for (int i = lane; i < per_row; i += 32) t += s_ps[i];
      t = WarpSum(t);
      if (lane == 0) s_scale[0][0] = 1.0f / sqrtf(t / static_cast<float>(a.group_size) + a.geps);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int k = k0 + tid + j * kThreads;
      if (k < k1) put(k, h_s[k] + s_scale[0][0] * counted_sum::Value(q[j]));
    }
  };
  // kRed: this thread's last partials (fixed point) per layer parity, item and output o = tid +
  // j kThreads; a layer adds the difference, so each parity's sums return to the new layer's.
  long long prev[2][kRedMaxItems][2] = {};
  auto each_partial = [&](auto f) {  // f(i, j, o) for each of this thread's partials
#pragma unroll
    for (int i = 0; i < kRedMaxItems; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int o = tid + j * kThreads;
        if (i < items && o < d) f(i, j, o);
      }
    }
  };
  load_layer_inputs(0);

  for (int l = 0; l < a.num_layers; ++l) {
    const uint32_t tag = Tag(epoch, l);
    // The phase of the layer's tile barriers, and the parity buffers of its conv inputs and head
    // constants.
    const int b = l & 1;
    // Thread 0's clock at phase boundaries (bench-mamba-blocks --trace): where a layer's time goes.
    auto trace = [&](int point) {
      if constexpr (kTrace) {
        if (tid == 0) {
          a.trace[(static_cast<int64_t>(l) * kMambaBlocksTracePoints + point) * G + blockIdx.x] =
              clock64();
        }
      }
    };
    trace(0);

    // ---- A: RMSNorm(h), in_proj columns [a0, a1), conv of the xBC ones ----
    {
      trace(1);
      // h: from the kernel before (layer 0) or from every block's phase C of the layer before,
      // into act in the GEMV's layout (XPos).
      if (l == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          for (int k = tid; k < d; k += kThreads) {
            const float v = __ldcg(a.h + r * a.ldh + k);
            act[r * lda + XPos(k)] = v;
            if (kRed) h_s[k] = v;
          }
        }
      } else if constexpr (kRed) {
        red_h(l - 1, 0, d, [&](int k, float v) {
          h_s[k] = v;
          act[XPos(k)] = v;
        });
      } else {
        PollGather(
            R * d, Tag(epoch, l - 1), [&](int i) { return a.x_h + i; },
            [&](int i, float v) { act[(i / d) * lda + XPos(i % d)] = v; });
      }
      __syncthreads();
      if constexpr (kRed) {
        // This layer's out_proj columns of each item's channels ([items][d][kSlice]), for B.
        for (int q = tid; q < items * d * 2; q += kThreads) {
          const int i = q / (2 * d), o = (q - i * 2 * d) >> 1, half = q & 1;
          CpAsync16(smem + a.off_c + ((static_cast<int64_t>(i) * d + o) * kSlice + half * 8) * 2,
                    a.layer[l].out_w + static_cast<int64_t>(o) * d_inner + s_item_ch[i] + half * 8);
        }
      } else if (tid == kCopyThread && l > 0) {
        PrefetchOutProj(a, l, p, smem, &bars[1]);
      }
      trace(2);
      MbarrierWait(&bars[0], b);  // the tile and the norm weight
      // Each row's sum of squares, and its h scaled by the norm weight in place (the row's norm
      // scale is applied to the GEMV's sums).
      float ss[R] = {};
      for (int k = tid; k < d; k += kThreads) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float* x = act + r * lda + XPos(k);
          const float v = *x;
          ss[r] += v * v;
          if (k >= p.c0 && k < p.c1) s_hown[r][k - p.c0] = v;
          *x = norm_s[k] * v;
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) ss[r] = WarpSum(ss[r]);
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r) s_red[warp][r] = ss[r];
      }
      __syncthreads();
      trace(3);
      if (warp < a_split.parts * a_split.per) {
        const int part = warp / a_split.per;
        WarpColumnsGemv<R, R == 1 ? 3 : (R == 2 ? 5 : 3)>(
            a_w, d, a_cols, warp % a_split.per, a_split.per, act, lda, part * a_split.len,
            min(d, (part + 1) * a_split.len), lane, s_dot[part]);
      }
      if (warp == 0 && lane < R) {
        float t = 0.0f;
        for (int w = 0; w < kWarps; ++w) t += s_red[w][lane];
        s_ascale[lane] = 1.0f / sqrtf(t / static_cast<float>(d) + a.eps);
      }
      __syncthreads();  // the in_proj tile is read
      trace(4);
      for (int t = tid; t < a_cols * R; t += kThreads) {
        const int col = t / R, r = t % R, c = p.a0 + col;
        float v = 0.0f;
        for (int part = 0; part < a_split.parts; ++part) v += s_dot[part][t];
        v *= s_ascale[r];
        if (c >= x0 && c < x1) {
          // Conv update of xBC channel j: bias, then taps oldest first (ConvDecodeKernel).
          const int i = c - x0, j = c - d_inner;
          const float4 w = s_cw[b][i];
          const float w0 = s_cst[b][r][0][i], w1 = s_cst[b][r][1][i], w2 = s_cst[b][r][2][i];
          float out = s_cb[b][i];
          out += w.x * w0;
          out += w.y * w1;
          out += w.z * w2;
          out += w.w * v;
          StoreTagged(a.x_in + static_cast<int64_t>(r) * a.in_dim + c, SiluDev(out), tag);
          float* st = s_cptr[l][r];
          st[j] = w1;
          st[conv_dim + j] = w2;
          st[2 * conv_dim + j] = v;
        } else {
          StoreTagged(a.x_in + static_cast<int64_t>(r) * a.in_dim + c, v, tag);  // z or dt
        }
      }
      if (l + 1 < a.num_layers) load_layer_inputs(l + 1);
      trace(5);
    }

    // ---- B: SSM update of items (row, head, kSlice state rows), gate, sums of squares ----
    // Its inputs come from the few blocks that own the item's in_proj columns.
    if (items > 0) {
      if (tid < per_item) {  // thread e polls element e of every item at once
        float v[kMaxItems];
        PollWords(
            tag,
            [&](int i) -> const uint64_t* {
              return i < items ? a.x_in + s_item_src[i][b_kind] + b_off : nullptr;
            },
            v);
#pragma unroll
        for (int i = 0; i < kMaxItems; ++i) {
          if (i < items) s_in[i][tid] = v[i];
        }
      }
      __syncthreads();
      trace(6);
      if (tid < items) {
        const float dt = DtOf(s_in[tid][2 * N + 2 * kSlice], s_dtb[b][tid], a.dt_min, a.dt_max);
        s_dt[tid] = dt;
        s_da[tid] = expf(dt * s_a[b][tid]);
      }
      MbarrierWait(&bars[2], b);
      __syncthreads();
      trace(7);
      for (int i = 0; i < items; ++i) {
        const int r = s_item_r[i], ch = s_item_ch[i] + warp;
        const float dt = s_dt[i], dA = s_da[i], xv = s_in[i][2 * N + warp];
        const float* S = st_s + (static_cast<int64_t>(i) * kSlice + warp) * N;
        float* S_out = s_sptr[l][r] + s_item_st[i] + static_cast<int64_t>(warp) * N;
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < kMaxState / 32; ++j) {
          const int n = lane + 32 * j;
          if (n < N) {
            const float sv = S[n] * dA + (dt * s_in[i][n]) * xv;
            acc += sv * s_in[i][N + n];
            S_out[n] = sv;
          }
        }
        acc = WarpSum(acc);
        const float gv = (acc + s_d[b][i] * xv) * SiluDev(s_in[i][2 * N + kSlice + warp]);
        if (lane == 0) {
          if (kRed) {
            s_gq[i][warp] = gv * s_gw[b][i][warp];
          } else {
            StoreTagged(a.x_g + static_cast<int64_t>(r) * d_inner + ch, gv, tag);
          }
          s_part[i][warp] = gv * gv;
        }
      }
      __syncthreads();  // the state tiles are read: refill them for the next layer
      if (tid < items) {
        float t = 0.0f;
        for (int w = 0; w < kWarps; ++w) t += s_part[tid][w];
        StoreTagged(a.x_part + s_item_r[tid] * per_row + s_item_ch[tid] / kSlice, t, tag);
      }
      if (tid == kCopyThread && l + 1 < a.num_layers) prefetch_states(l + 1);
      if constexpr (kRed) {
        // out_proj over the item's channels: a partial of every h column, added in fixed point;
        // the gated norm's row scale is applied by the readers (red_h).
        CpAsyncWaitAll();
        __syncthreads();  // every thread's slice copies have landed
        unsigned long long* acc = a.x_acc + b * d;
        each_partial([&](int i, int j, int o) {
          const uint4* wp =
              reinterpret_cast<const uint4*>(c_w + (static_cast<int64_t>(i) * d + o) * kSlice);
          const uint4 w0 = wp[0], w1 = wp[1];
          const uint32_t wv[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
          const float* gq = s_gq[i];
          float t = 0.0f;
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            t += Bf16Lo(wv[e]) * gq[2 * e];
            t += Bf16Hi(wv[e]) * gq[2 * e + 1];
          }
          const long long v = ToFixed(t);
          // Branches, not prev[b]: a runtime index would move prev to local memory.
          const long long old = b ? prev[1][i][j] : prev[0][i][j];
          if (b) {
            prev[1][i][j] = v;
          } else {
            prev[0][i][j] = v;
          }
          atomicAdd(acc + o, counted_sum::Add(v - old, 1));
        });
      }
    }
    // kRed has no phase C: the next in_proj tile is copied from here (the tile was read in A).
    if (kRed && tid == kCopyThread && l + 1 < a.num_layers) {
      PrefetchInProj(a, l + 1, p, smem, &bars[0]);
    }
    trace(8);

    // ---- C: gated norm, h[:, c0:c1] += g_normed * out_proj^T ----
    if constexpr (!kRed) {
      // g times the gated norm's weight (into act in the GEMV's layout) and the items' sums of
      // squares from every block's B. The norm's scale is a row's (one group: applied to the
      // GEMV's sums, like phase A's) or a group's (applied to act before the GEMV).
      MbarrierWait(&bars[1], b);  // the out_proj tile and the gated norm's weight
      const int ng = R * d_inner;
      PollGather(
          ng + R * per_row, tag, [&](int i) { return i < ng ? a.x_g + i : a.x_part + (i - ng); },
          [&](int i, float v) {
            if (i < ng) {
              const int r = i / d_inner, k = i - r * d_inner;
              act[r * ldg + XPos(k)] = gnorm_s[k] * v;
            } else {
              s_ps[i - ng] = v;
            }
          });
      __syncthreads();
      if (tid == kCopyThread && l + 1 < a.num_layers) PrefetchInProj(a, l + 1, p, smem, &bars[0]);
      trace(9);
      // A warp per (row, norm group) adds the group's item sums (the same order in every block).
      for (int pair = warp; pair < R * groups; pair += kWarps) {
        const int r = pair / groups, gi = pair % groups;
        const float* pp = s_ps + r * per_row + gi * per_group;
        float t = 0.0f;
        for (int i = lane; i < per_group; i += 32) t += pp[i];
        t = WarpSum(t);
        if (lane == 0) s_scale[r][gi] = 1.0f / sqrtf(t / static_cast<float>(a.group_size) + a.geps);
      }
      if (groups > 1) {
        __syncthreads();
        for (int k = tid; k < d_inner; k += kThreads) {
          const int gi = k / a.group_size;
#pragma unroll
          for (int r = 0; r < R; ++r) act[r * ldg + XPos(k)] *= s_scale[r][gi];
        }
        __syncthreads();
      }
      trace(10);
      if (warp < c_split.parts * c_split.per) {
        const int part = warp / c_split.per;
        WarpColumnsGemv<R, R == 1 ? 1 : 2>(
            c_w, d_inner, c_cols, warp % c_split.per, c_split.per, act, ldg, part * c_split.len,
            min(d_inner, (part + 1) * c_split.len), lane, s_dot[part]);
      }
      __syncthreads();  // the out_proj tile is read
      trace(11);
      for (int t = tid; t < c_cols * R; t += kThreads) {
        const int col = t / R, r = t % R;
        float v = 0.0f;
        for (int part = 0; part < c_split.parts; ++part) v += s_dot[part][t];
        if (groups == 1) v *= s_scale[r][0];
        const float hv = s_hown[r][col] + v;
        if (l + 1 == a.num_layers) {
          a.h[r * a.ldh + p.c0 + col] = hv;
        } else {
          StoreTagged(a.x_h + r * d + p.c0 + col, hv, tag);
        }
      }
      trace(12);
    }
  }

  if constexpr (kRed) {
    // The last layer's h for this block's columns (every block has some: d >= G), whose partial
    // sums only this block reads: it zeroes them. Once they are complete every item has finished
    // the last layer, so every block has read the layer before's sums (each block's phase A feeds
    // some item): those go back to zero by each item taking its partials and counts out.
    const int nl = a.num_layers;
    unsigned long long* last = a.x_acc + ((nl - 1) & 1) * d;
    red_h(nl - 1, p.c0, p.c1, [&](int k, float v) {
      a.h[k] = v;
      last[k] = 0ull;
    });
    if (nl >= 2) {
      const int pb = (nl - 2) & 1;
      const unsigned long long adds = pb ? nl / 2 : (nl + 1) / 2;  // this item's, with counts
      each_partial([&](int i, int j, int o) {
        const long long old = pb ? prev[1][i][j] : prev[0][i][j];
        atomicAdd(a.x_acc + (pb * d + o), 0ull - counted_sum::Add(old, adds));
      });
    }
  }

  // The last block out (every block has read the epoch by then) starts the next launch's.
  if (tid == 0 && atomicAdd(a.counters + kExits, 1u) == static_cast<unsigned>(G - 1)) {
    a.counters[kExits] = 0u;
    a.counters[kEpoch] = epoch + 1u;
  }
}

// ---- The cluster variant: one grid-wide exchange per layer ----
// Clusters of cs blocks (16, or 8: an H100's GPCs hold 7 clusters of 16, 112 SMs); cluster c owns
// a range of d_inner channels (whole 16-channel slices, or whole norm groups when there are
// several) and computes everything those channels need inside the cluster: in_proj's z and x
// columns of its channels, dt of their heads and all B / C columns (every cluster computes B and
// C: the price of not exchanging them grid-wide; cluster 0 keeps their conv state, written once
// every cluster has read the old one), the conv, the SSM update, and out_proj over its own
// channels (a partial of every h column). Within a cluster, values reach every block by
// st.async into its shared memory, completing bytes of a transaction barrier the receiver waits
// on (a one-way message; cluster-wide barriers in their place cost 0.8-3.8 us each); only the
// partial h sums cross clusters, as tagged words, once per layer. Block q of every cluster sums
// h columns [c0, c1) over the clusters in the same order, so every cluster gets the same bits.
// Measured against the kernel above (bench-mamba-blocks, same run): 11.3 vs 12.3 us per 370M
// layer at batch 1, 14.3 vs 16.3 at 2; but in a whole decode step at batch 1 it was slower
// (0.81 vs 0.78 ms, not yet explained), so CudaBackend takes it for 2 rows only.
// Why each push is safe to land early: a block pushes layer l's in_proj outputs only after
// receiving h of layer l from every block (each of which had finished layer l - 1's phase B),
// g of layer l only after every block's in_proj outputs of l (each past its phase-C reads of
// l - 1), and h of layer l + 1 only after every block's g of l (each past reading act for l).
constexpr int kMaxClusters = 16;
constexpr int kMaxCCols = 128;   // out_proj (h) columns per block
constexpr int kMaxSlices = 64;   // phase-B slices (kSlice channels) per row in a cluster
constexpr int kDotMax = 1024;    // GEMV sums per block: k parts x columns x rows
constexpr int kMaxCinCols = 72;  // in_proj columns per block

struct ClusterArgs {
  LayerParams layer[kMaxLayers];
  int num_layers;
  float* h;
  int64_t ldh;
  uint64_t* x_part;  // [2][nc][R][d]: per layer parity, each cluster's partial h sums
  uint64_t* x_ss;    // [2][nc][R]: and its sums of g^2 (one norm group)
  unsigned* counters;
  long long* trace;  // as BlocksArgs' (bench-mamba-blocks), rows of trace_stride blocks
  int trace_stride;
  int d, H, P, N, ngroups, d_inner, conv_dim, in_dim, group_size;
  float eps, geps, dt_min, dt_max;
  int nc, unit, units;  // clusters; d_inner in units of `unit` channels, split over the clusters
  int off_a, off_a_norm, off_c, off_c_norm, off_st, off_act, off_g, off_cin;
};

// Cluster c's channels [ch0, ch0 + nch) (whole kSlice slices, or whole norm groups when there
// are several) and the heads [hd0, hd0 + nh) they belong to.
struct ClusterRange {
  int ch0, nch, hd0, nh;
};
__host__ __device__ __forceinline__ ClusterRange RangeOf(int units, int unit, int nc, int c,
                                                         int P) {
  const int ch0 = RangeBegin(units, nc, c) * unit, ch1 = RangeBegin(units, nc, c + 1) * unit;
  const int hd0 = ch0 / P, hd1 = ch1 > ch0 ? (ch1 - 1) / P + 1 : hd0;
  return {ch0, ch1 - ch0, hd0, hd1 - hd0};
}

// The in_proj column of a cluster's virtual column v: its channels' z, its channels' x, all B
// and C, its heads' dt, in that order.
__device__ __forceinline__ int VirtualColumn(const ClusterArgs& a, const ClusterRange& cr, int v) {
  const int bc = 2 * a.ngroups * a.N;
  if (v < cr.nch) return cr.ch0 + v;
  v -= cr.nch;
  if (v < cr.nch) return a.d_inner + cr.ch0 + v;
  v -= cr.nch;
  if (v < bc) return 2 * a.d_inner + v;
  return 2 * a.d_inner + bc + cr.hd0 + (v - bc);
}

template <int R, bool kTrace>
__global__ void __launch_bounds__(kThreads, 1)
    ClusterMambaBlocksKernel(const __grid_constant__ ClusterArgs a) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ __align__(128) char smem[];
  // Tiles: in_proj, out_proj, states (the copy engine); pushes from the cluster: in_proj outputs,
  // g with its sums of squares, h.
  __shared__ uint64_t bars[6];
  __shared__ float s_red[kWarps][R];
  __shared__ float s_ascale[R];
  __shared__ float s_gscale[R][kMaxNormGroups];
  __shared__ float s_hown[R][kMaxCCols];
  __shared__ float s_dot[kDotMax];
  __shared__ float s_stage[kMaxCCols * R > kMaxCinCols * R ? kMaxCCols * R : kMaxCinCols * R];
  __shared__ float s_dt[kMaxItems], s_da[kMaxItems];
  // Per layer parity, copied a layer ahead: D, dt bias, A_log of each item's head.
  __shared__ float s_d[2][kMaxItems], s_dtb[2][kMaxItems], s_alog[2][kMaxItems];
  __shared__ float s_part[kMaxItems][kWarps];
  __shared__ int s_item_r[kMaxItems], s_item_s[kMaxItems];
  __shared__ uint32_t s_epoch;
  __shared__ float* s_cptr[kMaxLayers][R];
  __shared__ float* s_sptr[kMaxLayers][R];
  __shared__ float4 s_cw[2][kMaxCinCols];
  __shared__ float s_cb[2][kMaxCinCols];
  __shared__ float s_cst[2][R][3][kMaxCinCols];
  __shared__ float s_bcst[R][3][kMaxCinCols];  // cluster 0: B/C conv states, written late
  __shared__ float s_ps[R][kMaxSlices];        // pushed: the cluster's per-slice sums of g^2
  __shared__ float s_xss[kMaxClusters * R];    // every cluster's sums of g^2 per row

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int cs = static_cast<int>(cluster.num_blocks());
  const int q = static_cast<int>(cluster.block_rank()), ci = blockIdx.x / cs;
  const int d = a.d, d_inner = a.d_inner, conv_dim = a.conv_dim, N = a.N, P = a.P;
  const ClusterRange cr = RangeOf(a.units, a.unit, a.nc, ci, P);
  const int ck = cr.nch, bc = 2 * a.ngroups * N, vn = 2 * ck + bc + cr.nh;
  const int v0 = RangeBegin(vn, cs, q), v1 = RangeBegin(vn, cs, q + 1), a_cols = v1 - v0;
  const int c0 = RangeBegin(d, cs, q), c1 = RangeBegin(d, cs, q + 1), c_cols = c1 - c0;
  // Conv columns (x, B, C): virtual [ck, 2 ck + bc); of them B and C are [2 ck, 2 ck + bc).
  const int slices = ck / kSlice, items_total = R * slices;
  const int items = (items_total - q + cs - 1) / cs;
  const int groups = d_inner / a.group_size, lgroups = groups == 1 ? 1 : ck / a.group_size;
  const int per_group = a.group_size / kSlice;
  const __nv_bfloat16* a_w = reinterpret_cast<const __nv_bfloat16*>(smem + a.off_a);
  const __nv_bfloat16* c_w = reinterpret_cast<const __nv_bfloat16*>(smem + a.off_c);
  const float* norm_s = reinterpret_cast<const float*>(smem + a.off_a_norm);
  const float* gnorm_s = reinterpret_cast<const float*>(smem + a.off_c_norm);
  const float* st_s = reinterpret_cast<const float*>(smem + a.off_st);
  float* act = reinterpret_cast<float*>(smem + a.off_act);
  float* act_g = reinterpret_cast<float*>(smem + a.off_g);
  const float* cin = reinterpret_cast<const float*>(smem + a.off_cin);
  const GemvSplit a_split = SplitK<R>(d), c_split = SplitK<R>(ck);
  const int lda = PaddedK(d), ldg = PaddedK(ck);
  const int nc = a.nc;
  // Bytes each push barrier's phase receives: every in_proj output of the cluster; every g and
  // slice sum; h.
  const uint32_t cin_bytes = R * vn * 4, g_bytes = R * (ck + slices) * 4, h_bytes = R * d * 4;
  // The thread that issues the bulk copies: not one of the exchange's pollers (tid < c_cols R)
  // nor of the layer-input loaders (kLoadFirst - kMaxItems and up).
  constexpr int kCopier = kLoadFirst - kMaxItems - 32;

  auto prefetch_in = [&](int l) {
    const uint32_t row = static_cast<uint32_t>(d) * 2;
    MbarrierArriveExpectTx(&bars[0], a_cols * row + d * 4);
    const int ends[4] = {ck, 2 * ck, 2 * ck + bc, vn};
    for (int v = v0; v < v1;) {
      int e = v1;
      for (int i = 0; i < 4; ++i) {
        if (v < ends[i]) {
          e = min(e, ends[i]);
          break;
        }
      }
      BulkCopyToShared(smem + a.off_a + (v - v0) * row,
                       a.layer[l].in_w + static_cast<int64_t>(VirtualColumn(a, cr, v)) * d,
                       (e - v) * row, &bars[0]);
      v = e;
    }
    BulkCopyToShared(smem + a.off_a_norm, a.layer[l].norm_w, d * 4, &bars[0]);
  };
  auto prefetch_out = [&](int l) {
    const uint32_t row = static_cast<uint32_t>(ck) * 2;
    MbarrierArriveExpectTx(&bars[1], c_cols * row + ck * 4);
    for (int c = c0; c < c1; ++c) {
      BulkCopyToShared(smem + a.off_c + (c - c0) * row,
                       a.layer[l].out_w + static_cast<int64_t>(c) * d_inner + cr.ch0, row,
                       &bars[1]);
    }
    BulkCopyToShared(smem + a.off_c_norm, a.layer[l].gnorm_w + cr.ch0, ck * 4, &bars[1]);
  };

  if (tid == 0) {
    for (uint64_t& b : bars) MbarrierInit(&b, 1);
    FenceMbarrierInit();
  }
  __syncthreads();
  if (tid == kCopier) {
    prefetch_in(0);
    prefetch_out(0);
  }
  // No AllowDependentGrids(): the successor starts when this grid ends (see the top comment).
  WaitForPriorGrids();
  if (tid == 0) s_epoch = __ldcg(a.counters + kEpoch);
  for (int i = tid; i < a.num_layers * R; i += kThreads) {
    const int l = i / R, r = i % R;
    s_cptr[l][r] = a.layer[l].conv_states[r];
    s_sptr[l][r] = a.layer[l].ssm_states[r];
  }
  if (tid < items) {
    const int it = q + tid * cs;
    s_item_r[tid] = it / slices;
    s_item_s[tid] = it % slices;
  }
  __syncthreads();
  const uint32_t epoch = s_epoch;
  const uint32_t st_bytes = static_cast<uint32_t>(kSlice) * N * 4;
  auto prefetch_states = [&](int l) {
    if (items == 0) return;
    MbarrierArriveExpectTx(&bars[2], st_bytes * items);
    for (int i = 0; i < items; ++i) {
      BulkCopyToShared(
          smem + a.off_st + i * st_bytes,
          s_sptr[l][s_item_r[i]] + static_cast<int64_t>(cr.ch0 + s_item_s[i] * kSlice) * N,
          st_bytes, &bars[2]);
    }
  };
  if (tid == kCopier) prefetch_states(0);
  // Layer l's conv inputs of this block's conv columns and its items' head constants, copied
  // asynchronously into l's parity buffers; the loaders wait for them before the barrier ahead
  // of their first use.
  const int cv0 = max(v0, ck), cv1 = min(v1, 2 * ck + bc);
  auto load_layer_inputs = [&](int l) {
    const LayerParams& L = a.layer[l];
    const int b = l & 1;
    const int i = tid - kLoadFirst;
    if (i >= 0 && i < cv1 - cv0) {
      const int col = cv0 + i - v0, j = VirtualColumn(a, cr, cv0 + i) - d_inner;
      CpAsync16(&s_cw[b][col], reinterpret_cast<const float4*>(L.conv_w) + j);
      if (L.conv_b != nullptr) {
        CpAsync4(&s_cb[b][col], L.conv_b + j);
      } else {
        s_cb[b][col] = 0.0f;
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float* st = s_cptr[l][r];
        CpAsync4(&s_cst[b][r][0][col], st + j);
        CpAsync4(&s_cst[b][r][1][col], st + conv_dim + j);
        CpAsync4(&s_cst[b][r][2][col], st + 2 * conv_dim + j);
      }
    }
    const int it = tid - (kLoadFirst - kMaxItems);
    if (it >= 0 && it < items) {
      const int hd = (cr.ch0 + s_item_s[it] * kSlice) / P;
      CpAsync4(&s_dtb[b][it], L.dt_bias + hd);
      CpAsync4(&s_alog[b][it], L.A_log + hd);
      CpAsync4(&s_d[b][it], L.D + hd);
    }
  };
  load_layer_inputs(0);
  // Pushes n staged values (s_stage[t], t < n) to every block of the cluster: value t to the
  // shared address dst(t) there, completing barrier bar's bytes. All threads take part.
  auto push_staged = [&](int n, uint64_t* bar, auto dst) {
    const uint32_t bar_local = SharedAddress(bar);
    for (int i = tid; i < n * cs; i += kThreads) {
      const int rank = i / n, t = i - rank * n;
      StoreToRank(MapToRank(dst(t), rank), s_stage[t], MapToRank(bar_local, rank));
    }
  };
  const uint32_t cin_addr = SharedAddress(cin), act_addr = SharedAddress(act);
  cluster.sync();  // every block's barriers are initialised before the first push

  for (int l = 0; l < a.num_layers; ++l) {
    const uint32_t tag = Tag(epoch, l);
    const int b = l & 1;
    const bool last = l + 1 == a.num_layers;
    auto trace = [&](int point) {
      if constexpr (kTrace) {
        if (tid == 0) {
          a.trace[(static_cast<int64_t>(l) * kMambaBlocksTracePoints + point) * a.trace_stride +
                  blockIdx.x] = clock64();
        }
      }
    };
    trace(0);
    if (tid == 0) {  // arm this layer's push barriers (pushes may arrive before: tx goes negative)
      MbarrierArriveExpectTx(&bars[3], cin_bytes);
      MbarrierArriveExpectTx(&bars[4], g_bytes);
    }

    // ---- A: RMSNorm(h), this block's in_proj columns, their conv; pushed to the cluster ----
    if (l == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        for (int k = tid; k < d; k += kThreads)
          act[r * lda + XPos(k)] = __ldcg(a.h + r * a.ldh + k);
      }
      __syncthreads();
    } else {
      MbarrierWait<true>(&bars[5], (l - 1) & 1);  // h from the cluster
    }
    MbarrierWait(&bars[0], b);
    trace(1);
    {
      float ss[R] = {};
      for (int k = tid; k < d; k += kThreads) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float* x = act + r * lda + XPos(k);
          const float v = *x;
          ss[r] += v * v;
          if (k >= c0 && k < c1) s_hown[r][k - c0] = v;
          *x = norm_s[k] * v;
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) ss[r] = WarpSum(ss[r]);
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r) s_red[warp][r] = ss[r];
      }
    }
    trace(2);
    CpAsyncWaitAll();  // this layer's conv inputs and head constants
    __syncthreads();
    trace(3);
    if (warp < a_split.parts * a_split.per) {
      const int part = warp / a_split.per;
      WarpColumnsGemv<R, R == 1 ? 4 : (R == 2 ? 6 : 3)>(
          a_w, d, a_cols, warp % a_split.per, a_split.per, act, lda, part * a_split.len,
          min(d, (part + 1) * a_split.len), lane, s_dot + part * a_cols * R);
    }
    trace(4);
    if (warp == 0 && lane < R) {
      float t = 0.0f;
      for (int w = 0; w < kWarps; ++w) t += s_red[w][lane];
      s_ascale[lane] = 1.0f / sqrtf(t / static_cast<float>(d) + a.eps);
    }
    __syncthreads();  // the in_proj tile is read
    if (tid == kCopier && !last) prefetch_in(l + 1);
    if (tid == 0 && !last) MbarrierArriveExpectTx(&bars[5], h_bytes);  // for the next layer
    trace(5);
    for (int t = tid; t < a_cols * R; t += kThreads) {
      const int col = t / R, r = t % R, v = v0 + col;
      float val = 0.0f;
      for (int part = 0; part < a_split.parts; ++part) val += s_dot[part * a_cols * R + t];
      val *= s_ascale[r];
      if (v >= ck && v < 2 * ck + bc) {
        const int j = VirtualColumn(a, cr, v) - d_inner;
        const float4 w = s_cw[b][col];
        const float w0 = s_cst[b][r][0][col], w1 = s_cst[b][r][1][col], w2 = s_cst[b][r][2][col];
        float out = s_cb[b][col];
        out += w.x * w0;
        out += w.y * w1;
        out += w.z * w2;
        out += w.w * val;
        if (v < 2 * ck) {  // x: this cluster's channels, their state is its own
          float* st = s_cptr[l][r];
          st[j] = w1;
          st[conv_dim + j] = w2;
          st[2 * conv_dim + j] = val;
        } else if (ci == 0) {  // B / C: every cluster computes them, cluster 0 keeps the state
          s_bcst[r][0][col] = w1;
          s_bcst[r][1][col] = w2;
          s_bcst[r][2][col] = val;
        }
        val = SiluDev(out);
      }
      s_stage[t] = val;
    }
    __syncthreads();
    push_staged(a_cols * R, &bars[3], [&](int t) {
      return cin_addr + static_cast<uint32_t>((t % R) * vn + v0 + t / R) * 4;
    });
    if (!last) load_layer_inputs(l + 1);
    trace(6);
    MbarrierWait<true>(&bars[3], b);  // the cluster's in_proj outputs
    trace(7);

    // ---- B: SSM update of this block's items; g and its squares pushed to the cluster ----
    if (items > 0) {
      if (tid < items) {
        const int r = s_item_r[tid], lh = (cr.ch0 + s_item_s[tid] * kSlice) / P - cr.hd0;
        const float dt = DtOf(cin[r * vn + 2 * ck + bc + lh], s_dtb[b][tid], a.dt_min, a.dt_max);
        s_dt[tid] = dt;
        s_da[tid] = expf(dt * -expf(s_alog[b][tid]));
      }
      MbarrierWait(&bars[2], b);
      MbarrierWait(&bars[1], b);  // the gated norm's weight
      __syncthreads();
      trace(8);
      const uint32_t g_bar = SharedAddress(&bars[4]);
      for (int i = 0; i < items; ++i) {
        const int r = s_item_r[i], lc = s_item_s[i] * kSlice + warp;
        const int grp = (cr.ch0 + lc) / P / (a.H / a.ngroups);
        const float* in = cin + r * vn;
        const float* Bv = in + 2 * ck + grp * N;
        const float* Cv = in + 2 * ck + a.ngroups * N + grp * N;
        const float dt = s_dt[i], dA = s_da[i], xv = in[ck + lc];
        const float* S = st_s + (static_cast<int64_t>(i) * kSlice + warp) * N;
        float* S_out = s_sptr[l][r] + static_cast<int64_t>(cr.ch0 + lc) * N;
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < kMaxState / 32; ++j) {
          const int n = lane + 32 * j;
          if (n < N) {
            const float sv = S[n] * dA + (dt * Bv[n]) * xv;
            acc += sv * Cv[n];
            S_out[n] = sv;
          }
        }
        acc = WarpSum(acc);
        const float gv = (acc + s_d[b][i] * xv) * SiluDev(in[lc]);
        if (lane == 0) s_part[i][warp] = gv * gv;
        if (lane < cs) {
          StoreToRank(MapToRank(SharedAddress(act_g + r * ldg + XPos(lc)), lane), gnorm_s[lc] * gv,
                      MapToRank(g_bar, lane));
        }
      }
      __syncthreads();  // the state tiles are read
      if (tid < items) {
        float t = 0.0f;
        for (int w = 0; w < kWarps; ++w) t += s_part[tid][w];
        const uint32_t dst = SharedAddress(&s_ps[s_item_r[tid]][s_item_s[tid]]);
        for (int j = 0; j < cs; ++j) StoreToRank(MapToRank(dst, j), t, MapToRank(g_bar, j));
      }
      if (tid == kCopier && !last) prefetch_states(l + 1);
    }
    trace(9);
    MbarrierWait<true>(&bars[4], b);  // g of the cluster's channels and the slice sums
    trace(10);

    // ---- C: out_proj over the cluster's channels for h columns [c0, c1); the exchange ----
    MbarrierWait(&bars[1], b);
    if (groups > 1) {  // whole norm groups in each cluster: their scales are the cluster's
      for (int pair = warp; pair < R * lgroups; pair += kWarps) {
        const int r = pair / lgroups, gi = pair % lgroups;
        float t = 0.0f;
        for (int i = lane; i < per_group; i += 32) t += s_ps[r][gi * per_group + i];
        t = WarpSum(t);
        if (lane == 0)
          s_gscale[r][gi] = 1.0f / sqrtf(t / static_cast<float>(a.group_size) + a.geps);
      }
      __syncthreads();
      for (int k = tid; k < ck; k += kThreads) {
#pragma unroll
        for (int r = 0; r < R; ++r) act_g[r * ldg + XPos(k)] *= s_gscale[r][k / a.group_size];
      }
      __syncthreads();
    }
    trace(11);
    if (warp < c_split.parts * c_split.per) {
      const int part = warp / c_split.per;
      WarpColumnsGemv<R, 4>(c_w, ck, c_cols, warp % c_split.per, c_split.per, act_g, ldg,
                            part * c_split.len, min(ck, (part + 1) * c_split.len), lane,
                            s_dot + part * c_cols * R);
    }
    __syncthreads();  // the out_proj tile is read
    if (tid == kCopier && !last) prefetch_out(l + 1);
    uint64_t* xp = a.x_part + static_cast<int64_t>(b) * nc * R * d;
    uint64_t* xs = a.x_ss + b * nc * R;
    for (int t = tid; t < c_cols * R; t += kThreads) {
      const int col = t / R, r = t % R;
      float v = 0.0f;
      for (int part = 0; part < c_split.parts; ++part) v += s_dot[part * c_cols * R + t];
      StoreTagged(xp + (static_cast<int64_t>(ci) * R + r) * d + c0 + col, v, tag);
    }
    if (groups == 1 && q == 0 && tid < R) {
      float t = 0.0f;
      for (int s = 0; s < slices; ++s) t += s_ps[tid][s];
      StoreTagged(xs + ci * R + tid, t, tag);
    }
    trace(12);
    // h[r, c0 + col] from every cluster's partial, in cluster order; the last warp polls the
    // clusters' sums of g^2.
    float sum = 0.0f;
    if (tid < c_cols * R) {
      const int col = tid / R, r = tid % R;
      float v[kMaxClusters];
      PollWords(
          tag,
          [&](int j) -> const uint64_t* {
            return j < nc ? xp + (static_cast<int64_t>(j) * R + r) * d + c0 + col : nullptr;
          },
          v);
      for (int j = 0; j < nc; ++j) sum += v[j];
    } else if (groups == 1 && warp == kWarps - 1) {
      float v[1];
      for (int j = lane; j < nc * R; j += 32) {
        PollWords(
            tag, [&](int) -> const uint64_t* { return xs + j; }, v);
        s_xss[j] = v[0];
      }
    }
    __syncthreads();
    if (tid < c_cols * R) {
      const int col = tid / R, r = tid % R;
      float scale = 1.0f;
      if (groups == 1) {
        float ss = 0.0f;
        for (int j = 0; j < nc; ++j) ss += s_xss[j * R + r];
        scale = 1.0f / sqrtf(ss / static_cast<float>(a.group_size) + a.geps);
      }
      const float hv = s_hown[r][col] + scale * sum;
      if (last) {
        if (ci == 0) a.h[r * a.ldh + c0 + col] = hv;
      } else {
        s_stage[tid] = hv;
      }
    }
    trace(13);
    // Every cluster has read this layer's conv states (before its partials): cluster 0 writes
    // the B / C ones now.
    if (ci == 0) {
      for (int t = tid; t < a_cols * R; t += kThreads) {
        const int col = t / R, r = t % R, v = v0 + col;
        if (v >= 2 * ck && v < 2 * ck + bc) {
          const int j = VirtualColumn(a, cr, v) - d_inner;
          float* st = s_cptr[l][r];
          st[j] = s_bcst[r][0][col];
          st[conv_dim + j] = s_bcst[r][1][col];
          st[2 * conv_dim + j] = s_bcst[r][2][col];
        }
      }
    }
    if (!last) {
      __syncthreads();
      push_staged(c_cols * R, &bars[5], [&](int t) {
        return act_addr + static_cast<uint32_t>((t % R) * lda + XPos(c0 + t / R)) * 4;
      });
    }
    trace(14);
    trace(15);
  }

  cluster.sync();  // no block leaves while another may still store into it
  if (tid == 0 && atomicAdd(a.counters + kExits, 1u) == gridDim.x - 1) {
    a.counters[kExits] = 0u;
    a.counters[kEpoch] = epoch + 1u;
  }
}

// The shapes and layouts both kernels take: 1-4 one-token rows, bf16 weights, conv width 4,
// headdim a multiple of kSlice, d_state <= 128, and every block alike.
bool Covered(const MambaBlockArgs* blocks, int64_t count) {
  const MambaMixerArgs& m0 = blocks[0].mixer;
  const SsmParams& s0 = m0.ssm;
  const int64_t rows = m0.num_seqs;
  if (rows < 1 || rows > kMaxRows || m0.host_seq_offsets == nullptr) return false;
  for (int64_t r = 0; r <= rows; ++r) {
    if (m0.host_seq_offsets[r] != r) return false;  // one token per sequence, from row 0
  }
  const int64_t d = blocks[0].in_proj.cols, H = s0.nheads, P = s0.headdim, N = s0.d_state;
  const int64_t Gr = s0.ngroups, d_inner = H * P;
  const int64_t in_dim = 2 * d_inner + 2 * Gr * N + H;
  const int64_t gs = m0.norm_group_size;
  if (P % kSlice != 0 || N > kMaxState || N % 4 != 0 || Gr < 1 || H % Gr != 0 || d % 8 != 0 ||
      d_inner % 8 != 0 || gs <= 0 || gs % kSlice != 0 || d_inner % gs != 0 ||
      d_inner / gs > kMaxNormGroups || m0.conv_kernel != 4) {
    return false;
  }
  for (int64_t i = 0; i < count; ++i) {
    const MambaBlockArgs& b = blocks[i];
    const MambaMixerArgs& m = b.mixer;
    const bool same = b.in_proj.dtype == DType::kBF16 && m.out_proj.dtype == DType::kBF16 &&
                      b.in_proj.cols == d && b.in_proj.rows == in_dim && m.out_proj.rows == d &&
                      m.out_proj.cols == d_inner && m.num_seqs == rows &&
                      m.host_seq_offsets == m0.host_seq_offsets && m.ssm.nheads == H &&
                      m.ssm.headdim == P && m.ssm.d_state == N && m.ssm.ngroups == Gr &&
                      m.norm_group_size == gs && m.conv_kernel == 4 && m.out == m0.out &&
                      m.ld_out == m0.ld_out && m.zxbcdt == m0.zxbcdt && m.ld == m0.ld &&
                      m.xbc == m0.xbc && m.g == m0.g && m.eps == m0.eps && b.eps == blocks[0].eps &&
                      m.ssm.dt_min == s0.dt_min && m.ssm.dt_max == s0.dt_max;
    const bool aligned = reinterpret_cast<uintptr_t>(b.in_proj.data) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(m.out_proj.data) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(m.conv_weight) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(b.norm_weight) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(m.norm_weight) % 16 == 0;
    if (!same || !aligned) return false;
  }
  return true;
}

// The residual stream and the shapes, as both kernels' arguments name them.
template <class Args>
void FillShape(const MambaBlockArgs* blocks, Args* a) {
  const MambaMixerArgs& m = blocks[0].mixer;
  const SsmParams& s = m.ssm;
  a->h = m.out;
  a->ldh = m.ld_out;
  a->d = static_cast<int>(blocks[0].in_proj.cols);
  a->H = static_cast<int>(s.nheads);
  a->P = static_cast<int>(s.headdim);
  a->N = static_cast<int>(s.d_state);
  a->ngroups = static_cast<int>(s.ngroups);
  a->d_inner = a->H * a->P;
  a->conv_dim = a->d_inner + 2 * a->ngroups * a->N;
  a->in_dim = 2 * a->d_inner + 2 * a->ngroups * a->N + a->H;
  a->group_size = static_cast<int>(m.norm_group_size);
  a->eps = blocks[0].eps;
  a->geps = m.eps;
  a->dt_min = s.dt_min;
  a->dt_max = s.dt_max;
}

// A block's shared memory, as both kernels lay it out from offset 0: the in_proj tile (a_cols
// rows of d) and the norm weight, the out_proj tile (c_cols rows of c_k) and the gated norm's
// weight, the state tiles, and act (rows x act_k f32); each part 128-byte aligned. Returns the
// end, where a kernel's own parts follow.
template <class Args>
int64_t LayOutTiles(int64_t a_cols, int64_t d, int64_t c_cols, int64_t c_k, int64_t items,
                    int64_t N, int64_t rows, int64_t act_k, Args* a) {
  int64_t off = 0;
  auto take = [&](int* field, int64_t bytes) {
    *field = static_cast<int>(off);
    off = Align128(off + bytes);
  };
  take(&a->off_a, a_cols * d * 2);
  take(&a->off_a_norm, d * 4);
  take(&a->off_c, c_cols * c_k * 2);
  take(&a->off_c_norm, c_k * 4);
  take(&a->off_st, items * kSlice * N * 4);
  take(&a->off_act, rows * PaddedK(static_cast<int>(act_k)) * 4);
  return off;
}

void FillLayers(const MambaBlockArgs* blocks, int n, LayerParams* layer) {
  for (int i = 0; i < n; ++i) {
    const MambaBlockArgs& b = blocks[i];
    const MambaMixerArgs& m = b.mixer;
    LayerParams& L = layer[i];
    L.in_w = static_cast<const __nv_bfloat16*>(b.in_proj.data);
    L.out_w = static_cast<const __nv_bfloat16*>(m.out_proj.data);
    L.norm_w = b.norm_weight;
    L.conv_w = m.conv_weight;
    L.conv_b = m.conv_bias;
    L.conv_states = m.conv_states;
    L.ssm_states = m.ssm_states;
    L.A_log = m.ssm.A_log;
    L.D = m.ssm.D;
    L.dt_bias = m.ssm.dt_bias;
    L.gnorm_w = m.norm_weight;
  }
}
}  // namespace
}  // namespace ramba::kernels::cuda::mamba

namespace ramba::kernels::cuda {

absl::StatusOr<bool> PersistentMambaBlocks(Context& ctx, const MambaBlockArgs* blocks,
                                           int64_t count, long long* trace) {
  using namespace mamba;  // NOLINT: this file's own namespace
  if (count <= 0) return true;
  const MambaMixerArgs& m0 = blocks[0].mixer;
  const SsmParams& s0 = m0.ssm;
  const int64_t rows = m0.num_seqs;
  if (!Covered(blocks, count)) return false;
  const int64_t d = blocks[0].in_proj.cols, H = s0.nheads, P = s0.headdim, N = s0.d_state;
  const int64_t Gr = s0.ngroups, d_inner = H * P;
  const int64_t in_dim = 2 * d_inner + 2 * Gr * N + H;
  // The SSM state tiles are copied whole: every session's state must be 16-byte aligned, which
  // only the device knows; Backend allocations are, and so are states at multiples of 64N bytes.

  const int G = ctx.num_sms;
  BlocksArgs a = {};
  FillShape(blocks, &a);
  // Most columns / items any block gets (RangeBegin splits evenly).
  const int64_t a_cols = (in_dim + G - 1) / G, c_cols = (d + G - 1) / G;
  const int64_t items = (rows * d_inner / kSlice + G - 1) / G;
  if (a_cols > kMaxACols || c_cols > kMaxACols || items > kMaxItems) return false;
  const int64_t part_k = GemvPartK(static_cast<int>(rows));
  if (std::max(d, d_inner) > kWarps * part_k) return false;  // a warp per GEMV k part at least
  if (2 * N + 2 * kSlice + 1 > kLoadFirst - kMaxItems) return false;  // phase B: a thread per input
  // One row, one norm group: out_proj as per-item partials summed in fixed point (kRed), two
  // handoffs per layer instead of three. RAMBA_CUDA_MAMBA_REDUCE=0 keeps the three.
  const bool red = rows == 1 && m0.norm_group_size == d_inner && d <= 2 * kThreads &&
                   items <= kRedMaxItems && d_inner / kSlice <= counted_sum::kMaxAdders && d >= G &&
                   in_dim >= G && EnvSwitchOn("RAMBA_CUDA_MAMBA_REDUCE");
  int64_t smem_end = LayOutTiles(a_cols, d, red ? items * kSlice : c_cols, red ? d : d_inner, items,
                                 N, rows, std::max(d, d_inner), &a);
  a.off_h = static_cast<int>(smem_end);
  if (red) smem_end = Align128(smem_end + d * 4);
  const size_t smem = static_cast<size_t>(smem_end);
  using Kernel = void (*)(BlocksArgs);
  static constexpr Kernel kKernels[2][kMaxRows] = {
      {MambaBlocksKernel<1, false, false>, MambaBlocksKernel<2, false, false>,
       MambaBlocksKernel<3, false, false>, MambaBlocksKernel<4, false, false>},
      {MambaBlocksKernel<1, true, false>, MambaBlocksKernel<2, true, false>,
       MambaBlocksKernel<3, true, false>, MambaBlocksKernel<4, true, false>}};
  static constexpr Kernel kRedKernels[2] = {MambaBlocksKernel<1, false, true>,
                                            MambaBlocksKernel<1, true, true>};
  const Kernel kernel = red ? kRedKernels[trace != nullptr] : kKernels[trace != nullptr][rows - 1];
  cudaFuncAttributes attr;
  RAMBA_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, kernel));
  if (smem + attr.sharedSizeBytes > ctx.max_shared_per_block) return false;
  RETURN_IF_ERROR(PrepareSmem(ctx, kernel, smem, "MambaBlocks"));
  const int64_t per_row = d_inner / kSlice;
  if (rows * per_row > kMaxPartials) return false;
  if (rows * (in_dim + d_inner + per_row + d) * 8 >
      Context::kCountersPerSlot * static_cast<int64_t>(sizeof(unsigned))) {
    return false;  // the exchange buffers do not fit their counter slot
  }
  auto* x = reinterpret_cast<uint64_t*>(ctx.Counters(Context::CounterSlot::kMambaExchange));
  a.x_in = x;
  a.x_g = a.x_in + rows * in_dim;
  a.x_part = a.x_g + rows * d_inner;
  a.x_h = a.x_part + rows * per_row;
  a.counters = ctx.Counters(Context::CounterSlot::kMambaBlocks);
  a.x_acc = reinterpret_cast<unsigned long long*>(ctx.Counters(Context::CounterSlot::kMambaReduce));
  a.trace = trace;
  if (trace != nullptr && count > kMaxLayers) return false;  // one launch's layers only

  for (int64_t first = 0; first < count; first += kMaxLayers) {
    a.num_layers = static_cast<int>(std::min<int64_t>(kMaxLayers, count - first));
    FillLayers(blocks + first, a.num_layers, a.layer);
    RETURN_IF_ERROR(Launch(ctx, kernel, dim3(G), dim3(kThreads), smem, a));
  }
  return true;
}

absl::StatusOr<bool> ClusterMambaBlocks(Context& ctx, const MambaBlockArgs* blocks, int64_t count,
                                        long long* trace) {
  using namespace mamba;  // NOLINT: this file's own namespace
  if (count <= 0) return true;
  const MambaMixerArgs& m0 = blocks[0].mixer;
  const SsmParams& s0 = m0.ssm;
  const int64_t rows = m0.num_seqs;
  if (!Covered(blocks, count)) return false;
  const int64_t d = blocks[0].in_proj.cols, H = s0.nheads, P = s0.headdim, N = s0.d_state;
  const int64_t Gr = s0.ngroups, d_inner = H * P;
  const int64_t gs = m0.norm_group_size, groups = d_inner / gs;

  ClusterArgs a = {};
  FillShape(blocks, &a);
  using Kernel = void (*)(ClusterArgs);
  static constexpr Kernel kKernels[2][kMaxRows] = {
      {ClusterMambaBlocksKernel<1, false>, ClusterMambaBlocksKernel<2, false>,
       ClusterMambaBlocksKernel<3, false>, ClusterMambaBlocksKernel<4, false>},
      {ClusterMambaBlocksKernel<1, true>, ClusterMambaBlocksKernel<2, true>,
       ClusterMambaBlocksKernel<3, true>, ClusterMambaBlocksKernel<4, true>}};
  const Kernel kernel = kKernels[trace != nullptr][rows - 1];
  cudaFuncAttributes attr;
  RAMBA_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, kernel));
  const int64_t slot_words = Context::kCountersPerSlot * static_cast<int64_t>(sizeof(unsigned)) / 8;

  // Channels are dealt to clusters in slices, or in norm groups when there are several (a
  // group's scale then stays inside its cluster).
  a.unit = static_cast<int>(groups == 1 ? kSlice : gs);
  a.units = static_cast<int>(d_inner / a.unit);
  // The shared memory plan for nc clusters of cs blocks (the largest any block needs), and the
  // most in_proj columns a block gets; {0, 0} if it does not fit.
  struct Plan {
    size_t smem;
    int64_t a_cols;
  };
  auto plan = [&](int64_t cs, int64_t nc) -> Plan {
    int64_t ck = 0, vn = 0, items = 0;
    for (int64_t c = 0; c < nc; ++c) {
      const ClusterRange cr =
          RangeOf(a.units, a.unit, static_cast<int>(nc), static_cast<int>(c), static_cast<int>(P));
      ck = std::max<int64_t>(ck, cr.nch);
      vn = std::max<int64_t>(vn, 2 * cr.nch + 2 * Gr * N + cr.nh);
      items = std::max<int64_t>(items, (rows * cr.nch / kSlice + cs - 1) / cs);
    }
    const int64_t a_cols = (vn + cs - 1) / cs, c_cols = (d + cs - 1) / cs;
    if (a_cols > kMaxCinCols || c_cols > kMaxCCols || items > kMaxItems ||
        ck / kSlice > kMaxSlices || (groups > 1 && ck / gs > kMaxNormGroups)) {
      return {0, 0};
    }
    const int64_t part_k = GemvPartK(static_cast<int>(rows));
    const int64_t a_parts = (d + part_k - 1) / part_k, c_parts = (ck + part_k - 1) / part_k;
    if (a_parts > kWarps || c_parts > kWarps || a_parts * a_cols * rows > kDotMax ||
        c_parts * c_cols * rows > kDotMax) {
      return {0, 0};
    }
    int64_t off = LayOutTiles(a_cols, d, c_cols, ck, items, N, rows, d, &a);
    a.off_g = static_cast<int>(off);
    off = Align128(off + rows * PaddedK(static_cast<int>(ck)) * 4);
    a.off_cin = static_cast<int>(off);
    off = Align128(off + rows * vn * 4);
    if (static_cast<size_t>(off) + attr.sharedSizeBytes > ctx.max_shared_per_block) return {0, 0};
    return {static_cast<size_t>(off), a_cols};
  };
  // Clusters of 16 (non-portable) or 8 blocks, as many as can be resident at once (an H100's
  // GPCs take 7 of 16 or 15 of 8): the one whose blocks get the fewest in_proj columns (the
  // longest local phase), then the one with more blocks.
  int best_cs = 0, best_nc = 0;
  int64_t best_cols = 0;
  for (int cs : {16, 8}) {
    int nc = static_cast<int>(std::min<int64_t>({ctx.num_sms / cs, kMaxClusters, a.units}));
    Plan pl = plan(cs, nc);
    if (pl.smem == 0) continue;
    if (cs > 8) {
      RAMBA_CUDA_RETURN_IF_ERROR(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    }
    RETURN_IF_ERROR(PrepareSmem(ctx, kernel, pl.smem, "ClusterMambaBlocks"));
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(cs * nc);
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = pl.smem;
    cudaLaunchAttribute cl[1];
    cl[0].id = cudaLaunchAttributeClusterDimension;
    cl[0].val.clusterDim = {static_cast<unsigned>(cs), 1, 1};
    cfg.attrs = cl;
    cfg.numAttrs = 1;
    int max_clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&max_clusters, kernel, &cfg) != cudaSuccess) {
      (void)cudaGetLastError();
      continue;
    }
    if (max_clusters < nc) {  // fewer clusters need at least as much shared memory each
      nc = max_clusters;
      if (nc < 1 || (pl = plan(cs, nc)).smem == 0) continue;
      RETURN_IF_ERROR(PrepareSmem(ctx, kernel, pl.smem, "ClusterMambaBlocks"));
    }
    if (best_nc == 0 || pl.a_cols < best_cols ||
        (pl.a_cols == best_cols && nc * cs > best_nc * best_cs)) {
      best_cs = cs;
      best_nc = nc;
      best_cols = pl.a_cols;
    }
  }
  if (best_nc == 0) return false;
  a.nc = best_nc;
  const size_t smem = plan(best_cs, best_nc).smem;
  if (smem == 0) return false;
  RETURN_IF_ERROR(PrepareSmem(ctx, kernel, smem, "ClusterMambaBlocks"));
  if (2 * best_nc * rows * (d + 1) > slot_words) return false;  // the exchange buffers
  auto* x = reinterpret_cast<uint64_t*>(ctx.Counters(Context::CounterSlot::kMambaExchange));
  a.x_part = x;
  a.x_ss = a.x_part + 2 * best_nc * rows * d;
  a.trace_stride = ctx.num_sms;
  a.counters = ctx.Counters(Context::CounterSlot::kMambaBlocks);
  a.trace = trace;
  if (trace != nullptr && count > kMaxLayers) return false;

  for (int64_t first = 0; first < count; first += kMaxLayers) {
    a.num_layers = static_cast<int>(std::min<int64_t>(kMaxLayers, count - first));
    FillLayers(blocks + first, a.num_layers, a.layer);
    RETURN_IF_ERROR(
        LaunchClusters(ctx, best_cs, kernel, dim3(best_cs * best_nc), dim3(kThreads), smem, a));
  }
  return true;
}

absl::StatusOr<std::vector<double>> ProbeMambaGemv(Context& ctx, int ncols, int k) {
  using namespace mamba;  // NOLINT: this file's own namespace
  if (ncols <= 0 || ncols > 128 || k <= 0 || k % 8 != 0 || k > GemvPartK(1)) {
    return absl::InvalidArgumentError(
        "ProbeMambaGemv: 1-128 columns, k a positive multiple of 8 up to 1024");
  }
  constexpr int kReps = 50;
  const size_t smem = Align128(static_cast<int64_t>(ncols) * k * 2) +
                      (PaddedK(k) + 4 * static_cast<size_t>(ncols)) * 4;
  const int G = ctx.num_sms;
  long long* cycles = nullptr;
  RAMBA_CUDA_RETURN_IF_ERROR(cudaMalloc(&cycles, 2 * G * sizeof(long long)));
  std::vector<long long> host(2 * G);
  std::vector<double> out;
  auto run = [&](auto kernel) -> absl::Status {
    RETURN_IF_ERROR(PrepareSmem(ctx, kernel, smem, "ProbeMambaGemv"));
    RETURN_IF_ERROR(Launch(ctx, kernel, dim3(G), dim3(kThreads), smem, ncols, k, kReps, cycles));
    RAMBA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ctx.stream));
    RAMBA_CUDA_RETURN_IF_ERROR(
        cudaMemcpy(host.data(), cycles, host.size() * sizeof(long long), cudaMemcpyDeviceToHost));
    double own = 0, all = 0;
    for (int b = 0; b < G; ++b) own += host[2 * b], all += host[2 * b + 1];
    out.push_back(own / G / (kReps - 1));
    out.push_back(all / G / (kReps - 1));
    return absl::OkStatus();
  };
  absl::Status st = run(GemvProbeKernel<0>);
  if (st.ok()) st.Update(run(GemvProbeKernel<1>));
  if (st.ok()) st.Update(run(GemvProbeKernel<2>));
  if (st.ok()) st.Update(run(GemvProbeKernel<3>));
  if (st.ok()) st.Update(run(GemvProbeKernel<4>));
  cudaFree(cycles);
  RETURN_IF_ERROR(st);
  return out;
}

}  // namespace ramba::kernels::cuda
