// A decode step's run of Mamba blocks as one persistent kernel (Backend::MambaBlocks, a few
// one-token sequences). Launched layer by layer, a block is 7 kernels (in_proj with its norm,
// its split-K reduce, conv, SSM update, gated norm, out_proj, its reduce) and each boundary costs
// a grid's drain and the next one's first dependent round trip (~2-3 us), ~22 us per layer for
// ~4.4 us of weight bytes on an H100. Here one block per SM stays resident for every layer and
// the phases meet at grid-wide barriers (an arrival counter in L2):
//   A: RMSNorm of h (every block, from L2), in_proj for the block's own columns, and for those
//      columns the conv update (an xBC column has one owner, so its conv state too) -> barrier;
//   B: SSM update of (row, head, 16 state rows) items, gate, per-item sums of squares -> barrier;
//   C: gated norm scale from the sums (the same fixed order in every block: deterministic) and
//      out_proj for the block's own columns of h (h += ..., no atomics) -> barrier.
// Weights never change, so each block streams its next tiles (its in_proj and out_proj columns,
// one contiguous range each) into shared memory with the bulk copy engine a phase or more before
// it needs them, across barriers and into the next layer; the SSM states it will update are
// prefetched the same way. No split-K: a block's columns are whole weight rows.
//
// Status: opt-in (RAMBA_CUDA_PERSISTENT_MAMBA=1), correct (tests/kernels/cuda_mamba_blocks_test.cc)
// but measured no faster than block by block: 21.4 vs 20.8 us per 370M layer at batch 1, slower
// at 2-4 (bench-mamba-blocks --trace, docs/benchmarks.md). The weight tiles arrive before they
// are needed; the time goes to the three grid barriers (2-4 us each, ~2.5 us even without skew)
// and to the first dependent L2 round trip after each (1.2-2 us while the copies stream). Next:
// cheaper barriers (cluster-level first, fewer global arrivals) and fewer per layer.
//
// Co-residency: the grid is one block per SM and the block needs most of an SM's shared memory,
// so every block of the grid fits at once; a block waits at a barrier only for blocks of its own
// grid, and the kernels around it on the stream never wait for it (programmatic dependent launch
// lets its successor start only once every block of this grid has started), so all blocks become
// resident and the barriers complete.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "base/status_macros.h"
#include "kernels/cuda/async_copy.cuh"
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
constexpr int kMaxTasks = 2 * kWarps;  // phase C (column, k slice) pairs per block
constexpr int kMaxItems = 8;           // phase-B items per block
// The thread that issues the bulk copies: outside warp 0, whose thread 0 arrives at the grid
// barriers, so that no barrier release can wait on copies in flight (measured: no difference).
constexpr int kCopyThread = 32;
constexpr int kColsPerWarp = 4;                   // GEMV columns one warp computes at once
constexpr int kMaxACols = kColsPerWarp * kWarps;  // in_proj columns per block

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
  int rows;
  float* h;  // [rows, ldh]: the residual stream
  int64_t ldh;
  float* zx;  // [rows, ldzx]: in_proj's z and dt columns (xBC columns unused)
  int64_t ldzx;
  float* xbc;         // [rows, conv_dim]: conv outputs
  float* g;           // [rows, d_inner]: gated values before the norm
  float* partials;    // [rows, d_inner / kSlice]: per-item sums of g^2
  unsigned* barrier;  // GridBarrier's counters; zero between launches
  long long* trace;   // null, or [layers][kMambaBlocksTracePoints][grid]: clock64 per phase
  int d, H, P, N, ngroups, d_inner, conv_dim, in_dim;  // N: d_state
  int group_size;
  float eps, geps, dt_min, dt_max;
  int c_ksplit;  // k slices per out_proj column in phase C
  // Shared memory plan (byte offsets), fixed by the host for the grid size.
  int off_a, off_a_norm, off_c, off_c_norm, off_st, off_act;
};

__device__ __forceinline__ int RangeBegin(int n, int parts, int i) {
  return static_cast<int>(static_cast<int64_t>(n) * i / parts);
}

// Grid barrier counters: arrivals, exits, and (a cache line away, so that polling does not
// slow the arrivals down) the number of the last completed barrier.
constexpr int kArrivals = 0, kExits = 1, kDone = 32;

// Every block arrives (an acq_rel add, ordered after the block's writes by bar.sync); the last
// to arrive publishes the barrier's number with a release store, which the others poll for with
// acquire loads. Cumulativity carries every block's writes to every block past the barrier. No
// sequentially consistent fences (__threadfence).
__device__ __forceinline__ void GridBarrier(unsigned* bar, unsigned round, unsigned blocks) {
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned old;
    asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], 1;"
                 : "=r"(old)
                 : "l"(bar + kArrivals)
                 : "memory");
    if (old == round * blocks - 1) {
      asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(bar + kDone), "r"(round) : "memory");
    } else {
      unsigned seen;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];"
                     : "=r"(seen)
                     : "l"(bar + kDone)
                     : "memory");
      } while (seen < round);
    }
  }
  __syncthreads();
}

__device__ __forceinline__ float Bf16Lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float Bf16Hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }

// A warp's share of a GEMV tile in shared memory: for its columns c_j = col0 + j * stride
// (j < ncols <= kColsPerWarp) and each of `rows` rows, sum_k w[c_j][k] x[r][k] over
// k = k0 + lane * 8 + 256 i < k1, reduced over the warp (every lane gets the sums). The columns
// share each x load, and run as independent chains.
__device__ __forceinline__ void DotCols(const __nv_bfloat16* w, int ldw, int col0, int stride,
                                        int ncols, const float* x, int ldx, int k0, int k1,
                                        int rows, int lane, float (&acc)[kColsPerWarp][kMaxRows]) {
#pragma unroll
  for (int j = 0; j < kColsPerWarp; ++j) {
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) acc[j][r] = 0.0f;
  }
  for (int k = k0 + lane * 8; k < k1; k += 256) {
    float4 x0[kMaxRows], x1[kMaxRows];
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r < rows) {
        x0[r] = *reinterpret_cast<const float4*>(x + r * ldx + k);
        x1[r] = *reinterpret_cast<const float4*>(x + r * ldx + k + 4);
      }
    }
#pragma unroll
    for (int j = 0; j < kColsPerWarp; ++j) {
      if (j < ncols) {
        const uint4 wv =
            *reinterpret_cast<const uint4*>(w + static_cast<int64_t>(col0 + j * stride) * ldw + k);
        const float wf[8] = {Bf16Lo(wv.x), Bf16Hi(wv.x), Bf16Lo(wv.y), Bf16Hi(wv.y),
                             Bf16Lo(wv.z), Bf16Hi(wv.z), Bf16Lo(wv.w), Bf16Hi(wv.w)};
#pragma unroll
        for (int r = 0; r < kMaxRows; ++r) {
          if (r < rows) {
            acc[j][r] += wf[0] * x0[r].x + wf[1] * x0[r].y + wf[2] * x0[r].z + wf[3] * x0[r].w +
                         wf[4] * x1[r].x + wf[5] * x1[r].y + wf[6] * x1[r].z + wf[7] * x1[r].w;
          }
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kColsPerWarp; ++j) {
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (j < ncols && r < rows) acc[j][r] = WarpSum(acc[j][r]);
    }
  }
}

struct Plan {
  int a0, a1;  // in_proj columns [a0, a1)
  int c0, c1;  // out_proj columns (h columns) [c0, c1)
};

// Copies of layer l's constant tiles (no kernel writes weights), issued by thread 0: in_proj's
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
// The state rows of this block's phase-B items of layer l (written by earlier steps only).
__device__ __forceinline__ void PrefetchStates(const BlocksArgs& a, int l, int items, char* smem,
                                               uint64_t* bar) {
  if (items == 0) return;
  const int per_row = a.H * (a.P / kSlice);
  const uint32_t bytes = static_cast<uint32_t>(kSlice) * a.N * 4;
  MbarrierArriveExpectTx(bar, bytes * items);
  for (int i = 0; i < items; ++i) {
    const int it = blockIdx.x + i * gridDim.x;
    const int r = it / per_row, hs = it % per_row;  // hs = h * slices + s = first channel / 16
    const float* src = a.layer[l].ssm_states[r] + static_cast<int64_t>(hs) * kSlice * a.N;
    BulkCopyToShared(smem + a.off_st + i * bytes, src, bytes, bar);
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    MambaBlocksKernel(const __grid_constant__ BlocksArgs a) {
  extern __shared__ __align__(128) char smem[];
  __shared__ uint64_t bars[3];  // in_proj tile, out_proj tile, states
  __shared__ float s_red[kWarps][kMaxRows];
  __shared__ float s_scale[kMaxRows][kMaxNormGroups];
  __shared__ float s_hown[kMaxRows][kMaxTasks];  // h at this block's out_proj columns
  __shared__ float s_dot[kMaxTasks][kMaxRows];   // phase C (column, k slice) sums
  // Phase B, per item: B | C of its group, its x and z channels, dt, exp(dt A), D, g^2 sums.
  __shared__ float s_bc[kMaxItems][2 * kMaxState];
  __shared__ float s_x[kMaxItems][kSlice], s_z[kMaxItems][kSlice];
  __shared__ float s_dt[kMaxItems], s_da[kMaxItems], s_d[kMaxItems];
  __shared__ float s_dtb[kMaxItems], s_a[kMaxItems];  // dt bias, A = -exp(A_log)
  __shared__ float s_part[kMaxItems][kWarps];
  // Every layer's state pointers of each row, read once (each use would be a dependent load).
  __shared__ float* s_cptr[kMaxLayers][kMaxRows];
  __shared__ float* s_sptr[kMaxLayers][kMaxRows];
  // Phase A: the conv inputs of this block's xBC columns (weights, bias, each row's old state).
  __shared__ float4 s_cw[kMaxACols];
  __shared__ float s_cb[kMaxACols];
  __shared__ float s_cst[kMaxRows][3][kMaxACols];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int G = gridDim.x;
  const int rows = a.rows, d = a.d, d_inner = a.d_inner, conv_dim = a.conv_dim;
  const Plan p{RangeBegin(a.in_dim, G, blockIdx.x), RangeBegin(a.in_dim, G, blockIdx.x + 1),
               RangeBegin(d, G, blockIdx.x), RangeBegin(d, G, blockIdx.x + 1)};
  const int slices = a.P / kSlice, per_row = a.H * slices, items_total = rows * per_row;
  const int items = (items_total - static_cast<int>(blockIdx.x) + G - 1) / G;  // may be 0
  const int groups = d_inner / a.group_size, per_group = a.group_size / kSlice;
  // This block's xBC columns: in_proj columns [x0, x1), conv channels [x0, x1) - d_inner.
  const int x0 = max(p.a0, d_inner), x1 = min(p.a1, d_inner + conv_dim);
  const __nv_bfloat16* a_w = reinterpret_cast<const __nv_bfloat16*>(smem + a.off_a);
  const __nv_bfloat16* c_w = reinterpret_cast<const __nv_bfloat16*>(smem + a.off_c);
  const float* norm_s = reinterpret_cast<const float*>(smem + a.off_a_norm);
  const float* gnorm_s = reinterpret_cast<const float*>(smem + a.off_c_norm);
  const float* st_s = reinterpret_cast<const float*>(smem + a.off_st);
  float* act = reinterpret_cast<float*>(smem + a.off_act);

  if (tid == 0) {
    for (uint64_t& b : bars) MbarrierInit(&b, 1);
    FenceMbarrierInit();
  }
  __syncthreads();
  if (tid == kCopyThread) {
    PrefetchInProj(a, 0, p, smem, &bars[0]);
    PrefetchOutProj(a, 0, p, smem, &bars[1]);
  }
  AllowDependentGrids();
  WaitForPriorGrids();
  if (tid == kCopyThread) PrefetchStates(a, 0, items, smem, &bars[2]);
  for (int i = tid; i < a.num_layers * rows; i += kThreads) {
    const int l = i / rows, r = i % rows;
    s_cptr[l][r] = a.layer[l].conv_states[r];
    s_sptr[l][r] = a.layer[l].ssm_states[r];
  }
  __syncthreads();

  unsigned round = 0;
  for (int l = 0; l < a.num_layers; ++l) {
    const LayerParams& L = a.layer[l];
    const uint32_t parity = static_cast<uint32_t>(l & 1);
    // Thread 0's clock at phase boundaries (bench-mamba-blocks --trace): where a layer's time goes.
    auto trace = [&](int point) {
      if (a.trace != nullptr && tid == 0) {
        a.trace[(static_cast<int64_t>(l) * kMambaBlocksTracePoints + point) * G + blockIdx.x] =
            clock64();
      }
    };
    trace(0);

    // ---- A: RMSNorm(h) into act, in_proj columns [a0, a1), conv of the xBC ones ----
    {
      for (int i = tid; i < x1 - x0; i += kThreads) {
        const int j = x0 + i - d_inner;
        s_cw[i] = __ldg(reinterpret_cast<const float4*>(L.conv_w) + j);
        s_cb[i] = L.conv_b != nullptr ? L.conv_b[j] : 0.0f;
        for (int r = 0; r < rows; ++r) {
          const float* st = s_cptr[l][r];
          s_cst[r][0][i] = st[j];
          s_cst[r][1][i] = st[conv_dim + j];
          s_cst[r][2][i] = st[2 * conv_dim + j];
        }
      }
      if (tid < items) {  // phase B's per-head constants, off its critical path
        const int hd = ((blockIdx.x + tid * G) % per_row) / slices;
        s_dtb[tid] = L.dt_bias[hd];
        s_a[tid] = -expf(L.A_log[hd]);
        s_d[tid] = L.D[hd];
      }
      float ss[kMaxRows] = {};
      for (int k = tid; k < d; k += kThreads) {
#pragma unroll
        for (int r = 0; r < kMaxRows; ++r) {
          if (r < rows) {
            const float v = __ldcg(a.h + r * a.ldh + k);
            act[r * d + k] = v;
            ss[r] += v * v;
            if (k >= p.c0 && k < p.c1) s_hown[r][k - p.c0] = v;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) ss[r] = WarpSum(ss[r]);
      if (lane == 0) {
        for (int r = 0; r < kMaxRows; ++r) s_red[warp][r] = ss[r];
      }
      __syncthreads();
      trace(1);
      MbarrierWait(&bars[0], parity);  // the tile and the norm weight
      trace(2);
      for (int r = 0; r < rows; ++r) {
        float t = 0.0f;
        for (int w = 0; w < kWarps; ++w) t += s_red[w][r];
        const float scale = 1.0f / sqrtf(t / static_cast<float>(d) + a.eps);
        for (int k = tid; k < d; k += kThreads)
          act[r * d + k] = norm_s[k] * (act[r * d + k] * scale);
      }
      __syncthreads();
      trace(3);
      {
        const int ncols = p.a1 - p.a0;
        const int mine = (ncols - warp + kWarps - 1) / kWarps;  // columns warp, warp + 16, ...
        float acc[kColsPerWarp][kMaxRows];
        DotCols(a_w, d, warp, kWarps, mine, act, d, 0, d, rows, lane, acc);
#pragma unroll
        for (int jc = 0; jc < kColsPerWarp; ++jc) {
          float v = acc[jc][0];
#pragma unroll
          for (int r = 1; r < kMaxRows; ++r) v = lane == r ? acc[jc][r] : v;
          if (jc < mine && lane < rows) {
            const int r = lane, c = p.a0 + warp + jc * kWarps;
            if (c >= x0 && c < x1) {
              // Conv update of xBC channel j: bias, then taps oldest first (ConvDecodeKernel).
              const int i = c - x0, j = c - d_inner;
              const float4 w = s_cw[i];
              const float w0 = s_cst[r][0][i], w1 = s_cst[r][1][i], w2 = s_cst[r][2][i];
              float out = s_cb[i];
              out += w.x * w0;
              out += w.y * w1;
              out += w.z * w2;
              out += w.w * v;
              a.xbc[static_cast<int64_t>(r) * conv_dim + j] = SiluDev(out);
              float* st = s_cptr[l][r];
              st[j] = w1;
              st[conv_dim + j] = w2;
              st[2 * conv_dim + j] = v;
            } else {
              a.zx[r * a.ldzx + c] = v;  // z or dt
            }
          }
        }
      }
      trace(4);
      __syncthreads();  // the in_proj tile is read: refill it for the next layer
      if (tid == kCopyThread && l + 1 < a.num_layers) PrefetchInProj(a, l + 1, p, smem, &bars[0]);
      trace(5);
    }
    GridBarrier(a.barrier, ++round, G);
    trace(6);

    // ---- B: SSM update of items (row, head, kSlice state rows), gate, sums of squares ----
    if (items > 0) {
      // Everything the items read from global memory, in one round trip.
      for (int idx = tid; idx < items * 2 * a.N; idx += kThreads) {
        const int i = idx / (2 * a.N), n = idx % (2 * a.N);
        const int it = blockIdx.x + i * G;
        const int r = it / per_row, hd = (it % per_row) / slices;
        const int grp = hd / (a.H / a.ngroups);
        const int off =
            n < a.N ? d_inner + grp * a.N + n : d_inner + (a.ngroups + grp) * a.N + n - a.N;
        s_bc[i][n] = __ldcg(a.xbc + static_cast<int64_t>(r) * conv_dim + off);
      }
      for (int idx = tid; idx < items * kSlice; idx += kThreads) {
        const int i = idx / kSlice, w = idx % kSlice;
        const int it = blockIdx.x + i * G;
        const int r = it / per_row, ch = (it % per_row) * kSlice + w;
        s_x[i][w] = __ldcg(a.xbc + static_cast<int64_t>(r) * conv_dim + ch);
        s_z[i][w] = __ldcg(a.zx + r * a.ldzx + ch);
      }
      if (tid < items) {
        const int it = blockIdx.x + tid * G;
        const int r = it / per_row, hd = (it % per_row) / slices;
        const float dt = DtOf(__ldcg(a.zx + r * a.ldzx + d_inner + conv_dim + hd), s_dtb[tid],
                              a.dt_min, a.dt_max);
        s_dt[tid] = dt;
        s_da[tid] = expf(dt * s_a[tid]);
      }
      __syncthreads();
      trace(7);
      MbarrierWait(&bars[2], parity);
      trace(8);
      for (int i = 0; i < items; ++i) {
        const int it = blockIdx.x + i * G;
        const int r = it / per_row, ch = (it % per_row) * kSlice + warp;
        const float dt = s_dt[i], dA = s_da[i], xv = s_x[i][warp];
        const float* S = st_s + (static_cast<int64_t>(i) * kSlice + warp) * a.N;
        float* S_out = s_sptr[l][r] + static_cast<int64_t>(ch) * a.N;
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < kMaxState / 32; ++j) {
          const int n = lane + 32 * j;
          if (n < a.N) {
            const float sv = S[n] * dA + (dt * s_bc[i][n]) * xv;
            acc += sv * s_bc[i][a.N + n];
            S_out[n] = sv;
          }
        }
        acc = WarpSum(acc);
        const float gv = (acc + s_d[i] * xv) * SiluDev(s_z[i][warp]);
        if (lane == 0) {
          a.g[static_cast<int64_t>(r) * d_inner + ch] = gv;
          s_part[i][warp] = gv * gv;
        }
      }
      __syncthreads();  // the state tiles are read: refill them for the next layer
      if (tid < items) {
        const int it = blockIdx.x + tid * G;
        float t = 0.0f;
        for (int w = 0; w < kWarps; ++w) t += s_part[tid][w];
        a.partials[static_cast<int64_t>(it / per_row) * per_row + it % per_row] = t;
      }
      if (tid == kCopyThread && l + 1 < a.num_layers)
        PrefetchStates(a, l + 1, items, smem, &bars[2]);
    }
    trace(9);
    GridBarrier(a.barrier, ++round, G);
    trace(10);

    // ---- C: gated norm, h[:, c0:c1] += g_normed * out_proj^T ----
    {
      for (int r = 0; r < rows; ++r) {
        const float* gr = a.g + static_cast<int64_t>(r) * d_inner;
        for (int k = tid; k < d_inner; k += kThreads) act[r * d_inner + k] = __ldcg(gr + k);
      }
      // A warp per (row, norm group) adds the group's item sums (the same order in every block).
      for (int pair = warp; pair < rows * groups; pair += kWarps) {
        const int r = pair / groups, gi = pair % groups;
        const float* pp = a.partials + static_cast<int64_t>(r) * per_row + gi * per_group;
        float t = 0.0f;
        for (int i = lane; i < per_group; i += 32) t += __ldcg(pp + i);
        t = WarpSum(t);
        if (lane == 0) s_scale[r][gi] = 1.0f / sqrtf(t / static_cast<float>(a.group_size) + a.geps);
      }
      __syncthreads();
      trace(11);
      MbarrierWait(&bars[1], parity);  // the tile and the gated norm's weight
      trace(12);
      for (int r = 0; r < rows; ++r) {
        for (int k = tid; k < d_inner; k += kThreads) {
          act[r * d_inner + k] = gnorm_s[k] * (act[r * d_inner + k] * s_scale[r][k / a.group_size]);
        }
      }
      __syncthreads();
      trace(13);
      // Warp w: k slice w % ks of columns w / ks, w / ks + 16 / ks, ...
      const int ncols = p.c1 - p.c0, ks = a.c_ksplit, per_slice = kWarps / ks;
      const int klen = (d_inner / ks + 7) / 8 * 8;
      const int sl = warp % ks, col0 = warp / ks;
      if (warp < ks * per_slice) {
        const int mine = (ncols - col0 + per_slice - 1) / per_slice;
        float acc[kColsPerWarp][kMaxRows];
        DotCols(c_w, d_inner, col0, per_slice, mine, act, d_inner, sl * klen,
                min(d_inner, (sl + 1) * klen), rows, lane, acc);
        if (lane == 0) {
#pragma unroll
          for (int jc = 0; jc < kColsPerWarp; ++jc) {
            if (jc < mine) {
              for (int r = 0; r < kMaxRows; ++r)
                s_dot[(col0 + jc * per_slice) * ks + sl][r] = acc[jc][r];
            }
          }
        }
      }
      __syncthreads();  // the out_proj tile is read: refill it for the next layer
      if (tid < ncols * rows) {
        const int col = tid / rows, r = tid % rows;
        float t = 0.0f;
        for (int sl = 0; sl < ks; ++sl) t += s_dot[col * ks + sl][r];
        a.h[r * a.ldh + p.c0 + col] = s_hown[r][col] + t;
      }
      trace(14);
      if (tid == kCopyThread && l + 1 < a.num_layers) PrefetchOutProj(a, l + 1, p, smem, &bars[1]);
      trace(15);
    }
    if (l + 1 < a.num_layers) GridBarrier(a.barrier, ++round, G);
  }

  // Reset the counters for the next launch once every block is past its last barrier.
  if (tid == 0) {
    __threadfence();
    if (atomicAdd(&a.barrier[kExits], 1u) == static_cast<unsigned>(G - 1)) {
      a.barrier[kArrivals] = 0u;
      a.barrier[kExits] = 0u;
      a.barrier[kDone] = 0u;
    }
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
  if (rows < 1 || rows > kMaxRows || m0.host_seq_offsets == nullptr) return false;
  for (int64_t r = 0; r <= rows; ++r) {
    if (m0.host_seq_offsets[r] != r) return false;  // one token per sequence, from row 0
  }
  const int64_t d = blocks[0].in_proj.cols, H = s0.nheads, P = s0.headdim, N = s0.d_state;
  const int64_t Gr = s0.ngroups, d_inner = H * P, conv_dim = d_inner + 2 * Gr * N;
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
  // The SSM state tiles are copied whole: every session's state must be 16-byte aligned, which
  // only the device knows; Backend allocations are, and so are states at multiples of 64N bytes.

  const int G = ctx.num_sms;
  BlocksArgs a = {};
  a.rows = static_cast<int>(rows);
  a.h = m0.out;
  a.ldh = m0.ld_out;
  a.zx = const_cast<float*>(m0.zxbcdt);
  a.ldzx = m0.ld;
  a.xbc = m0.xbc;
  a.g = m0.g;
  a.d = static_cast<int>(d);
  a.H = static_cast<int>(H);
  a.P = static_cast<int>(P);
  a.N = static_cast<int>(N);
  a.ngroups = static_cast<int>(Gr);
  a.d_inner = static_cast<int>(d_inner);
  a.conv_dim = static_cast<int>(conv_dim);
  a.in_dim = static_cast<int>(in_dim);
  a.group_size = static_cast<int>(gs);
  a.eps = blocks[0].eps;
  a.geps = m0.eps;
  a.dt_min = s0.dt_min;
  a.dt_max = s0.dt_max;
  // Most columns / items any block gets (RangeBegin splits evenly).
  const int64_t a_cols = (in_dim + G - 1) / G, c_cols = (d + G - 1) / G;
  const int64_t items = (rows * d_inner / kSlice + G - 1) / G;
  if (a_cols > kMaxACols || items > kMaxItems) return false;
  // Phase C: ks k slices (a power of two dividing kWarps) so that each warp gets about one or
  // two columns of one slice; every (column, slice) pair must fit the kMaxTasks sums.
  int ks = kWarps;
  while (ks > 1 && (c_cols * ks > kMaxTasks || (kWarps / ks) < (c_cols + 1) / 2)) ks /= 2;
  if ((c_cols + kWarps / ks - 1) / (kWarps / ks) > kColsPerWarp || c_cols * ks > kMaxTasks) {
    return false;
  }
  a.c_ksplit = ks;
  auto align = [](int64_t x) { return (x + 127) / 128 * 128; };
  int64_t off = 0;
  a.off_a = static_cast<int>(off);
  off = align(off + a_cols * d * 2);
  a.off_a_norm = static_cast<int>(off);
  off = align(off + d * 4);
  a.off_c = static_cast<int>(off);
  off = align(off + c_cols * d_inner * 2);
  a.off_c_norm = static_cast<int>(off);
  off = align(off + d_inner * 4);
  a.off_st = static_cast<int>(off);
  off = align(off + items * kSlice * N * 4);
  a.off_act = static_cast<int>(off);
  off = align(off + rows * std::max(d, d_inner) * 4);
  const size_t smem = static_cast<size_t>(off);
  if (smem + 20 * 1024 > ctx.max_shared_per_block) return false;  // + static shared memory
  RETURN_IF_ERROR(PrepareSmem(ctx, MambaBlocksKernel, smem, "MambaBlocks"));
  ASSIGN_OR_RETURN(void* partials,
                   ctx.Scratch(ScratchSlot::kMixer, rows * (d_inner / kSlice) * sizeof(float)));
  a.partials = static_cast<float*>(partials);
  a.barrier = ctx.Counters(Context::CounterSlot::kGridBarrier);
  a.trace = trace;
  if (trace != nullptr && count > kMaxLayers) return false;  // one launch's layers only

  for (int64_t first = 0; first < count; first += kMaxLayers) {
    a.num_layers = static_cast<int>(std::min<int64_t>(kMaxLayers, count - first));
    for (int i = 0; i < a.num_layers; ++i) {
      const MambaBlockArgs& b = blocks[first + i];
      const MambaMixerArgs& m = b.mixer;
      LayerParams& L = a.layer[i];
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
    RETURN_IF_ERROR(Launch(ctx, MambaBlocksKernel, dim3(G), dim3(kThreads), smem, a));
  }
  return true;
}

}  // namespace ramba::kernels::cuda
