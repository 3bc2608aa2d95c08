#include "model/tokenizer.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <queue>
#include <sstream>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"
#include "unicode/bytestream.h"
#include "unicode/normalizer2.h"
#include "unicode/stringpiece.h"
#include "unicode/uchar.h"
#include "unicode/unistr.h"
#include "unicode/utf16.h"

namespace ramba {
namespace {

using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// Byte-level tokenizer.

class ByteTokenizer final : public Tokenizer {
 public:
  explicit ByteTokenizer(int64_t vocab_size) : vocab_size_(vocab_size) {}

  std::vector<int32_t> Encode(std::string_view text) const override {
    std::vector<int32_t> ids(text.size());
    for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<uint8_t>(text[i]);
    return ids;
  }

  absl::StatusOr<std::string> Decode(const std::vector<int32_t>& ids) const override {
    std::string out;
    out.reserve(ids.size());
    for (int32_t id : ids) {
      if (id < 0 || id >= vocab_size_) return UnknownId(id);
      if (id < 256) out.push_back(static_cast<char>(id));
    }
    return out;
  }

  absl::StatusOr<std::string> DecodeToken(int32_t id) const override {
    if (id < 0 || id >= vocab_size_) return UnknownId(id);
    return id < 256 ? std::string(1, static_cast<char>(id)) : std::string();
  }

  int64_t vocab_size() const override { return vocab_size_; }
  std::string_view kind() const override { return "byte"; }

 private:
  absl::Status UnknownId(int32_t id) const {
    return absl::InvalidArgumentError(
        absl::StrCat("byte tokenizer: token id ", id, " outside [0, ", vocab_size_, ")"));
  }
  const int64_t vocab_size_;
};

// ---------------------------------------------------------------------------------------------
// UTF-8 and Unicode classes.

// One step of strict UTF-8 decoding. An ill-formed byte (overlong forms, surrogates and values
// past U+10FFFF included) is returned alone with valid == false, so that byte-level BPE can still
// encode arbitrary bytes and Decode gives them back.
struct Utf8Char {
  char32_t cp;
  int len;
  bool valid;
};

Utf8Char NextChar(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
  const uint8_t c = b(i);
  if (c < 0x80) return {c, 1, true};
  int len;
  char32_t cp, min;
  if (c >= 0xC2 && c <= 0xDF) {
    len = 2, cp = c & 0x1F, min = 0x80;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3, cp = c & 0x0F, min = 0x800;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4, cp = c & 0x07, min = 0x10000;
  } else {
    return {c, 1, false};
  }
  if (i + len > s.size()) return {c, 1, false};
  for (int k = 1; k < len; ++k) {
    const uint8_t t = b(i + k);
    if ((t & 0xC0) != 0x80) return {c, 1, false};
    cp = (cp << 6) | (t & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return {c, 1, false};
  return {cp, len, true};
}

// The classes the GPT-2 split regex distinguishes. kSpace is Oniguruma's Unicode \s (the
// White_Space property); kLetter is \p{L}; kNumber is \p{N}; everything else, ill-formed bytes
// included, is kOther.
enum class CharClass : uint8_t { kLetter, kNumber, kSpace, kOther };

CharClass ClassifyCodePoint(char32_t cp) {
  if (cp < 0x80) {
    if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return CharClass::kLetter;
    if (cp >= '0' && cp <= '9') return CharClass::kNumber;
    if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D)) return CharClass::kSpace;
    return CharClass::kOther;
  }
  if (u_hasBinaryProperty(static_cast<UChar32>(cp), UCHAR_WHITE_SPACE)) return CharClass::kSpace;
  switch (u_charType(static_cast<UChar32>(cp))) {
    case U_UPPERCASE_LETTER:
    case U_LOWERCASE_LETTER:
    case U_TITLECASE_LETTER:
    case U_MODIFIER_LETTER:
    case U_OTHER_LETTER:
      return CharClass::kLetter;
    case U_DECIMAL_DIGIT_NUMBER:
    case U_LETTER_NUMBER:
    case U_OTHER_NUMBER:
      return CharClass::kNumber;
    default:
      return CharClass::kOther;
  }
}

struct ClassifiedChar {
  CharClass cls;
  int len;
};

ClassifiedChar Classify(std::string_view s, size_t i) {
  const Utf8Char c = NextChar(s, i);
  return {c.valid ? ClassifyCodePoint(c.cp) : CharClass::kOther, c.len};
}

// Rust's char::is_whitespace / is_alphanumeric, used by added tokens' lstrip, rstrip, single_word.
bool IsWhitespace(const Utf8Char& c) {
  return c.valid && u_hasBinaryProperty(static_cast<UChar32>(c.cp), UCHAR_WHITE_SPACE);
}
bool IsAlphanumeric(const Utf8Char& c) {
  if (!c.valid) return false;
  const auto cp = static_cast<UChar32>(c.cp);
  const int8_t t = u_charType(cp);
  return u_hasBinaryProperty(cp, UCHAR_ALPHABETIC) || t == U_DECIMAL_DIGIT_NUMBER ||
         t == U_LETTER_NUMBER || t == U_OTHER_NUMBER;
}

// Start of the UTF-8 character that ends just before `end` (ill-formed bytes count alone).
size_t PrevCharStart(std::string_view s, size_t end) {
  for (size_t back = 1; back <= 4 && back <= end; ++back) {
    const size_t start = end - back;
    const Utf8Char c = NextChar(s, start);
    if (c.len == static_cast<int>(back)) return start;
  }
  return end - 1;
}

// The GPT-2 byte -> printable character table (HF `bytes_to_unicode`): vocab and merges spell
// bytes with these characters.
std::array<char32_t, 256> ByteToUnicode() {
  std::array<char32_t, 256> table{};
  std::array<bool, 256> direct{};
  for (int b = '!'; b <= '~'; ++b) direct[b] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
  int next = 0;
  for (int b = 0; b < 256; ++b) table[b] = direct[b] ? b : 256 + next++;
  return table;
}

// ---------------------------------------------------------------------------------------------
// NFC normalisation (ICU). Ill-formed bytes are kept as they are and never combine.

class Normalizer {
 public:
  static absl::StatusOr<Normalizer> Create(bool nfc) {
    Normalizer n;
    if (nfc) {
      UErrorCode err = U_ZERO_ERROR;
      n.nfc_ = icu::Normalizer2::getNFCInstance(err);
      if (U_SUCCESS(err)) n.nfd_ = icu::Normalizer2::getNFDInstance(err);
      if (U_FAILURE(err) || n.nfc_ == nullptr || n.nfd_ == nullptr) {
        return absl::InternalError(absl::StrCat("ICU NFC normalizer: ", u_errorName(err)));
      }
    }
    return n;
  }

  // Appends the normalised form of `s` to `out`.
  void Normalize(std::string_view s, std::string* out) const {
    // Characters below U+0300 are NFC and never compose with a neighbour, and their UTF-8 lead
    // bytes are below 0xCC: most text skips ICU entirely.
    if (nfc_ == nullptr ||
        std::none_of(s.begin(), s.end(), [](char c) { return static_cast<uint8_t>(c) >= 0xCC; })) {
      out->append(s);
      return;
    }
    size_t i = 0;
    while (i < s.size()) {
      size_t j = i;
      while (j < s.size()) {
        const Utf8Char c = NextChar(s, j);
        if (!c.valid) break;
        j += c.len;
      }
      NormalizeValid(s.substr(i, j - i), out);
      if (j < s.size()) out->push_back(s[j++]);  // an ill-formed byte
      i = j;
    }
  }

 private:
  void NormalizeValid(std::string_view s, std::string* out) const {
    if (s.empty()) return;
    if (HasLongMarkRun(s)) {  // before ICU: its quick check is quadratic there too
      NfcLinear(s, out);
      return;
    }
    const icu::StringPiece piece(s.data(), static_cast<int32_t>(s.size()));
    UErrorCode err = U_ZERO_ERROR;
    if (nfc_->isNormalizedUTF8(piece, err) && U_SUCCESS(err)) {
      out->append(s);
      return;
    }
    err = U_ZERO_ERROR;
    std::string normalized;
    icu::StringByteSink<std::string> sink(&normalized);
    nfc_->normalizeUTF8(0, piece, sink, nullptr, err);
    // Valid UTF-8 cannot make NFC fail short of memory exhaustion; keep the input if it does.
    out->append(U_SUCCESS(err) ? std::string_view(normalized) : s);
  }

  // ICU puts combining marks in canonical order with an insertion sort, which is quadratic in a
  // long run of marks ("Zalgo" text: 1 MB took minutes). Text with such a run takes this
  // linear-time path instead: UAX #15's algorithm (full canonical decomposition, stable sort of
  // each run of marks by combining class, canonical composition) with ICU's per-character
  // decompositions and pair compositions. The test run with kLongMarkRun = -1 (every string
  // down this path) matched all NFC goldens.
#ifndef RAMBA_TOKENIZER_LONG_MARK_RUN
#define RAMBA_TOKENIZER_LONG_MARK_RUN 32
#endif
  static constexpr int kLongMarkRun = RAMBA_TOKENIZER_LONG_MARK_RUN;

  static bool HasLongMarkRun(std::string_view s) {
    if (kLongMarkRun < 0) return true;  // testing: every string takes the linear path
    int run = 0;
    for (size_t i = 0; i < s.size();) {
      const Utf8Char c = NextChar(s, i);
      i += c.len;
      if (c.cp < 0x300) {
        run = 0;
      } else if (u_getCombiningClass(static_cast<UChar32>(c.cp)) != 0) {
        if (++run > kLongMarkRun) return true;
      } else {
        run = 0;
      }
    }
    return false;
  }

  void NfcLinear(std::string_view s, std::string* out) const {
    const auto ccc = [](char32_t cp) { return u_getCombiningClass(static_cast<UChar32>(cp)); };
    // Decompose.
    std::vector<char32_t> cps;
    cps.reserve(s.size());
    icu::UnicodeString decomposition;
    for (size_t i = 0; i < s.size();) {
      const Utf8Char c = NextChar(s, i);
      i += c.len;
      if (!nfd_->getDecomposition(static_cast<UChar32>(c.cp), decomposition)) {
        cps.push_back(c.cp);
        continue;
      }
      for (int32_t k = 0; k < decomposition.length();) {
        const UChar32 d = decomposition.char32At(k);
        cps.push_back(static_cast<char32_t>(d));
        k += U16_LENGTH(d);
      }
    }
    // Canonical order.
    for (size_t i = 0; i < cps.size();) {
      if (ccc(cps[i]) == 0) {
        ++i;
        continue;
      }
      size_t j = i;
      while (j < cps.size() && ccc(cps[j]) != 0) ++j;
      std::stable_sort(cps.begin() + i, cps.begin() + j,
                       [&](char32_t a, char32_t b) { return ccc(a) < ccc(b); });
      i = j;
    }
    // Compose: a character joins the last starter unless a character between them is a starter
    // or has a combining class at least its own ("blocked").
    std::vector<char32_t> composed;
    composed.reserve(cps.size());
    int starter = -1;  // index in `composed`
    int last_class = -1;
    for (char32_t cp : cps) {
      const int cls = ccc(cp);
      if (starter >= 0) {
        const bool blocked = !(last_class < cls || last_class == 0) ||
                             (last_class == 0 && starter + 1 != static_cast<int>(composed.size()));
        if (!blocked) {
          const UChar32 pair = nfc_->composePair(static_cast<UChar32>(composed[starter]),
                                                 static_cast<UChar32>(cp));
          if (pair >= 0) {
            composed[starter] = static_cast<char32_t>(pair);
            continue;
          }
        }
      }
      if (cls == 0) starter = static_cast<int>(composed.size());
      last_class = cls;
      composed.push_back(cp);
    }
    for (char32_t cp : composed) AppendUtf8(cp, out);
  }

  static void AppendUtf8(char32_t cp, std::string* out) {
    if (cp < 0x80) {
      out->push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  const icu::Normalizer2* nfc_ = nullptr;
  const icu::Normalizer2* nfd_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// Added tokens: a byte trie giving the leftmost-longest match, as HF's Aho-Corasick
// (MatchKind::LeftmostLongest) does.

struct AddedToken {
  std::string content;  // as matched: normalised for normalized tokens
  int32_t id;
  bool single_word, lstrip, rstrip;
};

class AddedTokenMatcher {
 public:
  AddedTokenMatcher() : nodes_(1) {}

  void Add(AddedToken token) {
    if (token.content.empty()) return;  // HF ignores empty added tokens too
    int node = 0;
    for (char c : token.content) {
      auto [it, inserted] = nodes_[node].next.try_emplace(static_cast<uint8_t>(c), 0);
      if (inserted) {
        it->second = static_cast<int>(nodes_.size());
        nodes_.emplace_back();
      }
      node = it->second;
    }
    if (nodes_[node].token < 0) {
      nodes_[node].token = static_cast<int>(tokens_.size());
      tokens_.push_back(std::move(token));
    }
  }

  bool empty() const { return tokens_.empty(); }

  // Splits `s` into plain pieces and added tokens, calling plain(piece) and added(id) in order.
  template <typename Plain, typename Added>
  void Split(std::string_view s, Plain&& plain, Added&& added) const {
    if (tokens_.empty()) {
      plain(s);
      return;
    }
    size_t emitted = 0;  // HF's start_offset
    size_t i = 0;
    while (i < s.size()) {
      int best = -1;
      size_t best_end = 0;
      int node = 0;
      for (size_t k = i; k < s.size(); ++k) {
        auto it = nodes_[node].next.find(static_cast<uint8_t>(s[k]));
        if (it == nodes_[node].next.end()) break;
        node = it->second;
        if (nodes_[node].token >= 0) best = nodes_[node].token, best_end = k + 1;
      }
      if (best < 0) {
        ++i;
        continue;
      }
      const AddedToken& tok = tokens_[best];
      size_t start = i, stop = best_end;
      if (tok.single_word) {
        const bool start_ok = start == 0 || !IsAlphanumeric(NextChar(s, PrevCharStart(s, start)));
        const bool stop_ok = stop == s.size() || !IsAlphanumeric(NextChar(s, stop));
        if (!start_ok || !stop_ok) {
          // HF's find_iter resumes after the rejected match, not inside it.
          i = best_end;
          continue;
        }
      }
      if (tok.lstrip) {
        size_t new_start = start;
        while (new_start > 0) {
          const size_t p = PrevCharStart(s, new_start);
          if (!IsWhitespace(NextChar(s, p))) break;
          new_start = p;
        }
        start = std::max(new_start, emitted);
      }
      if (tok.rstrip) {
        while (stop < s.size()) {
          const Utf8Char c = NextChar(s, stop);
          if (!IsWhitespace(c)) break;
          stop += c.len;
        }
      }
      if (emitted < start) plain(s.substr(emitted, start - emitted));
      added(tok.id);
      emitted = stop;
      i = std::max(best_end, stop);
    }
    if (emitted < s.size()) plain(s.substr(emitted));
  }

 private:
  struct Node {
    absl::flat_hash_map<uint8_t, int> next;
    int token = -1;
  };
  std::vector<Node> nodes_;
  std::vector<AddedToken> tokens_;
};

// ---------------------------------------------------------------------------------------------
// The GPT-2 pre-tokenizer split, a hand-written form of
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// with the regex's leftmost-first alternation semantics.

template <typename Fn>
void SplitGpt2(std::string_view s, Fn&& emit) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const size_t start = i;
    if (s[i] == '\'' && i + 1 < n) {
      static constexpr std::string_view kSuffixes[] = {"s", "t", "re", "ve", "m", "ll", "d"};
      const std::string_view rest = s.substr(i + 1);
      size_t len = 0;
      for (std::string_view suf : kSuffixes) {
        if (rest.substr(0, suf.size()) == suf) {
          len = suf.size();
          break;
        }
      }
      if (len > 0) {
        emit(s.substr(start, 1 + len));
        i += 1 + len;
        continue;
      }
    }
    ClassifiedChar c = Classify(s, i);
    size_t run = i;  // where the class run starts (after an optional leading space)
    if (s[i] == ' ' && i + 1 < n) {
      const ClassifiedChar c2 = Classify(s, i + 1);
      if (c2.cls != CharClass::kSpace) c = c2, run = i + 1;
    }
    if (c.cls != CharClass::kSpace) {
      i = run + c.len;
      while (i < n) {
        const ClassifiedChar d = Classify(s, i);
        if (d.cls != c.cls) break;
        i += d.len;
      }
      emit(s.substr(start, i - start));
      continue;
    }
    // Whitespace: \s+(?!\S) takes the run but its last character when a non-space follows and
    // the run has two or more characters; otherwise \s+ takes the whole run.
    size_t last = i;
    i += c.len;
    while (i < n) {
      const ClassifiedChar d = Classify(s, i);
      if (d.cls != CharClass::kSpace) break;
      last = i;
      i += d.len;
    }
    if (i < n && last > start) i = last;
    emit(s.substr(start, i - start));
  }
}

// ---------------------------------------------------------------------------------------------
// Byte-level BPE.

class BpeTokenizer final : public Tokenizer {
 public:
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };

  struct Config {
    bool nfc = false;
    bool use_regex = true;
    bool ignore_merges = false;
    int32_t unk_id = -1;
    bool fuse_unk = false;
    std::array<int32_t, 256> byte_ids;                  // -1: no vocab entry
    std::array<bool, 256> unspellable{};                // a non-UTF-8 byte with no vocab entry
    absl::flat_hash_map<std::string, int32_t> word_ids;  // raw bytes -> id (ignore_merges)
    absl::flat_hash_map<uint64_t, Merge> merges;        // (left id, right id) -> merge
    std::vector<std::string> id_bytes;                  // id -> decoded bytes
    std::vector<bool> id_known;
    AddedTokenMatcher raw_added, normalized_added;
  };

  BpeTokenizer(Config config, Normalizer normalizer)
      : c_(std::move(config)), normalizer_(normalizer) {}

  std::vector<int32_t> Encode(std::string_view text) const override {
    // Bytes that never occur in UTF-8 (0xC0, 0xC1, 0xF5-0xFF) have no token in vocabs trained
    // on UTF-8 text; rather than drop them silently, spell them U+FFFD as a lossy decoder would.
    std::string sanitized;
    if (std::any_of(text.begin(), text.end(),
                    [&](char ch) { return c_.unspellable[static_cast<uint8_t>(ch)]; })) {
      for (char ch : text) {
        if (c_.unspellable[static_cast<uint8_t>(ch)]) {
          sanitized += "\xEF\xBF\xBD";
        } else {
          sanitized.push_back(ch);
        }
      }
      text = sanitized;
    }
    std::vector<int32_t> ids;
    ids.reserve(text.size() / 3 + 1);
    std::string normalized;
    c_.raw_added.Split(
        text,
        [&](std::string_view piece) {
          normalized.clear();
          normalizer_.Normalize(piece, &normalized);
          c_.normalized_added.Split(
              normalized, [&](std::string_view p) { EncodePlain(p, &ids); },
              [&](int32_t id) { ids.push_back(id); });
        },
        [&](int32_t id) { ids.push_back(id); });
    return ids;
  }

  absl::StatusOr<std::string> Decode(const std::vector<int32_t>& ids) const override {
    std::string out;
    for (int32_t id : ids) {
      if (!Known(id)) return UnknownId(id);
      out += c_.id_bytes[id];
    }
    return out;
  }

  absl::StatusOr<std::string> DecodeToken(int32_t id) const override {
    if (!Known(id)) return UnknownId(id);
    return c_.id_bytes[id];
  }

  int64_t vocab_size() const override { return static_cast<int64_t>(c_.id_bytes.size()); }
  std::string_view kind() const override { return "bpe"; }

 private:
  // Words longer than this are not cached (they are rare and would bloat the cache); the cache is
  // emptied when it reaches kMaxCacheEntries, which bounds its memory at a few tens of MB.
  static constexpr size_t kMaxCachedWordBytes = 64;
  static constexpr size_t kMaxCacheEntries = 1 << 17;

  bool Known(int32_t id) const {
    return id >= 0 && static_cast<size_t>(id) < c_.id_known.size() && c_.id_known[id];
  }
  absl::Status UnknownId(int32_t id) const {
    return absl::InvalidArgumentError(absl::StrCat("bpe tokenizer: unknown token id ", id,
                                                   " (vocab size ", vocab_size(), ")"));
  }

  void EncodePlain(std::string_view s, std::vector<int32_t>* ids) const {
    if (!c_.use_regex) {
      EncodeWord(s, ids);
      return;
    }
    SplitGpt2(s, [&](std::string_view word) { EncodeWord(word, ids); });
  }

  void EncodeWord(std::string_view word, std::vector<int32_t>* ids) const {
    if (word.size() == 1 && c_.byte_ids[static_cast<uint8_t>(word[0])] >= 0) {
      ids->push_back(c_.byte_ids[static_cast<uint8_t>(word[0])]);
      return;
    }
    const bool cacheable = word.size() <= kMaxCachedWordBytes;
    if (cacheable) {
      absl::ReaderMutexLock lock(&cache_mu_);
      auto it = cache_.find(absl::string_view(word.data(), word.size()));
      if (it != cache_.end()) {
        ids->insert(ids->end(), it->second.begin(), it->second.end());
        return;
      }
    }
    const size_t before = ids->size();
    MergeWord(word, ids);
    if (cacheable) {
      std::vector<int32_t> value(ids->begin() + before, ids->end());
      absl::MutexLock lock(&cache_mu_);
      if (cache_.size() >= kMaxCacheEntries) cache_.clear();
      cache_.try_emplace(std::string(word), std::move(value));
    }
  }

  // HF's Word::merge_all: repeatedly applies the lowest-ranked merge, leftmost first.
  void MergeWord(std::string_view word, std::vector<int32_t>* ids) const {
    if (c_.ignore_merges) {
      auto it = c_.word_ids.find(absl::string_view(word.data(), word.size()));
      if (it != c_.word_ids.end()) {
        ids->push_back(it->second);
        return;
      }
    }
    struct Symbol {
      int32_t id;
      int prev, next;
      bool alive;
    };
    std::vector<Symbol> sym;
    sym.reserve(word.size());
    for (char ch : word) {
      int32_t id = c_.byte_ids[static_cast<uint8_t>(ch)];
      if (id < 0) {
        if (c_.unk_id < 0) continue;  // HF drops characters it cannot spell without an unk token
        if (c_.fuse_unk && !sym.empty() && sym.back().id == c_.unk_id) continue;
        id = c_.unk_id;
      }
      const int pos = static_cast<int>(sym.size());
      sym.push_back({id, pos - 1, pos + 1, true});
    }
    if (sym.empty()) return;
    sym.back().next = -1;

    struct Candidate {
      int32_t rank;
      int pos;
      int32_t new_id;
      bool operator>(const Candidate& o) const {
        return rank != o.rank ? rank > o.rank : pos > o.pos;
      }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
    const auto find = [&](int32_t a, int32_t b) -> const Merge* {
      auto it = c_.merges.find(PairKey(a, b));
      return it == c_.merges.end() ? nullptr : &it->second;
    };
    for (size_t p = 0; p + 1 < sym.size(); ++p) {
      if (const Merge* m = find(sym[p].id, sym[p + 1].id)) {
        queue.push({m->rank, static_cast<int>(p), m->new_id});
      }
    }
    while (!queue.empty()) {
      const Candidate top = queue.top();
      queue.pop();
      Symbol& left = sym[top.pos];
      if (!left.alive || left.next < 0) continue;
      Symbol& right = sym[left.next];
      const Merge* m = find(left.id, right.id);
      if (m == nullptr || m->new_id != top.new_id) continue;  // stale candidate
      left.id = top.new_id;
      right.alive = false;
      left.next = right.next;
      if (left.next >= 0) sym[left.next].prev = top.pos;
      if (left.prev >= 0) {
        if (const Merge* pm = find(sym[left.prev].id, left.id)) {
          queue.push({pm->rank, left.prev, pm->new_id});
        }
      }
      if (left.next >= 0) {
        if (const Merge* nm = find(left.id, sym[left.next].id)) {
          queue.push({nm->rank, top.pos, nm->new_id});
        }
      }
    }
    for (int p = 0; p >= 0; p = sym[p].next) ids->push_back(sym[p].id);
  }

 public:
  static uint64_t PairKey(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

 private:
  const Config c_;
  const Normalizer normalizer_;
  mutable absl::Mutex cache_mu_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_
      ABSL_GUARDED_BY(cache_mu_);
};

// ---------------------------------------------------------------------------------------------
// tokenizer.json parsing.

absl::Status Invalid(std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("tokenizer.json: ", absl::string_view(what.data(), what.size())));
}

// Maps a vocab/merge string spelled in the byte-level alphabet back to raw bytes; false when it
// holds a character outside that alphabet (such a token can never come out of the byte-level
// pre-tokenizer).
bool ByteLevelToBytes(std::string_view s, const absl::flat_hash_map<char32_t, uint8_t>& inverse,
                      std::string* out) {
  out->clear();
  for (size_t i = 0; i < s.size();) {
    const Utf8Char c = NextChar(s, i);
    if (!c.valid) return false;
    auto it = inverse.find(c.cp);
    if (it == inverse.end()) return false;
    out->push_back(static_cast<char>(it->second));
    i += c.len;
  }
  return true;
}

bool IsNullOr(const json& j, const char* key, const char* type) {
  return !j.contains(key) || j[key].is_null() ||
         (j[key].is_object() && j[key].value("type", std::string()) == type);
}

// The normalizer: null, NFC, or a Sequence of those.
absl::StatusOr<bool> ParseNormalizer(const json& n) {
  if (n.is_null()) return false;
  if (!n.is_object()) return Invalid("\"normalizer\" is not an object");
  const std::string type = n.value("type", std::string());
  if (type == "NFC") return true;
  if (type == "Sequence" && n.contains("normalizers") && n["normalizers"].is_array()) {
    bool nfc = false;
    for (const json& sub : n["normalizers"]) {
      ASSIGN_OR_RETURN(bool sub_nfc, ParseNormalizer(sub));
      nfc = nfc || sub_nfc;
    }
    return nfc;
  }
  return Invalid(absl::StrCat("unsupported normalizer \"", type, "\" (supported: NFC)"));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> ParseBpe(const json& root) {
  if (!root.is_object()) return Invalid("top level is not an object");
  if (!root.contains("model") || !root["model"].is_object()) return Invalid("no \"model\" object");
  const json& model = root["model"];
  const std::string type = model.value("type", std::string());
  if (type != "BPE") {
    return Invalid(absl::StrCat("model type is \"", type, "\"; only \"BPE\" is supported"));
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(key) && !model[key].is_null() &&
        !(model[key].is_string() && model[key].get<std::string>().empty())) {
      return Invalid(absl::StrCat("unsupported BPE option \"", key, "\""));
    }
  }
  if (model.contains("dropout") && model["dropout"].is_number() &&
      model["dropout"].get<double>() > 0.0) {
    return Invalid("BPE dropout is not supported (encodings would be random)");
  }

  BpeTokenizer::Config cfg;
  cfg.ignore_merges = model.value("ignore_merges", false);
  cfg.fuse_unk = model.value("fuse_unk", false);

  if (!root.contains("pre_tokenizer") || !root["pre_tokenizer"].is_object() ||
      root["pre_tokenizer"].value("type", std::string()) != "ByteLevel") {
    return Invalid("pre_tokenizer must be ByteLevel (byte-level BPE)");
  }
  const json& pre = root["pre_tokenizer"];
  if (pre.value("add_prefix_space", false)) {
    return Invalid("ByteLevel add_prefix_space=true is not supported");
  }
  cfg.use_regex = pre.value("use_regex", true);
  if (!IsNullOr(root, "decoder", "ByteLevel")) return Invalid("decoder must be ByteLevel or null");
  if (!IsNullOr(root, "post_processor", "ByteLevel")) {
    return Invalid("post_processor must be ByteLevel or null (no template special tokens)");
  }
  ASSIGN_OR_RETURN(cfg.nfc, ParseNormalizer(root.contains("normalizer") ? root["normalizer"]
                                                                         : json(nullptr)));

  const std::array<char32_t, 256> byte_to_unicode = ByteToUnicode();
  absl::flat_hash_map<char32_t, uint8_t> unicode_to_byte;
  for (int b = 0; b < 256; ++b) unicode_to_byte[byte_to_unicode[b]] = static_cast<uint8_t>(b);

  // Vocab.
  if (!model.contains("vocab") || !model["vocab"].is_object()) {
    return Invalid("model has no \"vocab\" object");
  }
  const json& vocab_json = model["vocab"];
  absl::flat_hash_map<std::string, int32_t> vocab;  // as spelled in the file
  vocab.reserve(vocab_json.size());
  int64_t max_id = -1;
  for (auto it = vocab_json.begin(); it != vocab_json.end(); ++it) {
    if (!it.value().is_number_integer()) {
      return Invalid(absl::StrCat("vocab entry \"", it.key(), "\" has a non-integer id"));
    }
    const int64_t id = it.value().get<int64_t>();
    if (id < 0 || id > (1 << 30)) {
      return Invalid(absl::StrCat("vocab entry \"", it.key(), "\" has id ", id, " out of range"));
    }
    vocab[it.key()] = static_cast<int32_t>(id);
    max_id = std::max(max_id, id);
  }

  // Added tokens.
  std::vector<std::pair<AddedToken, bool>> added;  // token, normalized
  if (root.contains("added_tokens") && !root["added_tokens"].is_null()) {
    if (!root["added_tokens"].is_array()) return Invalid("\"added_tokens\" is not an array");
    for (const json& t : root["added_tokens"]) {
      if (!t.is_object() || !t.contains("id") || !t["id"].is_number_integer() ||
          !t.contains("content") || !t["content"].is_string()) {
        return Invalid("an added token lacks an integer \"id\" or a string \"content\"");
      }
      const int64_t id = t["id"].get<int64_t>();
      if (id < 0 || id > (1 << 30)) return Invalid(absl::StrCat("added token id ", id));
      max_id = std::max(max_id, id);
      AddedToken tok{t["content"].get<std::string>(), static_cast<int32_t>(id),
                     t.value("single_word", false), t.value("lstrip", false),
                     t.value("rstrip", false)};
      // HF's default: special tokens are matched on the raw text, others after normalisation.
      const bool normalized = t.value("normalized", !t.value("special", false));
      added.emplace_back(std::move(tok), normalized);
    }
  }
  if (max_id < 0) return Invalid("empty vocab");

  cfg.id_bytes.assign(max_id + 1, std::string());
  cfg.id_known.assign(max_id + 1, false);
  cfg.byte_ids.fill(-1);
  std::string bytes;
  // Decoding follows HF's ByteLevel decoder: a token spelled entirely in the byte alphabet decodes
  // to those bytes, any other token to its own UTF-8 text.
  const auto set_decode = [&](const std::string& spelled, int32_t id) {
    cfg.id_bytes[id] = ByteLevelToBytes(spelled, unicode_to_byte, &bytes) ? bytes : spelled;
    cfg.id_known[id] = true;
  };
  for (const auto& [spelled, id] : vocab) {
    set_decode(spelled, id);
    if (ByteLevelToBytes(spelled, unicode_to_byte, &bytes)) {
      if (bytes.size() == 1) cfg.byte_ids[static_cast<uint8_t>(bytes[0])] = id;
      if (cfg.ignore_merges) cfg.word_ids[bytes] = id;
    }
  }
  for (const auto& [tok, normalized] : added) set_decode(tok.content, tok.id);
  for (int b = 0; b < 256; ++b) {
    const bool never_utf8 = b == 0xC0 || b == 0xC1 || b >= 0xF5;
    cfg.unspellable[b] = never_utf8 && cfg.byte_ids[b] < 0;
  }

  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    auto it = vocab.find(model["unk_token"].get<std::string>());
    if (it == vocab.end()) return Invalid("unk_token is not in the vocab");
    cfg.unk_id = it->second;
  }

  // Merges: "left right" strings (older files) or [left, right] pairs (newer files); rank = index.
  if (!model.contains("merges") || !model["merges"].is_array()) {
    return Invalid("model has no \"merges\" array");
  }
  const json& merges = model["merges"];
  cfg.merges.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const json& m = merges[rank];
    std::string left, right;
    if (m.is_string()) {
      const std::string& s = m.get_ref<const std::string&>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || sp == 0 || sp + 1 == s.size() ||
          s.find(' ', sp + 1) != std::string::npos) {
        return Invalid(absl::StrCat("merge ", rank, " (\"", s, "\") is not \"left right\""));
      }
      left = s.substr(0, sp);
      right = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else {
      return Invalid(absl::StrCat("merge ", rank, " is neither \"left right\" nor a pair"));
    }
    const auto l = vocab.find(left), r = vocab.find(right), lr = vocab.find(left + right);
    if (l == vocab.end() || r == vocab.end() || lr == vocab.end()) {
      return Invalid(absl::StrCat("merge ", rank, " (\"", left, "\", \"", right,
                                  "\") uses a token missing from the vocab"));
    }
    // The first (lowest-ranked) occurrence of a pair wins, as in HF.
    cfg.merges.try_emplace(BpeTokenizer::PairKey(l->second, r->second),
                           BpeTokenizer::Merge{static_cast<int32_t>(rank), lr->second});
  }

  ASSIGN_OR_RETURN(Normalizer normalizer, Normalizer::Create(cfg.nfc));
  for (auto& [tok, normalized] : added) {
    if (normalized) {
      std::string content;
      normalizer.Normalize(tok.content, &content);
      tok.content = std::move(content);
      cfg.normalized_added.Add(std::move(tok));
    } else {
      cfg.raw_added.Add(std::move(tok));
    }
  }
  return std::unique_ptr<Tokenizer>(new BpeTokenizer(std::move(cfg), normalizer));
}

absl::StatusOr<std::string> ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path.string()));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("cannot read ", path.string()));
  return std::move(ss).str();
}

}  // namespace

std::unique_ptr<Tokenizer> CreateByteTokenizer(int64_t vocab_size) {
  return std::make_unique<ByteTokenizer>(std::max<int64_t>(vocab_size, 256));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> CreateBpeTokenizer(std::string_view tokenizer_json) {
  json root = json::parse(tokenizer_json.begin(), tokenizer_json.end(), nullptr,
                          /*allow_exceptions=*/false);
  if (root.is_discarded()) return Invalid("not valid JSON");
  try {
    return ParseBpe(root);
  } catch (const json::exception& e) {
    // A field of an unexpected JSON type that the checks above did not anticipate.
    return Invalid(e.what());
  }
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& model_dir,
                                                         int64_t vocab_size) {
  namespace fs = std::filesystem;
  const fs::path dir(model_dir);
  std::error_code ec;
  if (fs::exists(dir / "tokenizer.json", ec)) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(dir / "tokenizer.json"));
    auto tok = CreateBpeTokenizer(text);
    if (!tok.ok()) {
      return absl::Status(tok.status().code(),
                          absl::StrCat(model_dir, "/", tok.status().message()));
    }
    if (vocab_size > 0 && (*tok)->vocab_size() > vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat(model_dir, "/tokenizer.json: ", (*tok)->vocab_size(),
                       " token ids do not fit the model's vocab_size ", vocab_size));
    }
    return tok;
  }
  if (vocab_size < 256) {
    return absl::InvalidArgumentError(absl::StrCat(
        model_dir, ": byte-level tokenizer needs vocab_size >= 256, got ", vocab_size));
  }
  if (fs::exists(dir / "tokenizer_config.json", ec)) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(dir / "tokenizer_config.json"));
    const json cfg = json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (cfg.is_discarded() || !cfg.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(model_dir, "/tokenizer_config.json: not a JSON object"));
    }
    const auto type = cfg.find("type");
    if (type == cfg.end() || !type->is_string() || type->get<std::string>() != "byte") {
      return absl::InvalidArgumentError(absl::StrCat(
          model_dir, "/tokenizer_config.json: \"type\" must be \"byte\" when there is no "
                     "tokenizer.json"));
    }
  }
  return CreateByteTokenizer(vocab_size);
}

}  // namespace ramba
