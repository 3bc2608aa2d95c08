#include "model/sampler.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace ramba {

absl::Status ValidateSamplingOptions(const SamplingOptions& o) {
  if (!(o.temperature >= 0.0f) || !std::isfinite(o.temperature)) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be a finite number >= 0, got ", o.temperature));
  }
  if (o.top_k < 0) {
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", o.top_k));
  }
  if (!(o.top_p > 0.0f && o.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", o.top_p));
  }
  if (!(o.min_p >= 0.0f && o.min_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("min_p must be in [0, 1], got ", o.min_p));
  }
  if (!(o.presence_penalty >= -2.0f && o.presence_penalty <= 2.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("presence_penalty must be in [-2, 2], got ", o.presence_penalty));
  }
  if (!(o.frequency_penalty >= -2.0f && o.frequency_penalty <= 2.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("frequency_penalty must be in [-2, 2], got ", o.frequency_penalty));
  }
  if (!(o.repetition_penalty > 0.0f) || !std::isfinite(o.repetition_penalty)) {
    return absl::InvalidArgumentError(
        absl::StrCat("repetition_penalty must be a finite number > 0, got ", o.repetition_penalty));
  }
  return absl::OkStatus();
}

absl::Status ValidateTopLogprobs(int64_t top_logprobs, int64_t vocab) {
  const int64_t most = std::min<int64_t>(vocab, kernels::Backend::kMaxTopLogprobs);
  if (top_logprobs < 0 || top_logprobs > most) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_logprobs must be in [0, ", most, "], got ", top_logprobs));
  }
  return absl::OkStatus();
}

absl::Status ValidateLogitBias(absl::Span<const LogitBias> bias, int64_t vocab,
                               absl::string_view field) {
  if (static_cast<int64_t>(bias.size()) > kMaxLogitBiasEntries) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " has ", bias.size(), " entries, more than the ", kMaxLogitBiasEntries, " allowed"));
  }
  std::vector<int32_t> ids;
  ids.reserve(bias.size());
  for (const LogitBias& b : bias) {
    if (b.id < 0 || b.id >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, " has token id ", b.id, " outside the vocabulary [0, ", vocab, ")"));
    }
    if (!(b.bias >= -kMaxLogitBias && b.bias <= kMaxLogitBias)) {
      return absl::InvalidArgumentError(absl::StrCat(field, " of token ", b.id, " must be in [-",
                                                     kMaxLogitBias, ", ", kMaxLogitBias, "], got ",
                                                     b.bias));
    }
    ids.push_back(b.id);
  }
  std::sort(ids.begin(), ids.end());
  if (const auto dup = std::adjacent_find(ids.begin(), ids.end()); dup != ids.end()) {
    return absl::InvalidArgumentError(absl::StrCat(field, " lists token ", *dup, " twice"));
  }
  return absl::OkStatus();
}

float SamplingUniform(uint64_t seed, int64_t position) {
  uint64_t z = seed ^ (0x9E3779B97F4A7C15ull * (static_cast<uint64_t>(position) + 1));
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) / static_cast<float>(1ull << 24);
}

void SamplingInputs(absl::Span<const SamplingOptions> options, absl::Span<const int64_t> positions,
                    std::vector<kernels::SamplingParams>* params, std::vector<float>* uniforms) {
  params->resize(options.size());
  uniforms->resize(options.size());
  for (size_t r = 0; r < options.size(); ++r) {
    (*params)[r] = {options[r].temperature, options[r].top_k, options[r].top_p, options[r].min_p};
    (*uniforms)[r] = SamplingUniform(options[r].seed, positions[r]);
  }
}

absl::StatusOr<std::vector<int32_t>> SampleTokens(kernels::Backend* backend,
                                                  absl::Span<const float> logits, int64_t vocab,
                                                  absl::Span<const SamplingOptions> options,
                                                  absl::Span<const int64_t> positions) {
  const int64_t rows = static_cast<int64_t>(options.size());
  if (vocab <= 0 || static_cast<int64_t>(logits.size()) != rows * vocab ||
      static_cast<int64_t>(positions.size()) != rows) {
    return absl::InvalidArgumentError(absl::StrCat("SampleTokens: ", logits.size(),
                                                   " logits for ", rows, " rows of vocab ", vocab));
  }
  for (const SamplingOptions& o : options) {
    RETURN_IF_ERROR(ValidateSamplingOptions(o));
    if (o.adjusts_logits()) {
      return absl::InvalidArgumentError(
          "SampleTokens: penalties, held-back tokens and logit bias need a session");
    }
  }
  std::vector<kernels::SamplingParams> params;
  std::vector<float> uniforms;
  SamplingInputs(options, positions, &params, &uniforms);
  // Logits are host memory; stage them through the backend so every backend samples the same way.
  ASSIGN_OR_RETURN(kernels::Buffer dev_logits, backend->Allocate(logits.size() * sizeof(float)));
  RETURN_IF_ERROR(backend->Upload(dev_logits.data(), logits.data(), logits.size() * sizeof(float)));
  ASSIGN_OR_RETURN(kernels::Buffer dev_out, backend->Allocate(rows * sizeof(int32_t)));
  RETURN_IF_ERROR(backend->Sample(dev_logits.as<float>(), rows, vocab, params.data(),
                                  uniforms.data(), dev_out.as<int32_t>()));
  std::vector<int32_t> out(rows);
  RETURN_IF_ERROR(backend->Download(out.data(), dev_out.data(), rows * sizeof(int32_t)));
  return out;
}

}  // namespace ramba
