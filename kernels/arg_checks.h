// Argument checks shared by the backends: every op validates its host-side arguments and returns
// InvalidArgument "<Op>: <what is wrong>" instead of crashing.
#ifndef RAMBA_KERNELS_ARG_CHECKS_H_
#define RAMBA_KERNELS_ARG_CHECKS_H_

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "kernels/backend.h"

namespace ramba::kernels {

inline absl::Status InvalidOpArgument(std::string_view op, std::string_view what) {
  return absl::InvalidArgumentError(std::string(op) + ": " + std::string(what));
}

// Checks every backend applies in the same way.
// SsmScan's parameters: positive sizes, ngroups | nheads, per-head arrays set, dt_min <= dt_max.
absl::Status CheckSsmParams(std::string_view op, const SsmParams& p);
// Attention head layout: nh, nkv, hd positive and nkv | nh.
absl::Status CheckAttentionHeads(std::string_view op, int64_t nh, int64_t nkv, int64_t hd);
// MambaMixer's optional out projection (a.out_proj.data set): nheads * headdim columns and an
// output whose row stride holds its rows.
absl::Status CheckMixerOutProj(std::string_view op, const MambaMixerArgs& a);
// Per-row sampling parameters (host array of `rows`): finite temperature >= 0, top_k >= 0,
// top_p not NaN, min_p in [0, 1].
absl::Status CheckSamplingParams(std::string_view op, const SamplingParams* params, int64_t rows);
// Per-row penalties (host array of `rows`): finite presence and frequency, finite repetition > 0.
absl::Status CheckPenaltyParams(std::string_view op, const PenaltyParams* params, int64_t rows);
// TopLogprobs' sizes (rows >= 0, 1 <= n <= min(vocab, kMaxTopLogprobs)) and, with rows, pointers.
absl::Status CheckTopLogprobsArgs(const float* logits, int64_t rows, int64_t vocab, int64_t n,
                                  const int32_t* ids, const float* logprobs);

}  // namespace ramba::kernels

// Returns InvalidOpArgument(op, msg) from the enclosing function unless `cond` holds.
#define RAMBA_CHECK_ARG(op, cond, msg)                                     \
  do {                                                                     \
    if (!(cond)) return ::ramba::kernels::InvalidOpArgument((op), (msg)); \
  } while (0)

#endif  // RAMBA_KERNELS_ARG_CHECKS_H_
