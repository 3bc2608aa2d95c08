// Mamba-2 mixer kernels for decode steps: every sequence of the batch brings a few rows (one, in
// batched decode). The general kernels in mamba.cu then spend their time on launch structure, so
// these do everything in one pass per sequence, looping over its rows:
//  - ConvDecodeKernel / SsmDecodeKernel: the CausalConv1dSilu and SsmScan ops alone (the SSM
//    kernel optionally gated by silu(z): SsmDecodeGated);
//  - MambaMixerDecodeKernel: conv + SSM update + gated norm in one kernel (Backend::MambaMixer),
//    plus MixerFinishKernel for the norm. CudaBackend::MambaMixer uses them for batches of 256
//    and more: with programmatic dependent launch hiding launches, the three separate kernels
//    measured faster below that (the B/C conv each block recomputes and the finishing step cost
//    more than two launches); docs/benchmarks.md has the side-by-side figures.
//
// The fused kernel's block owns a range of one sequence's head channels (state rows; 8 at batch 1
// so that every SM gets work, up to 256 at large batches so that fewer blocks recompute the B/C
// conv), one warp per state row at a time. Two things need every block of a sequence: the B/C
// conv state (every block reads the old one, so nobody may overwrite it early) and the gated
// norm's sum of squares over the whole group. Both are finished by the sequence's last block to
// arrive (blocks count themselves in a per-sequence counter): it writes the B/C conv state, adds
// the blocks' partial sums in a fixed order (deterministic), and scales the gated rows in place.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <numeric>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/mamba_common.cuh"

namespace ramba::kernels::cuda::mamba {
namespace {

// ---------------- Conv alone ----------------

// Thread = (sequence, channel); the kernel - 1 history values stay in registers. Same
// arithmetic order as ConvOutKernel (bias, then taps oldest first), so results are identical.
template <int K>
__global__ void __launch_bounds__(kConvThreads)
    ConvDecodeKernel(const float* __restrict__ x, int64_t ldx, const int64_t* __restrict__ offsets,
                     float* const* __restrict__ states, const float* __restrict__ weight,
                     const float* __restrict__ bias, int64_t channels, float* __restrict__ y) {
  AllowDependentGrids();
  WaitForPriorGrids();
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

// ---------------- SSM update alone ----------------

constexpr int kSsmDecodeWarps = 8;

// Block = (sequence, head, group of kSsmDecodeWarps channels p), one warp per p, lanes over
// d_state (n = lane + 32 i, coalesced): at batch 1 the step is latency-bound, so every state row
// gets its own warp. Per row: the simple kernel's update, S = S dA + (dt B) x, then
// y = sum_n S C (warp reduction) + D x. The state row lives in registers across the rows.
template <int NPL>
__global__ void __launch_bounds__(kSsmDecodeWarps * 32) SsmDecodeKernel(ScanArgs a) {
  AllowDependentGrids();
  WaitForPriorGrids();
  const int h = static_cast<int>(blockIdx.x % a.H);
  const int64_t s = blockIdx.x / a.H;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t begin = a.offsets[s], end = a.offsets[s + 1];
  const int p = static_cast<int>(blockIdx.y) * kSsmDecodeWarps + warp;
  if (begin == end || p >= a.P) return;
  const HeadConsts hc = HeadConstsOf(a, h);
  const int64_t HP = hc.HP, b_off = hc.b_off, c_off = hc.c_off;
  const float A = hc.A, Dh = hc.D, bias = hc.dt_bias;
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
    if (lane == 0) {
      const int64_t c = static_cast<int64_t>(h) * a.P + p;
      const float yv = acc + Dh * xv;
      a.y[r * HP + c] = a.z != nullptr ? yv * SiluDev(a.z[r * a.ldz + c]) : yv;
    }
  }
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    const int n = lane + 32 * i;
    if (n < a.N) st[n] = S[i];
  }
}

// ---------------- Fused mixer ----------------

constexpr int kMixWarps = 8;
constexpr int kMixThreads = kMixWarps * 32;
constexpr int kMixMaxState = 256;
constexpr int kMixMaxNormGroups = 8;
constexpr int kMixMaxChannels = 256;  // head channels (state rows) per block
constexpr int kMixMaxHeads = 16;      // heads one block's channels may touch
constexpr int kConvK = 4;             // the fused kernel's conv width (Mamba-2's)

struct MixArgs {
  const float* zx;  // z | xBC | dt rows
  int64_t ld;
  const int64_t* offsets;
  float* const* conv_states;
  const float* conv_w;
  const float* conv_b;
  float* const* ssm_states;
  const float* A_log;
  const float* D;
  const float* dt_bias;
  int H, P, N, G;
  float dt_min, dt_max;
  const float* norm_w;
  int group_size;
  float eps;
  float* g;
  float* partials;     // [rows, bps]: each block's sum of g^2 per row
  unsigned* counters;  // [num_seqs], zero on entry and on exit; null: MixerFinishKernel finishes
  // Blocks tile each sequence's d_inner channels: domains of `dom` channels (inside one B/C
  // group and one norm group), each cut into bpd blocks of up to cpb channels; bps per sequence.
  int dom, cpb, bpd, bps;
};

// conv(silu) of channel j of the xBC columns for the sequence's rows [row0, row0 + T), written to
// out[t * stride]; the old state is read, never written.
__device__ __forceinline__ void ConvChannel(const MixArgs& a, const float* st, int64_t conv_dim,
                                            int64_t j, int64_t row0, int T, float* out,
                                            int stride) {
  const int64_t d_inner = static_cast<int64_t>(a.H) * a.P;
  const float4 w = __ldg(reinterpret_cast<const float4*>(a.conv_w) + j);  // kConvK == 4 taps
  const float b = a.conv_b != nullptr ? a.conv_b[j] : 0.0f;
  float w0 = st[j], w1 = st[conv_dim + j], w2 = st[2 * conv_dim + j];
  for (int t = 0; t < T; ++t) {
    const float in = a.zx[(row0 + t) * a.ld + d_inner + j];
    float acc = b;
    acc += w.x * w0;
    acc += w.y * w1;
    acc += w.z * w2;
    acc += w.w * in;
    out[t * stride] = SiluDev(acc);
    w0 = w1;
    w1 = w2;
    w2 = in;
  }
}

// New conv state of channel j: the last kConvK - 1 rows of [old state; raw rows]. Ascending i
// reads old row i + T > i, so the in-place update never reads a row it already overwrote.
__device__ __forceinline__ void WriteConvState(const MixArgs& a, float* st, int64_t conv_dim,
                                               int64_t j, int64_t row0, int T) {
  const int64_t d_inner = static_cast<int64_t>(a.H) * a.P;
  constexpr int hist = kConvK - 1;
  for (int i = 0; i < hist; ++i) {
    const int src = T + i - hist;
    st[i * conv_dim + j] =
        src < 0 ? st[(hist + src) * conv_dim + j] : a.zx[(row0 + src) * a.ld + d_inner + j];
  }
}

// What needs every block of sequence s done: the B/C conv state update (every block has read
// the old one) and the gated norm (each norm group's block partials added in a fixed order, then
// the sequence's gated rows scaled in place). Run by one whole block.
__device__ void FinishSequence(const MixArgs& a, int64_t s, int64_t row0, int T,
                               float (*s_scale)[kMixMaxNormGroups]) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t d_inner = static_cast<int64_t>(a.H) * a.P;
  const int64_t conv_dim = d_inner + 2 * static_cast<int64_t>(a.G) * a.N;
  for (int i = tid; i < 2 * a.G * a.N; i += kMixThreads) {
    WriteConvState(a, a.conv_states[s], conv_dim, d_inner + i, row0, T);
  }
  const int groups = static_cast<int>(d_inner / a.group_size);
  const int gblocks = a.bps / groups;  // norm groups are whole domains, so whole blocks
  for (int item = warp; item < T * groups; item += kMixWarps) {
    const int t = item / groups, gi = item % groups;
    const float* p = a.partials + (row0 + t) * a.bps + gi * gblocks;
    float ss = 0.0f;
    for (int b = lane; b < gblocks; b += 32) ss += __ldcg(p + b);
    ss = WarpSum(ss);
    if (lane == 0) s_scale[t][gi] = 1.0f / sqrtf(ss / static_cast<float>(a.group_size) + a.eps);
  }
  __syncthreads();
  for (int64_t i = tid; i < static_cast<int64_t>(T) * d_inner; i += kMixThreads) {
    const int t = static_cast<int>(i / d_inner);
    const int64_t c = i - static_cast<int64_t>(t) * d_inner;
    float* gp = a.g + (row0 + t) * d_inner + c;
    *gp = a.norm_w[c] * (__ldcg(gp) * s_scale[t][c / a.group_size]);
  }
}

template <int NPL>
__global__ void __launch_bounds__(kMixThreads) MambaMixerDecodeKernel(MixArgs a) {
  constexpr int R = static_cast<int>(kDecodeMaxRows);
  __shared__ float s_b[R][NPL * 32];
  __shared__ float s_c[R][NPL * 32];
  __shared__ float s_x[R][kMixMaxChannels];
  __shared__ float s_z[R][kMixMaxChannels];
  __shared__ float s_dt[R][kMixMaxHeads], s_da[R][kMixMaxHeads];
  __shared__ float s_part[kMixWarps][R];
  __shared__ float s_scale[R][kMixMaxNormGroups];
  __shared__ bool s_last;

  AllowDependentGrids();
  WaitForPriorGrids();
  const int64_t s = blockIdx.x / a.bps;
  const int blk = static_cast<int>(blockIdx.x % a.bps);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t row0 = a.offsets[s];
  const int T = static_cast<int>(a.offsets[s + 1] - row0);
  if (T == 0) return;  // every block of this sequence returns: nobody counts, nothing to finish

  const int N = a.N, P = a.P, G = a.G;
  const int64_t d_inner = static_cast<int64_t>(a.H) * P;
  const int64_t conv_dim = d_inner + 2 * static_cast<int64_t>(G) * N;
  const int c0 = (blk / a.bpd) * a.dom + (blk % a.bpd) * a.cpb;  // first channel of the block
  const int nch = min(a.cpb, (blk / a.bpd + 1) * a.dom - c0);
  const int h0 = c0 / P;
  const int nheads = (c0 + nch - 1) / P - h0 + 1;
  const int grp = h0 / (a.H / G);  // B/C group (the domain lies inside one)
  const float* conv_st = a.conv_states[s];
  float* ssm_st = a.ssm_states[s];

  // The first state row of this warp, loaded now so that it is in flight during the convs.
  // (Holding all of a warp's rows in registers instead was measured slower: 29.7 vs 14.9 ms per
  // batch-256 step.)
  float S[NPL];
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    const int n = lane + 32 * i;
    S[i] = warp < nch && n < N ? ssm_st[static_cast<int64_t>(c0 + warp) * N + n] : 0.0f;
  }

  // B and C of the group through the conv (recomputed by each of the group's blocks; the old
  // state is only read here).
  for (int i = tid; i < 2 * N; i += kMixThreads) {
    const bool is_c = i >= N;
    const int n = is_c ? i - N : i;
    const int64_t j = d_inner + (is_c ? static_cast<int64_t>(G + grp) : grp) * N + n;
    ConvChannel(a, conv_st, conv_dim, j, row0, T, is_c ? &s_c[0][n] : &s_b[0][n], NPL * 32);
  }
  // This block's x channels (no other block uses them, so it also updates their conv state),
  // and their z gates.
  for (int i = tid; i < nch; i += kMixThreads) {
    const int64_t j = c0 + i;
    ConvChannel(a, conv_st, conv_dim, j, row0, T, &s_x[0][i], kMixMaxChannels);
    WriteConvState(a, a.conv_states[s], conv_dim, j, row0, T);
    for (int t = 0; t < T; ++t) s_z[t][i] = a.zx[(row0 + t) * a.ld + j];
  }
  for (int i = tid; i < T * nheads; i += kMixThreads) {
    const int t = i / nheads, hl = i % nheads;
    const int h = h0 + hl;
    const float dt = DtOf(a.zx[(row0 + t) * a.ld + d_inner + conv_dim + h], a.dt_bias[h],
                          a.dt_min, a.dt_max);
    s_dt[t][hl] = dt;
    s_da[t][hl] = expf(dt * -expf(a.A_log[h]));
  }
  __syncthreads();

  // State rows, one warp each: S = S dA + (dt B) x; y = S C + D x; g = y silu(z). Lane 0 adds
  // g^2 into the warp's own s_part row.
  if (lane == 0) {
    for (int t = 0; t < R; ++t) s_part[warp][t] = 0.0f;
  }
  for (int ch = warp; ch < nch; ch += kMixWarps) {
    const int c = c0 + ch;
    float* st = ssm_st + static_cast<int64_t>(c) * N;
    if (ch != warp) {
#pragma unroll
      for (int i = 0; i < NPL; ++i) {
        const int n = lane + 32 * i;
        S[i] = n < N ? st[n] : 0.0f;
      }
    }
    const int h = c / P, hl = h - h0;
    const float Dh = a.D[h];
    for (int t = 0; t < T; ++t) {
      const float dt = s_dt[t][hl], dA = s_da[t][hl];
      const float xv = s_x[t][ch];
      float acc = 0.0f;
#pragma unroll
      for (int i = 0; i < NPL; ++i) {
        const int n = lane + 32 * i;
        if (n < N) {
          S[i] = S[i] * dA + (dt * s_b[t][n]) * xv;
          acc += S[i] * s_c[t][n];
        }
      }
      acc = WarpSum(acc);
      const float gv = (acc + Dh * xv) * SiluDev(s_z[t][ch]);
      if (lane == 0) {
        a.g[(row0 + t) * d_inner + c] = gv;
        s_part[warp][t] += gv * gv;
      }
    }
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      const int n = lane + 32 * i;
      if (n < N) st[n] = S[i];
    }
  }
  __syncthreads();

  if (tid < T) {
    float sum = 0.0f;
    for (int w = 0; w < kMixWarps; ++w) sum += s_part[w][tid];
    a.partials[(row0 + tid) * a.bps + blk] = sum;
  }
  if (a.counters == nullptr) return;  // MixerFinishKernel finishes
  // Publish g and the partial sums, then count this block in.
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(&a.counters[s], 1u) == static_cast<unsigned>(a.bps - 1);
  __syncthreads();
  if (!s_last) return;
  __threadfence();  // see every other block's writes
  FinishSequence(a, s, row0, T, s_scale);
  if (tid == 0) a.counters[s] = 0u;
}

// The finishing work as its own kernel, one block per sequence (RAMBA_CUDA_FUSED_MIXER=2).
__global__ void __launch_bounds__(kMixThreads) MixerFinishKernel(MixArgs a) {
  constexpr int R = static_cast<int>(kDecodeMaxRows);
  __shared__ float s_scale[R][kMixMaxNormGroups];
  AllowDependentGrids();
  WaitForPriorGrids();
  const int64_t s = blockIdx.x;
  const int64_t row0 = a.offsets[s];
  const int T = static_cast<int>(a.offsets[s + 1] - row0);
  if (T > 0) FinishSequence(a, s, row0, T, s_scale);
}

}  // namespace

absl::Status LaunchConvDecode4(Context& ctx, const float* x, int64_t ldx, const int64_t* offsets,
                               int64_t num_seqs, float* const* states, const float* weight,
                               const float* bias, int64_t channels, float* y) {
  const int64_t cblocks = (channels + kConvThreads - 1) / kConvThreads;
  const dim3 grid(static_cast<unsigned>(num_seqs), static_cast<unsigned>(cblocks));
  return Launch(ctx, ConvDecodeKernel<4>, grid, dim3(kConvThreads), 0, x, ldx, offsets, states,
                weight, bias, channels, y);
}

absl::StatusOr<bool> LaunchSsmDecode(Context& ctx, const ScanArgs& a, int64_t num_seqs) {
  if (a.N > 256 || num_seqs * a.H > INT_MAX) return false;
  const dim3 grid(static_cast<unsigned>(num_seqs * a.H),
                  static_cast<unsigned>((a.P + kSsmDecodeWarps - 1) / kSsmDecodeWarps));
  const dim3 block(kSsmDecodeWarps * 32);
  void (*kernel)(ScanArgs) = a.N <= 32    ? SsmDecodeKernel<1>
                             : a.N <= 64  ? SsmDecodeKernel<2>
                             : a.N <= 128 ? SsmDecodeKernel<4>
                                          : SsmDecodeKernel<8>;
  absl::Status st = Launch(ctx, kernel, grid, block, 0, a);
  if (!st.ok()) return st;
  return true;
}

}  // namespace ramba::kernels::cuda::mamba

namespace ramba::kernels::cuda {

absl::StatusOr<bool> FusedMambaMixer(Context& ctx, const MambaMixerArgs& m, int64_t num_seqs,
                                     const int64_t* host_seq_offsets, bool finish_kernel) {
  using namespace mamba;  // NOLINT: this file's own namespace
  const SsmParams& p = m.ssm;
  if (num_seqs <= 0) return true;
  const int64_t d_inner = p.nheads * p.headdim;
  if (m.conv_kernel != kConvK || p.d_state > kMixMaxState || p.nheads % p.ngroups != 0 ||
      m.norm_group_size <= 0 || d_inner % m.norm_group_size != 0 ||
      m.norm_group_size % p.headdim != 0 || d_inner / m.norm_group_size > kMixMaxNormGroups ||
      d_inner > INT_MAX || num_seqs > Context::kCountersPerSlot ||
      reinterpret_cast<uintptr_t>(m.conv_weight) % 16 != 0 ||
      MaxRows(host_seq_offsets, num_seqs) > kDecodeMaxRows) {
    return false;
  }
  // Domains: the largest channel ranges inside one B/C group and one norm group (both whole
  // heads). Channels per block: the most that still leave two blocks per SM, since fewer blocks
  // recompute the group's B/C conv fewer times (at batch 256, 256 blocks per sequence read
  // 8 KiB each of L2 per layer); a block touches at most kMixMaxHeads heads.
  const int P = static_cast<int>(p.headdim);
  const int dom =
      std::gcd(static_cast<int>(p.nheads / p.ngroups) * P, static_cast<int>(m.norm_group_size));
  const int64_t target = 2 * static_cast<int64_t>(std::max(ctx.num_sms, 1));
  auto blocks_for = [&](int cpb) {
    return num_seqs * (d_inner / dom) * ((dom + cpb - 1) / cpb);
  };
  int cpb = std::min(8, dom);
  for (int cand = 16; cand <= kMixMaxChannels && cand <= dom; cand *= 2) {
    if ((cand + P - 1) / P + 1 > kMixMaxHeads || blocks_for(cand) < target) break;
    cpb = cand;
  }
  if ((cpb + P - 1) / P + 1 > kMixMaxHeads || blocks_for(cpb) > INT_MAX) return false;
  const int bpd = (dom + cpb - 1) / cpb;
  const int64_t bps = (d_inner / dom) * bpd;
  const int64_t end_row = host_seq_offsets[num_seqs];
  absl::StatusOr<void*> partials =
      ctx.Scratch(ScratchSlot::kMixer, static_cast<size_t>(end_row) * bps * sizeof(float));
  if (!partials.ok()) return partials.status();

  MixArgs a;
  a.zx = m.zxbcdt;
  a.ld = m.ld;
  a.offsets = m.seq_offsets;
  a.conv_states = m.conv_states;
  a.conv_w = m.conv_weight;
  a.conv_b = m.conv_bias;
  a.ssm_states = m.ssm_states;
  a.A_log = p.A_log;
  a.D = p.D;
  a.dt_bias = p.dt_bias;
  a.H = static_cast<int>(p.nheads);
  a.P = P;
  a.N = static_cast<int>(p.d_state);
  a.G = static_cast<int>(p.ngroups);
  a.dt_min = p.dt_min;
  a.dt_max = p.dt_max;
  a.norm_w = m.norm_weight;
  a.group_size = static_cast<int>(m.norm_group_size);
  a.eps = m.eps;
  a.g = m.g;
  a.partials = static_cast<float*>(*partials);
  a.counters = finish_kernel ? nullptr : ctx.Counters(Context::CounterSlot::kMamba);
  a.dom = dom;
  a.cpb = cpb;
  a.bpd = bpd;
  a.bps = static_cast<int>(bps);
  void (*kernel)(MixArgs) = a.N <= 32    ? MambaMixerDecodeKernel<1>
                            : a.N <= 64  ? MambaMixerDecodeKernel<2>
                            : a.N <= 128 ? MambaMixerDecodeKernel<4>
                                         : MambaMixerDecodeKernel<8>;
  absl::Status st = Launch(ctx, kernel, dim3(static_cast<unsigned>(num_seqs * bps)),
                           dim3(kMixThreads), 0, a);
  if (!st.ok()) return st;
  if (finish_kernel) {
    absl::Status fin = Launch(ctx, MixerFinishKernel, dim3(static_cast<unsigned>(num_seqs)),
                              dim3(kMixThreads), 0, a);
    if (!fin.ok()) return fin;
  }
  return true;
}

}  // namespace ramba::kernels::cuda
