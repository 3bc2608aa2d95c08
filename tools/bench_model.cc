// bench-model: prefill and decode throughput of a RAMba configuration with random weights.
//
//   bench-model --config 370m --prefill_tokens 2048 --decode_tokens 32 --batch 1
// Prints one line per measurement; figures belong in docs/benchmarks.md with the command.
#include <chrono>
#include <cmath>
#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "kernels/backend.h"
#include "model/ramba_model.h"
#include "model/weights.h"

ABSL_FLAG(std::string, config, "tiny", "tiny | 370m | path to a config.json");
ABSL_FLAG(std::string, device, "cpu", "cpu, cuda or auto");
ABSL_FLAG(int32_t, threads, 0, "CPU threads (0 = all cores)");
ABSL_FLAG(int32_t, prefill_tokens, 2048, "Prompt length for the prefill measurement");
ABSL_FLAG(int32_t, segment, 1024, "Prefill segment length");
ABSL_FLAG(int32_t, decode_tokens, 64, "Decode steps to time");
ABSL_FLAG(int32_t, batch, 1, "Sessions decoded together");

namespace {

ramba::ModelConfig TinyConfig() {
  ramba::ModelConfig c;
  c.hidden_size = 256;
  c.vocab_size = 256;
  c.num_lower_layers = 4;
  c.num_upper_layers = 4;
  c.num_mamba_per_gca = 2;
  c.state_size = 64;
  c.head_dim = 64;
  c.expand = 2;
  c.num_heads = 8;
  c.retrieval_dim = 256;
  c.encoder_layers = 1;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 4;
  c.num_kv_heads = 1;
  c.time_step_max_limit = INFINITY;
  return c;
}

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "bench-model: %s\n", s.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string name = absl::GetFlag(FLAGS_config);
  ramba::ModelConfig config;
  if (name == "tiny") {
    config = TinyConfig();
  } else if (name == "370m") {
    config = ramba::Reference370MConfig();
  } else {
    auto c = ramba::LoadModelConfig(name);
    if (!c.ok()) return Fail(c.status());
    config = *c;
  }
  auto backend = ramba::kernels::CreateBackend(absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_threads));
  if (!backend.ok()) return Fail(backend.status());
  absl::StatusOr<std::unique_ptr<ramba::RambaModel>> model;
  {
    const ramba::TensorMap tensors = ramba::RandomTensors(config, 1);
    model = ramba::RambaModel::Create(config, tensors, backend->get());
  }
  if (!model.ok()) return Fail(model.status());

  const int32_t n = absl::GetFlag(FLAGS_prefill_tokens);
  const int32_t batch = absl::GetFlag(FLAGS_batch);
  std::vector<int32_t> prompt(n);
  for (int32_t i = 0; i < n; ++i) prompt[i] = (i * 7919 + 13) % config.vocab_size;

  std::vector<std::unique_ptr<ramba::SessionState>> states;
  double prefill_s = 0;
  for (int32_t b = 0; b < batch; ++b) {
    auto s = (*model)->NewSession();
    if (!s.ok()) return Fail(s.status());
    const double t0 = Now();
    if (auto st = (*model)->Prefill(s->get(), prompt, nullptr, absl::GetFlag(FLAGS_segment)); !st.ok()) {
      return Fail(st);
    }
    if (b == 0) prefill_s = Now() - t0;
    states.push_back(std::move(*s));
  }
  std::vector<ramba::SessionState*> ptrs;
  for (auto& s : states) ptrs.push_back(s.get());
  std::vector<int32_t> tokens(batch, 1);
  std::vector<float> logits;
  // One warm-up step, then the timed ones.
  if (auto st = (*model)->Decode(ptrs, tokens, &logits); !st.ok()) return Fail(st);
  const int32_t steps = absl::GetFlag(FLAGS_decode_tokens);
  const double t1 = Now();
  for (int32_t i = 0; i < steps; ++i) {
    if (auto st = (*model)->Decode(ptrs, tokens, &logits); !st.ok()) return Fail(st);
  }
  const double decode_s = Now() - t1;
  std::printf("config=%s device=%s prefill: %d tokens in %.3f s = %.1f tok/s | decode batch %d at "
              "context %d: %.2f ms/step = %.1f tok/s\n",
              name.c_str(), std::string((*backend)->name()).c_str(), n, prefill_s, n / prefill_s,
              batch, n, 1e3 * decode_s / steps, steps * batch / decode_s);
  return 0;
}
