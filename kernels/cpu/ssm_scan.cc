// Mamba-2 selective scan as the sequential recurrence. Rows of the state (one per head channel p)
// evolve independently, so the work items are (sequence, head, block of kPBlock channels): each
// item walks its sequence's rows in order and keeps its [kPBlock, d_state] slice of the state hot
// in L1 while the inner loops run over contiguous d_state. Each output element is produced by one
// thread in a fixed order, so results are bitwise identical for any thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/vec.h"

namespace ramba::kernels::cpu {
namespace {
constexpr int64_t kPBlock = 16;
constexpr float kDtSoftplusThreshold = 20.0f;  // PyTorch's F.softplus default

// One row of the recurrence for `np` state rows: S = dA * S + x (outer) dtB, y = S C + D x.
// The hottest loop outside BLAS: built for AVX2 as well as baseline x86-64 and picked at load
// time (ifunc), since the project compiles without -march.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void UpdateRows(float* state, const float* xs, const float* __restrict db,
                const float* __restrict C, float dA, float Dh, int64_t np, int64_t N, float* yr) {
  for (int64_t i = 0; i < np; ++i) {
    float* __restrict S = state + i * N;
    const float xi = xs[i];
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; ++n) {
      const float v = S[n] * dA + db[n] * xi;
      S[n] = v;
      acc += v * C[n];
    }
    yr[i] = acc + Dh * xi;
  }
}

}  // namespace

void SsmScan(const float* xbc, int64_t ldxbc, const float* dt_raw, int64_t lddt,
             const int64_t* seq_offsets, int64_t num_seqs, float* const* ssm_states,
             const SsmParams& p, float* y) {
  const int64_t H = p.nheads, P = p.headdim, N = p.d_state, G = p.ngroups;
  if (num_seqs <= 0 || H <= 0 || P <= 0) return;
  const int64_t heads_per_group = H / G;
  const int64_t pblocks = (P + kPBlock - 1) / kPBlock;
  const int64_t items = num_seqs * H * pblocks;
  const int64_t total_rows = seq_offsets[num_seqs] - seq_offsets[0];
  const int64_t b_off = H * P;
  const int64_t c_off = H * P + G * N;

#pragma omp parallel if (total_rows * H * P * N > kMinParallelWork)
  {
    std::vector<float> dtb(static_cast<size_t>(N));
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t s = item / (H * pblocks);
      const int64_t h = (item / pblocks) % H;
      const int64_t p0 = (item % pblocks) * kPBlock;
      const int64_t np = std::min(kPBlock, P - p0);
      const int64_t g = h / heads_per_group;
      const float A = -std::exp(p.A_log[h]);
      const float Dh = p.D[h];
      const float bias = p.dt_bias[h];
      float* state = ssm_states[s] + (h * P + p0) * N;
      for (int64_t r = seq_offsets[s]; r < seq_offsets[s + 1]; ++r) {
        const float* row = xbc + r * ldxbc;
        const float* xs = row + h * P + p0;
        const float* __restrict B = row + b_off + g * N;
        const float* __restrict C = row + c_off + g * N;
        float dt = Softplus(dt_raw[r * lddt + h] + bias, kDtSoftplusThreshold);
        dt = std::min(std::max(dt, p.dt_min), p.dt_max);
        const float dA = std::exp(dt * A);
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) dtb[n] = dt * B[n];
        const float* __restrict db = dtb.data();
        UpdateRows(state, xs, db, C, dA, Dh, np, N, y + r * (H * P) + h * P + p0);
      }
    }
  }
}

}  // namespace ramba::kernels::cpu
