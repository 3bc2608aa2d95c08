// CUDA kernels of the Mamba-2 mixer: depthwise causal conv1d + SiLU and the selective scan.
// kernels/backend.h documents both ops; kernels/cpu/conv1d.cc and kernels/cpu/ssm_scan.cc are the
// references (same f32 formulas, softplus threshold, clamp, and state-then-output order).
//
// CausalConv1dSilu: outputs depend only on inputs, so the first launch computes every
// (row, channel) independently, reading earlier inputs from x or from the sequence's old conv
// state. The second launch rewrites the states: a launch boundary is the only grid-wide barrier
// that keeps those writes from racing with the first launch's reads of the old state.
//
// SsmScan: every state row S[h, p, :] evolves independently, so blocks own (sequence, head, a few
// head channels) and walk the sequence's rows in order with the state in registers: lane l of a
// warp holds S[p, n] for n = l, l + 32, ... of PR channels p. Timesteps are staged in shared
// memory 32 at a time (dt computed once per step; double-buffered cp.async, so the next tile
// loads while this one is computed), and y = S C is reduced across lanes by a transposing
// butterfly that finishes 32 (step, channel) sums with 31 shuffles instead of 5 per sum.
// Reading each state once and writing it once, coalesced, also makes this the decode kernel.
// A plain kernel (one warp per state row, state in global memory) handles d_state > 256 and can be
// forced with RAMBA_CUDA_SSM_KERNEL=simple to cross-check the tiled one.
//
// The chunked SSD form (quadratic intra-chunk + inter-chunk state passing) is not used: in f32
// on CUDA cores it costs about as many FMAs per (step, channel, state) as the recurrence (~3) and
// its speed-up comes from tensor cores, whose TF32/bf16 rounding misses the 1e-4 target.
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ops.h"

namespace ramba::kernels::cuda {
namespace {

constexpr float kDtSoftplusThreshold = 20.0f;  // PyTorch's F.softplus default, as on the CPU
constexpr size_t kDefaultSmemLimit = 48 * 1024;

__device__ __forceinline__ float SiluDev(float x) { return x / (1.0f + expf(-x)); }

// softplus(raw + bias) with threshold, clamped like std::min(std::max(dt, lo), hi) on the CPU
// (same comparisons, so NaN propagates the same way).
__device__ __forceinline__ float DtOf(float raw, float bias, float dt_min, float dt_max) {
  const float v = raw + bias;
  float dt = v > kDtSoftplusThreshold ? v : log1pf(expf(v));
  dt = dt < dt_min ? dt_min : dt;
  dt = dt_max < dt ? dt_max : dt;
  return dt;
}

// The sequence owning absolute row r (offsets[0] <= r < offsets[num_seqs]): the last s with
// offsets[s] <= r, which skips empty sequences (they share their offset with the next one).
__device__ __forceinline__ int64_t SeqOfRow(const int64_t* offsets, int64_t num_seqs, int64_t r) {
  int64_t lo = 0, hi = num_seqs - 1;  // invariant: offsets[lo] <= r, answer in [lo, hi]
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= r) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// ---------------- CausalConv1dSilu ----------------

constexpr int kConvThreads = 256;  // channels per block
constexpr int kConvRows = 4;       // rows per block: the taps of neighbouring rows hit L1

__global__ void __launch_bounds__(kConvThreads)
    ConvOutKernel(const float* __restrict__ x, int64_t ldx, const int64_t* __restrict__ offsets,
                  int64_t num_seqs, int64_t row_begin, int64_t row_end,
                  float* const* __restrict__ states, const float* __restrict__ weight,
                  const float* __restrict__ bias, int64_t channels, int kernel,
                  float* __restrict__ y) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kConvThreads + threadIdx.x;
  if (c >= channels) return;
  const int hist = kernel - 1;
  const float* w = weight + c * kernel;
  const float b = bias != nullptr ? bias[c] : 0.0f;
  const int64_t r0 = row_begin + static_cast<int64_t>(blockIdx.x) * kConvRows;
  for (int64_t r = r0; r < r0 + kConvRows && r < row_end; ++r) {
    const int64_t s = SeqOfRow(offsets, num_seqs, r);
    const int64_t start = offsets[s];
    const int64_t t = r - start;  // position inside this call's part of the sequence
    float acc = b;
    for (int j = 0; j < kernel; ++j) {
      // Tap j reads input t - hist + j: a row of the old state when negative, else a row of x.
      const int64_t src = t - hist + j;
      const float in =
          src < 0 ? states[s][(hist + src) * channels + c] : x[(start + src) * ldx + c];
      acc += w[j] * in;
    }
    y[r * channels + c] = SiluDev(acc);
  }
}

// New state of sequence blockIdx.x: the last hist rows of [old state; this call's rows]. One
// thread owns one channel of every state row and writes rows in ascending order, reading row
// i + T > i of the old state, so it never reads a row it already overwrote.
__global__ void __launch_bounds__(kConvThreads)
    ConvStateKernel(const float* __restrict__ x, int64_t ldx, const int64_t* __restrict__ offsets,
                    float* const* __restrict__ states, int64_t channels, int hist) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kConvThreads + threadIdx.x;
  if (c >= channels) return;
  const int64_t s = blockIdx.x;
  const int64_t start = offsets[s];
  const int64_t T = offsets[s + 1] - start;
  if (T == 0) return;
  float* st = states[s];
  for (int i = 0; i < hist; ++i) {
    const int64_t src = T + i - hist;  // row of this call; negative: row hist + src of old state
    st[i * channels + c] = src < 0 ? st[(hist + src) * channels + c] : x[(start + src) * ldx + c];
  }
}

// ---------------- SsmScan ----------------

struct ScanArgs {
  const float* xbc;
  int64_t ldxbc;
  const float* dt_raw;
  int64_t lddt;
  const int64_t* offsets;
  float* const* states;
  const float* A_log;
  const float* D;
  const float* dt_bias;
  int H, P, N, G;
  float dt_min, dt_max;
  float* y;
};

// What every scan kernel derives for head h: the x | B | C column offsets in an xbc row (B and C
// of the head's group) and the head's A = -exp(A_log), D and dt bias.
struct HeadConsts {
  int64_t HP, b_off, c_off;
  float A, D, dt_bias;
};
__device__ __forceinline__ HeadConsts HeadConstsOf(const ScanArgs& a, int h) {
  const int64_t HP = static_cast<int64_t>(a.H) * a.P;
  const int g = h / (a.H / a.G);
  return HeadConsts{HP,
                    HP + static_cast<int64_t>(g) * a.N,
                    HP + static_cast<int64_t>(a.G + g) * a.N,
                    -expf(a.A_log[h]),
                    a.D[h],
                    a.dt_bias[h]};
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o >= 1; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The plain recurrence, line for line as on the CPU: block (32 threads) = (sequence, head,
// channel p); the state row stays in global memory, lanes stride over d_state.
__global__ void __launch_bounds__(32) SsmScanSimpleKernel(ScanArgs a) {
  const int p = static_cast<int>(blockIdx.x % a.P);
  const int64_t sh = blockIdx.x / a.P;
  const int h = static_cast<int>(sh % a.H);
  const int64_t s = sh / a.H;
  const int lane = threadIdx.x;
  const HeadConsts hc = HeadConstsOf(a, h);
  const int64_t HP = hc.HP, b_off = hc.b_off, c_off = hc.c_off;
  const float A = hc.A, Dh = hc.D, bias = hc.dt_bias;
  float* st = a.states[s] + (static_cast<int64_t>(h) * a.P + p) * a.N;
  for (int64_t r = a.offsets[s]; r < a.offsets[s + 1]; ++r) {
    const float* row = a.xbc + r * a.ldxbc;
    const float dt = DtOf(a.dt_raw[r * a.lddt + h], bias, a.dt_min, a.dt_max);
    const float dA = expf(dt * A);
    const float xv = row[static_cast<int64_t>(h) * a.P + p];
    float acc = 0.0f;
    for (int n = lane; n < a.N; n += 32) {
      const float v = st[n] * dA + (dt * row[b_off + n]) * xv;
      st[n] = v;
      acc += v * row[c_off + n];
    }
    acc = WarpSum(acc);
    if (lane == 0) a.y[r * HP + static_cast<int64_t>(h) * a.P + p] = acc + Dh * xv;
  }
}

constexpr int kScanWarps = 4;
constexpr int kScanThreads = kScanWarps * 32;
constexpr int kScanTile = 32;  // timesteps per shared-memory tile

// Shared memory of the tiled kernel: two tile buffers of
//   B [kScanTile][NS] | C [kScanTile][NS] | x [kScanTile][PB] | raw dt [kScanTile]
// then dt [kScanTile] and exp(dt A) [kScanTile] of the tile being computed.
__host__ __device__ constexpr int TileBufFloats(int ns, int pb) {
  return kScanTile * (2 * ns + pb + 1);
}
__host__ __device__ constexpr size_t TiledSmemBytes(int npl, int pr) {
  return sizeof(float) *
         (2 * static_cast<size_t>(TileBufFloats(npl * 32, kScanWarps * pr)) + 2 * kScanTile);
}

// One stage of TransposeReduce32: lanes l and l ^ W pair up; each keeps the half of its 2W
// remaining sums selected by bit W of its lane and adds the partner's copy of that half.
template <int W>
__device__ __forceinline__ void TransposeStage(float (&v)[32], int lane) {
  const bool upper = (lane & W) != 0;
#pragma unroll
  for (int i = 0; i < W; ++i) {
    const float lo = v[i], hi = v[i + W];
    const float send = upper ? lo : hi;
    const float keep = upper ? hi : lo;
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, W);
  }
}

// v[i] holds this lane's term of sum i (i < 32). Returns, in lane l, the sum over all lanes of
// v[l]: after the five stages v[0] holds the sum whose index has lane l's bits.
__device__ __forceinline__ float TransposeReduce32(float (&v)[32], int lane) {
  TransposeStage<16>(v, lane);
  TransposeStage<8>(v, lane);
  TransposeStage<4>(v, lane);
  TransposeStage<2>(v, lane);
  TransposeStage<1>(v, lane);
  return v[0];
}

// Block = (sequence, head, PB = kScanWarps * PR head channels); warp w owns channels
// p_blk + w * PR + [0, PR), lane l owns state columns n = l + 32 k (k < NPL; d_state <= 32 NPL).
// Padding columns (n >= N) and channels (p >= P) read zeros from shared memory, so their state
// stays 0 and they add nothing; they are never stored.
template <int NPL, int PR>
__global__ void __launch_bounds__(kScanThreads, 1) SsmScanTiledKernel(ScanArgs a, int pblocks) {
  constexpr int NS = NPL * 32;
  constexpr int PB = kScanWarps * PR;
  constexpr int TT = 32 / PR;  // steps per transposed reduction (TT * PR = 32 sums)
  constexpr int kBuf = TileBufFloats(NS, PB);
  static_assert(kScanTile % TT == 0, "tile must hold whole reduction groups");
  extern __shared__ float smem[];
  float* s_dt = smem + 2 * kBuf;
  float* s_da = s_dt + kScanTile;

  const int pb = static_cast<int>(blockIdx.x % pblocks);
  const int64_t sh = blockIdx.x / pblocks;
  const int h = static_cast<int>(sh % a.H);
  const int64_t s = sh / a.H;
  const int64_t row0 = a.offsets[s];
  const int64_t T = a.offsets[s + 1] - row0;
  if (T == 0) return;  // whole block: before any barrier

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int N = a.N, P = a.P;
  const int p_blk = pb * PB;  // first head channel of the block
  const int pw = warp * PR;   // the warp's first channel, relative to p_blk
  const HeadConsts hc = HeadConstsOf(a, h);
  const int64_t HP = hc.HP, b_off = hc.b_off, c_off = hc.c_off;
  const float A = hc.A, Dh = hc.D, bias = hc.dt_bias;
  const int64_t x_off = static_cast<int64_t>(h) * P + p_blk;

  // Padding entries are never written by the tile copies: zero them once in both buffers.
  for (int buf = 0; buf < 2; ++buf) {
    float* base = smem + buf * kBuf;
    if (N < NS) {
      for (int i = tid; i < kScanTile * NS; i += kScanThreads) {
        if (i % NS >= N) {
          base[i] = 0.0f;
          base[kScanTile * NS + i] = 0.0f;
        }
      }
    }
    for (int i = tid; i < kScanTile * PB; i += kScanThreads) {
      if (p_blk + i % PB >= P) base[2 * kScanTile * NS + i] = 0.0f;
    }
  }

  // Queues the copies of tile `t0` (nt steps) into buffer `buf`; only real entries are copied.
  auto stage = [&](int64_t t0, int nt, int buf) {
    float* sb = smem + buf * kBuf;
    float* sc = sb + kScanTile * NS;
    float* sx = sc + kScanTile * NS;
    float* sraw = sx + kScanTile * PB;
    for (int i = tid; i < nt * NS; i += kScanThreads) {
      const int t = i / NS, n = i % NS;
      if (n < N) {
        const float* row = a.xbc + (row0 + t0 + t) * a.ldxbc;
        __pipeline_memcpy_async(sb + i, row + b_off + n, sizeof(float));
        __pipeline_memcpy_async(sc + i, row + c_off + n, sizeof(float));
      }
    }
    for (int i = tid; i < nt * PB; i += kScanThreads) {
      const int t = i / PB, q = i % PB;
      if (p_blk + q < P) {
        __pipeline_memcpy_async(sx + i, a.xbc + (row0 + t0 + t) * a.ldxbc + x_off + q,
                                sizeof(float));
      }
    }
    if (tid < nt) {
      __pipeline_memcpy_async(sraw + tid, a.dt_raw + (row0 + t0 + tid) * a.lddt + h,
                              sizeof(float));
    }
  };

  const int64_t num_tiles = (T + kScanTile - 1) / kScanTile;
  auto tile_len = [&](int64_t i) {
    return static_cast<int>(T - i * kScanTile < kScanTile ? T - i * kScanTile : kScanTile);
  };
  stage(0, tile_len(0), 0);
  __pipeline_commit();

  float S[PR][NPL];
  float* st = a.states[s] + (static_cast<int64_t>(h) * P + p_blk + pw) * N;
#pragma unroll
  for (int r = 0; r < PR; ++r) {
#pragma unroll
    for (int k = 0; k < NPL; ++k) {
      const int n = k * 32 + lane;
      S[r][k] = (p_blk + pw + r < P && n < N) ? st[r * N + n] : 0.0f;
    }
  }

  for (int64_t ti = 0; ti < num_tiles; ++ti) {
    const int buf = static_cast<int>(ti & 1);
    const int nt = tile_len(ti);
    // (a) Every warp has finished tile ti - 1, so its buffer (= the next tile's) is free.
    __syncthreads();
    if (ti + 1 < num_tiles) stage((ti + 1) * kScanTile, tile_len(ti + 1), buf ^ 1);
    __pipeline_commit();  // possibly empty: keeps one group per tile
    __pipeline_wait_prior(1);  // this thread's copies of tile ti have landed
    __syncthreads();           // (b) ... and every other thread's
    const float* sb = smem + buf * kBuf;
    const float* sc = sb + kScanTile * NS;
    const float* sx = sc + kScanTile * NS;
    const float* sraw = sx + kScanTile * PB;
    if (tid < nt) {
      const float dt = DtOf(sraw[tid], bias, a.dt_min, a.dt_max);
      s_dt[tid] = dt;
      s_da[tid] = expf(dt * A);
    }
    __syncthreads();  // (c) dt of the tile visible

    for (int g0 = 0; g0 < nt; g0 += TT) {
      float part[32];  // part[j * PR + r]: this lane's share of y at step g0 + j, channel r
#pragma unroll
      for (int j = 0; j < TT; ++j) {
        const int t = g0 + j;
        if (t < nt) {
          const float dA = s_da[t];
          const float dt = s_dt[t];
          float bv[NPL], cv[NPL];
#pragma unroll
          for (int k = 0; k < NPL; ++k) {
            bv[k] = sb[t * NS + k * 32 + lane];
            cv[k] = sc[t * NS + k * 32 + lane];
          }
#pragma unroll
          for (int r = 0; r < PR; ++r) {
            const float dtx = dt * sx[t * PB + pw + r];
            float acc = 0.0f;
#pragma unroll
            for (int k = 0; k < NPL; ++k) {
              S[r][k] = fmaf(S[r][k], dA, dtx * bv[k]);
              acc = fmaf(S[r][k], cv[k], acc);
            }
            part[j * PR + r] = acc;
          }
        } else {
#pragma unroll
          for (int r = 0; r < PR; ++r) part[j * PR + r] = 0.0f;
        }
      }
      const float sum = TransposeReduce32(part, lane);
      const int t = g0 + lane / PR;
      const int r = lane % PR;
      if (t < nt && p_blk + pw + r < P) {
        a.y[(row0 + ti * kScanTile + t) * HP + x_off + pw + r] = sum + Dh * sx[t * PB + pw + r];
      }
    }
  }

#pragma unroll
  for (int r = 0; r < PR; ++r) {
#pragma unroll
    for (int k = 0; k < NPL; ++k) {
      const int n = k * 32 + lane;
      if (p_blk + pw + r < P && n < N) st[r * N + n] = S[r][k];
    }
  }
}

bool ForceSimpleScan() {
  const char* v = std::getenv("RAMBA_CUDA_SSM_KERNEL");
  return v != nullptr && std::strcmp(v, "simple") == 0;
}

template <int NPL, int PR>
absl::Status LaunchTiled(Context& ctx, const ScanArgs& a, int64_t num_seqs) {
  const int pblocks = (a.P + kScanWarps * PR - 1) / (kScanWarps * PR);
  const int64_t blocks = num_seqs * a.H * pblocks;
  if (blocks > INT_MAX) return absl::InvalidArgumentError("SsmScan: grid too large");
  constexpr size_t smem = TiledSmemBytes(NPL, PR);
  if (smem > ctx.max_shared_per_block) {
    return absl::InternalError(absl::StrCat("SsmScan: needs ", smem, " bytes of shared memory"));
  }
  auto* kernel = SsmScanTiledKernel<NPL, PR>;
  if (smem > kDefaultSmemLimit) {
    RAMBA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(blocks), kScanThreads, smem, ctx.stream>>>(a, pblocks);
  RAMBA_CUDA_CHECK_LAUNCH("SsmScanTiledKernel");
  return absl::OkStatus();
}

template <int NPL>
absl::Status LaunchTiledPr(Context& ctx, const ScanArgs& a, int64_t num_seqs) {
  // More channels per warp reuse each staged B/C value more often but leave fewer blocks: take
  // the widest that still gives every SM a block and does not exceed the head.
  auto blocks = [&](int pr) {
    return num_seqs * a.H * ((a.P + kScanWarps * pr - 1) / (kScanWarps * pr));
  };
  const int64_t min_blocks = ctx.num_sms > 0 ? ctx.num_sms : 1;
  if (a.P >= kScanWarps * 4 && blocks(4) >= min_blocks) {
    return LaunchTiled<NPL, 4>(ctx, a, num_seqs);
  }
  if (a.P >= kScanWarps * 2 && blocks(2) >= min_blocks) {
    return LaunchTiled<NPL, 2>(ctx, a, num_seqs);
  }
  return LaunchTiled<NPL, 1>(ctx, a, num_seqs);
}

// ---------------- Decode: a few rows per sequence ----------------
// Batched decode brings one row per sequence. The general kernels then spend their time on
// launch structure (two conv launches; 32-step tiles of one step), so these do everything in one
// pass per sequence, looping over its (few) rows.

constexpr int64_t kDecodeMaxRows = 8;  // longest sequence the decode kernels take

// Thread = (sequence, channel); the kernel - 1 history values stay in registers. Same
// arithmetic order as ConvOutKernel (bias, then taps oldest first), so results are identical.
template <int K>
__global__ void __launch_bounds__(kConvThreads)
    ConvDecodeKernel(const float* __restrict__ x, int64_t ldx, const int64_t* __restrict__ offsets,
                     float* const* __restrict__ states, const float* __restrict__ weight,
                     const float* __restrict__ bias, int64_t channels, float* __restrict__ y) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kConvThreads + threadIdx.x;
  if (c >= channels) return;
  const int64_t s = blockIdx.x;
  const int64_t begin = offsets[s], end = offsets[s + 1];
  if (begin == end) return;
  float w[K];
#pragma unroll
  for (int j = 0; j < K; ++j) w[j] = weight[c * K + j];
  const float b = bias != nullptr ? bias[c] : 0.0f;
  float* st = states[s];
  float win[K - 1];
#pragma unroll
  for (int j = 0; j < K - 1; ++j) win[j] = st[j * channels + c];
  for (int64_t r = begin; r < end; ++r) {
    const float in = x[r * ldx + c];
    float acc = b;
#pragma unroll
    for (int j = 0; j < K - 1; ++j) acc += w[j] * win[j];
    acc += w[K - 1] * in;
    y[r * channels + c] = SiluDev(acc);
#pragma unroll
    for (int j = 0; j + 1 < K - 1; ++j) win[j] = win[j + 1];
    win[K - 2] = in;
  }
#pragma unroll
  for (int j = 0; j < K - 1; ++j) st[j * channels + c] = win[j];
}

constexpr int kSsmDecodeWarps = 8;

// Block = (sequence, head, group of kSsmDecodeWarps channels p), one warp per p, lanes over
// d_state (n = lane + 32 i, coalesced): at batch 1 the step is latency-bound, so every state row
// gets its own warp. Per row: the simple kernel's update, S = S dA + (dt B) x, then
// y = sum_n S C (warp reduction) + D x. The state row lives in registers across the rows.
template <int NPL>
__global__ void __launch_bounds__(kSsmDecodeWarps * 32) SsmDecodeKernel(ScanArgs a) {
  const int h = static_cast<int>(blockIdx.x % a.H);
  const int64_t s = blockIdx.x / a.H;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t begin = a.offsets[s], end = a.offsets[s + 1];
  const int p = static_cast<int>(blockIdx.y) * kSsmDecodeWarps + warp;
  if (begin == end || p >= a.P) return;
  const HeadConsts hc = HeadConstsOf(a, h);
  const int64_t HP = hc.HP, b_off = hc.b_off, c_off = hc.c_off;
  const float A = hc.A, Dh = hc.D, bias = hc.dt_bias;
  {
    float* st = a.states[s] + (static_cast<int64_t>(h) * a.P + p) * a.N;
    float S[NPL];
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      const int n = lane + 32 * i;
      S[i] = n < a.N ? st[n] : 0.0f;
    }
    for (int64_t r = begin; r < end; ++r) {
      const float* row = a.xbc + r * a.ldxbc;
      const float dt = DtOf(a.dt_raw[r * a.lddt + h], bias, a.dt_min, a.dt_max);
      const float dA = expf(dt * A);
      const float xv = row[static_cast<int64_t>(h) * a.P + p];
      float acc = 0.0f;
#pragma unroll
      for (int i = 0; i < NPL; ++i) {
        const int n = lane + 32 * i;
        if (n < a.N) {
          S[i] = S[i] * dA + (dt * row[b_off + n]) * xv;
          acc += S[i] * row[c_off + n];
        }
      }
      acc = WarpSum(acc);
      if (lane == 0) a.y[r * HP + static_cast<int64_t>(h) * a.P + p] = acc + Dh * xv;
    }
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      const int n = lane + 32 * i;
      if (n < a.N) st[n] = S[i];
    }
  }
}

int64_t MaxRows(const int64_t* host_offsets, int64_t num_seqs) {
  int64_t m = 0;
  for (int64_t s = 0; s < num_seqs; ++s) m = std::max(m, host_offsets[s + 1] - host_offsets[s]);
  return m;
}

}  // namespace

absl::Status CausalConv1dSilu(Context& ctx, const float* x, int64_t ldx, const int64_t* seq_offsets,
                              int64_t num_seqs, float* const* conv_states, const float* weight,
                              const float* bias, int64_t channels, int64_t kernel, float* y,
                              const int64_t* host_seq_offsets) {
  if (num_seqs <= 0 || channels <= 0) return absl::OkStatus();
  if (kernel > INT_MAX) return absl::InvalidArgumentError("CausalConv1dSilu: kernel too large");
  const int64_t row_begin = host_seq_offsets[0];
  const int64_t row_end = host_seq_offsets[num_seqs];
  const int64_t cblocks = (channels + kConvThreads - 1) / kConvThreads;
  const int64_t rblocks = (row_end - row_begin + kConvRows - 1) / kConvRows;
  if (cblocks > 65535 || rblocks > INT_MAX || num_seqs > INT_MAX) {
    return absl::InvalidArgumentError("CausalConv1dSilu: grid too large");
  }
  if (kernel == 4 && num_seqs <= INT_MAX && rblocks > 0 &&
      MaxRows(host_seq_offsets, num_seqs) <= kDecodeMaxRows) {
    const dim3 grid(static_cast<unsigned>(num_seqs), static_cast<unsigned>(cblocks));
    ConvDecodeKernel<4><<<grid, kConvThreads, 0, ctx.stream>>>(x, ldx, seq_offsets, conv_states,
                                                              weight, bias, channels, y);
    RAMBA_CUDA_CHECK_LAUNCH("ConvDecodeKernel");
    return absl::OkStatus();
  }
  if (rblocks > 0) {
    const dim3 grid(static_cast<unsigned>(rblocks), static_cast<unsigned>(cblocks));
    ConvOutKernel<<<grid, kConvThreads, 0, ctx.stream>>>(x, ldx, seq_offsets, num_seqs, row_begin,
                                                         row_end, conv_states, weight, bias,
                                                         channels, static_cast<int>(kernel), y);
    RAMBA_CUDA_CHECK_LAUNCH("ConvOutKernel");
  }
  if (kernel > 1 && rblocks > 0) {
    const dim3 grid(static_cast<unsigned>(num_seqs), static_cast<unsigned>(cblocks));
    ConvStateKernel<<<grid, kConvThreads, 0, ctx.stream>>>(x, ldx, seq_offsets, conv_states,
                                                           channels, static_cast<int>(kernel - 1));
    RAMBA_CUDA_CHECK_LAUNCH("ConvStateKernel");
  }
  return absl::OkStatus();
}

absl::Status SsmScan(Context& ctx, const float* xbc, int64_t ldxbc, const float* dt_raw,
                     int64_t lddt, const int64_t* seq_offsets, int64_t num_seqs,
                     float* const* ssm_states, const SsmParams& p, float* y,
                     const int64_t* host_seq_offsets) {
  if (num_seqs <= 0 || host_seq_offsets[num_seqs] == host_seq_offsets[0]) {
    return absl::OkStatus();  // no rows: every state is unchanged
  }
  if (p.nheads > INT_MAX / p.headdim || p.d_state > INT_MAX / 4 || p.ngroups > INT_MAX / 2) {
    return absl::InvalidArgumentError("SsmScan: sizes too large");
  }
  ScanArgs a;
  a.xbc = xbc;
  a.ldxbc = ldxbc;
  a.dt_raw = dt_raw;
  a.lddt = lddt;
  a.offsets = seq_offsets;
  a.states = ssm_states;
  a.A_log = p.A_log;
  a.D = p.D;
  a.dt_bias = p.dt_bias;
  a.H = static_cast<int>(p.nheads);
  a.P = static_cast<int>(p.headdim);
  a.N = static_cast<int>(p.d_state);
  a.G = static_cast<int>(p.ngroups);
  a.dt_min = p.dt_min;
  a.dt_max = p.dt_max;
  a.y = y;

  if (!ForceSimpleScan() && MaxRows(host_seq_offsets, num_seqs) <= kDecodeMaxRows &&
      num_seqs * p.nheads <= INT_MAX) {
    const dim3 blocks(static_cast<unsigned>(num_seqs * p.nheads),
                      static_cast<unsigned>((p.headdim + kSsmDecodeWarps - 1) / kSsmDecodeWarps));
    if (a.N <= 32) {
      SsmDecodeKernel<1><<<blocks, kSsmDecodeWarps * 32, 0, ctx.stream>>>(a);
    } else if (a.N <= 64) {
      SsmDecodeKernel<2><<<blocks, kSsmDecodeWarps * 32, 0, ctx.stream>>>(a);
    } else if (a.N <= 128) {
      SsmDecodeKernel<4><<<blocks, kSsmDecodeWarps * 32, 0, ctx.stream>>>(a);
    } else if (a.N <= 256) {
      SsmDecodeKernel<8><<<blocks, kSsmDecodeWarps * 32, 0, ctx.stream>>>(a);
    }
    if (a.N <= 256) {
      RAMBA_CUDA_CHECK_LAUNCH("SsmDecodeKernel");
      return absl::OkStatus();
    }
  }
  if (!ForceSimpleScan()) {
    if (a.N <= 32) return LaunchTiledPr<1>(ctx, a, num_seqs);
    if (a.N <= 64) return LaunchTiledPr<2>(ctx, a, num_seqs);
    if (a.N <= 128) return LaunchTiledPr<4>(ctx, a, num_seqs);
    if (a.N <= 256) return LaunchTiledPr<8>(ctx, a, num_seqs);
  }
  const int64_t blocks = num_seqs * p.nheads * p.headdim;
  if (blocks > INT_MAX) return absl::InvalidArgumentError("SsmScan: grid too large");
  SsmScanSimpleKernel<<<static_cast<unsigned>(blocks), 32, 0, ctx.stream>>>(a);
  RAMBA_CUDA_CHECK_LAUNCH("SsmScanSimpleKernel");
  return absl::OkStatus();
}

}  // namespace ramba::kernels::cuda
