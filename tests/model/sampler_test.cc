// Sampling: greedy, reproducibility from a seed, filters, and validation messages.
#include "model/sampler.h"

#include <cmath>
#include <map>

#include "gtest/gtest.h"

namespace ramba {
namespace {

class SamplerTest : public ::testing::Test {
 protected:
  std::unique_ptr<kernels::Backend> backend_ = kernels::CreateCpuBackend();
  // vocab 5: token 3 most likely, then 1.
  std::vector<float> logits_ = {0.1f, 2.0f, -1.0f, 2.5f, 0.0f};
};

TEST_F(SamplerTest, GreedyPicksArgmax) {
  SamplingOptions o;  // temperature 0
  auto t = SampleTokens(backend_.get(), logits_, 5, {o}, {0});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)[0], 3);
}

TEST_F(SamplerTest, SameSeedSameTokensOtherSeedOtherTokens) {
  SamplingOptions o;
  o.temperature = 1.5f;
  o.seed = 42;
  std::vector<int32_t> a, b, c;
  for (int64_t pos = 0; pos < 200; ++pos) {
    a.push_back((*SampleTokens(backend_.get(), logits_, 5, {o}, {pos}))[0]);
    b.push_back((*SampleTokens(backend_.get(), logits_, 5, {o}, {pos}))[0]);
    SamplingOptions other = o;
    other.seed = 43;
    c.push_back((*SampleTokens(backend_.get(), logits_, 5, {other}, {pos}))[0]);
  }
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  std::map<int32_t, int> counts;
  for (int32_t t : a) counts[t]++;
  EXPECT_GE(counts.size(), 4u);           // temperature 1.5 spreads the mass
  EXPECT_GT(counts[3], counts[2]);        // but keeps the order
}

TEST_F(SamplerTest, TopKAndTopPRestrictTheSupport) {
  SamplingOptions k2;
  k2.temperature = 1.0f;
  k2.top_k = 2;
  SamplingOptions p;
  p.temperature = 1.0f;
  p.top_p = 0.5f;  // token 3 alone holds > 50% after softmax
  for (int64_t pos = 0; pos < 300; ++pos) {
    k2.seed = p.seed = pos;
    const int32_t a = (*SampleTokens(backend_.get(), logits_, 5, {k2}, {pos}))[0];
    EXPECT_TRUE(a == 3 || a == 1) << a;
    const int32_t b = (*SampleTokens(backend_.get(), logits_, 5, {p}, {pos}))[0];
    EXPECT_EQ(b, 3);
  }
}

TEST_F(SamplerTest, BatchRowsAreIndependent) {
  std::vector<float> two = logits_;
  two.insert(two.end(), {5.0f, 0.0f, 0.0f, 0.0f, 0.0f});
  SamplingOptions g;
  auto t = SampleTokens(backend_.get(), two, 5, {g, g}, {0, 0});
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(*t, (std::vector<int32_t>{3, 0}));
}

TEST_F(SamplerTest, InvalidOptionsNameTheField) {
  SamplingOptions o;
  o.temperature = -1;
  EXPECT_NE(ValidateSamplingOptions(o).message().find("temperature"), std::string::npos);
  o = {};
  o.top_p = 0;
  EXPECT_NE(ValidateSamplingOptions(o).message().find("top_p"), std::string::npos);
  for (float bad : {-0.1f, 1.5f, NAN}) {
    o = {};
    o.min_p = bad;
    EXPECT_NE(ValidateSamplingOptions(o).message().find("min_p"), std::string::npos) << bad;
  }
  o = {};
  o.min_p = 1.0f;
  EXPECT_TRUE(ValidateSamplingOptions(o).ok());
  for (float bad : {-2.5f, 2.01f, NAN}) {
    o = {};
    o.presence_penalty = bad;
    EXPECT_NE(ValidateSamplingOptions(o).message().find("presence_penalty"), std::string::npos);
    o = {};
    o.frequency_penalty = bad;
    EXPECT_NE(ValidateSamplingOptions(o).message().find("frequency_penalty"), std::string::npos);
  }
  for (float bad : {0.0f, -1.0f, INFINITY, NAN}) {
    o = {};
    o.repetition_penalty = bad;
    EXPECT_NE(ValidateSamplingOptions(o).message().find("repetition_penalty"), std::string::npos)
        << bad;
  }
  o = {};
  o.presence_penalty = -2.0f;
  o.frequency_penalty = 2.0f;
  o.repetition_penalty = 0.5f;
  EXPECT_TRUE(ValidateSamplingOptions(o).ok());
  EXPECT_TRUE(o.has_penalties());
  // Valid, but SampleTokens has no token counts to apply them with.
  EXPECT_EQ(SampleTokens(backend_.get(), logits_, 5, {o}, {0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(SamplingOptions{}.has_penalties());
  o = {};
  o.top_k = -3;
  EXPECT_NE(ValidateSamplingOptions(o).message().find("top_k"), std::string::npos);
  EXPECT_EQ(SampleTokens(backend_.get(), logits_, 5, {o}, {0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(SampleTokens(backend_.get(), logits_, 4, {SamplingOptions{}}, {0}).ok());
}

TEST(ValidateLogitBiasTest, IdsInVocabularyOnceValuesInRangeAtMostTheLimit) {
  EXPECT_TRUE(ValidateLogitBias({}, 10).ok());
  EXPECT_TRUE(ValidateLogitBias({{0, -100.0f}, {9, 100.0f}}, 10).ok());
  for (const std::vector<LogitBias>& bad : std::vector<std::vector<LogitBias>>{
           {{10, 1.0f}}, {{-1, 1.0f}}, {{2, 100.5f}}, {{2, NAN}}, {{4, 1.0f}, {4, 2.0f}}}) {
    const absl::Status s = ValidateLogitBias(bad, 10, "sampling.logit_bias");
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("sampling.logit_bias"), std::string::npos) << s.message();
  }
  std::vector<LogitBias> many(kMaxLogitBiasEntries + 1);
  for (size_t i = 0; i < many.size(); ++i) many[i].id = static_cast<int32_t>(i);
  EXPECT_FALSE(ValidateLogitBias(many, 5000).ok());
  many.pop_back();
  EXPECT_TRUE(ValidateLogitBias(many, 5000).ok());
  // Options that adjust the logits need a session: SampleTokens refuses them.
  auto backend = kernels::CreateCpuBackend(1);
  const std::vector<float> logits = {1.0f, 2.0f};
  for (int which = 0; which < 2; ++which) {
    SamplingOptions o;
    (which == 0 ? o.logit_bias : o.hold_back) = true;
    EXPECT_TRUE(o.adjusts_logits());
    EXPECT_EQ(SampleTokens(backend.get(), logits, 2, {o}, {0}).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
}

TEST(SamplingUniformTest, InRangeAndSpread) {
  double sum = 0;
  for (int64_t i = 0; i < 10000; ++i) {
    const float u = SamplingUniform(7, i);
    ASSERT_GE(u, 0.0f);
    ASSERT_LT(u, 1.0f);
    sum += u;
  }
  EXPECT_NEAR(sum / 10000, 0.5, 0.02);
}

}  // namespace
}  // namespace ramba
