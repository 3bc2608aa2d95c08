// Pieces shared by the Mamba-2 mixer kernels: mamba.cu (general conv and prefill scan) and
// mamba_decode.cu (decode steps: a few rows per sequence). Device code is the same f32 formulas as
// kernels/cpu/conv1d.cc and kernels/cpu/ssm_scan.cc.
#ifndef RAMBA_KERNELS_CUDA_MAMBA_COMMON_CUH_
#define RAMBA_KERNELS_CUDA_MAMBA_COMMON_CUH_

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cuda/ops.h"

namespace ramba::kernels::cuda::mamba {

constexpr float kDtSoftplusThreshold = 20.0f;  // PyTorch's F.softplus default, as on the CPU
constexpr int kConvThreads = 256;               // channels per conv block
constexpr int64_t kDecodeMaxRows = 8;           // longest sequence the decode kernels take

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
  // SsmDecodeKernel only: y *= silu(z) when z is set (the gated norm's gate, so that a folded
  // RMSNorm is all that is left before out_proj; see cuda::SsmDecodeGated).
  const float* z = nullptr;
  int64_t ldz = 0;
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

// How one SsmScan call splits its sequences. Sequential (item_begin null): work item s is
// sequence s, scanned in place on ssm_states[s]. Chunked: a sequence of more than min_rows rows
// is cut into chunks of L rows (the last one shorter), each a work item of its own that starts
// from its S_in in `states` and stores no state; other sequences stay one item, in place.
struct ChunkPlan {
  const int64_t* chunk_begin = nullptr;  // [num_seqs + 1]: first chunk of sequence s
  const int64_t* item_begin = nullptr;   // [num_seqs + 1]: first work item of sequence s
  float* states = nullptr;               // [chunks, H, P, N]: S_loc (pass 1), S_in (pass 2)
  float* decay = nullptr;                // [chunks, H]: exp(A * sum of the chunk's dt)
  int64_t num_seqs = 0;
  int64_t min_rows = 0;
  int64_t L = 0;
};

// Chunks and work items of a sequence of `rows` rows; host and device agree by construction.
__host__ __device__ inline int64_t ChunksOf(int64_t rows, int64_t min_rows, int64_t L) {
  return rows > min_rows ? (rows + L - 1) / L : 0;
}
__host__ __device__ inline int64_t ItemsOf(int64_t rows, int64_t min_rows, int64_t L) {
  return rows > min_rows ? (rows + L - 1) / L : (rows > 0 ? 1 : 0);
}

struct ScanItem {
  int64_t row0, rows;
  const float* init;  // [H, P, N]: the state before row0
  float* fin;         // [H, P, N]: where the state after the last row goes, or null
};

// Chunk `chunk` of the plan as a work item from a zero state into its S_loc (pass 1).
__device__ __forceinline__ ScanItem ChunkItemOf(const ScanArgs& a, const ChunkPlan& c,
                                                int64_t chunk) {
  const int64_t s = SeqOfRow(c.chunk_begin, c.num_seqs, chunk);
  const int64_t row0 = a.offsets[s] + (chunk - c.chunk_begin[s]) * c.L;
  const int64_t rest = a.offsets[s + 1] - row0;
  const int64_t hpn = static_cast<int64_t>(a.H) * a.P * a.N;
  return ScanItem{row0, rest < c.L ? rest : c.L, nullptr, c.states + chunk * hpn};
}

__device__ __forceinline__ ScanItem ItemOf(const ScanArgs& a, const ChunkPlan& c, int64_t item) {
  if (c.item_begin == nullptr) {
    const int64_t row0 = a.offsets[item];
    return ScanItem{row0, a.offsets[item + 1] - row0, a.states[item], a.states[item]};
  }
  const int64_t s = SeqOfRow(c.item_begin, c.num_seqs, item);
  const int64_t row0 = a.offsets[s], rows = a.offsets[s + 1] - row0;
  if (rows <= c.min_rows) return ScanItem{row0, rows, a.states[s], a.states[s]};
  const int64_t k = item - c.item_begin[s];
  const int64_t hpn = static_cast<int64_t>(a.H) * a.P * a.N;
  const int64_t len = rows - k * c.L < c.L ? rows - k * c.L : c.L;
  return ScanItem{row0 + k * c.L, len, c.states + (c.chunk_begin[s] + k) * hpn, nullptr};
}

inline int64_t MaxRows(const int64_t* host_offsets, int64_t num_seqs) {
  int64_t m = 0;
  for (int64_t s = 0; s < num_seqs; ++s) m = std::max(m, host_offsets[s + 1] - host_offsets[s]);
  return m;
}

// mamba_decode.cu: one-pass kernels for batches whose sequences have <= kDecodeMaxRows rows.
// Conv with a 4-tap kernel; same results as the general conv.
absl::Status LaunchConvDecode4(Context& ctx, const float* x, int64_t ldx, const int64_t* offsets,
                               int64_t num_seqs, float* const* states, const float* weight,
                               const float* bias, int64_t channels, float* y);
// SSM update for d_state <= 256; returns false (launching nothing) for larger states.
absl::StatusOr<bool> LaunchSsmDecode(Context& ctx, const ScanArgs& a, int64_t num_seqs);

// mamba_ssd.cu: passes 1 and 3 of the chunked scan by the SSD form on tensor cores, for what
// SsdSupports accepts (headdim 64, d_state 64 or 128). States: every chunk's S_loc and decay
// (as SsmChunkStateKernel). Outputs: every work item of `plan`, and the new state of whole-sequence
// items.
bool SsdSupports(const Context& ctx, const ScanArgs& a);
absl::Status LaunchSsdStates(Context& ctx, const ScanArgs& a, const ChunkPlan& plan,
                             int64_t chunks);
absl::Status LaunchSsdOutputs(Context& ctx, const ScanArgs& a, const ChunkPlan& plan,
                              int64_t items);

}  // namespace ramba::kernels::cuda::mamba

#endif  // RAMBA_KERNELS_CUDA_MAMBA_COMMON_CUH_
