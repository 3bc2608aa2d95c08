// C++ logits vs the PyTorch reference's fixtures (tests/fixtures/*, made by
// model/reference/export_fixtures.py), through every path that feeds tokens: one full pass,
// the fixture's own segmentation, and token-by-token decode.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "model/ramba_model.h"
#include "model/safetensors.h"
#include "nlohmann/json.hpp"
#include "tests/testing/test_util.h"

namespace ramba {
namespace {

namespace fs = std::filesystem;
using testing::MaxRowRelError;

struct Fixture {
  std::unique_ptr<kernels::Backend> backend;
  std::unique_ptr<RambaModel> model;
  std::vector<int32_t> tokens;
  std::vector<int64_t> segments;
  std::vector<float> expected;  // [T, V]
};

Fixture LoadFixture(const std::string& name) {
  Fixture f;
  const std::string dir = testing::FixtureDir() + "/" + name;
  f.backend = kernels::CreateCpuBackend();
  auto model = RambaModel::Load(dir, f.backend.get());
  EXPECT_TRUE(model.ok()) << model.status();
  if (model.ok()) f.model = std::move(*model);
  std::ifstream in(dir + "/inputs.json");
  std::stringstream ss;
  ss << in.rdbuf();
  const auto j = nlohmann::json::parse(ss.str());
  f.tokens = j.at("tokens").get<std::vector<int32_t>>();
  f.segments = j.at("segments").get<std::vector<int64_t>>();
  auto expected = ReadSafetensors(dir + "/expected.safetensors");
  EXPECT_TRUE(expected.ok()) << expected.status();
  if (expected.ok()) f.expected = expected->at("logits").ToFloat();
  return f;
}

class ModelFixtureTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ModelFixtureTest, MatchesReference) {
  Fixture f = LoadFixture(GetParam());
  ASSERT_NE(f.model, nullptr);
  const int64_t V = f.model->config().vocab_size;
  const int64_t T = static_cast<int64_t>(f.tokens.size());
  ASSERT_GE(T, 700);
  ASSERT_EQ(static_cast<int64_t>(f.expected.size()), T * V);

  // 1. One forward pass over the whole sequence.
  auto full_state = f.model->NewSession();
  ASSERT_TRUE(full_state.ok());
  std::vector<float> full;
  {
    SessionState* st[] = {full_state->get()};
    absl::Span<const int32_t> tk[] = {f.tokens};
    ASSERT_TRUE(f.model->Forward(st, tk, LogitsMode::kAll, &full).ok());
  }
  EXPECT_LE(MaxRowRelError(full, f.expected, V), 1e-4) << "full pass vs reference";
  EXPECT_EQ((*full_state)->position(), T);
  EXPECT_EQ((*full_state)->num_chunks(), T / 64);

  // 2. The fixture's segmentation (odd sizes, single tokens, crossing chunk boundaries).
  auto seg_state = f.model->NewSession();
  ASSERT_TRUE(seg_state.ok());
  std::vector<float> segmented;
  int64_t begin = 0;
  for (int64_t n : f.segments) {
    SessionState* st[] = {seg_state->get()};
    absl::Span<const int32_t> tk[] = {absl::MakeConstSpan(f.tokens).subspan(begin, n)};
    std::vector<float> part;
    ASSERT_TRUE(f.model->Forward(st, tk, LogitsMode::kAll, &part).ok());
    segmented.insert(segmented.end(), part.begin(), part.end());
    begin += n;
  }
  ASSERT_EQ(begin, T);
  EXPECT_LE(MaxRowRelError(segmented, f.expected, V), 1e-4) << "segmented vs reference";
  EXPECT_LE(MaxRowRelError(segmented, full, V), 1e-5) << "segmented vs full pass";

  // 3. Token by token through Decode.
  auto dec_state = f.model->NewSession();
  ASSERT_TRUE(dec_state.ok());
  std::vector<float> decoded;
  for (int32_t t : f.tokens) {
    SessionState* st[] = {dec_state->get()};
    const int32_t in[] = {t};
    std::vector<float> step;
    ASSERT_TRUE(f.model->Decode(st, in, &step).ok());
    decoded.insert(decoded.end(), step.begin(), step.end());
  }
  EXPECT_LE(MaxRowRelError(decoded, f.expected, V), 1e-4) << "decode vs reference";
  EXPECT_LE(MaxRowRelError(decoded, full, V), 1e-5) << "decode vs full pass";
  std::printf("%s: rel err vs reference full %.2e segmented %.2e decode %.2e; "
              "segmented vs full %.2e, decode vs full %.2e\n",
              GetParam().c_str(), MaxRowRelError(full, f.expected, V),
              MaxRowRelError(segmented, f.expected, V), MaxRowRelError(decoded, f.expected, V),
              MaxRowRelError(segmented, full, V), MaxRowRelError(decoded, full, V));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ModelFixtureTest, ::testing::ValuesIn(testing::FixtureNames()),
                         [](const auto& info) { return info.param; });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(ModelFixtureTest);

TEST(ModelFixtureCoverage, FixturesArePresent) {
  // The fixtures are committed; their absence means a broken checkout, not a skipped test.
  EXPECT_GE(testing::FixtureNames().size(), 4u);
}

}  // namespace
}  // namespace ramba
