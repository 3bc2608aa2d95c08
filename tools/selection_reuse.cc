// selection-reuse: how often neighbouring tokens of a trained model pick the same chunks, which
// decides what sharing chunk reads within a query block (the block-shared sparse attention
// kernel) can save. Runs the model on the CPU over a text file or a passkey haystack, records
// every retrieval's selection, and prints picks per distinct chunk within aligned blocks of
// consecutive rows (1.0: no chunk picked twice; 8 rows x top-8 all alike: 8.0).
//
//   selection-reuse --model models/ramba-tiny --passkey_length 65536
//   selection-reuse --model models/ramba-tiny --text FILE --length 65536 --dump sel.bin
// --dump writes the selections, one row per token, for bench-ops --selection file.
#include <cstdio>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "kernels/cpu/cpu_backend.h"
#include "model/ramba_model.h"
#include "model/tokenizer.h"
#include "tools/passkey.h"
#include "tools/selection_stats.h"

ABSL_FLAG(std::string, model, "models/ramba-tiny", "Model directory.");
ABSL_FLAG(std::string, text, "", "Text file to run (its first --length tokens).");
ABSL_FLAG(int64_t, length, 65536, "Tokens of --text to run.");
ABSL_FLAG(int64_t, passkey_length, 0, "Run a passkey haystack of this many tokens instead.");
ABSL_FLAG(std::string, block_rows, "1,2,4,8,16,64", "Comma-separated block sizes in rows.");
ABSL_FLAG(int64_t, segment, 4096, "Prefill segment length.");
ABSL_FLAG(int32_t, threads, 0, "CPU threads (0 = all cores).");
ABSL_FLAG(std::string, dump, "", "Write the selections here (tools/selection_stats.h format).");

namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "selection-reuse: %s\n", s.ToString().c_str());
  return 1;
}

// The CPU backend, keeping a copy of every distinct selection that sparse attention reads (the
// HSA layers of a group share one retrieval, so consecutive equal selections are one).
class RecordingBackend : public ramba::kernels::CpuBackend {
 public:
  using CpuBackend::CpuBackend;

  absl::Status SparseChunkAttention(const float* q, int64_t rows,
                                    const ramba::kernels::ChunkMemoryBatch& mem,
                                    const int32_t* indices, const float* weights,
                                    int64_t retrieval_heads, int64_t top_k, int64_t nh, int64_t nkv,
                                    int64_t hd, int64_t chunk_size, float* out) override {
    const int64_t per_row = retrieval_heads * top_k;
    std::vector<int32_t> sel(indices, indices + rows * per_row);
    for (int64_t i = 0; i < rows * per_row; ++i) {
      if (weights[i] == 0.0f) sel[i] = -1;  // read by no kernel
    }
    if (selections_.empty() || selections_.back() != sel) {
      selections_.push_back(std::move(sel));
      per_row_ = per_row;
    }
    return CpuBackend::SparseChunkAttention(q, rows, mem, indices, weights, retrieval_heads, top_k,
                                            nh, nkv, hd, chunk_size, out);
  }

  // Picks per distinct chunk over aligned blocks of `block_rows` rows of each selection.
  ramba::tools::ReuseCount Reuse(int64_t block_rows) const {
    ramba::tools::ReuseCount count;
    for (const std::vector<int32_t>& sel : selections_) {
      ramba::tools::CountReuse(sel.data(), static_cast<int64_t>(sel.size()) / per_row_, per_row_,
                               block_rows, &count);
    }
    return count;
  }

  // Every recorded selection in order: one row per token of the run.
  ramba::tools::Selections All() const {
    ramba::tools::Selections all;
    all.per_row = per_row_;
    for (const std::vector<int32_t>& sel : selections_) {
      all.indices.insert(all.indices.end(), sel.begin(), sel.end());
    }
    return all;
  }

 private:
  std::vector<std::vector<int32_t>> selections_;
  int64_t per_row_ = 1;
};

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("Picks per distinct chunk among neighbouring tokens' selections.");
  absl::ParseCommandLine(argc, argv);
  std::vector<int64_t> block_rows;
  for (absl::string_view s :
       absl::StrSplit(absl::GetFlag(FLAGS_block_rows), ',', absl::SkipEmpty())) {
    int64_t v;
    if (!absl::SimpleAtoi(s, &v) || v <= 0) {
      return Fail(absl::InvalidArgumentError("--block_rows: bad size '" + std::string(s) + "'"));
    }
    block_rows.push_back(v);
  }
  RecordingBackend backend(absl::GetFlag(FLAGS_threads));
  const std::string dir = absl::GetFlag(FLAGS_model);
  auto model = ramba::RambaModel::Load(dir, &backend);
  if (!model.ok()) return Fail(model.status());
  auto tokenizer = ramba::LoadTokenizer(dir, (*model)->config().vocab_size);
  if (!tokenizer.ok()) return Fail(tokenizer.status());

  std::vector<int32_t> tokens;
  std::string source;
  if (const int64_t n = absl::GetFlag(FLAGS_passkey_length); n > 0) {
    auto c =
        ramba::eval::MakePasskeyCase(**tokenizer, n, 0.5, ramba::eval::KeyFormat::kMixed, 1234, 0);
    if (!c.ok()) return Fail(c.status());
    tokens = c->prompt;
    source = "passkey haystack";
  } else {
    const std::string path = absl::GetFlag(FLAGS_text);
    if (path.empty()) return Fail(absl::InvalidArgumentError("give --text or --passkey_length"));
    std::ifstream f(path, std::ios::binary);
    if (!f) return Fail(absl::NotFoundError(path));
    std::stringstream ss;
    ss << f.rdbuf();
    tokens = (*tokenizer)->Encode(ss.str());
    const int64_t length = absl::GetFlag(FLAGS_length);
    if (length <= 0) return Fail(absl::InvalidArgumentError("--length must be positive"));
    if (static_cast<int64_t>(tokens.size()) > length) tokens.resize(length);
    source = path;
  }
  auto state = (*model)->NewSession();
  if (!state.ok()) return Fail(state.status());
  if (auto s = (*model)->Prefill(state->get(), tokens, nullptr, absl::GetFlag(FLAGS_segment));
      !s.ok()) {
    return Fail(s);
  }
  std::printf("%s, %zu tokens (%s)\n", dir.c_str(), tokens.size(), source.c_str());
  if (const std::string dump = absl::GetFlag(FLAGS_dump); !dump.empty()) {
    const ramba::tools::Selections all = backend.All();
    if (auto s = ramba::tools::WriteSelections(dump, all); !s.ok()) return Fail(s);
    std::printf("  wrote %lld rows x %lld picks to %s\n", static_cast<long long>(all.rows()),
                static_cast<long long>(all.per_row), dump.c_str());
  }
  for (int64_t r : block_rows) {
    const ramba::tools::ReuseCount count = backend.Reuse(r);
    std::printf("  %3lld rows per block: %.2f picks per distinct chunk (%lld picks)\n",
                static_cast<long long>(r), count.Ratio(), static_cast<long long>(count.picks));
  }
  return 0;
}
