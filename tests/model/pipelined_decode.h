// Shared by the CPU and GPU model tests: RambaModel::LaunchDecode / CollectDecode chains give the
// tokens that ForwardAndSample gives step by step, and misuse is refused without a state change.
#ifndef RAMBA_TESTS_MODEL_PIPELINED_DECODE_H_
#define RAMBA_TESTS_MODEL_PIPELINED_DECODE_H_

#include <cmath>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "model/ramba_model.h"
#include "tests/testing/test_util.h"

namespace ramba::testing {

// Three sessions (prompts of 1, 60 and 130 tokens, so chunks complete during the steps), one
// greedy and two sampling with seeds, decode `steps` tokens both ways from forks of one prefill.
inline void ExpectPipelinedDecodeMatchesSteps(RambaModel* model, int steps) {
  const int64_t V = model->config().vocab_size;
  const std::vector<int64_t> prompt_lens = {1, 60, 130};
  std::vector<std::unique_ptr<SessionState>> stepped, pipelined;
  std::vector<int32_t> first;
  for (size_t i = 0; i < prompt_lens.size(); ++i) {
    const auto p = RandomTokens(prompt_lens[i] + 1, V, 40 + i);
    auto s = model->NewSession();
    ASSERT_TRUE(s.ok());
    if (prompt_lens[i] > 0) {
      SessionState* one[] = {s->get()};
      absl::Span<const int32_t> in[] = {absl::MakeConstSpan(p).first(prompt_lens[i])};
      ASSERT_TRUE(model->Forward(one, in, LogitsMode::kNone, nullptr).ok());
    }
    auto f = (*s)->Fork();
    ASSERT_TRUE(f.ok());
    stepped.push_back(std::move(*s));
    pipelined.push_back(std::move(*f));
    first.push_back(p.back());
  }
  std::vector<SamplingOptions> options(3);
  options[1].temperature = 0.8f;
  options[1].seed = 7;
  options[2].temperature = 1.3f;
  options[2].top_k = 20;
  options[2].seed = 3;
  auto ptrs = [](const std::vector<std::unique_ptr<SessionState>>& v) {
    std::vector<SessionState*> p;
    for (const auto& s : v) p.push_back(s.get());
    return p;
  };
  const std::vector<SessionState*> a = ptrs(stepped), b = ptrs(pipelined);

  // Step by step: each step's sampled tokens are the next step's input.
  std::vector<std::vector<int32_t>> want;
  std::vector<std::vector<float>> want_logprobs;
  std::vector<int32_t> next = first;
  const bool all[] = {true, true, true};
  for (int step = 0; step < steps; ++step) {
    std::vector<absl::Span<const int32_t>> spans;
    for (const int32_t& t : next) spans.push_back(absl::MakeConstSpan(&t, 1));
    std::vector<int32_t> sampled;
    std::vector<float> logprobs;
    ASSERT_TRUE(model->ForwardAndSample(a, spans, options, &sampled, all, &logprobs).ok());
    want.push_back(sampled);
    want_logprobs.push_back(logprobs);
    next = sampled;
  }

  // Pipelined: two steps in flight, the later one fed by the earlier one's tokens on the device;
  // every third step also brings its tokens' logprobs back.
  std::vector<std::vector<int32_t>> got;
  std::vector<std::vector<float>> got_logprobs;
  auto collect = [&] {
    std::vector<int32_t> sampled;
    std::vector<float> logprobs;
    ASSERT_TRUE(model->CollectDecode(&sampled, &logprobs).ok());
    got.push_back(sampled);
    got_logprobs.push_back(logprobs);
  };
  ASSERT_TRUE(model->LaunchDecode(b, first, options, /*logprobs=*/true).ok());
  for (int step = 1; step < steps; ++step) {
    ASSERT_TRUE(model->LaunchDecode(b, {}, options, /*logprobs=*/step % 3 == 0).ok());
    EXPECT_EQ(model->decodes_in_flight(), 2);
    collect();
  }
  collect();
  EXPECT_EQ(got, want);
  for (int step = 0; step < steps; ++step) {
    for (size_t s = 0; s < a.size(); ++s) {
      const float lp = got_logprobs[step][s];
      if (step % 3 != 0) {
        EXPECT_TRUE(std::isnan(lp)) << "step " << step;
        continue;
      }
      EXPECT_NEAR(lp, want_logprobs[step][s], 1e-5) << "step " << step << " session " << s;
      EXPECT_LE(lp, 0.0f);
    }
  }
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(b[i]->position(), a[i]->position());
    EXPECT_EQ(b[i]->num_chunks(), a[i]->num_chunks());
  }
  // The states agree as well: one more step from each gives the same tokens.
  std::vector<int32_t> from_a, from_b;
  std::vector<absl::Span<const int32_t>> spans;
  for (const int32_t& t : want.back()) spans.push_back(absl::MakeConstSpan(&t, 1));
  ASSERT_TRUE(model->ForwardAndSample(a, spans, options, &from_a).ok());
  ASSERT_TRUE(model->ForwardAndSample(b, spans, options, &from_b).ok());
  EXPECT_EQ(from_a, from_b);
}

// Misuse: each call fails with FailedPrecondition / InvalidArgument and leaves positions alone.
inline void ExpectPipelinedDecodeMisuseRefused(RambaModel* model) {
  auto s1 = model->NewSession();
  auto s2 = model->NewSession();
  ASSERT_TRUE(s1.ok() && s2.ok());
  SessionState* one[] = {s1->get()};
  SessionState* two[] = {s1->get(), s2->get()};
  SessionState* swapped[] = {s2->get(), s1->get()};
  const std::vector<SamplingOptions> o1(1), o2(2);
  const int32_t t1[] = {5};
  std::vector<int32_t> out;
  auto positions = [&] { return std::make_pair((*s1)->position(), (*s2)->position()); };

  EXPECT_EQ(model->CollectDecode(&out).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(model->LaunchDecode(one, {}, o1).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(model->LaunchDecode(one, t1, o2).code(), absl::StatusCode::kInvalidArgument);
  const int32_t bad[] = {static_cast<int32_t>(model->config().vocab_size)};
  EXPECT_EQ(model->LaunchDecode(one, bad, o1).code(), absl::StatusCode::kInvalidArgument);
  SamplingOptions negative;
  negative.temperature = -1;
  EXPECT_EQ(model->LaunchDecode(one, t1, {negative}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(positions(), std::make_pair(int64_t{0}, int64_t{0}));

  const int32_t t2[] = {5, 6};
  ASSERT_TRUE(model->LaunchDecode(two, t2, o2).ok());
  const auto after_one = positions();
  EXPECT_EQ(after_one, std::make_pair(int64_t{1}, int64_t{1}));
  // Other sessions, or the same in another order, cannot take the launched step's tokens.
  EXPECT_EQ(model->LaunchDecode(one, {}, o1).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(model->LaunchDecode(swapped, {}, o2).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(model->LaunchDecode(two, {}, o2).ok());
  // At most kMaxDecodesInFlight uncollected.
  EXPECT_EQ(model->LaunchDecode(two, {}, o2).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(positions(), std::make_pair(int64_t{2}, int64_t{2}));
  ASSERT_TRUE(model->CollectDecode(&out).ok());
  EXPECT_EQ(out.size(), 2u);
  ASSERT_TRUE(model->CollectDecode(&out).ok());
  for (int32_t t : out) EXPECT_TRUE(t >= 0 && t < model->config().vocab_size) << t;
  // Forward calls on other sessions, sampling included, leave the chain alone ...
  auto s3 = model->NewSession();
  ASSERT_TRUE(s3.ok());
  SessionState* other[] = {s3->get()};
  std::vector<int32_t> other_sampled;
  absl::Span<const int32_t> other_in[] = {absl::MakeConstSpan(t1)};
  ASSERT_TRUE(model->ForwardAndSample(other, other_in, o1, &other_sampled).ok());
  ASSERT_TRUE(model->LaunchDecode(two, {}, o2).ok());
  ASSERT_TRUE(model->CollectDecode(&out).ok());
  EXPECT_EQ(positions(), std::make_pair(int64_t{3}, int64_t{3}));
  // ... but one that feeds a chained session breaks it.
  std::vector<float> logits;
  ASSERT_TRUE(model->Decode(one, t1, &logits).ok());
  EXPECT_EQ(model->LaunchDecode(two, {}, o2).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(positions(), std::make_pair(int64_t{4}, int64_t{3}));
}

}  // namespace ramba::testing

#endif  // RAMBA_TESTS_MODEL_PIPELINED_DECODE_H_
