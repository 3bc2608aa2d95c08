// Tokenizers: byte-level (our own models: token id = byte value) and GPT-NeoX byte-level BPE
// loaded from a HF tokenizer.json (the reference 370M/3B checkpoints).
#ifndef RAMBA_MODEL_TOKENIZER_H_
#define RAMBA_MODEL_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace ramba {

// Thread-safe after construction: all methods are const and may be called concurrently (the BPE
// tokenizer's internal word cache has its own mutex).
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Encodes text, which should be UTF-8. No special tokens are added (no BOS/EOS); special tokens
  // written in the text (e.g. "<|endoftext|>") become their ids. Never fails: ill-formed UTF-8 is
  // encoded byte by byte where the vocab has the byte, else as U+FFFD.
  virtual std::vector<int32_t> Encode(std::string_view text) const = 0;
  // Decodes ids to bytes (possibly an incomplete UTF-8 sequence at the end; callers streaming
  // text should use DecodeToken and buffer). Unknown ids are an InvalidArgument error.
  virtual absl::StatusOr<std::string> Decode(const std::vector<int32_t>& ids) const = 0;
  // The bytes of one token (for streaming output); concatenating DecodeToken over ids equals
  // Decode(ids). Unknown ids are an InvalidArgument error.
  virtual absl::StatusOr<std::string> DecodeToken(int32_t id) const = 0;
  // One past the largest id Encode can return or Decode accepts.
  virtual int64_t vocab_size() const = 0;
  virtual std::string_view kind() const = 0;  // "byte" or "bpe"
};

// Token id = byte value (vocab 256). Any vocab_size >= 256 is accepted: ids >= 256 decode to "".
// A smaller vocab_size is raised to 256.
std::unique_ptr<Tokenizer> CreateByteTokenizer(int64_t vocab_size = 256);

// GPT-2 style byte-level BPE from the text of a HF tokenizer.json ("model": {"type": "BPE",
// "vocab", "merges"}, ByteLevel pre-tokenizer with the GPT-2 split regex, added_tokens).
// Implements what GPT-2/GPT-NeoX files use: normalizer null or NFC, added tokens matched before
// BPE (leftmost-longest; special ones on the raw text, "normalized" ones after NFC), merges by
// rank, ByteLevel decoder. Other options (e.g. add_prefix_space, template post-processors,
// non-BPE models) and malformed files are an InvalidArgument error naming the problem.
// Matches the HF `tokenizers` package's encodings (golden tests in tests/model/).
absl::StatusOr<std::unique_ptr<Tokenizer>> CreateBpeTokenizer(std::string_view tokenizer_json);

// Loads the tokenizer described by a model directory: tokenizer.json when present (BPE), else
// tokenizer_config.json {"type": "byte"} or no file at all -> byte-level with `vocab_size` ids.
// vocab_size is the model's embedding size: a BPE vocab that does not fit it, a byte vocab_size
// below 256, or a tokenizer_config.json of another type is an InvalidArgument error.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& model_dir,
                                                         int64_t vocab_size);

}  // namespace ramba

#endif  // RAMBA_MODEL_TOKENIZER_H_
