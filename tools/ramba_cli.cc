// ramba-cli: loads a model directory and runs prefill + generation from text, printing the
// generated text as it is produced and the prefill / decode speed.
//
//   ramba-cli --model models/ramba-tiny --prompt "The passkey is" --max_tokens 64
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "kernels/backend.h"
#include "model/ramba_model.h"
#include "model/sampler.h"
#include "model/tokenizer.h"

ABSL_FLAG(std::string, model, "models/ramba-tiny", "Model directory (config.json, model.safetensors, tokenizer).");
ABSL_FLAG(std::string, prompt, "", "Prompt text.");
ABSL_FLAG(std::string, prompt_file, "", "Read the prompt from this file ('-' for stdin) instead of --prompt.");
ABSL_FLAG(int32_t, max_tokens, 64, "Tokens to generate.");
ABSL_FLAG(float, temperature, 0.0f, "Sampling temperature; 0 = greedy.");
ABSL_FLAG(int32_t, top_k, 0, "Top-k filter (0 = off).");
ABSL_FLAG(float, top_p, 1.0f, "Nucleus filter (1 = off).");
ABSL_FLAG(float, min_p, 0.0f,
          "Min-p filter: keep tokens at least this fraction as likely as the top one (0 = off).");
ABSL_FLAG(uint64_t, seed, 0, "Sampling seed: the same seed gives the same tokens.");
ABSL_FLAG(float, presence_penalty, 0.0f,
          "Subtracted from the logits of tokens already generated, in [-2, 2] (0 = off).");
ABSL_FLAG(float, frequency_penalty, 0.0f,
          "Subtracted once per time a token was generated, in [-2, 2] (0 = off).");
ABSL_FLAG(float, repetition_penalty, 1.0f,
          "Divides positive / multiplies negative logits of tokens in the prompt or generated "
          "(> 1 discourages repeats; 1 = off).");
ABSL_FLAG(std::string, device, "auto", "cpu, cuda or auto.");
ABSL_FLAG(int32_t, threads, 0, "CPU threads (0 = all cores).");
ABSL_FLAG(int32_t, segment, 1024, "Prefill segment length in tokens.");
ABSL_FLAG(bool, stop_at_eos, false, "Stop when the model emits eos_token_id.");

namespace {

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "ramba-cli: %s\n", std::string(s.ToString()).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Runs a RAMba model on a prompt and prints the generated text.\n"
      "  ramba-cli --model DIR --prompt TEXT [--max_tokens N] [--temperature T --seed S]");
  absl::ParseCommandLine(argc, argv);
  using Clock = std::chrono::steady_clock;

  std::string prompt = absl::GetFlag(FLAGS_prompt);
  const std::string prompt_file = absl::GetFlag(FLAGS_prompt_file);
  if (!prompt_file.empty()) {
    std::stringstream ss;
    if (prompt_file == "-") {
      ss << std::cin.rdbuf();
    } else {
      std::ifstream in(prompt_file, std::ios::binary);
      if (!in) return Fail(absl::NotFoundError("cannot read --prompt_file " + prompt_file));
      ss << in.rdbuf();
    }
    prompt = ss.str();
  }
  ramba::SamplingOptions sampling;
  sampling.temperature = absl::GetFlag(FLAGS_temperature);
  sampling.top_k = absl::GetFlag(FLAGS_top_k);
  sampling.top_p = absl::GetFlag(FLAGS_top_p);
  sampling.min_p = absl::GetFlag(FLAGS_min_p);
  sampling.seed = absl::GetFlag(FLAGS_seed);
  sampling.presence_penalty = absl::GetFlag(FLAGS_presence_penalty);
  sampling.frequency_penalty = absl::GetFlag(FLAGS_frequency_penalty);
  sampling.repetition_penalty = absl::GetFlag(FLAGS_repetition_penalty);
  if (auto s = ramba::ValidateSamplingOptions(sampling); !s.ok()) return Fail(s);

  auto backend = ramba::kernels::CreateBackend(absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_threads));
  if (!backend.ok()) return Fail(backend.status());
  const std::string dir = absl::GetFlag(FLAGS_model);
  const auto t_load = Clock::now();
  auto model = ramba::RambaModel::Load(dir, backend->get());
  if (!model.ok()) return Fail(model.status());
  const ramba::ModelConfig& config = (*model)->config();
  auto tokenizer = ramba::LoadTokenizer(dir, config.vocab_size);
  if (!tokenizer.ok()) return Fail(tokenizer.status());
  std::fprintf(stderr, "loaded %s on %s in %.2fs\n", dir.c_str(),
               std::string((*backend)->name()).c_str(), Seconds(t_load, Clock::now()));

  std::vector<int32_t> ids = (*tokenizer)->Encode(prompt);
  if (ids.empty()) return Fail(absl::InvalidArgumentError("the prompt is empty"));
  auto state = (*model)->NewSession();
  if (!state.ok()) return Fail(state.status());

  // The prompt but its last token in segments, then one token sampled per step on the backend
  // (logits stay there), the first from the prompt's last token.
  const auto t0 = Clock::now();
  const absl::Span<const int32_t> all(ids);
  if (auto s = (*model)->Prefill(state->get(), all.first(ids.size() - 1), nullptr,
                                 absl::GetFlag(FLAGS_segment));
      !s.ok()) {
    return Fail(s);
  }
  if (sampling.has_penalties()) {
    if (auto s = (*state)->ResetTokenCounts(ids); !s.ok()) return Fail(s);
  }
  const int32_t max_tokens = absl::GetFlag(FLAGS_max_tokens);
  int32_t generated = 0;
  ramba::SessionState* states[] = {state->get()};
  int32_t input = ids.back();
  const auto t1 = Clock::now();  // generation's time includes the prompt's last token
  for (; generated < max_tokens; ++generated) {
    const absl::Span<const int32_t> in[] = {absl::MakeConstSpan(&input, 1)};
    std::vector<int32_t> next;
    if (auto s = (*model)->ForwardAndSample(states, in, {sampling}, &next); !s.ok()) return Fail(s);
    const int32_t token = next[0];
    auto text = (*tokenizer)->DecodeToken(token);
    if (text.ok()) {
      std::fwrite(text->data(), 1, text->size(), stdout);
      std::fflush(stdout);
    }
    if (absl::GetFlag(FLAGS_stop_at_eos) && token == config.eos_token_id) {
      ++generated;
      break;
    }
    input = token;
  }
  const auto t2 = Clock::now();
  std::printf("\n");
  const double prefill_s = Seconds(t0, t1), decode_s = Seconds(t1, t2);
  std::fprintf(
      stderr,
      "prompt %zu tokens in %.3fs (%.1f tok/s); generated %d tokens in %.3fs (%.1f tok/s)\n",
      ids.size() - 1, prefill_s, (ids.size() - 1) / std::max(prefill_s, 1e-9), generated, decode_s,
      generated / std::max(decode_s, 1e-9));
  return 0;
}
