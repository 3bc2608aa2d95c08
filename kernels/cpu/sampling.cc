// Token sampling, one row per work item. Tokens are ranked by (logit descending, id ascending);
// only as much of that ranking is sorted as the top-k / top-p cut and the inverse-CDF walk need
// (selection + sort of a growing prefix), so a peaked distribution costs O(vocab), not a full sort.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "kernels/cpu/ops.h"

namespace ramba::kernels::cpu {
namespace {

inline float Clean(float l) { return std::isnan(l) ? -INFINITY : l; }

int32_t Argmax(const float* logits, int64_t vocab) {
  int64_t best = 0;
  float bv = -INFINITY;
  for (int64_t i = 0; i < vocab; ++i) {
    const float v = Clean(logits[i]);
    if (v > bv) {
      bv = v;
      best = i;
    }
  }
  return static_cast<int32_t>(best);
}

}  // namespace

int32_t SampleRow(const float* logits, int64_t vocab, const SamplingParams& params,
                  float uniform) {
  if (vocab <= 0) return 0;
  if (!(params.temperature > 0.0f)) return Argmax(logits, vocab);
  float mx = -INFINITY;
  for (int64_t i = 0; i < vocab; ++i) mx = std::max(mx, Clean(logits[i]));
  if (mx == -INFINITY) return Argmax(logits, vocab);
  const float inv_t = 1.0f / params.temperature;
  std::vector<float> p(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < vocab; ++i) {
    const float l = Clean(logits[i]);
    // +inf logits share all the mass; otherwise exp((l - max) / T).
    p[i] = mx == INFINITY ? (l == INFINITY ? 1.0f : 0.0f) : std::exp((l - mx) * inv_t);
  }
  auto ranks_before = [logits](int32_t a, int32_t b) {
    const float la = Clean(logits[a]), lb = Clean(logits[b]);
    return la > lb || (la == lb && a < b);
  };
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  int64_t sorted = 0;  // order[0, sorted) is the exact ranking prefix
  auto ensure_sorted = [&](int64_t m) {
    if (m <= sorted) return;
    m = std::min(vocab, std::max(m, std::max<int64_t>(64, sorted * 4)));
    // Select the next block, then sort just that block: O(vocab + block log block).
    if (m < vocab) std::nth_element(order.begin() + sorted, order.begin() + m, order.end(), ranks_before);
    std::sort(order.begin() + sorted, order.begin() + m, ranks_before);
    sorted = m;
  };

  // Top-k keeps the first k of the ranking, min-p the prefix whose probabilities reach min_p
  // times the first's (which is 1, or all +inf logits share the mass): together the shorter.
  int64_t kept = params.top_k > 0 && params.top_k < vocab ? params.top_k : vocab;
  if (params.min_p > 0.0f) {
    int64_t n = 1;  // the first token always stays
    for (; n < kept; ++n) {
      ensure_sorted(n + 1);
      if (!(p[order[n]] >= params.min_p)) break;
    }
    kept = n;
  }
  double mass = 0.0;
  if (kept < vocab) {
    ensure_sorted(kept);
    for (int64_t j = 0; j < kept; ++j) mass += p[order[j]];
  } else {
    for (int64_t i = 0; i < vocab; ++i) mass += p[i];
  }
  // Top-p: the smallest ranking prefix whose share of the kept mass reaches top_p (at least one).
  if (params.top_p < 1.0f) {
    const double target = static_cast<double>(params.top_p) * mass;
    double cum = 0.0;
    int64_t n = 0;
    while (n < kept) {
      ensure_sorted(n + 1);
      cum += p[order[n]];
      ++n;
      if (cum >= target) break;
    }
    kept = std::max<int64_t>(n, 1);
    mass = cum;
  }
  // Inverse CDF over the kept prefix in ranking order.
  const double u = std::min(std::max(static_cast<double>(uniform), 0.0), 1.0);
  const double target = u * mass;
  double cum = 0.0;
  int32_t last_positive = order[0];
  for (int64_t j = 0; j < kept; ++j) {
    ensure_sorted(j + 1);
    const float pj = p[order[j]];
    if (pj <= 0.0f) continue;
    cum += pj;
    last_positive = order[j];
    if (cum > target) return order[j];
  }
  // Only reached when rounding left the walk's total a hair below `mass`.
  return last_positive;
}

namespace {

// (max, log of the sum of exp(x - max) in double) over a row.
std::pair<float, double> RowLogSumExp(const float* row, int64_t vocab) {
  float max = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < vocab; ++i) max = std::max(max, row[i]);
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(row[i]) - max);
  return {max, std::log(sum)};
}

}  // namespace

void TopLogprobs(const float* logits, int64_t rows, int64_t vocab, int64_t n, int32_t* ids,
                 float* logprobs) {
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = logits + r * vocab;
    const auto [max, log_sum] = RowLogSumExp(row, vocab);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + n, order.end(), [row](int32_t a, int32_t b) {
      const float la = Clean(row[a]), lb = Clean(row[b]);
      return la > lb || (la == lb && a < b);
    });
    for (int64_t j = 0; j < n; ++j) {
      const int32_t t = order[j];
      ids[r * n + j] = t;
      logprobs[r * n + j] = static_cast<float>(static_cast<double>(row[t]) - max - log_sum);
    }
  }
}

// exp(x - max) summed in double over the row, then the log.
void TokenLogprobs(const float* logits, int64_t rows, int64_t vocab, const int32_t* tokens,
                   float* out) {
#pragma omp parallel for schedule(static) if (rows > 1 && rows * vocab > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = logits + r * vocab;
    const int32_t token = tokens[r];
    if (token < 0 || token >= vocab) {
      out[r] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const auto [max, log_sum] = RowLogSumExp(row, vocab);
    out[r] = static_cast<float>(static_cast<double>(row[token]) - max - log_sum);
  }
}

void ApplyPenalties(const float* logits, int64_t rows, int64_t vocab, const PenaltyParams* params,
                    float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = logits + r * vocab;
    float* dst = out + r * vocab;
    const PenaltyParams& p = params[r];
    if (p.counts == nullptr && p.bias == nullptr) {
      std::copy(row, row + vocab, dst);
      continue;
    }
    for (int64_t i = 0; i < vocab; ++i) {
      dst[i] = AdjustedLogit(row[i], p.counts != nullptr ? p.counts[i] : 0,
                             p.bias != nullptr ? p.bias[i] : 0.0f, p);
    }
  }
}

void CountTokens(const PenaltyParams* params, int64_t rows, int64_t vocab, const int32_t* tokens) {
  for (int64_t r = 0; r < rows; ++r) {
    if (params[r].counts != nullptr && tokens[r] >= 0 && tokens[r] < vocab) {
      ++params[r].counts[tokens[r]];
    }
  }
}

void Sample(const float* logits, int64_t rows, int64_t vocab, const SamplingParams* params,
            const float* uniforms, int32_t* out) {
#pragma omp parallel for schedule(static) if (rows > 1 && rows * vocab > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    out[r] = SampleRow(logits + r * vocab, vocab, params[r], uniforms[r]);
  }
}

}  // namespace ramba::kernels::cpu
