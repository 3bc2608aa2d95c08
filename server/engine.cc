#include "server/engine.h"

#include <algorithm>
#include <limits>
#include <memory>

#include "absl/strings/str_cat.h"

namespace ramba::server {

struct Engine::Running {
  std::shared_ptr<EngineRequest> req;
  std::vector<int32_t> pending;  // tokens still to feed, consumed from `next`
  size_t next = 0;
  int32_t generated = 0;
  int64_t take = 0;  // tokens taken into the current iteration's batch
  bool stopping = false;  // stopped by on_token; its last token still to feed (feed_stop_token)

  int64_t remaining() const { return static_cast<int64_t>(pending.size() - next); }
  bool generating() const { return req->max_new_tokens > 0 && !stopping; }
  // In the batch being planned, this row's token is kept and its logprob wanted (a row still
  // feeding input after this batch ignores its token).
  bool wants_logprob() const {
    return req->include_logprobs && generating() && take == remaining();
  }
};

// A decode step launched and not yet collected: its rows in order (null once a row's request has
// ended while a step launched ahead still carries it).
struct Engine::InFlight {
  std::vector<Running*> batch;
  std::vector<SessionState*> states;
  std::vector<SamplingOptions> options;
  bool all_decoding = false;  // every row fed its last input token: each gets a token to report
  bool logprobs = false;      // some row's request wants its token's logprob
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
      if (!st.ok()) {
        r->req->on_done(st, FinishReason::kError);
      } else if (r->remaining() == 0) {
        r->req->on_done(absl::OkStatus(), FinishReason::kInputConsumed);  // nothing to append
      } else {
        active.push_back(std::move(r));
      }
    }
    active_count_ = static_cast<int64_t>(active.size());
    Step(active);
  }
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
  return ValidateSamplingOptions(req.sampling);
}

bool Engine::Report(Running* r, int32_t token, float logprob, bool fed_ahead) {
  const TokenAction action =
      r->req->on_token ? r->req->on_token(token, logprob) : TokenAction::kContinue;
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

bool Engine::CanChain(const InFlight& step, const std::vector<std::unique_ptr<Running>>& active) {
  // Every row runs the next step anyway (none ended, cancelled or at max_new_tokens with this
  // step's token) and no other request waits for a batch.
  if (!step.all_decoding || active.size() != step.batch.size()) return false;
  for (Running* r : step.batch) {
    if (r == nullptr || r->req->cancelled.load() || r->generated + 1 >= r->req->max_new_tokens) {
      return false;
    }
  }
  return true;
}

void Engine::CollectInFlight(const std::vector<std::unique_ptr<Running>>& active, bool chain,
                             std::vector<ToReport>* to_report, std::vector<Running*>* done) {
  InFlight& step = *in_flight_;
  std::unique_ptr<InFlight> next;
  absl::Status st;
  if (chain && CanChain(step, active)) {
    st = model_->LaunchDecode(step.states, {}, step.options, step.logprobs);
    if (st.ok()) next = std::make_unique<InFlight>(step);
  }
  std::vector<int32_t> sampled;
  std::vector<float> logprobs;
  if (absl::Status c = model_->CollectDecode(&sampled, &logprobs); !c.ok() && st.ok()) st = c;
  if (!st.ok()) {
    for (Running* r : step.batch) {
      if (r == nullptr) continue;
      r->req->on_done(st, FinishReason::kError);
      done->push_back(r);
    }
    DiscardLaunched();  // the chained successor, if launched
    return;
  }
  for (size_t i = 0; i < step.batch.size(); ++i) {
    Running* r = step.batch[i];
    if (r == nullptr) continue;
    switch (Absorb(r, sampled[i], next != nullptr)) {
      case Outcome::kToken:
        to_report->push_back(
            {r, sampled[i],
             r->req->include_logprobs ? logprobs[i] : std::numeric_limits<float>::quiet_NaN()});
        break;
      case Outcome::kEnded:
        done->push_back(r);
        if (next != nullptr) next->batch[i] = nullptr;
        break;
      case Outcome::kNone:
        break;
    }
  }
  in_flight_ = std::move(next);
}

void Engine::DiscardLaunched() {
  while (model_->decodes_in_flight() > 0) {
    std::vector<int32_t> ignored;
    (void)model_->CollectDecode(&ignored);
  }
  in_flight_.reset();
}

void Engine::PlanBatch(const std::vector<std::unique_ptr<Running>>& active,
                       const std::vector<Running*>& skip, std::vector<Running*>* batch) {
  // One token for every request at its last input token (decoding), then prompt tokens for the
  // others, oldest first, within the token budget.
  int64_t budget = options_.max_batch_tokens;
  for (auto& r : active) r->take = 0;
  auto eligible = [&skip](const Running& r) {
    return r.remaining() > 0 && !r.req->cancelled.load() && !Contains(skip, &r) &&
           !(r.generating() && r.generated >= r.req->max_new_tokens);
  };
  for (auto& r : active) {
    if (eligible(*r) && r->remaining() == 1 && budget > 0) {
      r->take = 1;
      --budget;
    }
  }
  for (auto& r : active) {
    if (eligible(*r) && r->take == 0 && budget > 0) {
      r->take = std::min(r->remaining(), budget);
      budget -= r->take;
    }
  }
  for (auto& r : active) {
    if (r->take > 0) batch->push_back(r.get());
  }
}

void Engine::LaunchNext(const std::vector<std::unique_ptr<Running>>& active,
                        std::vector<Running*>* done) {
  auto step = std::make_unique<InFlight>();
  PlanBatch(active, *done, &step->batch);
  if (step->batch.empty()) return;
  std::vector<absl::Span<const int32_t>> spans;
  for (Running* r : step->batch) {
    step->states.push_back(r->req->state);
    step->options.push_back(r->req->sampling);
    spans.push_back(absl::MakeConstSpan(r->pending).subspan(r->next, r->take));
    step->logprobs = step->logprobs || r->wants_logprob();
  }
  const absl::Status st = model_->LaunchForward(step->states, spans, step->options, step->logprobs);
  if (!st.ok()) {
    for (Running* r : step->batch) {
      r->req->on_done(st, FinishReason::kError);
      done->push_back(r);
    }
    return;
  }
  step->all_decoding = true;
  for (Running* r : step->batch) {
    r->next += r->take;
    step->all_decoding = step->all_decoding && r->generating() && r->remaining() == 0;
  }
  in_flight_ = std::move(step);
}

void Engine::Step(std::vector<std::unique_ptr<Running>>& active) {
  const bool pipelined = options_.pipeline_decode;

  // Pipelined: collect the step in flight (launching its successor first when it is the same
  // batch of decode rows), launch the next one from what is known now, and only then report the
  // collected tokens, so that the device runs while this thread turns them into text and
  // messages. A request a reported token stops has had it fed by the step in flight.
  std::vector<ToReport> to_report;
  std::vector<Running*> done;
  if (in_flight_ != nullptr) CollectInFlight(active, pipelined, &to_report, &done);
  if (pipelined && in_flight_ == nullptr) LaunchNext(active, &done);
  for (const auto& [r, token, logprob] : to_report) {
    if (Contains(done, r)) continue;  // failed with the launch that would have fed its token
    const bool fed = in_flight_ != nullptr && Contains(in_flight_->batch, r);
    if (Report(r, token, logprob, fed)) {
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
  PlanBatch(active, {}, &batch);
  if (batch.empty()) return;
  std::vector<SessionState*> states;
  std::vector<absl::Span<const int32_t>> spans;
  for (Running* r : batch) {
    states.push_back(r->req->state);
    spans.push_back(absl::MakeConstSpan(r->pending).subspan(r->next, r->take));
  }
  // Every sequence gets a token drawn on the backend (only the tokens are downloaded); those
  // still consuming input ignore theirs.
  std::vector<SamplingOptions> options;
  // Logprobs only for the rows that keep their token (Running::wants_logprob).
  auto want_logprob = std::make_unique<bool[]>(batch.size());  // a span of bool (not vector<bool>)
  bool any_logprob = false;
  for (size_t i = 0; i < batch.size(); ++i) {
    Running* r = batch[i];
    options.push_back(r->req->sampling);
    want_logprob[i] = r->wants_logprob();
    any_logprob = any_logprob || want_logprob[i];
  }
  std::vector<int32_t> sampled;
  std::vector<float> logprobs;
  const absl::Status st = model_->ForwardAndSample(
      states, spans, options, &sampled, absl::MakeConstSpan(want_logprob.get(), batch.size()),
      any_logprob ? &logprobs : nullptr);
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
    if (o == Outcome::kEnded || (o == Outcome::kToken && Report(r, sampled[i], logprob, false))) {
      done.push_back(r);
    }
  }
  EraseDone(active, done);
}

}  // namespace ramba::server
