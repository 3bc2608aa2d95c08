#include "server/engine.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <memory>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "server/metrics.h"

namespace ramba::server {

struct Engine::Running {
  std::shared_ptr<EngineRequest> req;
  std::vector<int32_t> pending;  // tokens still to feed, consumed from `next`
  size_t next = 0;
  int32_t generated = 0;
  int64_t take = 0;  // tokens taken into the current iteration's batch
  // In the batch being planned: the row of the step in flight whose sampled token is this row's
  // input (still on the device, not yet in `pending`); -1 when its input comes from `pending`.
  int32_t carried_from = -1;
  bool stopping = false;  // stopped by on_token; its last token still to feed (feed_stop_token)

  int64_t remaining() const { return static_cast<int64_t>(pending.size() - next); }
  // The tokens this row feeds in the batch being planned (none when carried).
  absl::Span<const int32_t> input() const {
    if (carried_from >= 0) return {};
    return absl::MakeConstSpan(pending).subspan(next, take);
  }
  bool generating() const { return req->max_new_tokens > 0 && !stopping; }
  // In the batch being planned, this row's token is kept and its logprob wanted (a row still
  // feeding input after this batch ignores its token).
  bool wants_logprob() const {
    return req->wants_logprobs() && generating() && (carried_from >= 0 || take == remaining());
  }
  // The request's sampling options for the batch being planned: its held-back tokens stay out
  // while the generation has produced fewer than min_new_tokens before this row's token (a
  // carried row's token comes after the one still on the device).
  SamplingOptions SamplingForStep() const {
    SamplingOptions o = req->sampling;
    o.hold_back =
        !req->held_back.empty() && generated + (carried_from >= 0 ? 1 : 0) < req->min_new_tokens;
    return o;
  }
  // This row's share of a step's top logprobs (n per row), empty when it asked for none.
  std::vector<TopLogprob> TopOf(const std::vector<TopLogprob>& top, size_t row, int64_t n) const {
    if (req->top_logprobs <= 0 || n <= 0) return {};
    const auto first = top.begin() + static_cast<int64_t>(row) * n;
    return std::vector<TopLogprob>(first, first + std::min<int64_t>(req->top_logprobs, n));
  }
};

// A step launched and not yet collected: its rows in order (null once a row's request has ended
// while a step launched ahead still carries it).
struct Engine::InFlight {
  std::vector<Running*> batch;
  // Per row: it fed its last input token, so its sampled token counts (the next step may carry
  // it, or the request ends); a row with input left ignores its token.
  std::vector<bool> fed_all;
  // Per row: the row of the step launched before this one that it carries, or -1.
  std::vector<int32_t> carried;
  bool logprobs = false;  // some row's request wants its token's logprob
  int top_logprobs = 0;   // the most top logprobs a row wants
};

Engine::Engine(RambaModel* model, EngineOptions options)
    : model_(model), options_(options), thread_([this] { Loop(); }) {}

Engine::~Engine() {
  Stop();
  if (thread_.joinable()) thread_.join();
}

void Engine::Submit(std::shared_ptr<EngineRequest> request) {
  absl::MutexLock lock(&mu_);
  if (stopping_) {
    request->on_done(absl::UnavailableError("the engine is shutting down"), FinishReason::kCancelled);
    return;
  }
  queue_.push_back(std::move(request));
}

int64_t Engine::QueueDepth() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(queue_.size());
}

int64_t Engine::ActiveRequests() const { return active_count_.load(); }

void Engine::Stop() {
  absl::MutexLock lock(&mu_);
  stopping_ = true;
}

absl::Status Engine::WaitForWarmup() {
  warmed_.WaitForNotification();
  return warmup_status_;
}

void Engine::Loop() {
  if (options_.warmup) warmup_status_ = model_->Warmup();
  warmed_.Notify();
  std::vector<std::unique_ptr<Running>> active;
  auto finish = [](Running& r, const absl::Status& s, FinishReason reason) {
    r.req->on_done(s, reason);
  };
  while (true) {
    std::deque<std::shared_ptr<EngineRequest>> rejected;
    std::vector<std::unique_ptr<Running>> admitted;
    bool stop = false;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this, &active]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !queue_.empty() || !active.empty();
      };
      mu_.Await(absl::Condition(&ready));
      stop = stopping_;
      if (stop) {
        rejected.swap(queue_);
      } else {
        while (!queue_.empty() &&
               static_cast<int64_t>(active.size()) < options_.max_active_requests) {
          auto r = std::make_unique<Running>();
          r->req = std::move(queue_.front());
          queue_.pop_front();
          r->pending = r->req->input;
          admitted.push_back(std::move(r));
        }
      }
    }
    if (stop) {
      // Launched steps finish on the device whatever happens; the model is left with none.
      DiscardLaunched();
      for (auto& r : active) finish(*r, absl::CancelledError("the engine stopped"), FinishReason::kCancelled);
      for (auto& q : rejected) q->on_done(absl::CancelledError("the engine stopped"), FinishReason::kCancelled);
      active_count_ = 0;
      return;
    }
    // Validate outside the lock: a bad request must fail alone, not poison a shared batch.
    for (auto& r : admitted) {
      absl::Status st = Validate(*r->req);
      for (const auto& other : active) {
        if (st.ok() && other->req->state == r->req->state) {
          st = absl::FailedPreconditionError("the session already has a request running");
        }
      }
      if (st.ok()) st = StartGeneration(*r->req);
      if (!st.ok()) {
        r->req->on_done(st, FinishReason::kError);
      } else if (r->remaining() == 0) {
        r->req->on_done(absl::OkStatus(), FinishReason::kInputConsumed);  // nothing to append
      } else {
        active.push_back(std::move(r));
      }
    }
    active_count_ = static_cast<int64_t>(active.size());
    iteration_ran_model_ = false;
    const auto start = std::chrono::steady_clock::now();
    Step(active);
    if (options_.metrics != nullptr && iteration_ran_model_) {
      options_.metrics->engine_iteration_latency->Observe(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
  }
}

void Engine::CountStep(const std::vector<Running*>& launched, const std::vector<Running*>& fed) {
  if (launched.empty() && fed.empty()) return;
  iteration_ran_model_ = true;
  if (options_.metrics == nullptr) return;
  int64_t tokens = 0;
  for (const std::vector<Running*>* rows : {&launched, &fed}) {
    for (const Running* r : *rows) tokens += r->take;
  }
  options_.metrics->engine_step_sequences->Observe(
      static_cast<double>(launched.size() + fed.size()));
  options_.metrics->engine_step_tokens->Observe(static_cast<double>(tokens));
  // The model's cumulative counts as of the last step that brought them back.
  const RambaModel::ChunkTierCounts tiers = model_->chunk_tier_counts();
  if (tiers.selected > tier_counts_seen_.selected) {
    const uint64_t host_tier = tiers.host - tier_counts_seen_.host;
    const uint64_t cached = tiers.cached - tier_counts_seen_.cached;
    const uint64_t device = tiers.selected - tier_counts_seen_.selected - host_tier;
    options_.metrics->chunk_selections_device->Increment(static_cast<double>(device));
    options_.metrics->chunk_selections_cache->Increment(static_cast<double>(cached));
    options_.metrics->chunk_selections_host->Increment(static_cast<double>(host_tier - cached));
    tier_counts_seen_ = tiers;
  }
}

absl::Status Engine::StartGeneration(EngineRequest& req) {
  if (req.max_new_tokens == 0) return absl::OkStatus();
  SessionState* state = req.state;
  req.sampling.logit_bias = !req.logit_bias.empty();
  req.sampling.hold_back = false;  // per step (Running::SamplingForStep)
  const bool hold_back = req.min_new_tokens > 0 && !req.held_back.empty();
  if (!req.sampling.has_penalties() && !hold_back && !req.sampling.logit_bias) {
    return absl::OkStatus();
  }
  // The generation's scratch lives from here (its input is the prompt) until it ends, so that
  // the memory follows running generations, not resident sessions (every op using it is queued
  // by then).
  req.on_done = [state, done = std::move(req.on_done)](const absl::Status& s, FinishReason reason) {
    state->ReleaseGenerationScratch();
    done(s, reason);
  };
  if (req.sampling.has_penalties() || hold_back) {
    RETURN_IF_ERROR(state->ResetTokenCounts(
        req.input, hold_back ? absl::MakeConstSpan(req.held_back) : absl::Span<const int32_t>()));
  }
  if (req.sampling.logit_bias) RETURN_IF_ERROR(state->SetLogitBias(req.logit_bias));
  return absl::OkStatus();
}

absl::Status Engine::Validate(const EngineRequest& req) const {
  if (req.state == nullptr) return absl::InvalidArgumentError("request has no session state");
  if (req.state->backend() != model_->backend()) {
    return absl::InvalidArgumentError("the session state lives on another backend");
  }
  if (req.max_new_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_new_tokens must be >= 0, got ", req.max_new_tokens));
  }
  if (req.max_new_tokens > 0 && req.input.empty()) {
    return absl::InvalidArgumentError("generation needs at least one input token to sample from");
  }
  const int64_t vocab = model_->config().vocab_size;
  for (size_t i = 0; i < req.input.size(); ++i) {
    if (req.input[i] < 0 || req.input[i] >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", req.input[i], " at index ", i,
                                                     " is outside the vocabulary [0, ", vocab,
                                                     ")"));
    }
  }
  RETURN_IF_ERROR(ValidateTopLogprobs(req.top_logprobs, vocab));
  RETURN_IF_ERROR(ValidateLogitBias(req.logit_bias, vocab));
  if (req.min_new_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("min_new_tokens must be >= 0, got ", req.min_new_tokens));
  }
  for (const int32_t t : req.held_back) {
    if (t < 0 || t >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("held-back token id ", t, " is outside the vocabulary [0, ", vocab, ")"));
    }
  }
  return ValidateSamplingOptions(req.sampling);
}

bool Engine::Report(Running* r, int32_t token, float logprob, absl::Span<const TopLogprob> top,
                    bool fed_ahead) {
  const TokenAction action =
      r->req->on_token ? r->req->on_token(token, logprob, top) : TokenAction::kContinue;
  if (action == TokenAction::kStop) {
    if (!fed_ahead && r->req->feed_stop_token) {
      r->stopping = true;  // the token is pending: the next batch feeds it, then the request ends
      return false;
    }
    r->req->last_token_fed = fed_ahead;
    r->req->on_done(absl::OkStatus(), FinishReason::kStop);
    return true;
  }
  if (r->generated >= r->req->max_new_tokens) {
    r->req->last_token_fed = fed_ahead;  // false: no step is launched past max_new_tokens
    r->req->on_done(absl::OkStatus(), FinishReason::kMaxTokens);
    return true;
  }
  return false;
}

Engine::Outcome Engine::Absorb(Running* r, int32_t token, bool fed_ahead) {
  if (r->remaining() > 0) return Outcome::kNone;  // more input to feed
  if (r->stopping) {
    r->req->last_token_fed = true;
    r->req->on_done(absl::OkStatus(), FinishReason::kStop);
    return Outcome::kEnded;
  }
  if (!r->generating()) {
    r->req->on_done(absl::OkStatus(), FinishReason::kInputConsumed);
    return Outcome::kEnded;
  }
  ++r->generated;
  r->pending.push_back(token);
  if (fed_ahead) r->next = r->pending.size();  // the step launched ahead took it
  return Outcome::kToken;
}

namespace {

template <typename T>
void EraseDone(std::vector<std::unique_ptr<T>>& active, const std::vector<T*>& done) {
  if (done.empty()) return;
  active.erase(std::remove_if(active.begin(), active.end(),
                              [&](const std::unique_ptr<T>& r) {
                                return std::find(done.begin(), done.end(), r.get()) != done.end();
                              }),
               active.end());
}

template <typename T>
bool Contains(const std::vector<T*>& v, const T* x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

}  // namespace

void Engine::Collect(const InFlight& step, std::vector<ToReport>* to_report,
                     std::vector<Running*>* done) {
  std::vector<int32_t> sampled;
  std::vector<float> logprobs;
  std::vector<TopLogprob> top;
  iteration_ran_model_ = true;
  if (absl::Status st = model_->CollectDecode(&sampled, &logprobs, &top); !st.ok()) {
    // The step launched after it may carry its tokens: both fail.
    for (const InFlight* s : {&step, static_cast<const InFlight*>(in_flight_.get())}) {
      if (s == nullptr) continue;
      for (Running* r : s->batch) {
        if (r == nullptr || Contains(*done, r)) continue;
        r->req->on_done(st, FinishReason::kError);
        done->push_back(r);
      }
    }
    DiscardLaunched();
    return;
  }
  // Rows whose token the step in flight took as its input.
  std::vector<int32_t> taken_by(step.batch.size(), -1);
  if (in_flight_ != nullptr) {
    for (size_t j = 0; j < in_flight_->carried.size(); ++j) {
      if (in_flight_->carried[j] >= 0) taken_by[in_flight_->carried[j]] = static_cast<int32_t>(j);
    }
  }
  for (size_t i = 0; i < step.batch.size(); ++i) {
    Running* r = step.batch[i];
    // Ended, failed with the launch after, or input left (launched after it: not seen here).
    if (r == nullptr || Contains(*done, r) || !step.fed_all[i]) continue;
    switch (Absorb(r, sampled[i], taken_by[i] >= 0)) {
      case Outcome::kToken:
        to_report->push_back(
            {r, sampled[i],
             r->req->wants_logprobs() ? logprobs[i] : std::numeric_limits<float>::quiet_NaN(),
             r->TopOf(top, i, step.top_logprobs)});
        break;
      case Outcome::kEnded:
        done->push_back(r);
        if (taken_by[i] >= 0) in_flight_->batch[taken_by[i]] = nullptr;
        break;
      case Outcome::kNone:
        break;
    }
  }
}

void Engine::DiscardLaunched() {
  while (model_->decodes_in_flight() > 0) {
    std::vector<int32_t> ignored;
    (void)model_->CollectDecode(&ignored);
  }
  in_flight_.reset();
}

void Engine::PlanBatch(const std::vector<std::unique_ptr<Running>>& active,
                       const std::vector<Running*>& skip, const InFlight* carry_from, bool split,
                       std::vector<Running*>* batch, std::vector<Running*>* feed) {
  int64_t budget = options_.max_batch_tokens;
  for (auto& r : active) {
    r->take = 0;
    r->carried_from = -1;
  }
  // Rows whose next input is the token the step in flight samples for them: it is not their last
  // (max_new_tokens), and they are not cancelled.
  if (carry_from != nullptr) {
    for (size_t i = 0; i < carry_from->batch.size() && budget > 0; ++i) {
      Running* r = carry_from->batch[i];
      if (r == nullptr || !carry_from->fed_all[i] || !r->generating() || Contains(skip, r) ||
          r->req->cancelled.load() || r->generated + 1 >= r->req->max_new_tokens) {
        continue;
      }
      r->carried_from = static_cast<int32_t>(i);
      r->take = 1;
      --budget;
    }
  }
  auto eligible = [&skip](const Running& r) {
    return r.remaining() > 0 && r.carried_from < 0 && !r.req->cancelled.load() &&
           !Contains(skip, &r) && !(r.generating() && r.generated >= r.req->max_new_tokens);
  };
  // One token for every request at its last input token (decoding), then prompt tokens for the
  // others, oldest first, within the token budget.
  for (auto& r : active) {
    if (eligible(*r) && r->remaining() == 1 && (!split || r->generating()) && budget > 0) {
      r->take = 1;
      --budget;
    }
  }
  for (auto& r : active) {
    if (!eligible(*r) || r->take > 0 || budget <= 0) continue;
    // Split: a generating request keeps its last input token for a launch.
    const int64_t want = split && r->generating() ? r->remaining() - 1 : r->remaining();
    r->take = std::min(want, budget);
    budget -= r->take;
    if (split) feed->push_back(r.get());
  }
  for (auto& r : active) {
    if (r->take > 0 && !(split && Contains(*feed, r.get()))) batch->push_back(r.get());
  }
}

void Engine::LaunchNext(const std::vector<std::unique_ptr<Running>>& active,
                        const InFlight* carry_from, std::vector<Running*>* done) {
  auto step = std::make_unique<InFlight>();
  std::vector<Running*> feed;
  PlanBatch(active, *done, carry_from, options_.split_prefill, &step->batch, &feed);
  CountStep(step->batch, feed);
  auto fail = [done](const std::vector<Running*>& rows, const absl::Status& st) {
    for (Running* r : rows) {
      r->req->on_done(st, FinishReason::kError);
      done->push_back(r);
    }
  };
  if (!step->batch.empty()) {
    std::vector<SessionState*> states;
    std::vector<SamplingOptions> options;
    std::vector<absl::Span<const int32_t>> spans;
    for (Running* r : step->batch) {
      states.push_back(r->req->state);
      options.push_back(r->SamplingForStep());
      step->carried.push_back(r->carried_from);
      spans.push_back(r->input());
      step->logprobs = step->logprobs || r->wants_logprob();
      if (r->wants_logprob()) {
        step->top_logprobs = std::max(step->top_logprobs, r->req->top_logprobs);
      }
    }
    const absl::Status st = model_->LaunchForward(states, spans, options, step->logprobs,
                                                  step->carried, step->top_logprobs);
    if (!st.ok()) {
      fail(step->batch, st);
    } else {
      for (Running* r : step->batch) {
        if (r->carried_from < 0) r->next += r->take;
        step->fed_all.push_back(r->remaining() == 0);
      }
      in_flight_ = std::move(step);
    }
  }
  if (feed.empty()) return;
  std::vector<SessionState*> states;
  std::vector<absl::Span<const int32_t>> spans;
  for (Running* r : feed) {
    states.push_back(r->req->state);
    spans.push_back(r->input());
  }
  if (const absl::Status st = model_->Feed(states, spans); !st.ok()) {
    fail(feed, st);
    return;
  }
  for (Running* r : feed) {
    r->next += r->take;
    // Appended: done once the work is queued, since whatever reads the state next (a snapshot,
    // another step) is ordered after it on the backend.
    if (r->remaining() == 0 && !r->generating() && Absorb(r, 0, false) == Outcome::kEnded) {
      done->push_back(r);
    }
  }
}

void Engine::Step(std::vector<std::unique_ptr<Running>>& active) {
  const bool pipelined = options_.pipeline_decode;

  // Pipelined: launch the next step from what is known now (rows of the step in flight that go
  // on take its tokens on the device), then collect the step in flight, and only then report its
  // tokens, so that the device runs while this thread turns them into text and messages. A
  // request a reported token stops has had it fed by the step launched after it.
  std::vector<ToReport> to_report;
  std::vector<Running*> done;
  if (pipelined) {
    std::unique_ptr<InFlight> collecting = std::move(in_flight_);
    LaunchNext(active, collecting.get(), &done);
    if (collecting != nullptr) Collect(*collecting, &to_report, &done);
  }
  for (const auto& [r, token, logprob, top] : to_report) {
    if (Contains(done, r)) continue;  // failed with the launch that would have fed its token
    const bool fed = in_flight_ != nullptr && Contains(in_flight_->batch, r);
    if (Report(r, token, logprob, top, fed)) {
      done.push_back(r);
      if (fed) *std::find(in_flight_->batch.begin(), in_flight_->batch.end(), r) = nullptr;
    }
  }
  // Cancelled requests leave once no step in flight carries them (their last token pending).
  for (auto& r : active) {
    if (r->req->cancelled.load() && !Contains(done, r.get()) &&
        (in_flight_ == nullptr || !Contains(in_flight_->batch, r.get()))) {
      r->req->on_done(absl::CancelledError("the request was cancelled"), FinishReason::kCancelled);
      done.push_back(r.get());
    }
  }
  EraseDone(active, done);
  if (in_flight_ != nullptr && std::all_of(in_flight_->batch.begin(), in_flight_->batch.end(),
                                           [](const Running* r) { return r == nullptr; })) {
    DiscardLaunched();  // launched for requests that have all ended since: nothing to report
  }
  if (!pipelined) StepOneAtATime(active);
  active_count_ = static_cast<int64_t>(active.size());
}

void Engine::StepOneAtATime(std::vector<std::unique_ptr<Running>>& active) {
  std::vector<Running*> batch;
  PlanBatch(active, {}, /*carry_from=*/nullptr, /*split=*/false, &batch, nullptr);
  if (batch.empty()) return;
  CountStep(batch, {});
  std::vector<SessionState*> states;
  std::vector<absl::Span<const int32_t>> spans;
  for (Running* r : batch) {
    states.push_back(r->req->state);
    spans.push_back(r->input());
  }
  // Every sequence gets a token drawn on the backend (only the tokens are downloaded); those
  // still consuming input ignore theirs.
  std::vector<SamplingOptions> options;
  // Logprobs only for the rows that keep their token (Running::wants_logprob).
  auto want_logprob = std::make_unique<bool[]>(batch.size());  // a span of bool (not vector<bool>)
  bool any_logprob = false;
  int top_n = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    Running* r = batch[i];
    options.push_back(r->SamplingForStep());
    want_logprob[i] = r->wants_logprob();
    any_logprob = any_logprob || want_logprob[i];
    if (want_logprob[i]) top_n = std::max(top_n, r->req->top_logprobs);
  }
  std::vector<int32_t> sampled;
  std::vector<float> logprobs;
  std::vector<TopLogprob> top;
  const absl::Status st = model_->ForwardAndSample(
      states, spans, options, &sampled, absl::MakeConstSpan(want_logprob.get(), batch.size()),
      any_logprob ? &logprobs : nullptr, top_n, &top);
  std::vector<Running*> done;
  for (size_t i = 0; i < batch.size(); ++i) {
    Running* r = batch[i];
    if (!st.ok()) {
      r->req->on_done(st, FinishReason::kError);
      done.push_back(r);
      continue;
    }
    r->next += r->take;
    const Outcome o = Absorb(r, sampled[i], /*fed_ahead=*/false);
    const float logprob = any_logprob ? logprobs[i] : std::numeric_limits<float>::quiet_NaN();
    if (o == Outcome::kEnded ||
        (o == Outcome::kToken && Report(r, sampled[i], logprob, r->TopOf(top, i, top_n), false))) {
      done.push_back(r);
    }
  }
  EraseDone(active, done);
}

}  // namespace ramba::server
