// passkey-eval: passkey retrieval accuracy of a model over a grid of context length x needle
// depth, on the C++ engine (CPU, or GPU once the CUDA backend exists). Prints a table and writes
// JSON.
//
//   passkey-eval --model models/ramba-tiny --lengths 4096,16384 --depths 0,0.25,0.5,0.75,1 \
//                --trials 20 --json_out results.json
#include <cstdio>
#include <fstream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "kernels/backend.h"
#include "model/ramba_model.h"
#include "model/tokenizer.h"
#include "tools/passkey.h"

ABSL_FLAG(std::string, model, "models/ramba-tiny", "Model directory.");
ABSL_FLAG(std::string, lengths, "4096,16384", "Comma-separated context lengths in tokens.");
ABSL_FLAG(std::string, depths, "0,0.25,0.5,0.75,1", "Comma-separated needle depths in [0, 1].");
ABSL_FLAG(int64_t, trials, 20, "Trials per (length, depth) cell.");
ABSL_FLAG(std::string, key_format, "mixed", "grouped | word | alnum | mixed");
ABSL_FLAG(uint64_t, seed, 1234, "Haystack seed.");
ABSL_FLAG(std::string, device, "auto", "cpu, cuda or auto.");
ABSL_FLAG(int32_t, threads, 0, "CPU threads (0 = all cores).");
ABSL_FLAG(int64_t, segment, 2048, "Prefill segment length.");
ABSL_FLAG(std::string, json_out, "", "Write the JSON report here.");

namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "passkey-eval: %s\n", s.ToString().c_str());
  return 1;
}

void Progress(const ramba::eval::CellResult& c) {
  std::fprintf(stderr, "length %ld depth %.2f: %ld/%ld correct (%.1fs)\n", static_cast<long>(c.length),
               c.depth, static_cast<long>(c.correct), static_cast<long>(c.trials), c.seconds);
  for (const auto& m : c.misses) std::fprintf(stderr, "  miss: %s\n", m.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("Passkey retrieval accuracy over context length x needle depth.");
  absl::ParseCommandLine(argc, argv);
  ramba::eval::EvalOptions options;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_lengths), ',', absl::SkipEmpty())) {
    int64_t v;
    if (!absl::SimpleAtoi(s, &v) || v <= 0) {
      return Fail(absl::InvalidArgumentError("--lengths: bad length '" + std::string(s) + "'"));
    }
    options.lengths.push_back(v);
  }
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_depths), ',', absl::SkipEmpty())) {
    double v;
    if (!absl::SimpleAtod(s, &v) || v < 0 || v > 1) {
      return Fail(absl::InvalidArgumentError("--depths: bad depth '" + std::string(s) + "'"));
    }
    options.depths.push_back(v);
  }
  options.trials = absl::GetFlag(FLAGS_trials);
  if (options.trials <= 0) return Fail(absl::InvalidArgumentError("--trials must be positive"));
  auto format = ramba::eval::ParseKeyFormat(absl::GetFlag(FLAGS_key_format));
  if (!format.ok()) return Fail(format.status());
  options.format = *format;
  options.seed = absl::GetFlag(FLAGS_seed);
  options.segment_tokens = absl::GetFlag(FLAGS_segment);

  auto backend = ramba::kernels::CreateBackend(absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_threads));
  if (!backend.ok()) return Fail(backend.status());
  const std::string dir = absl::GetFlag(FLAGS_model);
  auto model = ramba::RambaModel::Load(dir, backend->get());
  if (!model.ok()) return Fail(model.status());
  auto tokenizer = ramba::LoadTokenizer(dir, (*model)->config().vocab_size);
  if (!tokenizer.ok()) return Fail(tokenizer.status());

  auto cells = ramba::eval::RunPasskeyEval(**model, **tokenizer, options, &Progress);
  if (!cells.ok()) return Fail(cells.status());
  std::printf("passkey accuracy, %s on %s, %ld trials per cell, seed %lu\n%s", dir.c_str(),
              std::string((*backend)->name()).c_str(), static_cast<long>(options.trials),
              static_cast<unsigned long>(options.seed), ramba::eval::FormatTable(*cells).c_str());
  const std::string json_out = absl::GetFlag(FLAGS_json_out);
  if (!json_out.empty()) {
    std::ofstream out(json_out);
    out << ramba::eval::ToJson(*cells, options, dir) << "\n";
    if (!out) return Fail(absl::InternalError("cannot write " + json_out));
  }
  return 0;
}
