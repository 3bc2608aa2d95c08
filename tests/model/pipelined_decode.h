// Shared by the CPU and GPU model tests: RambaModel::LaunchDecode / CollectDecode chains give the
// tokens that ForwardAndSample gives step by step, and misuse is refused without a state change.
#ifndef RAMBA_TESTS_MODEL_PIPELINED_DECODE_H_
#define RAMBA_TESTS_MODEL_PIPELINED_DECODE_H_

#include <algorithm>
#include <cmath>
#include <deque>
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "model/ramba_model.h"
#include "model/sampler.h"
#include "tests/testing/test_util.h"

namespace ramba::testing {

// Sessions prefilled with random prompts of `prompt_lens` tokens (seeds from `seed`), each with a
// fork: the two copies to run two ways, and each session's next input token.
struct ForkedSessions {
  std::vector<std::unique_ptr<SessionState>> a, b;
  std::vector<int32_t> next;
};
inline void PrefillForked(RambaModel* model, const std::vector<int64_t>& prompt_lens, uint64_t seed,
                          ForkedSessions* out) {
  for (size_t i = 0; i < prompt_lens.size(); ++i) {
    const auto p = RandomTokens(prompt_lens[i] + 1, model->config().vocab_size, seed + i);
    auto s = model->NewSession();
    ASSERT_TRUE(s.ok());
    SessionState* one[] = {s->get()};
    absl::Span<const int32_t> in[] = {absl::MakeConstSpan(p).first(prompt_lens[i])};
    ASSERT_TRUE(model->Forward(one, in, LogitsMode::kNone, nullptr).ok());
    auto f = (*s)->Fork();
    ASSERT_TRUE(f.ok());
    out->a.push_back(std::move(*s));
    out->b.push_back(std::move(*f));
    out->next.push_back(p.back());
  }
}

// Three sessions (prompts of 1, 60 and 130 tokens, so chunks complete during the steps), one
// greedy and two sampling with seeds, decode `steps` tokens both ways from forks of one prefill.
inline void ExpectPipelinedDecodeMatchesSteps(RambaModel* model, int steps) {
  ForkedSessions sessions;
  PrefillForked(model, {1, 60, 130}, 40, &sessions);
  if (::testing::Test::HasFatalFailure()) return;
  const std::vector<std::unique_ptr<SessionState>>& stepped = sessions.a;
  const std::vector<std::unique_ptr<SessionState>>& pipelined = sessions.b;
  const std::vector<int32_t> first = sessions.next;
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
  std::vector<std::vector<TopLogprob>> want_top;  // 5 per session
  std::vector<int32_t> next = first;
  const bool all[] = {true, true, true};
  for (int step = 0; step < steps; ++step) {
    std::vector<absl::Span<const int32_t>> spans;
    for (const int32_t& t : next) spans.push_back(absl::MakeConstSpan(&t, 1));
    std::vector<int32_t> sampled;
    std::vector<float> logprobs;
    std::vector<TopLogprob> top;
    ASSERT_TRUE(model->ForwardAndSample(a, spans, options, &sampled, all, &logprobs, 5, &top).ok());
    want.push_back(sampled);
    want_logprobs.push_back(logprobs);
    want_top.push_back(top);
    next = sampled;
  }

  // Pipelined: two steps in flight, the later one fed by the earlier one's tokens on the device;
  // every third step also brings its tokens' logprobs back, and each row's 5 most likely tokens.
  std::vector<std::vector<int32_t>> got;
  std::vector<std::vector<float>> got_logprobs;
  std::vector<std::vector<TopLogprob>> got_top;
  auto collect = [&] {
    std::vector<int32_t> sampled;
    std::vector<float> logprobs;
    std::vector<TopLogprob> top;
    ASSERT_TRUE(model->CollectDecode(&sampled, &logprobs, &top).ok());
    got.push_back(sampled);
    got_logprobs.push_back(logprobs);
    got_top.push_back(top);
  };
  ASSERT_TRUE(model->LaunchDecode(b, first, options, /*logprobs=*/true, /*top_logprobs=*/5).ok());
  for (int step = 1; step < steps; ++step) {
    ASSERT_TRUE(
        model->LaunchDecode(b, {}, options, /*logprobs=*/step % 3 == 0, step % 3 == 0 ? 5 : 0)
            .ok());
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
        EXPECT_TRUE(got_top[step].empty()) << "step " << step;
        continue;
      }
      EXPECT_NEAR(lp, want_logprobs[step][s], 1e-5) << "step " << step << " session " << s;
      EXPECT_LE(lp, 0.0f);
      ASSERT_EQ(got_top[step].size(), 5 * a.size());
      for (size_t j = 5 * s; j < 5 * s + 5; ++j) {
        EXPECT_EQ(got_top[step][j].id, want_top[step][j].id) << "step " << step << " entry " << j;
        EXPECT_NEAR(got_top[step][j].logprob, want_top[step][j].logprob, 1e-5);
        if (j > 5 * s) EXPECT_LE(got_top[step][j].logprob, got_top[step][j - 1].logprob);
      }
      // A greedy row's token is its most likely one.
      if (options[s].temperature == 0.0f) EXPECT_EQ(got[step][s], got_top[step][5 * s].id);
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

// Launches whose rows join, leave and change order between them (LaunchForward's `carried`): a
// session in the last launch takes its token from there on the device, others feed theirs from
// the host. The same tokens as ForwardAndSample over the same batches, and Feed (queued, no
// logits) leaves a session as Forward with no logits does.
inline void ExpectCarriedRowsMatchSteps(RambaModel* model, int launches) {
  const int64_t V = model->config().vocab_size;
  ForkedSessions sessions;
  PrefillForked(model, {1, 62, 63, 130}, 70, &sessions);
  if (::testing::Test::HasFatalFailure()) return;
  const int n = static_cast<int>(sessions.next.size());
  const std::vector<std::unique_ptr<SessionState>>& stepped = sessions.a;
  const std::vector<std::unique_ptr<SessionState>>& launched = sessions.b;
  std::vector<int32_t> next = sessions.next;  // each session's next input token
  std::vector<SamplingOptions> options(n);
  options[1].temperature = 0.9f;
  options[1].seed = 5;
  options[3].temperature = 1.2f;
  options[3].top_k = 30;
  options[3].seed = 9;
  // Launch k's rows: a changing subset, reversed on odd k.
  auto members = [n](int k) {
    std::vector<int> m;
    for (int i = 0; i < n; ++i) {
      if ((k * 7 + i * 3) % 5 != 0) m.push_back(i);
    }
    if (k % 2 == 1) std::reverse(m.begin(), m.end());
    return m;
  };

  // Step by step.
  std::vector<std::vector<int32_t>> want;
  {
    std::vector<int32_t> last = next;
    for (int k = 0; k < launches; ++k) {
      const std::vector<int> m = members(k);
      std::vector<SessionState*> st;
      std::vector<absl::Span<const int32_t>> in;
      std::vector<SamplingOptions> o;
      for (int i : m) {
        st.push_back(stepped[i].get());
        in.push_back(absl::MakeConstSpan(&last[i], 1));
        o.push_back(options[i]);
      }
      std::vector<int32_t> sampled;
      ASSERT_TRUE(model->ForwardAndSample(st, in, o, &sampled).ok());
      for (size_t r = 0; r < m.size(); ++r) last[m[r]] = sampled[r];
      want.push_back(sampled);
    }
  }

  // Launched: two in flight; rows of the last launch carried, the rest fed their collected token.
  std::vector<std::vector<int32_t>> got;
  std::vector<int> last_members;
  std::vector<int> pending_members;  // members of the launch not yet collected, oldest first
  std::deque<std::vector<int>> uncollected;
  auto collect = [&] {
    std::vector<int32_t> sampled;
    ASSERT_TRUE(model->CollectDecode(&sampled).ok());
    const std::vector<int> m = uncollected.front();
    uncollected.pop_front();
    ASSERT_EQ(sampled.size(), m.size());
    for (size_t r = 0; r < m.size(); ++r) next[m[r]] = sampled[r];
    got.push_back(sampled);
  };
  for (int k = 0; k < launches; ++k) {
    const std::vector<int> m = members(k);
    std::vector<SessionState*> st;
    std::vector<absl::Span<const int32_t>> in;
    std::vector<SamplingOptions> o;
    std::vector<int32_t> carried;
    for (int i : m) {
      st.push_back(launched[i].get());
      o.push_back(options[i]);
      const auto at = std::find(last_members.begin(), last_members.end(), i);
      if (at != last_members.end()) {
        carried.push_back(static_cast<int32_t>(at - last_members.begin()));
        in.emplace_back();
      } else {
        carried.push_back(-1);
        in.push_back(absl::MakeConstSpan(&next[i], 1));
      }
    }
    ASSERT_TRUE(model->LaunchForward(st, in, o, /*logprobs=*/k % 4 == 0, carried).ok())
        << "launch " << k;
    uncollected.push_back(m);
    last_members = m;
    if (uncollected.size() == 2) collect();
  }
  while (!uncollected.empty()) collect();
  EXPECT_EQ(got, want);
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(launched[i]->position(), stepped[i]->position()) << i;
    EXPECT_EQ(launched[i]->num_chunks(), stepped[i]->num_chunks()) << i;
  }

  // Feed: queued prompt tokens, then one step each; a Forward without logits on the other copy.
  const auto more = RandomTokens(70, V, 99);
  SessionState* a[] = {stepped[2].get()};
  SessionState* b[] = {launched[2].get()};
  absl::Span<const int32_t> in[] = {absl::MakeConstSpan(more)};
  ASSERT_TRUE(model->Forward(a, in, LogitsMode::kNone, nullptr).ok());
  ASSERT_TRUE(model->Feed(b, in).ok());
  EXPECT_EQ(b[0]->position(), a[0]->position());
  const int32_t t[] = {7};
  std::vector<int32_t> from_a, from_b;
  ASSERT_TRUE(model->ForwardAndSample(a, {absl::MakeConstSpan(t)}, {options[2]}, &from_a).ok());
  ASSERT_TRUE(model->ForwardAndSample(b, {absl::MakeConstSpan(t)}, {options[2]}, &from_b).ok());
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

  // Carried rows: only the last launch's rows, each for its own session, as that launch left it.
  ASSERT_TRUE(model->LaunchDecode(two, t2, o2).ok());
  ASSERT_TRUE(model->CollectDecode(&out).ok());
  const std::vector<absl::Span<const int32_t>> none(2);
  const std::vector<absl::Span<const int32_t>> given = {absl::MakeConstSpan(t1), {}};
  const int32_t swap[] = {1, 0}, past_end[] = {2, -1}, short_carried[] = {0};
  const int32_t keep_second[] = {-1, 1};
  EXPECT_EQ(model->LaunchForward(two, none, o2, false, swap).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(model->LaunchForward(two, given, o2, false, past_end).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(model->LaunchForward(two, none, o2, false, short_carried).code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<absl::Span<const int32_t>> both = {absl::MakeConstSpan(t1),
                                                       absl::MakeConstSpan(t1)};
  EXPECT_EQ(model->LaunchForward(two, both, o2, false, keep_second).code(),
            absl::StatusCode::kInvalidArgument);  // carried and given tokens
  EXPECT_EQ(positions(), std::make_pair(int64_t{5}, int64_t{4}));
  // A valid one: the first session fed from the host, the second carried.
  ASSERT_TRUE(model->LaunchForward(two, given, o2, false, keep_second).ok());
  ASSERT_TRUE(model->CollectDecode(&out).ok());
  EXPECT_EQ(positions(), std::make_pair(int64_t{6}, int64_t{5}));
  // Fed since: no longer carried.
  ASSERT_TRUE(model->Decode(swapped, t2, &logits).ok());
  const int32_t both_carried[] = {0, 1};
  EXPECT_EQ(model->LaunchForward(two, none, o2, false, both_carried).code(),
            absl::StatusCode::kFailedPrecondition);
}

// Logit bias, held-back tokens and repetition penalties: pipelined launches (each step's tokens
// counted on the backend and fed to the next on the device) give the tokens of a host reference
// that adjusts downloaded logits step by step (the CPU backend's ApplyPenalties, bit-exact with
// the GPU's) and samples them without adjustments; a session whose counts were never reset is
// refused, unchanged.
inline void ExpectPenaltiesMatchHostReference(RambaModel* model, int steps) {
  const int64_t V = model->config().vocab_size;
  const std::vector<int64_t> lens = {1, 60, 130};
  constexpr uint64_t kSeed = 90;
  ForkedSessions sessions;
  PrefillForked(model, lens, kSeed, &sessions);
  if (::testing::Test::HasFatalFailure()) return;
  std::vector<SessionState*> a, b;
  for (size_t i = 0; i < lens.size(); ++i) {
    a.push_back(sessions.a[i].get());
    b.push_back(sessions.b[i].get());
  }
  std::vector<SamplingOptions> options(3);
  options[0].frequency_penalty = 1.5f;  // greedy
  options[0].presence_penalty = 0.5f;
  options[0].repetition_penalty = 1.3f;
  options[1].temperature = 0.9f;
  options[1].seed = 11;
  options[1].repetition_penalty = 1.8f;
  options[1].presence_penalty = -0.4f;
  // options[2]: greedy without penalties, beside rows with them. Rows 0 and 2 have a logit bias;
  // row 1 holds back every third token id for its first kHeldSteps tokens (min_tokens).
  constexpr int kHeldSteps = 4;
  std::vector<std::vector<LogitBias>> bias(lens.size());
  std::vector<std::vector<float>> dense_bias(lens.size());
  std::vector<int32_t> held;
  {
    std::mt19937 gen(5);
    for (int i : {0, 2}) {
      options[i].logit_bias = true;
      dense_bias[i].assign(static_cast<size_t>(V), 0.0f);
      for (int32_t t = 0; t < V; t += 1 + static_cast<int32_t>(gen() % 4)) {
        const float v = (static_cast<int>(gen() % 21) - 10) * 5.0f;
        bias[i].push_back({t, v});
        dense_bias[i][t] = v;
      }
    }
    for (int32_t t = 0; t < V; t += 3) held.push_back(t);
  }
  auto options_at = [&](int step) {
    std::vector<SamplingOptions> o = options;
    o[1].hold_back = step < kHeldSteps;
    return o;
  };
  std::vector<SamplingOptions> plain(lens.size());
  for (size_t i = 0; i < lens.size(); ++i) {
    plain[i].temperature = options[i].temperature;
    plain[i].seed = options[i].seed;
  }

  // Reference on the host.
  auto cpu = kernels::CreateCpuBackend(1);
  std::vector<std::vector<int32_t>> prompts, counts;
  for (size_t i = 0; i < lens.size(); ++i) {
    prompts.push_back(RandomTokens(lens[i] + 1, V, kSeed + i));
    counts.emplace_back(static_cast<size_t>(V), 0);
    for (int32_t t : prompts.back()) counts.back()[t] = kernels::PenaltyParams::kPromptTokenBit;
  }
  for (int32_t t : held) counts[1][t] |= kernels::PenaltyParams::kHeldBackBit;
  std::vector<std::vector<int32_t>> want;
  std::vector<int32_t> next = sessions.next;
  int penalty_changed_greedy = 0, bias_changed_greedy = 0;
  for (int step = 0; step < steps; ++step) {
    std::vector<absl::Span<const int32_t>> spans;
    for (const int32_t& t : next) spans.push_back(absl::MakeConstSpan(&t, 1));
    std::vector<float> logits;
    ASSERT_TRUE(model->Forward(a, spans, LogitsMode::kLast, &logits).ok());
    const std::vector<SamplingOptions> at = options_at(step);
    std::vector<kernels::PenaltyParams> params(lens.size());
    std::vector<int64_t> positions;
    for (size_t i = 0; i < lens.size(); ++i) {
      const SamplingOptions& o = at[i];
      if (o.needs_token_counts()) {
        params[i] = {counts[i].data(), o.presence_penalty, o.frequency_penalty,
                     o.repetition_penalty};
        params[i].hold_back = o.hold_back;
      }
      if (o.logit_bias) params[i].bias = dense_bias[i].data();
      positions.push_back(a[i]->position());
    }
    std::vector<float> penalized(logits.size());
    ASSERT_TRUE(cpu->ApplyPenalties(logits.data(), 3, V, params.data(), penalized.data()).ok());
    auto sampled = SampleTokens(model->backend(), penalized, V, plain, positions);
    ASSERT_TRUE(sampled.ok()) << sampled.status();
    ASSERT_TRUE(cpu->CountTokens(params.data(), 3, V, sampled->data()).ok());
    auto argmax = [&](size_t row) {
      const auto first = logits.begin() + static_cast<int64_t>(row) * V;
      return static_cast<int32_t>(std::max_element(first, first + V) - first);
    };
    penalty_changed_greedy += (*sampled)[0] != argmax(0);
    bias_changed_greedy += (*sampled)[2] != argmax(2);
    if (step < kHeldSteps) {
      EXPECT_NE((*sampled)[1] % 3, 0) << "step " << step << " sampled a held-back token";
    }
    want.push_back(*sampled);
    next = *sampled;
  }
  EXPECT_GT(penalty_changed_greedy, 0) << "the penalties never changed a greedy token";
  EXPECT_GT(bias_changed_greedy, 0) << "the bias never changed a greedy token";

  // Counts never reset: refused before any state changes.
  const int64_t before = b[0]->position();
  EXPECT_EQ(model->LaunchDecode(b, sessions.next, options).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(b[0]->position(), before);
  EXPECT_EQ(model->decodes_in_flight(), 0);

  // Pipelined on the model.
  for (size_t i = 0; i < lens.size(); ++i) {
    if (options[i].has_penalties()) {
      ASSERT_TRUE(b[i]->ResetTokenCounts(prompts[i], i == 1 ? absl::MakeConstSpan(held)
                                                            : absl::Span<const int32_t>())
                      .ok());
    }
    if (options[i].logit_bias) ASSERT_TRUE(b[i]->SetLogitBias(bias[i]).ok());
  }
  std::vector<std::vector<int32_t>> got;
  auto collect = [&] {
    std::vector<int32_t> sampled;
    ASSERT_TRUE(model->CollectDecode(&sampled).ok());
    got.push_back(sampled);
  };
  ASSERT_TRUE(model->LaunchDecode(b, sessions.next, options_at(0)).ok());
  for (int step = 1; step < steps; ++step) {
    ASSERT_TRUE(model->LaunchDecode(b, {}, options_at(step)).ok());
    collect();
  }
  collect();
  EXPECT_EQ(got, want);
  for (SessionState* s : b) s->ReleaseGenerationScratch();
}

}  // namespace ramba::testing

#endif  // RAMBA_TESTS_MODEL_PIPELINED_DECODE_H_
