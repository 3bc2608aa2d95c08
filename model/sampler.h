// Token sampling with reproducible randomness: the uniform used for a token is a hash of the
// request seed and the token's position, so the same seed gives the same tokens, also after a
// session is saved and restored, or when the same sequence is decoded in another batch.
#ifndef RAMBA_MODEL_SAMPLER_H_
#define RAMBA_MODEL_SAMPLER_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kernels/backend.h"

namespace ramba {

struct SamplingOptions {
  float temperature = 0.0f;  // 0: greedy
  int32_t top_k = 0;         // 0: off
  float top_p = 1.0f;        // 1: off
  float min_p = 0.0f;        // 0: off
  uint64_t seed = 0;
  // Repetition penalties (vLLM's; kernels::PenaltyParams has the rule), applied to the logits
  // before temperature and the filters, greedy included. presence and frequency count the tokens
  // the generation has sampled so far; repetition also the prompt's. The session's token counts
  // must have been reset for the generation (SessionState::ResetTokenCounts).
  float presence_penalty = 0.0f;    // 0: off
  float frequency_penalty = 0.0f;   // 0: off
  float repetition_penalty = 1.0f;  // 1: off
  bool has_penalties() const {
    return presence_penalty != 0.0f || frequency_penalty != 0.0f || repetition_penalty != 1.0f;
  }
  // Adds the session's logit bias (SessionState::SetLogitBias) to the logits first.
  bool logit_bias = false;
  // The tokens the session's token counts mark as held back (SessionState::ResetTokenCounts: a
  // request's stop tokens) may not be sampled. Set per step by the caller, which knows how many
  // tokens the generation has produced before the one a step samples (min_tokens).
  bool hold_back = false;
  bool needs_token_counts() const { return has_penalties() || hold_back; }
  bool adjusts_logits() const { return needs_token_counts() || logit_bias; }
};

// A logit bias entry: `bias` is added to token `id`'s logit before sampling.
struct LogitBias {
  int32_t id = 0;
  float bias = 0.0f;
};

// The most logit bias entries a generation may have, and their range (OpenAI's).
inline constexpr int64_t kMaxLogitBiasEntries = 1024;
inline constexpr float kMaxLogitBias = 100.0f;

// Checks every id is in [0, vocab) and appears once, every bias is in [-kMaxLogitBias,
// kMaxLogitBias] and there are at most kMaxLogitBiasEntries; the message names `field`.
absl::Status ValidateLogitBias(absl::Span<const LogitBias> bias, int64_t vocab,
                               absl::string_view field = "logit_bias");

// Checks ranges: temperature >= 0 and finite, top_k >= 0, 0 < top_p <= 1, 0 <= min_p <= 1,
// presence and frequency penalties in [-2, 2] (OpenAI's range), repetition penalty finite and
// > 0. The message names the field.
absl::Status ValidateSamplingOptions(const SamplingOptions& options);

// Checks 0 <= top_logprobs <= min(vocab, Backend::kMaxTopLogprobs); the message names
// top_logprobs.
absl::Status ValidateTopLogprobs(int64_t top_logprobs, int64_t vocab);

// The uniform in [0, 1) for (seed, position): splitmix64 of both, top 24 bits.
float SamplingUniform(uint64_t seed, int64_t position);

// The backend Sample op's per-row inputs for options[r] and the position positions[r] the token
// will take. Options must be valid (ValidateSamplingOptions).
void SamplingInputs(absl::Span<const SamplingOptions> options, absl::Span<const int64_t> positions,
                    std::vector<kernels::SamplingParams>* params, std::vector<float>* uniforms);

// Samples one token per row of host `logits` [rows, vocab]; positions[r] is the position the
// sampled token will take in its session. Options that adjust the logits are refused (they need
// a session's token counts and bias).
absl::StatusOr<std::vector<int32_t>> SampleTokens(kernels::Backend* backend,
                                                  absl::Span<const float> logits, int64_t vocab,
                                                  absl::Span<const SamplingOptions> options,
                                                  absl::Span<const int64_t> positions);

}  // namespace ramba

#endif  // RAMBA_MODEL_SAMPLER_H_
