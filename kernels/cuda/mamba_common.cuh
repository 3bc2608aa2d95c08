// Pieces shared by the Mamba-2 mixer kernels: mamba.cu (general conv and prefill scan) and
// mamba_decode.cu (decode steps: a few rows per sequence). Device code is the same f32 formulas as
// kernels/cpu/conv1d.cc and kernels/cpu/ssm_scan.cc.
#ifndef RAMBA_KERNELS_CUDA_MAMBA_COMMON_CUH_
#define RAMBA_KERNELS_CUDA_MAMBA_COMMON_CUH_

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/status/status.h"
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

}  // namespace ramba::kernels::cuda::mamba

#endif  // RAMBA_KERNELS_CUDA_MAMBA_COMMON_CUH_
