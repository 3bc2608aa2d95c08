#include "tools/passkey.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"

namespace ramba::eval {
namespace {

// Eval-only filler: a town's daily log. None of it appears in the trainer's generator.
constexpr const char* kFiller[] = {
    "The ferry to the north island left at seven, carrying mail and two crates of apples.",
    "At the bakery on Mill Lane the morning loaves sold out before nine.",
    "A light rain moved in from the west and the harbour lamps were lit early.",
    "The council met in the old library to discuss repairs to the stone bridge.",
    "Children gathered by the fountain to race paper boats along the gutter.",
    "The clock in the square was wound on Tuesday, as it has been for ninety years.",
    "Fishermen reported a good catch of herring and a few stubborn crabs.",
    "The school choir practised the autumn songs with the windows open.",
    "A cart lost a wheel near the market, and three neighbours helped lift it.",
    "Evening brought a cold wind, and smoke rose from every chimney on the hill.",
    "The lighthouse keeper logged two passing steamers and one sailing yacht.",
    "In the orchard the pears were picked and stacked in wooden boxes.",
    "The post office extended its hours for the week of the harvest fair.",
    "Someone painted the garden gate blue, and nobody could say who.",
    "The tailor finished a wool coat for the mayor, lined with green silk.",
    "Geese flew south over the marsh in long, uneven lines.",
    "The night train was delayed by fog but arrived before midnight.",
    "A traveller asked for directions to the observatory and stayed for supper.",
    "The river rose a hand's width after the storms upstream.",
    "Lanterns were hung along the pier for the festival of lights.",
};

constexpr const char* kWords[] = {"copper", "violet", "harbor", "lantern", "meadow", "falcon",
                                  "granite", "ember",  "willow", "quartz",  "saffron", "tundra"};

constexpr const char* kIntro =
    "Below is a long record of unrelated notes. Somewhere inside it is a pass key. "
    "Remember the pass key: you will be asked for it at the end.\n";

std::mt19937_64 CaseRng(uint64_t seed, int64_t length, double depth, int64_t trial) {
  std::seed_seq seq{static_cast<uint64_t>(seed), static_cast<uint64_t>(length),
                    static_cast<uint64_t>(std::llround(depth * 1e6)),
                    static_cast<uint64_t>(trial)};
  return std::mt19937_64(seq);
}

std::string MakeKey(KeyFormat format, std::mt19937_64& rng) {
  auto digit = [&] { return static_cast<char>('0' + rng() % 10); };
  if (format == KeyFormat::kMixed) format = static_cast<KeyFormat>(rng() % 3);
  std::string key;
  switch (format) {
    case KeyFormat::kGroupedDigits: {
      const int groups = 2 + rng() % 2;
      for (int g = 0; g < groups; ++g) {
        if (g) key += '-';
        const int n = 2 + rng() % 3;
        for (int i = 0; i < n; ++i) key += digit();
      }
      break;
    }
    case KeyFormat::kWordNumber: {
      key = kWords[rng() % (sizeof(kWords) / sizeof(kWords[0]))];
      key += '-';
      const int n = 3 + rng() % 3;
      for (int i = 0; i < n; ++i) key += digit();
      break;
    }
    default: {
      const int n = 6 + rng() % 4;
      constexpr const char kAlnum[] = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
      for (int i = 0; i < n; ++i) key += kAlnum[rng() % (sizeof(kAlnum) - 1)];
      break;
    }
  }
  return key;
}

// Appends filler tokens (whole sentences, the last one cut) until `out` grows by `count`.
void AppendFiller(const Tokenizer& tok, int64_t count, std::mt19937_64& rng,
                  std::vector<int32_t>* out) {
  const int64_t target = static_cast<int64_t>(out->size()) + count;
  while (static_cast<int64_t>(out->size()) < target) {
    std::string sentence = kFiller[rng() % (sizeof(kFiller) / sizeof(kFiller[0]))];
    sentence += ' ';
    for (int32_t id : tok.Encode(sentence)) {
      if (static_cast<int64_t>(out->size()) == target) break;
      out->push_back(id);
    }
  }
}

bool Matches(const std::string& generated, const std::string& key) {
  const absl::string_view text = absl::StripLeadingAsciiWhitespace(generated);
  if (!absl::StartsWith(text, key)) return false;
  return text.size() == key.size() || !absl::ascii_isalnum(text[key.size()]);
}

}  // namespace

absl::StatusOr<KeyFormat> ParseKeyFormat(const std::string& name) {
  if (name == "grouped") return KeyFormat::kGroupedDigits;
  if (name == "word") return KeyFormat::kWordNumber;
  if (name == "alnum") return KeyFormat::kUpperAlnum;
  if (name == "mixed") return KeyFormat::kMixed;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown key format '", name, "' (grouped, word, alnum, mixed)"));
}

absl::StatusOr<PasskeyCase> MakePasskeyCase(const Tokenizer& tok, int64_t length, double depth,
                                            KeyFormat format, uint64_t seed, int64_t trial) {
  if (!(depth >= 0.0 && depth <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("depth must be in [0, 1], got ", depth));
  }
  std::mt19937_64 rng = CaseRng(seed, length, depth, trial);
  PasskeyCase c;
  c.key = MakeKey(format, rng);
  const std::vector<int32_t> intro = tok.Encode(kIntro);
  const std::vector<int32_t> needle = tok.Encode(
      absl::StrCat(" The pass key is ", c.key, ". Remember it. ", c.key, " is the pass key. "));
  const std::vector<int32_t> question = tok.Encode("\nWhat is the pass key? The pass key is");
  const int64_t fixed = static_cast<int64_t>(intro.size() + needle.size() + question.size());
  if (length < fixed) {
    return absl::InvalidArgumentError(
        absl::StrCat("length ", length, " is shorter than the needle and question (", fixed,
                     " tokens)"));
  }
  const int64_t filler = length - fixed;
  const int64_t before = static_cast<int64_t>(std::llround(depth * filler));
  c.prompt = intro;
  AppendFiller(tok, before, rng, &c.prompt);
  c.needle_position = static_cast<int64_t>(c.prompt.size());
  c.prompt.insert(c.prompt.end(), needle.begin(), needle.end());
  AppendFiller(tok, filler - before, rng, &c.prompt);
  c.prompt.insert(c.prompt.end(), question.begin(), question.end());
  return c;
}

absl::StatusOr<std::vector<CellResult>> RunPasskeyEval(RambaModel& model, const Tokenizer& tok,
                                                       const EvalOptions& options,
                                                       void (*progress)(const CellResult&)) {
  std::vector<CellResult> cells;
  const int64_t vocab = model.config().vocab_size;
  for (int64_t length : options.lengths) {
    for (double depth : options.depths) {
      CellResult cell;
      cell.length = length;
      cell.depth = depth;
      const auto t0 = std::chrono::steady_clock::now();
      for (int64_t trial = 0; trial < options.trials; ++trial) {
        ASSIGN_OR_RETURN(PasskeyCase c,
                         MakePasskeyCase(tok, length, depth, options.format, options.seed, trial));
        ASSIGN_OR_RETURN(std::unique_ptr<SessionState> state, model.NewSession());
        std::vector<float> logits;
        RETURN_IF_ERROR(model.Prefill(state.get(), c.prompt, &logits, options.segment_tokens));
        // Greedy answer: the key's length in tokens plus room for a space and the full stop.
        const int64_t max_new = static_cast<int64_t>(tok.Encode(" " + c.key).size()) + 2;
        std::vector<int32_t> answer;
        SessionState* st[] = {state.get()};
        for (int64_t i = 0; i < max_new; ++i) {
          const int32_t next = static_cast<int32_t>(
              std::max_element(logits.begin(), logits.begin() + vocab) - logits.begin());
          answer.push_back(next);
          if (i + 1 == max_new) break;
          const int32_t in[] = {next};
          RETURN_IF_ERROR(model.Decode(st, in, &logits));
        }
        ASSIGN_OR_RETURN(std::string text, tok.Decode(answer));
        ++cell.trials;
        if (Matches(text, c.key)) {
          ++cell.correct;
        } else if (cell.misses.size() < 3) {
          cell.misses.push_back(absl::StrCat("expected '", c.key, "' got '",
                                             absl::CHexEscape(text), "'"));
        }
      }
      cell.seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (progress != nullptr) progress(cell);
      cells.push_back(std::move(cell));
    }
  }
  return cells;
}

std::string FormatTable(const std::vector<CellResult>& cells) {
  std::vector<int64_t> lengths;
  std::vector<double> depths;
  for (const CellResult& c : cells) {
    if (std::find(lengths.begin(), lengths.end(), c.length) == lengths.end()) {
      lengths.push_back(c.length);
    }
    if (std::find(depths.begin(), depths.end(), c.depth) == depths.end()) depths.push_back(c.depth);
  }
  std::string out = absl::StrFormat("%10s", "length");
  for (double d : depths) absl::StrAppendFormat(&out, " | depth %4.2f", d);
  absl::StrAppend(&out, " | overall\n");
  for (int64_t len : lengths) {
    absl::StrAppendFormat(&out, "%10d", len);
    int64_t ok = 0, n = 0;
    for (double d : depths) {
      for (const CellResult& c : cells) {
        if (c.length == len && c.depth == d) {
          absl::StrAppendFormat(&out, " | %5.1f%% %3d", 100.0 * c.correct / std::max<int64_t>(1, c.trials), c.trials);
          ok += c.correct;
          n += c.trials;
        }
      }
    }
    absl::StrAppendFormat(&out, " | %5.1f%%\n", 100.0 * ok / std::max<int64_t>(1, n));
  }
  return out;
}

std::string ToJson(const std::vector<CellResult>& cells, const EvalOptions& options,
                   const std::string& model_dir) {
  nlohmann::json j;
  j["model"] = model_dir;
  j["seed"] = options.seed;
  j["trials_per_cell"] = options.trials;
  j["cells"] = nlohmann::json::array();
  for (const CellResult& c : cells) {
    j["cells"].push_back({{"length", c.length},
                          {"depth", c.depth},
                          {"trials", c.trials},
                          {"correct", c.correct},
                          {"accuracy", static_cast<double>(c.correct) / std::max<int64_t>(1, c.trials)},
                          {"seconds", c.seconds},
                          {"misses", c.misses}});
  }
  return j.dump(2);
}

}  // namespace ramba::eval
