// Sample: greedy, temperature, top-k, top-p, inverse-CDF order and determinism; the repetition
// penalties, logit bias and held-back tokens (ApplyPenalties, CountTokens).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/kernel_test_util.h"

namespace ramba::kernels {
namespace {

using testing::RandomVec;

int32_t SampleOne(Backend* be, const std::vector<float>& logits, SamplingParams p, float u) {
  int32_t out = -7;
  EXPECT_TRUE(be->Sample(logits.data(), 1, logits.size(), &p, &u, &out).ok());
  return out;
}

// Counts of each token over a uniform grid of n values of u.
std::map<int32_t, int> Histogram(Backend* be, const std::vector<float>& logits, SamplingParams p,
                                 int n) {
  std::map<int32_t, int> h;
  for (int i = 0; i < n; ++i) ++h[SampleOne(be, logits, p, (i + 0.5f) / n)];
  return h;
}

std::vector<float> LogProbs(const std::vector<double>& p) {
  std::vector<float> l;
  for (double x : p) l.push_back(static_cast<float>(std::log(x)));
  return l;
}

TEST(SampleTest, GreedyTakesLowestIdOnTies) {
  auto be = testing::Cpu();
  EXPECT_EQ(SampleOne(be.get(), {1, 3, 3, 2}, {0.0f, 0, 1.0f}, 0.99f), 1);
  EXPECT_EQ(SampleOne(be.get(), {NAN, -1, 5, NAN, 5}, {0.0f, 0, 1.0f}, 0.3f), 2);
  EXPECT_EQ(SampleOne(be.get(), {-INFINITY, -INFINITY}, {0.0f, 0, 1.0f}, 0.3f), 0);
  // Greedy ignores top-k / top-p and the uniform.
  EXPECT_EQ(SampleOne(be.get(), {0, 9, 1}, {0.0f, 2, 0.1f}, 0.0f), 1);
}

TEST(TokenLogprobsTest, LogSoftmaxOfTheTokenAndNanOutOfRange) {
  auto be = testing::Cpu();
  const std::vector<double> probs = {0.05, 0.25, 0.1, 0.4, 0.2};
  std::vector<float> logits = LogProbs(probs);
  for (float& l : logits) l += 30.0f;  // a shift changes nothing
  std::vector<float> two = logits;
  two.insert(two.end(), {1.0f, -INFINITY, 1.0f, 1.0f, -INFINITY});  // a second row
  for (int32_t t = 0; t < 5; ++t) {
    const std::vector<int32_t> tokens = {t, t};
    std::vector<float> out(2, 0.0f);
    ASSERT_TRUE(be->TokenLogprobs(two.data(), 2, 5, tokens.data(), out.data()).ok());
    EXPECT_NEAR(out[0], std::log(probs[t]), 1e-5) << t;
    if (t == 1 || t == 4) {
      EXPECT_EQ(out[1], -INFINITY) << t;
    } else {
      EXPECT_NEAR(out[1], std::log(1.0 / 3), 1e-5) << t;
    }
  }
  const std::vector<int32_t> bad = {-1, 5};
  std::vector<float> out(2, 0.0f);
  ASSERT_TRUE(be->TokenLogprobs(two.data(), 2, 5, bad.data(), out.data()).ok());
  EXPECT_TRUE(std::isnan(out[0]) && std::isnan(out[1]));
  EXPECT_FALSE(be->TokenLogprobs(nullptr, 2, 5, bad.data(), out.data()).ok());
  EXPECT_FALSE(be->TokenLogprobs(two.data(), 2, 0, bad.data(), out.data()).ok());
}

TEST(SampleTest, InverseCdfRunsOverDescendingProbabilities) {
  auto be = testing::Cpu();
  const auto logits = LogProbs({0.1, 0.6, 0.3});
  const SamplingParams p{1.0f, 0, 1.0f};
  EXPECT_EQ(SampleOne(be.get(), logits, p, 0.0f), 1);
  EXPECT_EQ(SampleOne(be.get(), logits, p, 0.59f), 1);
  EXPECT_EQ(SampleOne(be.get(), logits, p, 0.61f), 2);
  EXPECT_EQ(SampleOne(be.get(), logits, p, 0.89f), 2);
  EXPECT_EQ(SampleOne(be.get(), logits, p, 0.91f), 0);
  EXPECT_EQ(SampleOne(be.get(), logits, p, 0.99999994f), 0);
  EXPECT_EQ(SampleOne(be.get(), logits, p, 1.0f), 0);  // out-of-range uniform is clamped
}

TEST(SampleTest, FullDistributionMatchesSoftmax) {
  auto be = testing::Cpu();
  const std::vector<double> probs = {0.05, 0.25, 0.1, 0.4, 0.2};
  const int n = 10000;
  auto h = Histogram(be.get(), LogProbs(probs), {1.0f, 0, 1.0f}, n);
  for (size_t t = 0; t < probs.size(); ++t) EXPECT_NEAR(h[t], probs[t] * n, 2) << t;
}

TEST(SampleTest, TemperatureSharpensAndFlattens) {
  auto be = testing::Cpu();
  const std::vector<float> logits = {1.0f, 2.0f, 0.5f};
  for (float T : {0.5f, 2.0f}) {
    std::vector<double> p(3);
    double z = 0;
    for (int i = 0; i < 3; ++i) z += p[i] = std::exp(logits[i] / T);
    const int n = 10000;
    auto h = Histogram(be.get(), logits, {T, 0, 1.0f}, n);
    for (int i = 0; i < 3; ++i) EXPECT_NEAR(h[i], p[i] / z * n, 2) << T;
  }
}

TEST(SampleTest, TopKRestrictsAndRenormalises) {
  auto be = testing::Cpu();
  const std::vector<double> probs = {0.1, 0.3, 0.05, 0.35, 0.2};
  const int n = 10000;
  auto h = Histogram(be.get(), LogProbs(probs), {1.0f, 2, 1.0f}, n);
  EXPECT_EQ(h.size(), 2u);
  EXPECT_NEAR(h[3], 0.35 / 0.65 * n, 2);
  EXPECT_NEAR(h[1], 0.30 / 0.65 * n, 2);
  auto h1 = Histogram(be.get(), LogProbs(probs), {1.0f, 1, 1.0f}, 100);
  EXPECT_EQ(h1, (std::map<int32_t, int>{{3, 100}}));
  // top_k >= vocab keeps everything.
  EXPECT_EQ(Histogram(be.get(), LogProbs(probs), {1.0f, 50, 1.0f}, 1000).size(), 5u);
}

TEST(SampleTest, TopKTiesPreferLowerIds) {
  auto be = testing::Cpu();
  const std::vector<float> logits = {0, 1, 1, 1, 0};
  auto h = Histogram(be.get(), logits, {1.0f, 2, 1.0f}, 1000);
  EXPECT_EQ(h, (std::map<int32_t, int>{{1, 500}, {2, 500}}));
}

TEST(SampleTest, TopPKeepsSmallestPrefixReachingMass) {
  auto be = testing::Cpu();
  const std::vector<double> probs = {0.15, 0.5, 0.05, 0.3};
  const auto logits = LogProbs(probs);
  const int n = 10000;
  auto h = Histogram(be.get(), logits, {1.0f, 0, 0.7f}, n);  // 0.5 < 0.7 <= 0.8
  EXPECT_EQ(h.size(), 2u);
  EXPECT_NEAR(h[1], 0.5 / 0.8 * n, 2);
  EXPECT_NEAR(h[3], 0.3 / 0.8 * n, 2);
  // A tiny top_p still keeps one token.
  EXPECT_EQ(Histogram(be.get(), logits, {1.0f, 0, 1e-6f}, 100), (std::map<int32_t, int>{{1, 100}}));
  // top-k first, then top-p over the renormalised top-k mass: {1: .625, 3: .375} -> 0.6 keeps 1.
  EXPECT_EQ(Histogram(be.get(), logits, {1.0f, 2, 0.6f}, 100), (std::map<int32_t, int>{{1, 100}}));
  EXPECT_EQ(Histogram(be.get(), logits, {1.0f, 2, 0.7f}, 100).size(), 2u);
}

TEST(SampleTest, MinPKeepsTokensAtLeastThatFractionOfTheMostLikely) {
  auto be = testing::Cpu();
  const std::vector<double> probs = {0.1, 0.4, 0.05, 0.3, 0.15};
  const auto logits = LogProbs(probs);
  const int n = 10000;
  auto h = Histogram(be.get(), logits, {1.0f, 0, 1.0f, 0.5f}, n);  // keeps p >= 0.2
  EXPECT_EQ(h.size(), 2u);
  EXPECT_NEAR(h[1], 0.4 / 0.7 * n, 2);
  EXPECT_NEAR(h[3], 0.3 / 0.7 * n, 2);
  EXPECT_EQ(Histogram(be.get(), logits, {1.0f, 0, 1.0f, 0.3f}, 1000).size(), 3u);  // p >= 0.12
  EXPECT_EQ(Histogram(be.get(), logits, {1.0f, 0, 1.0f, 1.0f}, 100),
            (std::map<int32_t, int>{{1, 100}}));
  EXPECT_EQ(Histogram(be.get(), logits, {1.0f, 0, 1.0f, 0.0f}, 10000).size(), 5u);  // off
  // Temperature first: at T = 0.5 the ratios square, 0.3 / 0.4 -> 0.5625 < 0.6.
  EXPECT_EQ(Histogram(be.get(), logits, {0.5f, 0, 1.0f, 0.6f}, 100),
            (std::map<int32_t, int>{{1, 100}}));
  // min_p 1 keeps every token tied with the most likely.
  const std::vector<float> ties = {0, 1, 1, 1, 0};
  EXPECT_EQ(Histogram(be.get(), ties, {1.0f, 0, 1.0f, 1.0f}, 999),
            (std::map<int32_t, int>{{1, 333}, {2, 333}, {3, 333}}));
  // With top-k: both cuts apply (top 2 = {1, 3}; min_p 0.3 would also keep 4).
  EXPECT_EQ(Histogram(be.get(), logits, {1.0f, 2, 1.0f, 0.3f}, 1000).size(), 2u);
}

TEST(SampleTest, MinPComesBeforeTopP) {
  auto be = testing::Cpu();
  const auto logits = LogProbs({0.5, 0.3, 0.2});
  // min_p 0.5 keeps {0, 1} (mass 0.8); top_p 0.6 of that is reached by token 0 alone (0.625).
  // Top-p first would keep {0, 1} (0.5 < 0.6 <= 0.8).
  EXPECT_EQ(Histogram(be.get(), logits, {1.0f, 0, 0.6f, 0.5f}, 100),
            (std::map<int32_t, int>{{0, 100}}));
  EXPECT_EQ(Histogram(be.get(), logits, {1.0f, 0, 0.6f, 0.0f}, 1000).size(), 2u);
}

// Straightforward reference: full sort, double probabilities.
int32_t SampleRef(const std::vector<float>& logits, SamplingParams p, float u) {
  const int64_t V = logits.size();
  std::vector<int32_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  std::vector<double> pr(V);
  for (int64_t i = 0; i < V; ++i) pr[i] = std::exp((double(logits[i]) - logits[order[0]]) / p.temperature);
  int64_t kept = p.top_k > 0 ? std::min<int64_t>(p.top_k, V) : V;
  while (kept > 1 && pr[order[kept - 1]] < p.min_p) --kept;
  double mass = 0;
  for (int64_t j = 0; j < kept; ++j) mass += pr[order[j]];
  if (p.top_p < 1.0f) {
    double cum = 0;
    int64_t j = 0;
    while (j < kept) {
      cum += pr[order[j++]];
      if (cum >= p.top_p * mass) break;
    }
    kept = j;
    mass = cum;
  }
  double cum = 0;
  for (int64_t j = 0; j < kept; ++j) {
    cum += pr[order[j]];
    if (cum > u * mass) return order[j];
  }
  return order[kept - 1];
}

TEST(SampleTest, LargeVocabMatchesReferenceAndBatchIsDeterministic) {
  auto be = testing::Cpu();
  const int64_t V = 50280, rows = 6;
  std::vector<float> logits = RandomVec(rows * V, 3, -4.0f, 4.0f);
  const std::vector<SamplingParams> params = {{1.0f, 0, 1.0f, 0.05f}, {0.7f, 0, 0.9f},
                                              {1.3f, 40, 1.0f, 0.2f}, {1.0f, 100, 0.5f},
                                              {0.0f, 0, 1.0f},        {2.0f, 0, 0.2f}};
  const auto uniforms = RandomVec(rows, 4, 0.0f, 1.0f);
  std::vector<int32_t> out(rows), again(rows);
  ASSERT_TRUE(be->Sample(logits.data(), rows, V, params.data(), uniforms.data(), out.data()).ok());
  ASSERT_TRUE(be->Sample(logits.data(), rows, V, params.data(), uniforms.data(), again.data()).ok());
  EXPECT_EQ(out, again);
  for (int64_t r = 0; r < rows; ++r) {
    const std::vector<float> row(logits.begin() + r * V, logits.begin() + (r + 1) * V);
    int32_t want;
    if (params[r].temperature == 0.0f) {
      want = static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
    } else {
      want = SampleRef(row, params[r], uniforms[r]);
    }
    EXPECT_EQ(out[r], want) << r;
    EXPECT_EQ(SampleOne(be.get(), row, params[r], uniforms[r]), out[r]) << r;  // batch == alone
  }
  // Many uniforms over a fixed distribution agree with the reference.
  const std::vector<float> row(logits.begin(), logits.begin() + V);
  const auto us = RandomVec(200, 5, 0.0f, 1.0f);
  for (float u : us) {
    const SamplingParams p{0.8f, 0, 0.95f};
    ASSERT_EQ(SampleOne(be.get(), row, p, u), SampleRef(row, p, u)) << u;
    const SamplingParams m{1.5f, 0, 0.9f, 0.01f};
    ASSERT_EQ(SampleOne(be.get(), row, m, u), SampleRef(row, m, u)) << u;
  }
}

TEST(TopLogprobsTest, MostLikelyFirstTiesByIdNanLast) {
  auto be = testing::Cpu();
  // Row 0: a tie between ids 1 and 3; row 1: a NaN ranks after -1.
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f,  //
                                     NAN, -1.0f, 3.0f, 0.0f, 3.5f};
  std::vector<int32_t> ids(6, -7);
  std::vector<float> lp(6, 0.0f);
  ASSERT_TRUE(be->TopLogprobs(logits.data(), 2, 5, 3, ids.data(), lp.data()).ok());
  EXPECT_EQ(ids, (std::vector<int32_t>{1, 3, 4, 4, 2, 3}));  // ids within each row
  double sum0 = 0;
  for (int i = 0; i < 5; ++i) sum0 += std::exp(logits[i] - 2.0);
  EXPECT_NEAR(lp[0], -std::log(sum0), 1e-6);
  EXPECT_EQ(lp[0], lp[1]);
  EXPECT_NEAR(lp[2], 1.0 - 2.0 - std::log(sum0), 1e-6);
  // The logprobs agree with TokenLogprobs for the same tokens.
  std::vector<float> token_lp(2);
  const std::vector<int32_t> tokens = {4, 3};
  ASSERT_TRUE(be->TokenLogprobs(logits.data(), 2, 5, tokens.data(), token_lp.data()).ok());
  EXPECT_EQ(token_lp[0], lp[2]);
  EXPECT_TRUE(std::isnan(token_lp[1]) && std::isnan(lp[5]));  // a NaN logit: no distribution
  // All of a row, and bad sizes.
  std::vector<int32_t> all(5);
  std::vector<float> all_lp(5);
  ASSERT_TRUE(be->TopLogprobs(logits.data(), 1, 5, 5, all.data(), all_lp.data()).ok());
  EXPECT_EQ(all, (std::vector<int32_t>{1, 3, 4, 0, 2}));
  for (int64_t n : {0, 6}) {
    EXPECT_EQ(be->TopLogprobs(logits.data(), 1, 5, n, all.data(), all_lp.data()).code(),
              absl::StatusCode::kInvalidArgument);
  }
  std::vector<float> big(50, 0.0f);
  std::vector<int32_t> big_ids(21);
  std::vector<float> big_lp(21);
  EXPECT_EQ(be->TopLogprobs(big.data(), 1, 50, 21, big_ids.data(), big_lp.data()).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(PenaltiesTest, EachPenaltyAsVllmDefinesIt) {
  auto be = testing::Cpu();
  constexpr int32_t kPrompt = PenaltyParams::kPromptTokenBit;
  // Token 0 never seen, 1 in the prompt only, 2 generated once, 3 generated 3 times (and in the
  // prompt), 4 generated twice with a negative logit.
  std::vector<int32_t> counts = {0, kPrompt, 1, kPrompt | 3, 2};
  const std::vector<float> logits = {2.0f, 2.0f, 2.0f, 3.0f, -1.0f,   // row 0: penalised
                                     2.0f, 2.0f, 2.0f, 3.0f, -1.0f};  // row 1: no counts
  const std::vector<PenaltyParams> params = {{counts.data(), 0.5f, 0.25f, 2.0f}, {}};
  std::vector<float> out(10, NAN);
  ASSERT_TRUE(be->ApplyPenalties(logits.data(), 2, 5, params.data(), out.data()).ok());
  const std::vector<float> want = {2.0f,
                                   2.0f / 2.0f,                        // prompt: repetition only
                                   2.0f / 2.0f - (0.25f * 1 + 0.5f),   // generated once
                                   3.0f / 2.0f - (0.25f * 3 + 0.5f),   // three times
                                   -1.0f * 2.0f - (0.25f * 2 + 0.5f),  // negative: multiplied
                                   2.0f, 2.0f, 2.0f, 3.0f, -1.0f};     // row 1 copied
  EXPECT_EQ(out, want);
  // Each penalty alone.
  const PenaltyParams presence{counts.data(), 1.0f, 0.0f, 1.0f};
  const PenaltyParams frequency{counts.data(), 0.0f, 1.0f, 1.0f};
  const PenaltyParams repetition{counts.data(), 0.0f, 0.0f, 4.0f};
  ASSERT_TRUE(be->ApplyPenalties(logits.data(), 1, 5, &presence, out.data()).ok());
  EXPECT_EQ(std::vector<float>(out.begin(), out.begin() + 5),
            (std::vector<float>{2.0f, 2.0f, 1.0f, 2.0f, -2.0f}));
  ASSERT_TRUE(be->ApplyPenalties(logits.data(), 1, 5, &frequency, out.data()).ok());
  EXPECT_EQ(std::vector<float>(out.begin(), out.begin() + 5),
            (std::vector<float>{2.0f, 2.0f, 1.0f, 0.0f, -3.0f}));
  ASSERT_TRUE(be->ApplyPenalties(logits.data(), 1, 5, &repetition, out.data()).ok());
  EXPECT_EQ(std::vector<float>(out.begin(), out.begin() + 5),
            (std::vector<float>{2.0f, 0.5f, 0.5f, 0.75f, -4.0f}));
  // A penalty turns greedy away from a repeated token.
  int32_t token = -1;
  const SamplingParams greedy{0.0f, 0, 1.0f};
  const float u = 0.5f;
  ASSERT_TRUE(be->Sample(logits.data(), 1, 5, &greedy, &u, &token).ok());
  EXPECT_EQ(token, 3);
  ASSERT_TRUE(be->ApplyPenalties(logits.data(), 1, 5, &frequency, out.data()).ok());
  ASSERT_TRUE(be->Sample(out.data(), 1, 5, &greedy, &u, &token).ok());
  EXPECT_EQ(token, 0);
}

TEST(PenaltiesTest, CountTokensKeepsThePromptMarkAndSkipsRowsWithoutCounts) {
  auto be = testing::Cpu();
  std::vector<int32_t> a = {0, PenaltyParams::kPromptTokenBit, 0}, b = {0, 0, 0};
  const std::vector<PenaltyParams> params = {{a.data()}, {}, {b.data()}};
  const std::vector<int32_t> tokens = {1, 2, 7};  // row 2's id is out of range: skipped
  ASSERT_TRUE(be->CountTokens(params.data(), 3, 3, tokens.data()).ok());
  ASSERT_TRUE(be->CountTokens(params.data(), 1, 3, tokens.data()).ok());
  EXPECT_EQ(a, (std::vector<int32_t>{0, PenaltyParams::kPromptTokenBit | 2, 0}));
  EXPECT_EQ(b, (std::vector<int32_t>{0, 0, 0}));
}

TEST(PenaltiesTest, BiasThenHeldBackTokensThenPenalties) {
  auto be = testing::Cpu();
  constexpr int32_t kHeld = PenaltyParams::kHeldBackBit;
  // Token 0 biased up, 1 held back (and biased up: still out), 2 generated twice and biased
  // down, 3 held back and generated once, 4 untouched.
  std::vector<int32_t> counts = {0, kHeld, 2, kHeld | 1, 0};
  const std::vector<float> bias = {1.5f, 100.0f, -1.0f, 0.0f, 0.0f};
  const std::vector<float> logits = {1.0f, 2.0f, 3.0f, 4.0f, -1.0f};
  std::vector<float> out(5, NAN);

  PenaltyParams p{counts.data(), 0.5f, 0.25f, 2.0f};
  p.bias = bias.data();
  p.hold_back = true;
  ASSERT_TRUE(be->ApplyPenalties(logits.data(), 1, 5, &p, out.data()).ok());
  EXPECT_EQ(out, (std::vector<float>{2.5f, -INFINITY,
                                     (3.0f - 1.0f) / 2.0f - (0.25f * 2 + 0.5f),  // biased first
                                     -INFINITY, -1.0f}));
  // Not holding back (min_tokens reached): the marks change nothing.
  p.hold_back = false;
  ASSERT_TRUE(be->ApplyPenalties(logits.data(), 1, 5, &p, out.data()).ok());
  EXPECT_EQ(out, (std::vector<float>{2.5f, 102.0f, 0.0f, 4.0f / 2.0f - (0.25f + 0.5f), -1.0f}));
  // A bias without counts; a held-back row without counts is refused.
  PenaltyParams bias_only;
  bias_only.bias = bias.data();
  ASSERT_TRUE(be->ApplyPenalties(logits.data(), 1, 5, &bias_only, out.data()).ok());
  EXPECT_EQ(out, (std::vector<float>{2.5f, 102.0f, 2.0f, 4.0f, -1.0f}));
  PenaltyParams held_without_counts;
  held_without_counts.hold_back = true;
  EXPECT_EQ(be->ApplyPenalties(logits.data(), 1, 5, &held_without_counts, out.data()).code(),
            absl::StatusCode::kInvalidArgument);
  // Counting keeps the held-back mark.
  const int32_t token = 1;
  ASSERT_TRUE(be->CountTokens(&p, 1, 5, &token).ok());
  EXPECT_EQ(counts[1], kHeld | 1);
}

}  // namespace
}  // namespace ramba::kernels
