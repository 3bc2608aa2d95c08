// Passkey retrieval evaluation: a seeded haystack generator (its own filler text and key formats,
// deliberately different from the trainer's in model/reference/tasks.py) and an evaluator that
// runs the C++ engine over a grid of context length x needle depth.
#ifndef RAMBA_TOOLS_PASSKEY_H_
#define RAMBA_TOOLS_PASSKEY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/ramba_model.h"
#include "model/tokenizer.h"

namespace ramba::eval {

enum class KeyFormat {
  kGroupedDigits,  // "4821-9930-17": digit groups joined by hyphens
  kWordNumber,     // "copper-58213": a word and a number
  kUpperAlnum,     // "Q7XK2M9P": upper-case letters and digits
  kMixed,          // one of the above per trial
};
absl::StatusOr<KeyFormat> ParseKeyFormat(const std::string& name);

// One passkey prompt, as token ids, with the answer it should produce.
struct PasskeyCase {
  std::vector<int32_t> prompt;   // haystack with the needle, ending with the question
  std::string key;               // the expected answer text (the model should emit " " + key)
  int64_t needle_position = 0;   // token index where the needle starts
};

// Builds a prompt of exactly `length` tokens (when length is large enough for the needle and the
// question; otherwise InvalidArgument) with the needle starting at about depth * (length - fixed
// parts). Deterministic in (seed, length, depth, trial).
absl::StatusOr<PasskeyCase> MakePasskeyCase(const Tokenizer& tokenizer, int64_t length,
                                            double depth, KeyFormat format, uint64_t seed,
                                            int64_t trial);

struct CellResult {
  int64_t length = 0;
  double depth = 0;
  int64_t trials = 0;
  int64_t correct = 0;
  double seconds = 0;            // total wall time of the cell
  std::vector<std::string> misses;  // "expected X got Y" for failed trials (first few)
};

struct EvalOptions {
  std::vector<int64_t> lengths;
  std::vector<double> depths;
  int64_t trials = 20;
  KeyFormat format = KeyFormat::kMixed;
  uint64_t seed = 1234;
  int64_t segment_tokens = 2048;
};

// Runs every cell: prefill the prompt, greedy-decode the answer, exact match. `progress` (may be
// null) is called after each cell.
absl::StatusOr<std::vector<CellResult>> RunPasskeyEval(
    RambaModel& model, const Tokenizer& tokenizer, const EvalOptions& options,
    void (*progress)(const CellResult&) = nullptr);

// A human-readable accuracy table (rows: lengths, columns: depths) and a JSON report.
std::string FormatTable(const std::vector<CellResult>& cells);
std::string ToJson(const std::vector<CellResult>& cells, const EvalOptions& options,
                   const std::string& model_dir);

}  // namespace ramba::eval

#endif  // RAMBA_TOOLS_PASSKEY_H_
