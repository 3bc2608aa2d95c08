// The engine: one thread that owns the model (and so the backend's stream) and runs every
// session's work in continuous batches. Each step takes one token from every decoding request
// plus a budget of prompt tokens from prefilling ones, runs them through the model as one ragged
// batch (or feeds the prompt tokens beside it: EngineOptions::split_prefill), samples where a
// request's input is exhausted, and reports tokens through callbacks. Requests join and leave
// between steps. Steps are pipelined (EngineOptions::pipeline_decode): the next step is launched
// before the one in flight is collected and its tokens reported.
//
// The engine never sees protobuf or the store: the gRPC layer turns requests into EngineRequests
// and commits session state after they finish.
#ifndef RAMBA_SERVER_ENGINE_H_
#define RAMBA_SERVER_ENGINE_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "model/ramba_model.h"
#include "model/sampler.h"

namespace ramba::server {

class Metrics;

enum class FinishReason { kNone, kInputConsumed, kMaxTokens, kStop, kCancelled, kError };

// What a token callback tells the engine.
enum class TokenAction { kContinue, kStop };

struct EngineRequest {
  // The session to run on. The caller holds the session's writer lock until on_done has run and
  // keeps the state alive until then; the engine is its only user meanwhile.
  SessionState* state = nullptr;
  // Tokens fed before sampling (prompt / appended text). Must be non-empty when generating: the
  // first token is sampled from the logits of the last input token. When generation ends at
  // max_new_tokens (or is cancelled), the last *generated* token is reported but not fed: the
  // caller keeps it as the session's pending token and puts it first in the next request's input,
  // so no step is spent on a token that may never be read. When it ends on kStop, the stopping
  // token is fed before on_done (see feed_stop_token).
  std::vector<int32_t> input;
  int32_t max_new_tokens = 0;    // 0: append only
  // The engine sets sampling.logit_bias and .hold_back itself, from the two fields below.
  SamplingOptions sampling;
  // Added to the logits of the listed tokens at every generated token (valid:
  // ValidateLogitBias).
  std::vector<LogitBias> logit_bias;
  // min_tokens: the first min_new_tokens generated tokens are never one of held_back (the caller's
  // stop tokens: EOS, stop ids), which the model cannot sample until then.
  int32_t min_new_tokens = 0;
  std::vector<int32_t> held_back;
  // Whether on_token gets the token's logprob (RambaModel::ForwardAndSample); NaN otherwise.
  bool include_logprobs = false;
  // How many of the most likely tokens at each generated token's place on_token gets (with
  // their logprobs; implies include_logprobs), 0 to min(vocab, Backend::kMaxTopLogprobs).
  int32_t top_logprobs = 0;
  bool wants_logprobs() const { return include_logprobs || top_logprobs > 0; }
  // Called on the engine thread for each generated token; kStop ends generation after it (stop
  // sequences and stop ids are decided by the caller, which knows the text). `top` is valid for
  // the call only.
  std::function<TokenAction(int32_t token, float logprob, absl::Span<const TopLogprob> top)>
      on_token;
  // Called exactly once, on the engine thread, when the request leaves the engine.
  std::function<void(const absl::Status& status, FinishReason reason)> on_done;
  // Whether a generation ended by kStop feeds its stopping token before on_done. A step launched
  // before the token was known to stop (EngineOptions::pipeline_decode) has fed it already and
  // cannot be undone, so for the state to be the same however the steps ran, the engine otherwise
  // runs one more step for it. false: do not spend that step (the caller throws the state away).
  bool feed_stop_token = true;
  // Set by the engine before on_done: the last generated token was fed, so it is part of the
  // state and not pending.
  bool last_token_fed = false;
  // Set by any thread (client cancelled, deadline passed); checked before every iteration, so a
  // cancelled request stops within one step with its state consistent (position = tokens fed).
  std::atomic<bool> cancelled{false};
};

struct EngineOptions {
  // Tokens per iteration across all requests (decode rows count one each). Bounds scratch memory
  // and the latency one long prompt adds to other sessions' decode steps.
  int64_t max_batch_tokens = 1024;
  // Requests in flight at once; more wait in the queue.
  int64_t max_active_requests = 256;
  // Run RambaModel::Warmup on the engine thread before the first request (WaitForWarmup returns
  // its status). On that thread because the backend's per-thread resources are set up by the
  // thread that uses them: warmed up on another thread, the CPU backend's second OpenMP team
  // made libgomp stop spinning, and every later op paid a wake-up (2.8x slower decode).
  bool warmup = false;
  // Launch each step before the previous one's tokens are back (RambaModel::LaunchForward: rows
  // that go on take their tokens on the device; rows may join or leave), so the device does not
  // wait while this thread reports tokens. A step launched ahead for a request whose token then
  // stops it has fed that token (EngineRequest::feed_stop_token), and its own token is dropped.
  // Steps are never launched past max_new_tokens.
  bool pipeline_decode = true;
  // With pipeline_decode: prompt tokens go through RambaModel::Feed next to each launch instead
  // of into it, all but a generating request's last one, which joins the next launch as a decode
  // row. Launches then hold only decode rows, a shape a GPU replays as a recorded graph; a batch
  // mixing a prompt's tokens with decode rows runs op by op (on an H100 serving ramba-tiny, ~1.8
  // ms against ~0.4). On the CPU a mixed batch reads the weights once for both, so the server
  // sets this only on a backend with graphs.
  bool split_prefill = false;
  // Where the engine reports its iterations and steps (Metrics::engine_*); null: nowhere.
  // Observed on the engine thread; must outlive the engine.
  Metrics* metrics = nullptr;
};

// Thread-safe: Submit and Stop may be called from any thread.
class Engine {
 public:
  Engine(RambaModel* model, EngineOptions options);
  ~Engine();  // stops (cancelling what is left) and joins the thread

  // Queues a request; its callbacks run on the engine thread.
  void Submit(std::shared_ptr<EngineRequest> request);
  // Requests waiting or running.
  int64_t QueueDepth() const;
  int64_t ActiveRequests() const;
  // Finishes every request with Cancelled and stops the thread. Idempotent.
  void Stop();
  // Blocks until the warm-up (EngineOptions::warmup) has run, or at once without one.
  absl::Status WaitForWarmup();

 private:
  struct Running;
  struct InFlight;
  struct ToReport {
    Running* r;
    int32_t token;
    float logprob;
    std::vector<TopLogprob> top;
  };
  enum class Outcome { kNone, kToken, kEnded };
  void Loop();
  absl::Status Validate(const EngineRequest& request) const;
  // Sets up the generation scratch a request's sampling needs (SessionState::ResetTokenCounts,
  // SetLogitBias), released when it ends.
  static absl::Status StartGeneration(EngineRequest& request);
  // One iteration over `active`. Pipelined: launch the next step, collect the one in flight
  // before it, report.
  void Step(std::vector<std::unique_ptr<Running>>& active);
  // Runs one blocking step (without pipeline_decode).
  void StepOneAtATime(std::vector<std::unique_ptr<Running>>& active);
  // Collects `step` (launched before in_flight_) and applies its rows: tokens to report (not yet
  // reported), requests ended.
  void Collect(const InFlight& step, std::vector<ToReport>* to_report, std::vector<Running*>* done);
  // Chooses the next batch among `active` (not `skip`, cancelled ones or ones about to end),
  // setting each request's take: first the rows of `carry_from` (a step not yet collected) whose
  // token it samples is their next input, then rows at their last input token, then prompt
  // tokens within the budget; with `split`, prompts (but a generating request's last token) go to
  // `feed` instead of `batch`.
  void PlanBatch(const std::vector<std::unique_ptr<Running>>& active,
                 const std::vector<Running*>& skip, const InFlight* carry_from, bool split,
                 std::vector<Running*>* batch, std::vector<Running*>* feed);
  // Plans and launches the next step as in_flight_ (carrying rows from `carry_from`), then feeds
  // the planned prompt tokens (split_prefill).
  void LaunchNext(const std::vector<std::unique_ptr<Running>>& active, const InFlight* carry_from,
                  std::vector<Running*>* done);
  // Collects and drops every launched step's tokens (engine stopping, a failed chain, rows all
  // ended) and clears in_flight_.
  void DiscardLaunched();
  // A step's row applied to its request whose input it used up: kToken (counted and pending, or
  // taken by the step launched ahead when fed_ahead), or kEnded (on_done has run).
  Outcome Absorb(Running* r, int32_t token, bool fed_ahead);
  // Reports a generated token; true when it ended the request (on_done has run).
  bool Report(Running* r, int32_t token, float logprob, absl::Span<const TopLogprob> top,
              bool fed_ahead);
  // Counts a step's rows, `launched` and prompt rows `fed` beside it (their sessions and taken
  // tokens), towards the metrics, and marks the iteration as one that ran model work.
  void CountStep(const std::vector<Running*>& launched, const std::vector<Running*>& fed);

  RambaModel* model_;
  EngineOptions options_;
  mutable absl::Mutex mu_;
  std::deque<std::shared_ptr<EngineRequest>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::atomic<int64_t> active_count_{0};
  std::unique_ptr<InFlight> in_flight_;  // engine thread only
  RambaModel::ChunkTierCounts tier_counts_seen_;  // engine thread only: counted into metrics
  bool iteration_ran_model_ = false;     // engine thread only: this iteration launched or collected
  absl::Status warmup_status_;  // written before warmed_ is notified
  absl::Notification warmed_;
  std::thread thread_;
};

}  // namespace ramba::server

#endif  // RAMBA_SERVER_ENGINE_H_
