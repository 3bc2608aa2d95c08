// Tests model/tokenizer.h. The GPT-NeoX goldens (tests/fixtures/tokenizer/) come from the HF
// `tokenizers` package via scripts/make_tokenizer_goldens.py.
#include "model/tokenizer.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace ramba {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string ReadFileOrEmpty(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "";
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The shared GPT-NeoX-20B tokenizer.json: next to the checkout, or under $RAMBA_SHARED_DIR.
fs::path NeoxTokenizerPath() {
  const fs::path rel = "data/gpt-neox-20b/tokenizer.json";
  const fs::path beside = fs::path(RAMBA_SOURCE_DIR "/../shared") / rel;
  if (fs::exists(beside)) return beside;
  if (const char* env = std::getenv("RAMBA_SHARED_DIR"); env != nullptr && *env != '\0') {
    if (fs::exists(fs::path(env) / rel)) return fs::path(env) / rel;
  }
  return {};
}

json ReadFixture(const std::string& name) {
  const std::string text =
      ReadFileOrEmpty(fs::path(RAMBA_SOURCE_DIR "/tests/fixtures/tokenizer") / name);
  return json::parse(text, nullptr, /*allow_exceptions=*/false);
}

std::string Show(std::string_view s) {  // JSON-escaped, for failure messages
  return json(std::string(s)).dump(-1, ' ', /*ensure_ascii=*/true,
                                   json::error_handler_t::replace);
}

// Loaded once: parsing the 2 MB tokenizer.json takes a noticeable fraction of a second.
class NeoxTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const fs::path path = NeoxTokenizerPath();
    if (path.empty()) return;
    auto tok = CreateBpeTokenizer(ReadFileOrEmpty(path));
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = std::move(tok).value().release();
  }
  static void TearDownTestSuite() {
    delete tok_;
    tok_ = nullptr;
  }
  void SetUp() override {
    if (tok_ == nullptr) {
      GTEST_SKIP() << "GPT-NeoX tokenizer.json not found beside the checkout "
                      "(../shared/data/gpt-neox-20b/) nor under $RAMBA_SHARED_DIR";
    }
  }

  // Checks every case of a golden file; returns how many passed.
  static int CheckGoldens(const json& cases) {
    int passed = 0;
    for (const json& c : cases) {
      const std::string text = c["text"].get<std::string>();
      const std::vector<int32_t> want = c["ids"].get<std::vector<int32_t>>();
      const std::string label = c.contains("name") ? c["name"].get<std::string>() : Show(text);
      const std::vector<int32_t> got = tok_->Encode(text);
      EXPECT_EQ(got, want) << label << ": text " << Show(text);
      auto decoded = tok_->Decode(want);
      EXPECT_TRUE(decoded.ok()) << label << ": " << decoded.status();
      if (!decoded.ok()) continue;
      EXPECT_EQ(*decoded, c["decode"].get<std::string>()) << label;
      if (c["roundtrip"].get<bool>()) {
        EXPECT_EQ(*decoded, text) << label;
      }
      std::string concat;
      for (int32_t id : want) concat += tok_->DecodeToken(id).value();
      EXPECT_EQ(concat, *decoded) << label;
      if (got == want && *decoded == c["decode"].get<std::string>()) ++passed;
    }
    return passed;
  }

  static Tokenizer* tok_;
};
Tokenizer* NeoxTest::tok_ = nullptr;

TEST_F(NeoxTest, MatchesHfGoldens) {
  const json golden = ReadFixture("neox_golden.json");
  ASSERT_FALSE(golden.is_discarded()) << "tests/fixtures/tokenizer/neox_golden.json";
  ASSERT_GE(golden["cases"].size(), 60u);
  const int passed = CheckGoldens(golden["cases"]);
  EXPECT_EQ(passed, static_cast<int>(golden["cases"].size()));
}

TEST_F(NeoxTest, MatchesHfFuzzGoldens) {
  const json golden = ReadFixture("neox_fuzz_golden.json");
  ASSERT_FALSE(golden.is_discarded()) << "tests/fixtures/tokenizer/neox_fuzz_golden.json";
  ASSERT_GE(golden["cases"].size(), 100u);
  const int passed = CheckGoldens(golden["cases"]);
  EXPECT_EQ(passed, static_cast<int>(golden["cases"].size()));
}

TEST_F(NeoxTest, Basics) {
  EXPECT_EQ(tok_->kind(), "bpe");
  EXPECT_EQ(tok_->vocab_size(), 50277);  // 50254 vocab entries + 23 added whitespace tokens
  EXPECT_THAT(tok_->Encode("<|endoftext|>"), ElementsAre(0));
  EXPECT_THAT(tok_->Encode(""), ElementsAre());
  EXPECT_EQ(tok_->DecodeToken(0).value(), "<|endoftext|>");
}

TEST_F(NeoxTest, UnknownIdIsInvalidArgument) {
  for (int32_t bad : {-1, 50277, 1 << 30}) {
    auto decoded = tok_->Decode({510, bad});
    EXPECT_EQ(decoded.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_EQ(tok_->DecodeToken(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST_F(NeoxTest, IllFormedUtf8) {
  // HF cannot take ill-formed UTF-8. Bytes that have a token are kept one by one, so truncated
  // and surrogate sequences round-trip; bytes that never occur in UTF-8 have no token in the
  // NeoX vocab and become U+FFFD.
  const std::string text = "ok bad \xc3 half \xed\xa0\x80 surrogate \xe2\x82";
  EXPECT_EQ(tok_->Decode(tok_->Encode(text)).value(), text);
  EXPECT_EQ(tok_->Decode(tok_->Encode("a\xff\xc0z")).value(), "a\uFFFD\uFFFDz");
  EXPECT_EQ(tok_->Encode("a\xffz"), tok_->Encode("a\uFFFDz"));
}

TEST_F(NeoxTest, LongCombiningMarkRunsNormalize) {
  // More than 32 marks in a row take the linear-time NFC path (ICU's reordering is quadratic);
  // the expected strings are Python's unicodedata.normalize("NFC", ...).
  std::string zalgo = "e", want = "\u1EB9";
  std::string hangul = "\u1100\u1161\u11A8", want_hangul = "\uAC01";
  for (int i = 0; i < 20; ++i) zalgo += "\u0301\u0323", hangul += "\u0301\u0323";
  for (int i = 0; i < 19; ++i) want += "\u0323";
  for (int i = 0; i < 20; ++i) want_hangul += "\u0323";
  for (int i = 0; i < 20; ++i) want += "\u0301", want_hangul += "\u0301";
  EXPECT_EQ(tok_->Decode(tok_->Encode("x " + zalgo + " y")).value(), "x " + want + " y");
  EXPECT_EQ(tok_->Decode(tok_->Encode(hangul)).value(), want_hangul);
  EXPECT_EQ(tok_->Encode(zalgo), tok_->Encode(want));
}

TEST_F(NeoxTest, ConcurrentEncodesAgree) {
  std::string text;
  for (int i = 0; i < 200; ++i) text += "Thread " + std::to_string(i) + " encodes caf\u00e9s. ";
  const std::vector<int32_t> want = tok_->Encode(text);
  std::vector<std::thread> threads;
  std::vector<bool> ok(8);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      bool all = true;
      for (int k = 0; k < 20; ++k) all = all && tok_->Encode(text) == want;
      ok[t] = all;
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 8; ++t) EXPECT_TRUE(ok[t]) << "thread " << t;
}

TEST(ByteTokenizerTest, RoundTrip) {
  auto tok = CreateByteTokenizer();
  EXPECT_EQ(tok->kind(), "byte");
  EXPECT_EQ(tok->vocab_size(), 256);
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  const std::vector<int32_t> ids = tok->Encode(all);
  ASSERT_EQ(ids.size(), 256u);
  for (int b = 0; b < 256; ++b) EXPECT_EQ(ids[b], b);
  EXPECT_EQ(tok->Decode(ids).value(), all);
  std::string concat;
  for (int32_t id : ids) concat += tok->DecodeToken(id).value();
  EXPECT_EQ(concat, all);

  std::mt19937 rng(7);
  std::string random(1000, '\0');
  for (char& c : random) c = static_cast<char>(rng() & 0xFF);
  EXPECT_EQ(tok->Decode(tok->Encode(random)).value(), random);
}

TEST(ByteTokenizerTest, LargerVocabAndUnknownIds) {
  auto tok = CreateByteTokenizer(260);
  EXPECT_EQ(tok->vocab_size(), 260);
  EXPECT_EQ(tok->Decode({'h', 257, 'i'}).value(), "hi");
  EXPECT_EQ(tok->DecodeToken(259).value(), "");
  EXPECT_EQ(tok->Decode({'h', 260}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tok->Decode({-1}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tok->DecodeToken(260).status().code(), absl::StatusCode::kInvalidArgument);
}

// A tiny valid tokenizer.json: bytes 'a', 'b', 'c' spell themselves in the byte-level alphabet,
// and 'Ġ' is the space byte.
json TinyBpe() {
  return json::parse(R"({
    "added_tokens": [{"id": 6, "content": "<|eot|>", "special": true, "normalized": false}],
    "normalizer": {"type": "NFC"},
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
    "post_processor": {"type": "ByteLevel"},
    "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "Ġ": 4, "Ġab": 5},
              "merges": ["a b", "Ġ ab"]}
  })");
}

TEST(BpeTokenizerTest, TinyVocab) {
  auto tok = CreateBpeTokenizer(TinyBpe().dump());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_THAT((*tok)->Encode("ab ab"), ElementsAre(3, 5));
  EXPECT_THAT((*tok)->Encode("ba<|eot|>c"), ElementsAre(1, 0, 6, 2));
  EXPECT_THAT((*tok)->Encode("a[b"), ElementsAre(0, 1));  // '[' is not in the vocab: dropped
  EXPECT_EQ((*tok)->Decode({3, 5, 6}).value(), "ab ab<|eot|>");
  EXPECT_EQ((*tok)->vocab_size(), 7);
}

TEST(BpeTokenizerTest, MergesAsPairs) {
  json j = TinyBpe();
  j["model"]["merges"] = json::parse(R"([["a", "b"], ["Ġ", "ab"]])");
  auto tok = CreateBpeTokenizer(j.dump());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_THAT((*tok)->Encode(" ab"), ElementsAre(5));
}

void ExpectInvalid(const std::string& text, const std::string& message_part) {
  auto tok = CreateBpeTokenizer(text);
  ASSERT_FALSE(tok.ok()) << "accepted: " << text;
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << tok.status();
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr(message_part));
}

TEST(BpeTokenizerTest, MalformedJsonIsInvalidArgument) {
  ExpectInvalid("", "not valid JSON");
  ExpectInvalid("{\"model\": ", "not valid JSON");
  ExpectInvalid("[1, 2]", "not an object");

  json j = TinyBpe();
  j.erase("model");
  ExpectInvalid(j.dump(), "no \"model\"");

  j = TinyBpe();
  j["model"]["type"] = "WordPiece";
  ExpectInvalid(j.dump(), "WordPiece");

  j = TinyBpe();
  j["model"].erase("vocab");
  ExpectInvalid(j.dump(), "vocab");

  j = TinyBpe();
  j["model"]["vocab"]["a"] = "zero";
  ExpectInvalid(j.dump(), "non-integer id");

  j = TinyBpe();
  j["model"].erase("merges");
  ExpectInvalid(j.dump(), "merges");

  j = TinyBpe();
  j["model"]["merges"] = json::array({"a b", "ab"});
  ExpectInvalid(j.dump(), "merge 1");

  j = TinyBpe();
  j["model"]["merges"] = json::array({"a b", "a b c"});
  ExpectInvalid(j.dump(), "merge 1");

  j = TinyBpe();
  j["model"]["merges"] = json::array({"a x"});
  ExpectInvalid(j.dump(), "missing from the vocab");

  j = TinyBpe();
  j["model"]["merges"] = json::array({"b c"});  // "bc" is not in the vocab
  ExpectInvalid(j.dump(), "missing from the vocab");

  j = TinyBpe();
  j["model"]["merges"] = json::array({json::array({"a"})});
  ExpectInvalid(j.dump(), "merge 0");

  j = TinyBpe();
  j["normalizer"] = json::parse(R"({"type": "Lowercase"})");
  ExpectInvalid(j.dump(), "normalizer");

  j = TinyBpe();
  j["pre_tokenizer"] = json::parse(R"({"type": "Whitespace"})");
  ExpectInvalid(j.dump(), "pre_tokenizer");

  j = TinyBpe();
  j["added_tokens"] = json::parse(R"([{"content": "x"}])");
  ExpectInvalid(j.dump(), "added token");
}

class LoadTokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           (std::string("ramba_tokenizer_test_") + info->name() + "_" +
            std::to_string(std::random_device{}()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  void Write(const std::string& name, const std::string& text) {
    std::ofstream(dir_ / name, std::ios::binary) << text;
  }
  fs::path dir_;
};

TEST_F(LoadTokenizerTest, NoFileIsByteLevel) {
  auto tok = LoadTokenizer(dir_.string(), 512);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->kind(), "byte");
  EXPECT_EQ((*tok)->vocab_size(), 512);
}

TEST_F(LoadTokenizerTest, ConfigByte) {
  Write("tokenizer_config.json", R"({"type": "byte"})");
  auto tok = LoadTokenizer(dir_.string(), 256);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->kind(), "byte");
}

TEST_F(LoadTokenizerTest, BadConfigOrVocab) {
  EXPECT_EQ(LoadTokenizer(dir_.string(), 100).status().code(),
            absl::StatusCode::kInvalidArgument);
  Write("tokenizer_config.json", R"({"type": "sentencepiece"})");
  EXPECT_EQ(LoadTokenizer(dir_.string(), 256).status().code(),
            absl::StatusCode::kInvalidArgument);
  Write("tokenizer_config.json", "not json");
  EXPECT_EQ(LoadTokenizer(dir_.string(), 256).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(LoadTokenizerTest, TokenizerJsonIsBpe) {
  Write("tokenizer_config.json", R"({"type": "byte"})");  // tokenizer.json takes precedence
  Write("tokenizer.json", TinyBpe().dump());
  auto tok = LoadTokenizer(dir_.string(), 7);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->kind(), "bpe");
  EXPECT_THAT((*tok)->Encode("ab"), ElementsAre(3));
  // Token ids that do not fit the model's embedding are an error.
  EXPECT_EQ(LoadTokenizer(dir_.string(), 6).status().code(), absl::StatusCode::kInvalidArgument);
  Write("tokenizer.json", "{");
  auto bad = LoadTokenizer(dir_.string(), 7);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("tokenizer.json"));
}

TEST_F(LoadTokenizerTest, NeoxDirectory) {
  const fs::path path = NeoxTokenizerPath();
  if (path.empty()) GTEST_SKIP() << "GPT-NeoX tokenizer.json not found";
  auto tok = LoadTokenizer(path.parent_path().string(), 50280);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->kind(), "bpe");
  EXPECT_THAT((*tok)->Encode("Hello world"), ElementsAre(12092, 1533));
}

}  // namespace
}  // namespace ramba
