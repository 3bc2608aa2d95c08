// The engine's continuous batching gives each request exactly what it would get alone, stops on
// request, and leaves states consistent.
#include "server/engine.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <future>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "model/weights.h"
#include "server/metrics.h"
#include "tests/testing/test_util.h"

namespace ramba::server {
namespace {

struct Outcome {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;  // one per token; NaN unless the request asked
  std::vector<std::vector<TopLogprob>> top;  // one list per token
  absl::Status status;
  FinishReason reason = FinishReason::kNone;
};

// Every test runs with prompts batched beside decode rows and with them fed apart
// (EngineOptions::split_prefill).
class EngineTest : public ::testing::TestWithParam<bool> {
 protected:
  EngineOptions Opts() const {
    EngineOptions o;
    o.split_prefill = GetParam();
    return o;
  }

  void SetUp() override {
    backend_ = kernels::CreateCpuBackend();
    config_ = testing::SmallConfig();
    model_ = std::move(*RambaModel::Create(config_, RandomTensors(config_, 11), backend_.get()));
  }

  // Submits a request and returns a future of its outcome.
  std::future<Outcome> Run(Engine& engine, SessionState* state, std::vector<int32_t> input,
                           int max_new, SamplingOptions sampling = {},
                           std::function<TokenAction(int32_t)> stop = nullptr,
                           std::shared_ptr<EngineRequest>* handle = nullptr,
                           bool include_logprobs = false, bool feed_stop_token = true,
                           int32_t top_logprobs = 0,
                           std::function<void(EngineRequest*)> edit = nullptr) {
    auto req = std::make_shared<EngineRequest>();
    auto outcome = std::make_shared<Outcome>();
    auto promise = std::make_shared<std::promise<Outcome>>();
    req->state = state;
    req->input = std::move(input);
    req->max_new_tokens = max_new;
    req->sampling = sampling;
    req->include_logprobs = include_logprobs;
    req->top_logprobs = top_logprobs;
    req->feed_stop_token = feed_stop_token;
    req->on_token = [outcome, stop](int32_t t, float logprob, absl::Span<const TopLogprob> top) {
      outcome->top.emplace_back(top.begin(), top.end());
      outcome->tokens.push_back(t);
      outcome->logprobs.push_back(logprob);
      return stop ? stop(t) : TokenAction::kContinue;
    };
    req->on_done = [outcome, promise](const absl::Status& s, FinishReason r) {
      outcome->status = s;
      outcome->reason = r;
      promise->set_value(*outcome);
    };
    if (edit) edit(req.get());
    if (handle != nullptr) *handle = req;
    engine.Submit(req);
    return promise->get_future();
  }

  // The same generation done by hand with Prefill + Decode.
  std::vector<int32_t> Reference(const std::vector<int32_t>& prompt, int n) {
    auto s = std::move(*model_->NewSession());
    std::vector<float> logits;
    EXPECT_TRUE(model_->Prefill(s.get(), prompt, &logits).ok());
    std::vector<int32_t> out;
    SessionState* st[] = {s.get()};
    for (int i = 0; i < n; ++i) {
      const int32_t t = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
      out.push_back(t);
      if (i + 1 < n) {
        const int32_t in[] = {t};
        EXPECT_TRUE(model_->Decode(st, in, &logits).ok());
      }
    }
    return out;
  }

  // log softmax of the logits that preceded each of `tokens` (fed one by one after `prompt`), in
  // double: the raw distribution's logprobs, whatever the sampling options.
  std::vector<double> ReferenceLogprobs(const std::vector<int32_t>& prompt,
                                        const std::vector<int32_t>& tokens) {
    auto s = std::move(*model_->NewSession());
    std::vector<float> logits;
    EXPECT_TRUE(model_->Prefill(s.get(), prompt, &logits).ok());
    std::vector<double> out;
    SessionState* st[] = {s.get()};
    for (int32_t t : tokens) {
      double max = -INFINITY, sum = 0.0;
      for (float x : logits) max = std::max<double>(max, x);
      for (float x : logits) sum += std::exp(x - max);
      out.push_back(logits[t] - max - std::log(sum));
      const int32_t in[] = {t};
      EXPECT_TRUE(model_->Decode(st, in, &logits).ok());
    }
    return out;
  }

  std::unique_ptr<kernels::Backend> backend_;
  ModelConfig config_;
  std::unique_ptr<RambaModel> model_;
};

TEST_P(EngineTest, ConcurrentRequestsMatchRunningAlone) {
  EngineOptions opts = Opts();
  opts.max_batch_tokens = 96;  // forces prompts to be split across iterations
  Engine engine(model_.get(), opts);
  std::vector<std::unique_ptr<SessionState>> states;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::future<Outcome>> futures;
  for (int i = 0; i < 6; ++i) {
    prompts.push_back(testing::RandomTokens(20 + 70 * i, config_.vocab_size, 100 + i));
    states.push_back(std::move(*model_->NewSession()));
  }
  for (int i = 0; i < 6; ++i) futures.push_back(Run(engine, states[i].get(), prompts[i], 12));
  for (int i = 0; i < 6; ++i) {
    Outcome o = futures[i].get();
    ASSERT_TRUE(o.status.ok()) << o.status;
    EXPECT_EQ(o.reason, FinishReason::kMaxTokens);
    EXPECT_EQ(o.tokens, Reference(prompts[i], 12)) << "request " << i;
    // The last generated token is not fed: it is the caller's pending token.
    EXPECT_EQ(states[i]->position(), static_cast<int64_t>(prompts[i].size()) + 11);
  }
}

// The warm-up runs on the engine thread before any request; requests submitted meanwhile wait
// for it and get what they would get without one.
TEST_P(EngineTest, WarmupRunsFirstAndChangesNoResult) {
  EngineOptions opts = Opts();
  opts.warmup = true;
  Engine engine(model_.get(), opts);
  const auto prompt = testing::RandomTokens(150, config_.vocab_size, 5);
  auto state = std::move(*model_->NewSession());
  std::future<Outcome> f = Run(engine, state.get(), prompt, 40);
  ASSERT_TRUE(engine.WaitForWarmup().ok());
  Outcome o = f.get();
  ASSERT_TRUE(o.status.ok()) << o.status;
  EXPECT_EQ(o.tokens, Reference(prompt, 40));

  Engine cold(model_.get(), Opts());
  EXPECT_TRUE(cold.WaitForWarmup().ok());  // no warm-up: returns at once
}

// Penalties count the request's input as the prompt and the tokens of this generation only: a
// greedy reference penalises host logits (the CPU backend's ApplyPenalties) after prefilling the
// whole history. Two generations in a row on one session, batched beside a request without
// penalties.
TEST_P(EngineTest, PenaltiesCountTheInputAndEachGenerationAfresh) {
  Engine engine(model_.get(), Opts());
  SamplingOptions penalised;
  penalised.frequency_penalty = 1.0f;
  penalised.presence_penalty = 0.5f;
  penalised.repetition_penalty = 1.5f;
  auto reference = [&](const std::vector<int32_t>& history, const std::vector<int32_t>& prompt,
                       int n) {
    auto s = std::move(*model_->NewSession());
    std::vector<float> logits;
    EXPECT_TRUE(model_->Prefill(s.get(), history, &logits).ok());
    std::vector<int32_t> counts(config_.vocab_size, 0);
    for (int32_t t : prompt) counts[t] = kernels::PenaltyParams::kPromptTokenBit;
    const kernels::PenaltyParams p{counts.data(), penalised.presence_penalty,
                                   penalised.frequency_penalty, penalised.repetition_penalty};
    std::vector<int32_t> out;
    SessionState* st[] = {s.get()};
    for (int i = 0; i < n; ++i) {
      std::vector<float> pen(logits.size());
      EXPECT_TRUE(
          backend_->ApplyPenalties(logits.data(), 1, config_.vocab_size, &p, pen.data()).ok());
      const int32_t t =
          static_cast<int32_t>(std::max_element(pen.begin(), pen.end()) - pen.begin());
      out.push_back(t);
      ++counts[t];
      const int32_t in[] = {t};
      EXPECT_TRUE(model_->Decode(st, in, &logits).ok());
    }
    return out;
  };
  const auto prompt = testing::RandomTokens(90, config_.vocab_size, 21);
  const auto other = testing::RandomTokens(40, config_.vocab_size, 22);
  auto state = std::move(*model_->NewSession());
  auto other_state = std::move(*model_->NewSession());
  std::future<Outcome> f = Run(engine, state.get(), prompt, 30, penalised);
  std::future<Outcome> g = Run(engine, other_state.get(), other, 30);
  const Outcome first = f.get();
  ASSERT_TRUE(first.status.ok()) << first.status;
  EXPECT_EQ(first.tokens, reference(prompt, prompt, 30));
  EXPECT_EQ(state->token_counts(), nullptr);       // released with the request
  EXPECT_NE(first.tokens, Reference(prompt, 30));  // the penalties changed something
  const Outcome beside = g.get();
  ASSERT_TRUE(beside.status.ok()) << beside.status;
  EXPECT_EQ(beside.tokens, Reference(other, 30));  // and nothing beside them

  // The next generation's prompt is its input: the pending token and two more.
  const std::vector<int32_t> input = {first.tokens.back(), 3, 5};
  const Outcome second = Run(engine, state.get(), input, 20, penalised).get();
  ASSERT_TRUE(second.status.ok()) << second.status;
  std::vector<int32_t> history = prompt;
  history.insert(history.end(), first.tokens.begin(), first.tokens.end() - 1);
  history.insert(history.end(), input.begin(), input.end());
  EXPECT_EQ(second.tokens, reference(history, input, 20));
}

// A logit bias steers greedy choices; held-back tokens stay out of exactly the first
// min_new_tokens tokens, also when steps are launched before the previous token is back (the
// engine decides per launch, counting the token still on the device).
TEST_P(EngineTest, LogitBiasAndHeldBackTokensUntilMinTokens) {
  const auto prompt = testing::RandomTokens(50, config_.vocab_size, 31);
  const std::vector<int32_t> plain = Reference(prompt, 12);
  int32_t forced = 0;  // a token greedy decoding does not pick by itself
  while (std::find(plain.begin(), plain.end(), forced) != plain.end()) ++forced;
  for (const bool pipelined : {true, false}) {
    SCOPED_TRACE(pipelined ? "pipelined" : "one step at a time");
    EngineOptions opts = Opts();
    opts.pipeline_decode = pipelined;
    Engine engine(model_.get(), opts);
    auto state = std::move(*model_->NewSession());
    const Outcome biased =
        Run(engine, state.get(), prompt, 6, {}, nullptr, nullptr, false, true, 0,
            [forced](EngineRequest* r) { r->logit_bias = {{forced, 100.0f}}; })
            .get();
    ASSERT_TRUE(biased.status.ok()) << biased.status;
    EXPECT_EQ(biased.tokens, std::vector<int32_t>(6, forced));
    EXPECT_EQ(state->logit_bias(), nullptr);  // released with the request

    // Held back (as a stop token) for the first 4 tokens: greedy goes its own way until then,
    // and the bias makes the fifth token the stop token.
    for (const int min_tokens : {4, 1}) {
      auto held = std::move(*model_->NewSession());
      auto stop_at_forced = [forced](int32_t t) {
        return t == forced ? TokenAction::kStop : TokenAction::kContinue;
      };
      auto hold_back = [forced, min_tokens](EngineRequest* r) {
        r->logit_bias = {{forced, 100.0f}};
        r->min_new_tokens = min_tokens;
        r->held_back = {forced, 7};
      };
      const Outcome o = Run(engine, held.get(), prompt, 20, {}, stop_at_forced, nullptr, false,
                            true, 0, hold_back)
                            .get();
      ASSERT_TRUE(o.status.ok()) << o.status;
      EXPECT_EQ(o.reason, FinishReason::kStop);
      std::vector<int32_t> want(plain.begin(), plain.begin() + min_tokens);
      want.push_back(forced);
      EXPECT_EQ(o.tokens, want) << "min_tokens " << min_tokens;
      EXPECT_EQ(held->token_counts(), nullptr);
    }
  }
  // Bad bias entries and held-back ids fail the request alone.
  Engine engine(model_.get(), Opts());
  auto state = std::move(*model_->NewSession());
  for (const auto& edit : std::vector<std::function<void(EngineRequest*)>>{
           [](EngineRequest* r) { r->logit_bias = {{1, 101.0f}}; },
           [this](EngineRequest* r) {
             r->logit_bias = {{static_cast<int32_t>(config_.vocab_size), 1.0f}};
           },
           [](EngineRequest* r) { r->logit_bias = {{3, 1.0f}, {3, 2.0f}}; },
           [](EngineRequest* r) { r->held_back = {-1}; },
           [](EngineRequest* r) { r->min_new_tokens = -1; }}) {
    const Outcome bad =
        Run(engine, state.get(), prompt, 3, {}, nullptr, nullptr, false, true, 0, edit).get();
    EXPECT_EQ(bad.status.code(), absl::StatusCode::kInvalidArgument) << bad.status;
    EXPECT_EQ(state->position(), 0);
  }
}

// Logprobs come with the tokens of requests that ask for them, batched with requests that do not
// (NaN there): the raw distribution's, so temperature does not change them.
TEST_P(EngineTest, LogprobsAreTheRawLogSoftmaxOfSampledTokens) {
  for (bool pipelined : {true, false}) {
    SCOPED_TRACE(pipelined ? "pipelined" : "one step at a time");
    EngineOptions opts = Opts();
    opts.max_batch_tokens = 64;  // the long prompt is fed over several steps, beside decodes
    opts.pipeline_decode = pipelined;
    Engine engine(model_.get(), opts);
    const std::vector<int32_t> p0 = testing::RandomTokens(150, config_.vocab_size, 31);
    const std::vector<int32_t> p1 = testing::RandomTokens(9, config_.vocab_size, 32);
    const std::vector<int32_t> p2 = testing::RandomTokens(40, config_.vocab_size, 33);
    auto s0 = std::move(*model_->NewSession());
    auto s1 = std::move(*model_->NewSession());
    auto s2 = std::move(*model_->NewSession());
    SamplingOptions hot;
    hot.temperature = 1.5f;
    hot.seed = 3;
    auto f0 = Run(engine, s0.get(), p0, 6, {}, nullptr, nullptr, /*include_logprobs=*/true);
    auto f1 = Run(engine, s1.get(), p1, 6, {}, nullptr, nullptr, /*include_logprobs=*/false);
    auto f2 = Run(engine, s2.get(), p2, 6, hot, nullptr, nullptr, /*include_logprobs=*/true);
    const Outcome o0 = f0.get(), o1 = f1.get(), o2 = f2.get();
    ASSERT_TRUE(o0.status.ok() && o1.status.ok() && o2.status.ok());
    ASSERT_EQ(o0.logprobs.size(), 6u);
    ASSERT_EQ(o2.logprobs.size(), 6u);
    const std::vector<double> want0 = ReferenceLogprobs(p0, o0.tokens);
    const std::vector<double> want2 = ReferenceLogprobs(p2, o2.tokens);
    for (int i = 0; i < 6; ++i) {
      EXPECT_NEAR(o0.logprobs[i], want0[i], 1e-4) << i;
      EXPECT_NEAR(o2.logprobs[i], want2[i], 1e-4) << i;
      EXPECT_LE(o0.logprobs[i], 0.0f);
      EXPECT_TRUE(std::isnan(o1.logprobs[i])) << i;
    }
    // Greedy picks the most likely token: no other has a larger logprob.
    EXPECT_GE(o0.logprobs[0], -std::log(static_cast<double>(config_.vocab_size)));
  }
}

// Top logprobs: each token comes with its request's n most likely tokens under the raw
// distribution, most likely first, checked against host logits (ties within rounding allowed).
TEST_P(EngineTest, TopLogprobsAreTheMostLikelyTokensOfTheRawDistribution) {
  for (bool pipelined : {true, false}) {
    SCOPED_TRACE(pipelined ? "pipelined" : "one step at a time");
    EngineOptions opts = Opts();
    opts.max_batch_tokens = 64;
    opts.pipeline_decode = pipelined;
    Engine engine(model_.get(), opts);
    const std::vector<int32_t> p0 = testing::RandomTokens(100, config_.vocab_size, 41);
    const std::vector<int32_t> p1 = testing::RandomTokens(30, config_.vocab_size, 42);
    auto s0 = std::move(*model_->NewSession());
    auto s1 = std::move(*model_->NewSession());
    auto s2 = std::move(*model_->NewSession());
    SamplingOptions hot;
    hot.temperature = 1.5f;
    hot.seed = 5;
    auto f0 = Run(engine, s0.get(), p0, 8, hot, nullptr, nullptr, false, true, /*top=*/4);
    auto f1 = Run(engine, s1.get(), p1, 8, {}, nullptr, nullptr, false, true, /*top=*/1);
    auto f2 = Run(engine, s2.get(), p1, 8);
    const Outcome o0 = f0.get(), o1 = f1.get(), o2 = f2.get();
    ASSERT_TRUE(o0.status.ok() && o1.status.ok() && o2.status.ok());
    for (const auto& [o, prompt, n] :
         {std::tuple(&o0, &p0, 4), std::tuple(&o1, &p1, 1), std::tuple(&o2, &p1, 0)}) {
      ASSERT_EQ(o->top.size(), 8u);
      // The logits before each generated token, on the host.
      auto s = std::move(*model_->NewSession());
      std::vector<float> logits;
      ASSERT_TRUE(model_->Prefill(s.get(), *prompt, &logits).ok());
      SessionState* st[] = {s.get()};
      for (int i = 0; i < 8; ++i) {
        const std::vector<TopLogprob>& top = o->top[i];
        ASSERT_EQ(top.size(), static_cast<size_t>(n)) << i;
        if (n > 0) EXPECT_FALSE(std::isnan(o->logprobs[i]));  // top implies the logprob
        double max = -INFINITY, sum = 0.0;
        for (float x : logits) max = std::max<double>(max, x);
        for (float x : logits) sum += std::exp(x - max);
        std::vector<double> ref(logits.size());
        for (size_t t = 0; t < logits.size(); ++t) ref[t] = logits[t] - max - std::log(sum);
        std::vector<double> sorted = ref;
        std::sort(sorted.rbegin(), sorted.rend());
        for (int j = 0; j < n; ++j) {
          EXPECT_NEAR(top[j].logprob, ref[top[j].id], 1e-4) << i << " " << j;
          EXPECT_NEAR(top[j].logprob, sorted[j], 1e-4) << i << " " << j;  // the j-th largest
          if (j > 0) EXPECT_LE(top[j].logprob, top[j - 1].logprob);
        }
        if (n > 0 && o == &o1) EXPECT_EQ(top[0].id, o->tokens[i]);  // greedy
        const int32_t in[] = {o->tokens[i]};
        ASSERT_TRUE(model_->Decode(st, in, &logits).ok());
      }
    }
  }
}

// Every token the model consumes is counted in exactly one step's ramba_engine_step_tokens, and
// every step in an iteration's time.
TEST_P(EngineTest, StepsAndIterationsAreCounted) {
  for (bool pipelined : {true, false}) {
    SCOPED_TRACE(pipelined ? "pipelined" : "one step at a time");
    auto metrics = std::move(*Metrics::Create(""));
    EngineOptions opts = Opts();
    opts.max_batch_tokens = 64;  // the long prompt takes three steps, beside decodes
    opts.pipeline_decode = pipelined;
    opts.metrics = metrics.get();
    {
      Engine engine(model_.get(), opts);
      auto s0 = std::move(*model_->NewSession());
      auto s1 = std::move(*model_->NewSession());
      auto f0 = Run(engine, s0.get(), testing::RandomTokens(150, config_.vocab_size, 41), 10);
      auto f1 = Run(engine, s1.get(), testing::RandomTokens(9, config_.vocab_size, 42), 10);
      ASSERT_TRUE(f0.get().status.ok());
      ASSERT_TRUE(f1.get().status.ok());
      // Both positions: the prompt and all but the last generated token (pending).
      EXPECT_EQ(s0->position() + s1->position(), 150 + 9 + 2 * 9);
      const auto tokens = metrics->engine_step_tokens->Collect().histogram;
      const auto sequences = metrics->engine_step_sequences->Collect().histogram;
      EXPECT_EQ(tokens.sample_sum, static_cast<double>(s0->position() + s1->position()));
      // Nine decode steps at least after the first token; no step without a session.
      EXPECT_GE(tokens.sample_count, 10u);
      EXPECT_EQ(sequences.sample_count, tokens.sample_count);
      EXPECT_GE(sequences.sample_sum, static_cast<double>(sequences.sample_count));
      EXPECT_LE(sequences.sample_sum, 2.0 * static_cast<double>(sequences.sample_count));
    }
    // Each iteration that launched a step counted; pipelined, an iteration that only collects
    // ends a request whose session has nothing left to launch: at most one per request (two
    // here, depending on when the other request ends).
    const auto iterations = metrics->engine_iteration_latency->Collect().histogram;
    const uint64_t steps = metrics->engine_step_tokens->Collect().histogram.sample_count;
    EXPECT_GE(iterations.sample_count, steps);
    EXPECT_LE(iterations.sample_count, steps + (pipelined ? 2 : 0));
    EXPECT_GT(iterations.sample_sum, 0.0);
  }
}

TEST_P(EngineTest, AppendOnlyConsumesInput) {
  Engine engine(model_.get(), Opts());
  auto s = std::move(*model_->NewSession());
  Outcome o = Run(engine, s.get(), testing::RandomTokens(300, config_.vocab_size, 1), 0).get();
  EXPECT_TRUE(o.status.ok());
  EXPECT_EQ(o.reason, FinishReason::kInputConsumed);
  EXPECT_TRUE(o.tokens.empty());
  EXPECT_EQ(s->position(), 300);
  EXPECT_EQ(s->num_chunks(), 4);
}

TEST_P(EngineTest, StopFromCallback) {
  // The stopping token is fed before the request ends, however the steps ran: by the step
  // launched ahead (pipelined) or by one more step; with feed_stop_token false, one at a time, it
  // is left unfed.
  struct Case {
    bool pipelined, feed;
  };
  for (const Case c : {Case{false, true}, Case{true, true}, Case{false, false}}) {
    SCOPED_TRACE(::testing::Message() << "pipelined " << c.pipelined << " feed " << c.feed);
    EngineOptions opts = Opts();
    opts.pipeline_decode = c.pipelined;
    Engine engine(model_.get(), opts);
    auto s = std::move(*model_->NewSession());
    int seen = 0;
    std::shared_ptr<EngineRequest> handle;
    Outcome o =
        Run(
            engine, s.get(), {1, 2, 3}, 50, {},
            [&seen](int32_t) { return ++seen == 4 ? TokenAction::kStop : TokenAction::kContinue; },
            &handle, /*include_logprobs=*/false, c.feed)
            .get();
    EXPECT_EQ(o.reason, FinishReason::kStop);
    EXPECT_EQ(o.tokens.size(), 4u);
    EXPECT_EQ(handle->last_token_fed, c.feed);
    EXPECT_EQ(s->position(), c.feed ? 3 + 4 : 3 + 3);
  }
}

TEST_P(EngineTest, CancelStopsWithinOneStepAndStateIsConsistent) {
  for (bool pipelined : {false, true}) {
    SCOPED_TRACE(pipelined ? "pipelined" : "one step at a time");
    EngineOptions opts = Opts();
    opts.pipeline_decode = pipelined;
    Engine engine(model_.get(), opts);
    auto s = std::move(*model_->NewSession());
    std::shared_ptr<EngineRequest> handle;
    int n = 0;
    auto f = Run(
        engine, s.get(), {5, 6, 7}, 1000, {},
        [&handle, &n](int32_t) {
          if (++n == 10) handle->cancelled = true;
          return TokenAction::kContinue;
        },
        &handle);
    Outcome o = f.get();
    EXPECT_EQ(o.reason, FinishReason::kCancelled);
    EXPECT_EQ(o.status.code(), absl::StatusCode::kCancelled);
    // Cancelled after the 10th token: one at a time, before the 11th step; pipelined, the 11th
    // step was already launched, and its token is reported too.
    EXPECT_EQ(o.tokens.size(), pipelined ? 11u : 10u);
    EXPECT_FALSE(handle->last_token_fed);
    EXPECT_EQ(s->position(), 3 + static_cast<int64_t>(o.tokens.size()) - 1);  // all but the last
    // The session can go on.
    Outcome more = Run(engine, s.get(), {o.tokens.back()}, 2).get();
    EXPECT_TRUE(more.status.ok());
  }
}

// Pipelined decode changes no token, finish reason or state, with requests ending at different
// steps for different reasons.
TEST_P(EngineTest, PipelinedDecodeMatchesOneStepAtATime) {
  SamplingOptions seeded;
  seeded.temperature = 1.1f;
  seeded.seed = 5;
  const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3}, {9}, {4, 4, 4, 4, 4}, {7, 8}};
  const std::vector<int> max_new = {40, 25, 70, 33};
  const std::vector<int> stop_after = {0, 12, 0, 20};  // 0: never
  struct Run1 {
    std::vector<Outcome> outcomes;
    std::vector<bool> fed;
    std::vector<std::unique_ptr<SessionState>> states;
  };
  auto run = [&](bool pipelined) {
    EngineOptions opts = Opts();
    opts.pipeline_decode = pipelined;
    Engine engine(model_.get(), opts);
    Run1 r;
    std::vector<std::future<Outcome>> futures;
    std::vector<std::shared_ptr<EngineRequest>> handles(prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) {
      r.states.push_back(std::move(*model_->NewSession()));
      auto counter = std::make_shared<int>(0);
      const int stop = stop_after[i];
      futures.push_back(Run(
          engine, r.states.back().get(), prompts[i], max_new[i], i % 2 ? seeded : SamplingOptions{},
          [counter, stop](int32_t) {
            return ++*counter == stop ? TokenAction::kStop : TokenAction::kContinue;
          },
          &handles[i], /*include_logprobs=*/i % 3 == 0));
    }
    for (size_t i = 0; i < prompts.size(); ++i) {
      r.outcomes.push_back(futures[i].get());
      r.fed.push_back(handles[i]->last_token_fed);
    }
    // Each session goes on from its history: the pending token first unless it was fed.
    for (size_t i = 0; i < prompts.size(); ++i) {
      std::vector<int32_t> input = {3, 1, 4};
      if (!r.fed[i]) input.insert(input.begin(), r.outcomes[i].tokens.back());
      r.outcomes.push_back(Run(engine, r.states[i].get(), input, 5).get());
    }
    return r;
  };
  Run1 a = run(false), b = run(true);
  for (size_t i = 0; i < a.outcomes.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_TRUE(a.outcomes[i].status.ok() && b.outcomes[i].status.ok());
    EXPECT_EQ(a.outcomes[i].tokens, b.outcomes[i].tokens);
    EXPECT_EQ(a.outcomes[i].reason, b.outcomes[i].reason);
    // Logprobs (requests 0 and 3) come back with a pipelined step's tokens as well.
    ASSERT_EQ(a.outcomes[i].logprobs.size(), b.outcomes[i].logprobs.size());
    for (size_t t = 0; t < a.outcomes[i].logprobs.size(); ++t) {
      const float la = a.outcomes[i].logprobs[t], lb = b.outcomes[i].logprobs[t];
      EXPECT_EQ(std::isnan(la), i % 3 != 0 || i >= prompts.size()) << t;
      if (!std::isnan(la)) EXPECT_NEAR(la, lb, 1e-5) << t;
      EXPECT_EQ(std::isnan(la), std::isnan(lb)) << t;
    }
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    SCOPED_TRACE(i);
    // A stopped request's last token is fed (ahead, or by one more step); a request that ran to
    // max_new_tokens leaves its last token pending.
    EXPECT_EQ(a.fed[i], stop_after[i] != 0);
    EXPECT_EQ(b.fed[i], stop_after[i] != 0);
    EXPECT_EQ(a.states[i]->position(), b.states[i]->position());
  }
}

TEST_P(EngineTest, SeededSamplingIsReproducibleAcrossBatching) {
  SamplingOptions sampling;
  sampling.temperature = 1.0f;
  sampling.top_p = 0.9f;
  sampling.seed = 77;
  const auto prompt = testing::RandomTokens(150, config_.vocab_size, 5);
  std::vector<int32_t> alone, crowded;
  {
    Engine engine(model_.get(), Opts());
    auto s = std::move(*model_->NewSession());
    alone = Run(engine, s.get(), prompt, 20, sampling).get().tokens;
  }
  {
    Engine engine(model_.get(), Opts());
    std::vector<std::unique_ptr<SessionState>> others;
    std::vector<std::future<Outcome>> fs;
    for (int i = 0; i < 4; ++i) {
      others.push_back(std::move(*model_->NewSession()));
      fs.push_back(Run(engine, others.back().get(), testing::RandomTokens(90, 300, i), 25));
    }
    auto s = std::move(*model_->NewSession());
    crowded = Run(engine, s.get(), prompt, 20, sampling).get().tokens;
    for (auto& f : fs) f.get();
  }
  EXPECT_EQ(alone, crowded);
}

TEST_P(EngineTest, BadInputFailsOnlyThatRequest) {
  Engine engine(model_.get(), Opts());
  auto a = std::move(*model_->NewSession());
  auto b = std::move(*model_->NewSession());
  auto fa = Run(engine, a.get(), {1, 2, static_cast<int32_t>(config_.vocab_size)}, 3);
  Outcome oa = fa.get();
  EXPECT_EQ(oa.status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(a->position(), 0);
  Outcome empty = Run(engine, b.get(), {}, 3).get();
  EXPECT_EQ(empty.status.code(), absl::StatusCode::kInvalidArgument);
  Outcome ok = Run(engine, b.get(), {1, 2, 3}, 3).get();
  EXPECT_TRUE(ok.status.ok());
  // Requests that would fail a whole batch fail alone at admission, while another runs: a
  // state on another backend, and a second request for a session that has one running.
  auto other_backend = kernels::CreateCpuBackend(1);
  auto other_model = RambaModel::Create(config_, RandomTensors(config_, 11), other_backend.get());
  ASSERT_TRUE(other_model.ok());
  auto foreign = std::move(*(*other_model)->NewSession());
  std::atomic<bool> release{false};
  auto running = Run(engine, a.get(), {4, 5}, 400, {}, [&release](int32_t) {
    return release.load() ? TokenAction::kStop : TokenAction::kContinue;
  });
  Outcome wrong_backend = Run(engine, foreign.get(), {1, 2}, 3).get();
  EXPECT_EQ(wrong_backend.status.code(), absl::StatusCode::kInvalidArgument);
  Outcome twice = Run(engine, a.get(), {1}, 3).get();
  EXPECT_EQ(twice.status.code(), absl::StatusCode::kFailedPrecondition);
  release = true;
  Outcome first = running.get();
  EXPECT_TRUE(first.status.ok());
  EXPECT_EQ(first.reason, FinishReason::kStop);
  EXPECT_EQ(foreign->position(), 0);
}

TEST_P(EngineTest, StopCancelsEverything) {
  auto engine = std::make_unique<Engine>(model_.get(), Opts());
  auto s = std::move(*model_->NewSession());
  auto f = Run(*engine, s.get(), {1, 2, 3}, 100000);
  engine->Stop();
  Outcome o = f.get();
  EXPECT_EQ(o.reason, FinishReason::kCancelled);
  engine.reset();
  SUCCEED();
}

INSTANTIATE_TEST_SUITE_P(Batching, EngineTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "SplitPrefill" : "Mixed";
                         });

}  // namespace
}  // namespace ramba::server
