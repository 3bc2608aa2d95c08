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
};

// A decode step launched and not yet collected: its rows in order (null once a row's request has
// ended while a step launched ahead still carries it).
struct Engine::InFlight {
  std::vector<Running*> batch;
  std::vector<SessionState*> states;
  std::vector<SamplingOptions> options;
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
      // Launched steps finish on the device whatever happens; collect them so that the model is
      // left with none in flight.
      while (model_->decodes_in_flight() > 0) {
        std::vector<int32_t> ignored;
        (void)model_->CollectDecode(&ignored);
      }
      in_flight_.reset();
      for (auto& r : active) finish(*r, absl::CancelledError("the engine stopped"), FinishReason::kCancelled);
      for (auto& q : rejected) q->on_done(absl::CancelledError("the engine stopped"), FinishReason::kCancelled);
      active_count_ = 0;
      return;
    }
    // Validate outside the lock: a bad request must fail alone, not poison a shared batch.
    for (auto& r : admitted) {
      const absl::Status st = Validate(*r->req);
      if (st.ok()) {
        active.push_back(std::move(r));
      } else {
        r->req->on_done(st, FinishReason::kError);
      }
    }
    active_count_ = static_cast<int64_t>(active.size());
    Step(active);
  }
}

absl::Status Engine::Validate(const EngineRequest& req) const {
  if (req.state == nullptr) return absl::InvalidArgumentError("request has no session state");
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
  ++r->generated;
  const TokenAction action =
      r->req->on_token ? r->req->on_token(token, logprob) : TokenAction::kContinue;
  if (action == TokenAction::kStop && !fed_ahead && r->req->feed_stop_token) {
    r->stopping = true;  // the next batch feeds it, then the request ends (Step)
    r->pending.push_back(token);
    return false;
  }
  if (action == TokenAction::kStop || r->generated >= r->req->max_new_tokens) {
    r->req->last_token_fed = fed_ahead;
    r->req->on_done(absl::OkStatus(),
                    action == TokenAction::kStop ? FinishReason::kStop : FinishReason::kMaxTokens);
    return true;
  }
  r->pending.push_back(token);
  if (fed_ahead) r->next = r->pending.size();  // the step launched ahead took it
  return false;
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

}  // namespace

void Engine::StepInFlight(std::vector<std::unique_ptr<Running>>& active) {
  InFlight& step = *in_flight_;
  // Launch the next step ahead when every row will run it anyway: no request has ended or been
  // cancelled, none reaches max_new_tokens with this step's token, and no other request is
  // waiting for a batch (new ones join once the pipeline drains).
  bool ahead = active.size() == step.batch.size();
  for (Running* r : step.batch) {
    ahead = ahead && r != nullptr && !r->req->cancelled.load() &&
            r->generated + 1 < r->req->max_new_tokens;
  }
  std::unique_ptr<InFlight> next;
  absl::Status st;
  if (ahead) {
    st = model_->LaunchDecode(step.states, {}, step.options);
    if (st.ok()) next = std::make_unique<InFlight>(step);
  }
  std::vector<int32_t> sampled;
  if (absl::Status c = model_->CollectDecode(&sampled); !c.ok()) st = c;
  std::vector<Running*> done;
  for (size_t i = 0; i < step.batch.size(); ++i) {
    Running* r = step.batch[i];
    if (r == nullptr) continue;
    bool ended;
    if (!st.ok()) {
      r->req->on_done(st, FinishReason::kError);
      ended = true;
    } else {
      ended = Report(r, sampled[i], std::numeric_limits<float>::quiet_NaN(), next != nullptr);
    }
    if (ended) {
      done.push_back(r);
      if (next != nullptr) next->batch[i] = nullptr;
    }
  }
  if (!st.ok() && next != nullptr) {
    // The step launched ahead has no requests left; drain it.
    std::vector<int32_t> ignored;
    (void)model_->CollectDecode(&ignored);
    next.reset();
  }
  in_flight_ = std::move(next);
  EraseDone(active, done);
  active_count_ = static_cast<int64_t>(active.size());
}

void Engine::Step(std::vector<std::unique_ptr<Running>>& active) {
  if (in_flight_ != nullptr) {
    StepInFlight(active);
    return;
  }
  // Leave: cancelled requests, and requests that cannot make progress.
  std::vector<std::unique_ptr<Running>> keep;
  for (auto& r : active) {
    if (r->req->cancelled.load()) {
      r->req->on_done(absl::CancelledError("the request was cancelled"), FinishReason::kCancelled);
    } else if (r->remaining() == 0) {
      // Only possible for a request submitted with empty input.
      if (r->generating()) {
        r->req->on_done(absl::InvalidArgumentError(
                            "generation needs at least one input token to sample from"),
                        FinishReason::kError);
      } else {
        r->req->on_done(absl::OkStatus(), FinishReason::kInputConsumed);
      }
    } else {
      keep.push_back(std::move(r));
    }
  }
  active.swap(keep);
  if (active.empty()) return;

  // Build the batch: one token for every request at its last input token (decoding), then
  // prompt tokens for the others, oldest first, within the token budget.
  int64_t budget = options_.max_batch_tokens;
  for (auto& r : active) r->take = 0;
  for (auto& r : active) {
    if (r->remaining() == 1 && budget > 0) {
      r->take = 1;
      --budget;
    }
  }
  for (auto& r : active) {
    if (r->take == 0 && budget > 0) {
      r->take = std::min(r->remaining(), budget);
      budget -= r->take;
    }
  }
  std::vector<Running*> batch;
  std::vector<SessionState*> states;
  std::vector<absl::Span<const int32_t>> spans;
  for (auto& r : active) {
    if (r->take == 0) continue;
    batch.push_back(r.get());
    states.push_back(r->req->state);
    spans.push_back(absl::MakeConstSpan(r->pending).subspan(r->next, r->take));
  }
  // Every sequence gets a token drawn on the backend (only the tokens are downloaded); those
  // still consuming input ignore theirs.
  std::vector<SamplingOptions> options;
  // Logprobs only for requests that asked and are at their last input token (the rows whose
  // token is kept): each costs a download of the row's logits.
  auto want_logprob = std::make_unique<bool[]>(batch.size());  // a span of bool (not vector<bool>)
  bool any_logprob = false;
  for (size_t i = 0; i < batch.size(); ++i) {
    Running* r = batch[i];
    options.push_back(r->req->sampling);
    want_logprob[i] = r->req->include_logprobs && r->generating() && r->take == r->remaining();
    any_logprob = any_logprob || want_logprob[i];
  }
  // Every request decoding (none prefilling, none left out, no logprobs): launch the step and
  // collect it in the next iteration, after launching its successor (StepInFlight).
  bool pipelined = options_.pipeline_decode && !any_logprob && batch.size() == active.size();
  for (Running* r : batch) pipelined = pipelined && r->generating() && r->remaining() == 1;
  if (pipelined) {
    auto step = std::make_unique<InFlight>();
    step->batch = batch;
    step->states = states;
    step->options = options;
    std::vector<int32_t> input;
    for (Running* r : batch) input.push_back(r->pending[r->next++]);
    const absl::Status st = model_->LaunchDecode(states, input, options);
    if (st.ok()) {
      in_flight_ = std::move(step);
      return;
    }
    for (Running* r : batch) r->req->on_done(st, FinishReason::kError);
    EraseDone(active, batch);
    active_count_ = static_cast<int64_t>(active.size());
    return;
  }
  std::vector<int32_t> sampled;
  std::vector<float> logprobs;
  const absl::Status st = model_->ForwardAndSample(
      states, spans, options, &sampled, absl::MakeConstSpan(want_logprob.get(), batch.size()),
      any_logprob ? &logprobs : nullptr);
  std::vector<Running*> done;
  if (!st.ok()) {
    for (Running* r : batch) {
      r->req->on_done(st, FinishReason::kError);
      done.push_back(r);
    }
  } else {
    for (size_t i = 0; i < batch.size(); ++i) {
      Running* r = batch[i];
      r->next += r->take;
      if (r->remaining() > 0) continue;
      if (r->stopping) {
        r->req->last_token_fed = true;
        r->req->on_done(absl::OkStatus(), FinishReason::kStop);
        done.push_back(r);
        continue;
      }
      if (!r->generating()) {
        r->req->on_done(absl::OkStatus(), FinishReason::kInputConsumed);
        done.push_back(r);
        continue;
      }
      const float logprob = any_logprob ? logprobs[i] : std::numeric_limits<float>::quiet_NaN();
      if (Report(r, sampled[i], logprob, /*fed_ahead=*/false)) done.push_back(r);
    }
  }
  EraseDone(active, done);
  active_count_ = static_cast<int64_t>(active.size());
}

}  // namespace ramba::server
