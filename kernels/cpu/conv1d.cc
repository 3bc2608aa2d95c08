// Depthwise causal conv1d + bias + SiLU over a ragged batch. Outputs depend only on inputs (no
// recurrence), so every (row, channel block) is an independent work item; the weight is transposed
// to [kernel, channels] once per call so the inner loop runs over contiguous channels.
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/vec.h"

namespace ramba::kernels::cpu {
namespace {
constexpr int64_t kChannelBlock = 256;
}  // namespace

void CausalConv1dSilu(const float* x, int64_t ldx, const int64_t* seq_offsets, int64_t num_seqs,
                      float* const* conv_states, const float* weight, const float* bias,
                      int64_t channels, int64_t kernel, float* y) {
  if (num_seqs <= 0 || channels <= 0) return;
  const int64_t base = seq_offsets[0];
  const int64_t rows = seq_offsets[num_seqs] - base;
  const int64_t hist = kernel - 1;
  std::vector<float> wt(static_cast<size_t>(kernel * channels));
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t j = 0; j < kernel; ++j) wt[j * channels + c] = weight[c * kernel + j];
  }
  std::vector<int32_t> row_seq(static_cast<size_t>(rows));
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int64_t r = seq_offsets[s]; r < seq_offsets[s + 1]; ++r) row_seq[r - base] = s;
  }
  const int64_t cblocks = (channels + kChannelBlock - 1) / kChannelBlock;

#pragma omp parallel for schedule(static) if (rows * channels * kernel > kMinParallelWork)
  for (int64_t item = 0; item < rows * cblocks; ++item) {
    const int64_t r = base + item / cblocks;
    const int64_t c0 = (item % cblocks) * kChannelBlock;
    const int64_t nc = std::min(kChannelBlock, channels - c0);
    const int64_t s = row_seq[r - base];
    const int64_t t = r - seq_offsets[s];  // position inside this batch's part of the sequence
    float acc[kChannelBlock];
    if (bias != nullptr) {
      std::memcpy(acc, bias + c0, nc * sizeof(float));
    } else {
      std::fill(acc, acc + nc, 0.0f);
    }
    for (int64_t j = 0; j < kernel; ++j) {
      // Tap j reads input t - hist + j: a state row when negative, else a row of x.
      const int64_t src = t - hist + j;
      const float* in = src < 0 ? conv_states[s] + (hist + src) * channels + c0
                                : x + (seq_offsets[s] + src) * ldx + c0;
      const float* __restrict wj = wt.data() + j * channels + c0;
#pragma omp simd
      for (int64_t c = 0; c < nc; ++c) acc[c] += wj[c] * in[c];
    }
    float* __restrict out = y + r * channels + c0;
    for (int64_t c = 0; c < nc; ++c) out[c] = SiluF(acc[c]);
  }

  // New state: the last `hist` rows of [old state; this batch's rows], oldest first.
#pragma omp parallel for schedule(static) if (num_seqs * hist * channels > kMinParallelWork)
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t T = seq_offsets[s + 1] - seq_offsets[s];
    if (T == 0) continue;
    float* st = conv_states[s];
    for (int64_t i = 0; i < hist; ++i) {
      const int64_t src = T + i - hist;  // index in the batch rows, negative: old state row
      float* dst = st + i * channels;
      if (src < 0) {
        // Reading row hist + src > i of the same buffer: ascending i never reads a row it wrote.
        std::memmove(dst, st + (hist + src) * channels, channels * sizeof(float));
      } else {
        std::memcpy(dst, x + (seq_offsets[s] + src) * ldx, channels * sizeof(float));
      }
    }
  }
}

}  // namespace ramba::kernels::cpu
