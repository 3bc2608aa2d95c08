// The passkey haystack generator and evaluator.
#include "tools/passkey.h"

#include <filesystem>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "tests/testing/test_util.h"

namespace ramba::eval {
namespace {

class PasskeyTest : public ::testing::Test {
 protected:
  std::unique_ptr<Tokenizer> tok_ = CreateByteTokenizer();
};

TEST_F(PasskeyTest, PromptHasExactLengthAndNeedleAtDepth) {
  for (double depth : {0.0, 0.3, 0.5, 1.0}) {
    auto c = MakePasskeyCase(*tok_, 4096, depth, KeyFormat::kMixed, 7, 3);
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(c->prompt.size(), 4096u);
    const std::string text = *tok_->Decode(c->prompt);
    const std::string needle = " The pass key is " + c->key + ". Remember it.";
    const size_t at = text.find(needle);
    ASSERT_NE(at, std::string::npos) << depth;
    EXPECT_EQ(static_cast<int64_t>(at), c->needle_position);
    EXPECT_NEAR(static_cast<double>(at) / 4096, depth, 0.06) << depth;
    EXPECT_TRUE(absl::EndsWith(text, "\nWhat is the pass key? The pass key is"));
    EXPECT_EQ(text.find(c->key), at + 17) << "the key appears only in the needle";
  }
}

TEST_F(PasskeyTest, DeterministicPerSeedAndTrial) {
  auto a = MakePasskeyCase(*tok_, 2000, 0.5, KeyFormat::kMixed, 1, 0);
  auto b = MakePasskeyCase(*tok_, 2000, 0.5, KeyFormat::kMixed, 1, 0);
  auto c = MakePasskeyCase(*tok_, 2000, 0.5, KeyFormat::kMixed, 1, 1);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(a->prompt, b->prompt);
  EXPECT_EQ(a->key, b->key);
  EXPECT_NE(a->prompt, c->prompt);
}

TEST_F(PasskeyTest, KeyFormats) {
  auto g = MakePasskeyCase(*tok_, 1000, 0.5, KeyFormat::kGroupedDigits, 1, 0);
  auto w = MakePasskeyCase(*tok_, 1000, 0.5, KeyFormat::kWordNumber, 1, 0);
  auto u = MakePasskeyCase(*tok_, 1000, 0.5, KeyFormat::kUpperAlnum, 1, 0);
  ASSERT_TRUE(g.ok() && w.ok() && u.ok());
  EXPECT_NE(g->key.find('-'), std::string::npos);
  EXPECT_TRUE(std::isdigit(g->key[0]));
  EXPECT_TRUE(std::islower(w->key[0]));
  for (char ch : u->key) EXPECT_TRUE(std::isupper(ch) || std::isdigit(ch)) << u->key;
  EXPECT_FALSE(ParseKeyFormat("emoji").ok());
}

TEST_F(PasskeyTest, RejectsImpossibleRequests) {
  EXPECT_EQ(MakePasskeyCase(*tok_, 50, 0.5, KeyFormat::kMixed, 1, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakePasskeyCase(*tok_, 5000, 1.5, KeyFormat::kMixed, 1, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(PasskeyTest, EvaluatorRunsEndToEnd) {
  // The byte-level fixture model has random weights: this checks the pipeline, not accuracy.
  auto backend = kernels::CreateCpuBackend();
  auto model = RambaModel::Load(testing::FixtureDir() + "/tiny_byte", backend.get());
  ASSERT_TRUE(model.ok()) << model.status();
  EvalOptions o;
  o.lengths = {700, 900};
  o.depths = {0.0, 1.0};
  o.trials = 2;
  auto cells = RunPasskeyEval(**model, *tok_, o);
  ASSERT_TRUE(cells.ok()) << cells.status();
  ASSERT_EQ(cells->size(), 4u);
  for (const CellResult& c : *cells) {
    EXPECT_EQ(c.trials, 2);
    EXPECT_LE(c.correct, c.trials);
    EXPECT_EQ(c.misses.size(), static_cast<size_t>(c.trials - c.correct));
  }
  const std::string table = FormatTable(*cells);
  EXPECT_NE(table.find("depth 1.00"), std::string::npos) << table;
  EXPECT_NE(ToJson(*cells, o, "tiny_byte").find("\"accuracy\""), std::string::npos);
}

}  // namespace
}  // namespace ramba::eval
