#include "kernels/arg_checks.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace ramba::kernels {

absl::Status CheckSsmParams(std::string_view op, const SsmParams& p) {
  RAMBA_CHECK_ARG(op, p.nheads > 0 && p.headdim > 0 && p.d_state > 0 && p.ngroups > 0,
                  "nheads, headdim, d_state and ngroups must be positive");
  RAMBA_CHECK_ARG(op, p.nheads % p.ngroups == 0, "ngroups must divide nheads");
  RAMBA_CHECK_ARG(op, p.A_log != nullptr && p.D != nullptr && p.dt_bias != nullptr,
                  "A_log, D or dt_bias is null");
  RAMBA_CHECK_ARG(op, !(p.dt_min > p.dt_max), "dt_min exceeds dt_max");
  return absl::OkStatus();
}

absl::Status CheckAttentionHeads(std::string_view op, int64_t nh, int64_t nkv, int64_t hd) {
  RAMBA_CHECK_ARG(op, nh > 0 && nkv > 0 && hd > 0 && nh % nkv == 0,
                  "nh, nkv, hd must be positive and nkv must divide nh");
  return absl::OkStatus();
}

absl::Status CheckMixerOutProj(std::string_view op, const MambaMixerArgs& a) {
  if (a.out_proj.data == nullptr) return absl::OkStatus();
  RAMBA_CHECK_ARG(op,
                  a.out_proj.cols == a.ssm.nheads * a.ssm.headdim && a.out != nullptr &&
                      a.ld_out >= a.out_proj.rows,
                  "out_proj needs nheads*headdim columns and an output with ld_out >= its rows");
  return absl::OkStatus();
}

absl::Status CheckSamplingParams(std::string_view op, const SamplingParams* params, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    const SamplingParams& p = params[r];
    if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature) || p.top_k < 0 ||
        std::isnan(p.top_p) || !(p.min_p >= 0.0f && p.min_p <= 1.0f)) {
      return InvalidOpArgument(op, absl::StrCat("row ", r, " has invalid sampling parameters"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckPenaltyParams(std::string_view op, const PenaltyParams* params, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    const PenaltyParams& p = params[r];
    if (!std::isfinite(p.presence) || !std::isfinite(p.frequency) || !std::isfinite(p.repetition) ||
        !(p.repetition > 0.0f)) {
      return InvalidOpArgument(op, absl::StrCat("row ", r, " has invalid penalties"));
    }
    if (p.hold_back && p.counts == nullptr) {
      return InvalidOpArgument(op, absl::StrCat("row ", r, " holds tokens back without counts"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckTopLogprobsArgs(const float* logits, int64_t rows, int64_t vocab, int64_t n,
                                  const int32_t* ids, const float* logprobs) {
  constexpr std::string_view kOp = "TopLogprobs";
  RAMBA_CHECK_ARG(kOp, rows >= 0 && vocab > 0 && vocab <= INT32_MAX, "bad sizes");
  RAMBA_CHECK_ARG(
      kOp, n >= 1 && n <= std::min(vocab, Backend::kMaxTopLogprobs),
      absl::StrCat("n must be in [1, min(vocab, ", Backend::kMaxTopLogprobs, ")], got ", n));
  RAMBA_CHECK_ARG(kOp, rows == 0 || (logits != nullptr && ids != nullptr && logprobs != nullptr),
                  "null pointer");
  return absl::OkStatus();
}

}  // namespace ramba::kernels
