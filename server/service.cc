#include "server/service.h"

#include <algorithm>
#include <chrono>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "base/status_macros.h"
#include "ramba/v1/metadata.h"
#include "server/text_streamer.h"

namespace ramba::server {

namespace v1 = ::ramba::v1;
using Clock = std::chrono::steady_clock;

grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  // absl and gRPC share the canonical code numbering.
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

namespace {

double Ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

absl::StatusOr<std::vector<int32_t>> ToTokens(const v1::Input& input, const Tokenizer& tok,
                                              int64_t vocab, int64_t max_tokens,
                                              const char* field) {
  std::vector<int32_t> ids;
  if (input.has_tokens()) {
    ids.assign(input.tokens().ids().begin(), input.tokens().ids().end());
    for (size_t i = 0; i < ids.size(); ++i) {
      if (ids[i] < 0 || ids[i] >= vocab) {
        return absl::InvalidArgumentError(absl::StrCat(field, ".tokens.ids[", i, "] = ", ids[i],
                                                       " is outside the vocabulary [0, ", vocab,
                                                       ")"));
      }
    }
  } else if (input.has_text()) {
    ids = tok.Encode(input.text());
  }
  if (static_cast<int64_t>(ids.size()) > max_tokens) {
    return absl::ResourceExhaustedError(absl::StrCat(field, " has ", ids.size(),
                                                     " tokens, more than the limit of ",
                                                     max_tokens, " per request"));
  }
  return ids;
}

// The server's defaults: SamplingOptions' own, but temperature 1 (sampling, not greedy).
SamplingOptions ServerSamplingDefaults() {
  SamplingOptions o;
  o.temperature = 1.0f;
  return o;
}

// Every field `d` sets, written over *o.
void Override(const SamplingDefaults& d, SamplingOptions* o) {
  if (d.temperature) o->temperature = *d.temperature;
  if (d.top_k) o->top_k = *d.top_k;
  if (d.top_p) o->top_p = *d.top_p;
  if (d.min_p) o->min_p = *d.min_p;
  if (d.presence_penalty) o->presence_penalty = *d.presence_penalty;
  if (d.frequency_penalty) o->frequency_penalty = *d.frequency_penalty;
  if (d.repetition_penalty) o->repetition_penalty = *d.repetition_penalty;
  if (d.seed) o->seed = *d.seed;
}

absl::StatusOr<SamplingDefaults> FromProto(const v1::SamplingParams& p, int64_t vocab,
                                           const char* field) {
  SamplingDefaults d;
  if (p.has_temperature()) d.temperature = p.temperature();
  if (p.has_top_k()) d.top_k = p.top_k();
  if (p.has_top_p()) d.top_p = p.top_p();
  if (p.has_min_p()) d.min_p = p.min_p();
  if (p.has_presence_penalty()) d.presence_penalty = p.presence_penalty();
  if (p.has_frequency_penalty()) d.frequency_penalty = p.frequency_penalty();
  if (p.has_repetition_penalty()) d.repetition_penalty = p.repetition_penalty();
  if (p.has_seed()) d.seed = p.seed();
  SamplingOptions check = ServerSamplingDefaults();
  Override(d, &check);
  if (absl::Status s = ValidateSamplingOptions(check); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": ", s.message()));
  }
  for (const auto& [id, bias] : p.logit_bias()) d.logit_bias.push_back({id, bias});
  std::sort(d.logit_bias.begin(), d.logit_bias.end(),
            [](const LogitBias& a, const LogitBias& b) { return a.id < b.id; });
  RETURN_IF_ERROR(ValidateLogitBias(d.logit_bias, vocab, absl::StrCat(field, ".logit_bias")));
  return d;
}

void ToProto(const SamplingDefaults& d, v1::SamplingParams* p) {
  if (d.temperature) p->set_temperature(*d.temperature);
  if (d.top_k) p->set_top_k(*d.top_k);
  if (d.top_p) p->set_top_p(*d.top_p);
  if (d.min_p) p->set_min_p(*d.min_p);
  if (d.presence_penalty) p->set_presence_penalty(*d.presence_penalty);
  if (d.frequency_penalty) p->set_frequency_penalty(*d.frequency_penalty);
  if (d.repetition_penalty) p->set_repetition_penalty(*d.repetition_penalty);
  if (d.seed) p->set_seed(*d.seed);
  for (const LogitBias& b : d.logit_bias) (*p->mutable_logit_bias())[b.id] = b.bias;
}

// Request value, else session default, else server default (seed: random).
SamplingOptions Resolve(const SamplingDefaults& req, const SamplingDefaults& session) {
  SamplingOptions o = ServerSamplingDefaults();
  Override(session, &o);
  Override(req, &o);
  if (!req.seed && !session.seed) {
    std::random_device rd;
    o.seed = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }
  return o;
}

// The request's logit bias when it has one, else the session's.
const std::vector<LogitBias>& ResolveLogitBias(const SamplingDefaults& req,
                                               const SamplingDefaults& session) {
  return req.logit_bias.empty() ? session.logit_bias : req.logit_bias;
}

void SetTime(int64_t micros, google::protobuf::Timestamp* t) {
  t->set_seconds(micros / 1000000);
  t->set_nanos(static_cast<int32_t>((micros % 1000000) * 1000));
}

void ToProto(const SessionView& v, v1::Session* s) {
  s->set_id(v.id);
  s->set_position(v.position);
  s->set_num_chunks(v.num_chunks);
  SetTime(v.created_unix_micros, s->mutable_create_time());
  SetTime(v.updated_unix_micros, s->mutable_update_time());
  for (const auto& [k, val] : v.meta.labels) (*s->mutable_labels())[k] = val;
  ToProto(v.meta.default_sampling, s->mutable_default_sampling());
  s->set_parent_id(v.meta.parent_id);
  if (v.meta.fork_position) s->set_fork_position(*v.meta.fork_position);
}

absl::Status ValidateLabels(const google::protobuf::Map<std::string, std::string>& labels,
                            int32_t max_labels) {
  if (static_cast<int32_t>(labels.size()) > max_labels) {
    return absl::InvalidArgumentError(
        absl::StrCat("labels has ", labels.size(), " entries, the limit is ", max_labels));
  }
  for (const auto& [k, v] : labels) {
    bool ok = !k.empty() && k.size() <= 63 && std::isalpha(static_cast<unsigned char>(k[0]));
    for (char c : k) {
      ok = ok && (std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-');
    }
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(
          "label key '", k, "' must be 1 to 63 bytes of [A-Za-z0-9._-] starting with a letter"));
    }
    if (v.size() > 256) {
      return absl::InvalidArgumentError(absl::StrCat("label '", k, "' value exceeds 256 bytes"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckExpected(bool has, int64_t expected, int64_t actual, const std::string& id) {
  if (has && expected != actual) {
    return absl::FailedPreconditionError(absl::StrCat("expected_position ", expected,
                                                      " but session '", id, "' is at position ",
                                                      actual));
  }
  return absl::OkStatus();
}

// Sessions may not grow beyond ServiceLimits.max_session_tokens.
absl::Status CheckSessionLimit(const ServiceLimits& lim, int64_t position, int64_t adding,
                               const std::string& id) {
  if (adding > 0 && position + adding > lim.max_session_tokens) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "session '", id, "' would grow to ", position + adding,
        " tokens, beyond the server's max_session_tokens of ", lim.max_session_tokens));
  }
  return absl::OkStatus();
}

// The contract returns the session's position with FAILED_PRECONDITION, so a client can retry
// without another GetSession.
void AddPositionTrailer(grpc::CallbackServerContext* ctx, const absl::Status& s, int64_t position) {
  if (s.code() == absl::StatusCode::kFailedPrecondition) {
    ctx->AddTrailingMetadata(v1::kSessionPositionMetadata, std::to_string(position));
  }
}

grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* ctx, const absl::Status& s) {
  auto* r = ctx->DefaultReactor();
  r->Finish(ToGrpcStatus(s));
  return r;
}

const absl::Status kDraining = absl::UnavailableError("the server is draining for shutdown");

// Serialises and writes a prepared commit of `lease` (timed into the commit latency metric), then
// runs `then` with the result: on the committer when there is one and `async`, else here.
void ApplyCommit(TaskPool* committer, bool async, Metrics* metrics, SessionLease* lease,
                 SessionLease::PreparedCommit prepared, std::function<void(absl::Status)> then) {
  // Shared, since a task must be copyable (the snapshot is not).
  auto write = [lease, metrics,
                prepared = std::make_shared<SessionLease::PreparedCommit>(std::move(prepared)),
                then = std::move(then)]() mutable {
    const auto t0 = Clock::now();
    absl::Status result = lease->ApplyCommit(std::move(*prepared));
    if (metrics) metrics->commit_latency->Observe(Ms(t0, Clock::now()) / 1e3);
    auto finish = std::move(then);  // released with this frame, not with the task
    finish(result);
  };
  if (async && committer != nullptr) {
    committer->Run(std::move(write));
  } else {
    write();
  }
}

// Appends `tokens` to a leased session (the last token stays pending) and commits; `done` runs
// after the commit (or failure): on the engine thread, or with `async` on the committer's, so it
// must not touch the model then. Uncommitted changes are dropped with the lease on failure.
void AppendAndCommit(const RambaService::Deps& deps, std::shared_ptr<SessionLease> lease,
                     std::vector<int32_t> tokens, std::function<void(absl::Status)> done,
                     grpc::CallbackServerContext* ctx = nullptr, bool async = true) {
  if (tokens.empty()) {
    done(absl::OkStatus());
    return;
  }
  auto req = std::make_shared<EngineRequest>();
  req->state = lease->state();
  if (lease->meta().pending_token) req->input.push_back(*lease->meta().pending_token);
  req->input.insert(req->input.end(), tokens.begin(), tokens.end() - 1);
  const int32_t last = tokens.back();
  Metrics* metrics = deps.metrics;
  const size_t n = tokens.size();
  TaskPool* committer = deps.committer;
  req->on_done = [lease, last, done, metrics, n, ctx, committer, async](const absl::Status& s,
                                                                        FinishReason) mutable {
    // Take the lease out of the callback so it is released before `done` answers the client
    // (the callback object itself lives until the engine drops the request).
    std::shared_ptr<SessionLease> held = std::move(lease);
    absl::Status result = s;
    // All or nothing: a call the client cancelled (or whose deadline passed) commits nothing.
    if (result.ok() && ctx != nullptr && ctx->IsCancelled()) {
      result = absl::CancelledError("the call was cancelled before its append committed");
    }
    if (!result.ok()) {
      held.reset();
      done(result);
      return;
    }
    held->meta().pending_token = last;
    // The snapshot is taken here, on the engine thread (queued copies, no wait); serialising and
    // writing it move to the committer. `done` moves along: its captures may hold the lease, which
    // must be released when the client hears back (no copy of it may stay behind in the engine's
    // request).
    absl::StatusOr<SessionLease::PreparedCommit> prepared = held->PrepareCommit();
    if (!prepared.ok()) {
      held.reset();
      done(prepared.status());
      return;
    }
    SessionLease* lease_ptr = held.get();
    ApplyCommit(
        committer, async, metrics, lease_ptr, std::move(*prepared),
        [held = std::move(held), done = std::move(done), metrics, n](absl::Status result) mutable {
          if (metrics && result.ok()) {
            metrics->prompt_tokens->Increment(static_cast<double>(n));
          }
          held.reset();
          done(result);
        });
  };
  deps.engine->Submit(std::move(req));
}

// ---- Generate / GenerateOnce ----

struct GenerateSpec {
  std::vector<int32_t> input;
  SamplingDefaults sampling;
  int32_t max_tokens = 0;
  int32_t min_tokens = 0;
  std::vector<std::string> stop_sequences;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  bool include_stop_sequence = false;
  bool include_text = true;
  bool include_logprobs = false;
  int32_t top_logprobs = 0;
  bool commit_input = true;
  bool commit_generated = true;
  bool has_expected = false;
  int64_t expected_position = 0;
};

absl::StatusOr<GenerateSpec> ParseGenerate(const RambaService::Deps& d, const v1::Input& input,
                                           const v1::SamplingParams& sampling,
                                           const v1::StoppingCriteria& stopping,
                                           const v1::OutputOptions& output) {
  const ServiceLimits& lim = d.options.limits;
  GenerateSpec g;
  ASSIGN_OR_RETURN(g.input, ToTokens(input, *d.tokenizer, d.model->config().vocab_size,
                                     lim.max_request_input_tokens, "input"));
  ASSIGN_OR_RETURN(g.sampling, FromProto(sampling, d.model->config().vocab_size, "sampling"));
  g.max_tokens = stopping.has_max_tokens() ? stopping.max_tokens() : lim.default_max_tokens;
  if (g.max_tokens < 1 || g.max_tokens > lim.max_generate_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("stopping.max_tokens must be in [1, ",
                                                   lim.max_generate_tokens, "], got ",
                                                   g.max_tokens));
  }
  if (stopping.stop_sequences_size() > lim.max_stop_sequences) {
    return absl::InvalidArgumentError(absl::StrCat("stopping.stop_sequences has ",
                                                   stopping.stop_sequences_size(),
                                                   " entries, the limit is ",
                                                   lim.max_stop_sequences));
  }
  for (const std::string& s : stopping.stop_sequences()) {
    if (s.empty() || static_cast<int32_t>(s.size()) > lim.max_stop_sequence_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "stopping.stop_sequences entries must be 1 to ", lim.max_stop_sequence_bytes, " bytes"));
    }
    g.stop_sequences.push_back(s);
  }
  if (stopping.stop_token_ids_size() > lim.max_stop_token_ids) {
    return absl::InvalidArgumentError(absl::StrCat("stopping.stop_token_ids has ",
                                                   stopping.stop_token_ids_size(),
                                                   " entries, the limit is ",
                                                   lim.max_stop_token_ids));
  }
  for (int32_t id : stopping.stop_token_ids()) {
    if (id < 0 || id >= d.model->config().vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("stopping.stop_token_ids has id ", id, " outside the vocabulary"));
    }
    g.stop_token_ids.push_back(id);
  }
  if (stopping.min_tokens() < 0 || stopping.min_tokens() > g.max_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("stopping.min_tokens must be in [0, max_tokens = ", g.max_tokens, "], got ",
                     stopping.min_tokens()));
  }
  g.min_tokens = stopping.min_tokens();
  g.ignore_eos = stopping.ignore_eos();
  g.include_stop_sequence = stopping.include_stop_sequence();
  g.include_text = !output.has_include_token_text() || output.include_token_text();
  g.include_logprobs = output.include_logprobs();
  if (absl::Status s = ValidateTopLogprobs(output.top_logprobs(), d.model->config().vocab_size);
      !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("output.", s.message()));
  }
  g.top_logprobs = output.top_logprobs();
  return g;
}

// One Generate / GenerateOnce call: runs the engine request(s), streams tokens (one write in
// flight, the rest coalesced), commits, and sends Final.
class GenerateCall : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  GenerateCall(grpc::CallbackServerContext* ctx, const RambaService::Deps& deps,
               GenerateSpec spec, std::string session_id, bool stateless)
      : ctx_(ctx), deps_(deps), spec_(std::move(spec)), session_id_(std::move(session_id)),
        stateless_(stateless), start_(Clock::now()),
        streamer_(spec_.stop_sequences, spec_.include_stop_sequence) {}

  void Start() {
    absl::Status s = Begin();
    if (!s.ok()) Fail(s);
  }

  void OnCancel() override {
    cancelled_ = true;
    absl::MutexLock lock(&mu_);
    if (request_) request_->cancelled = true;
  }
  void OnWriteDone(bool ok) override {
    bool finish = false;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) {
        cancelled_ = true;
        if (request_) request_->cancelled = true;
      }
      finish = WriteNextLocked();
    }
    if (finish) Finish(final_status_);
  }
  void OnDone() override { delete this; }

 private:
  absl::Status Begin() {
    Engine* engine = deps_.engine;
    if (stateless_) {
      if (spec_.input.empty()) {
        return absl::InvalidArgumentError("input is required and must not be empty");
      }
      ASSIGN_OR_RETURN(temp_, deps_.model->NewSession());
      sampling_ = Resolve(spec_.sampling, {});
      logit_bias_ = spec_.sampling.logit_bias;
      return Submit(temp_.get(), spec_.input);
    }
    if (!spec_.commit_input && spec_.commit_generated) {
      return absl::InvalidArgumentError(
          "commit_generated = true needs commit_input = true (generated tokens follow the input)");
    }
    const auto t0 = Clock::now();
    ASSIGN_OR_RETURN(SessionLease lease, deps_.sessions->Acquire(session_id_));
    load_ms_ = Ms(t0, Clock::now());
    lease_ = std::make_shared<SessionLease>(std::move(lease));
    {
      absl::Status st = CheckExpected(spec_.has_expected, spec_.expected_position,
                                      lease_->position(), session_id_);
      AddPositionTrailer(ctx_, st, lease_->position());
      RETURN_IF_ERROR(st);
    }
    {
      const ServiceLimits& lim = deps_.options.limits;
      const int64_t input = spec_.commit_input ? static_cast<int64_t>(spec_.input.size()) : 0;
      RETURN_IF_ERROR(CheckSessionLimit(lim, lease_->position(), input + 1, session_id_));
      const int64_t room = lim.max_session_tokens - lease_->position() - input;
      if (spec_.commit_generated && spec_.max_tokens > room) {
        spec_.max_tokens = static_cast<int32_t>(room);
        session_limited_ = true;
      }
    }
    sampling_ = Resolve(spec_.sampling, lease_->meta().default_sampling);
    logit_bias_ = ResolveLogitBias(spec_.sampling, lease_->meta().default_sampling);
    std::vector<int32_t> feed;
    if (lease_->meta().pending_token) feed.push_back(*lease_->meta().pending_token);
    if (spec_.commit_generated) {
      feed.insert(feed.end(), spec_.input.begin(), spec_.input.end());
      if (feed.empty()) return NothingToGenerateFrom();
      return Submit(lease_->state(), feed);
    }
    // Generated tokens stay out of the session: generate on a fork. With commit_input the
    // input joins the session first.
    if (spec_.commit_input && !spec_.input.empty()) {
      auto self = this;
      // Synchronous: the continuation forks the state, which stays on the engine thread.
      AppendAndCommit(
          deps_, lease_, spec_.input,
          [self](absl::Status s) {
            if (!s.ok()) {
              self->Fail(s);
              return;
            }
            self->input_committed_ = true;
            absl::Status st = self->GenerateOnFork({*self->lease_->meta().pending_token});
            if (!st.ok()) self->Fail(st);
          },
          nullptr, /*async=*/false);
      (void)engine;
      return absl::OkStatus();
    }
    feed.insert(feed.end(), spec_.input.begin(), spec_.input.end());
    if (feed.empty()) return NothingToGenerateFrom();
    return GenerateOnFork(feed);
  }

  // The first token is sampled from the prediction after the last token fed, so generation needs
  // a token to feed: input or the session's pending token, which a stop token never is.
  absl::Status NothingToGenerateFrom() const {
    if (lease_->position() == 0) {
      return absl::InvalidArgumentError(
          "the session is empty and input is empty: nothing to generate from");
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "input is empty and session ", session_id_,
        " ends with a finished generation (its stop token is part of the history, so there is no "
        "pending token to generate from): send input"));
  }

  absl::Status GenerateOnFork(std::vector<int32_t> feed) {
    ASSIGN_OR_RETURN(temp_, lease_->state()->Fork());
    fork_only_ = true;
    return Submit(temp_.get(), std::move(feed));
  }

  absl::Status Submit(SessionState* state, std::vector<int32_t> feed) {
    auto req = std::make_shared<EngineRequest>();
    req->state = state;
    req->input = std::move(feed);
    req->max_new_tokens = spec_.max_tokens;
    req->sampling = sampling_;
    req->logit_bias = logit_bias_;
    req->min_new_tokens = spec_.min_tokens;
    req->held_back = spec_.stop_token_ids;
    if (!spec_.ignore_eos) req->held_back.push_back(deps_.model->config().eos_token_id);
    req->include_logprobs = spec_.include_logprobs;
    req->top_logprobs = spec_.top_logprobs;
    req->feed_stop_token = !(stateless_ || fork_only_);  // a throwaway state needs no last step
    req->on_token = [this](int32_t t, float logprob, absl::Span<const TopLogprob> top) {
      return OnToken(t, logprob, top);
    };
    req->on_done = [this](const absl::Status& s, FinishReason r) { OnEngineDone(s, r); };
    {
      absl::MutexLock lock(&mu_);
      request_ = req;
    }
    if (cancelled_) req->cancelled = true;
    queued_ = Clock::now();
    deps_.engine->Submit(std::move(req));
    return absl::OkStatus();
  }

  // Engine thread.
  TokenAction OnToken(int32_t token, float logprob, absl::Span<const TopLogprob> top) {
    const auto now = Clock::now();
    if (!first_token_) {
      first_token_ = now;
      if (deps_.metrics) deps_.metrics->time_to_first_token->Observe(Ms(start_, now) / 1e3);
    } else if (deps_.metrics) {
      deps_.metrics->inter_token_latency->Observe(Ms(last_token_, now) / 1e3);
    }
    last_token_ = now;
    generated_.push_back(token);
    const ModelConfig& c = deps_.model->config();
    v1::Token t;
    t.set_id(token);
    if (spec_.include_logprobs || spec_.top_logprobs > 0) t.set_logprob(logprob);
    for (const TopLogprob& alt : top) {
      v1::TopLogprob* a = t.add_top_logprobs();
      a->set_id(alt.id);
      a->set_logprob(alt.logprob);
      auto bytes = deps_.tokenizer->DecodeToken(alt.id);
      if (bytes.ok()) a->set_token(*bytes);
    }
    TokenAction action = TokenAction::kContinue;
    if (!spec_.ignore_eos && token == c.eos_token_id) {
      reason_ = v1::FINISH_REASON_EOS;
      action = TokenAction::kStop;
    } else if (std::find(spec_.stop_token_ids.begin(), spec_.stop_token_ids.end(), token) !=
               spec_.stop_token_ids.end()) {
      reason_ = v1::FINISH_REASON_STOP_TOKEN;
      stop_token_ = token;
      action = TokenAction::kStop;
    }
    std::string text;
    if (action == TokenAction::kContinue) {
      auto bytes = deps_.tokenizer->DecodeToken(token);
      // A stop sequence counts from the min_tokens-th token on (StoppingCriteria.min_tokens).
      text = streamer_.Add(bytes.ok() ? *bytes : std::string(),
                           static_cast<int32_t>(generated_.size()) >= spec_.min_tokens);
      if (streamer_.stopped()) {
        reason_ = v1::FINISH_REASON_STOP_SEQUENCE;
        action = TokenAction::kStop;
      }
    }
    // The last token releases whatever text is still held back.
    const bool last = action == TokenAction::kStop ||
                      static_cast<int32_t>(generated_.size()) >= spec_.max_tokens;
    if (last && !streamer_.stopped()) text += streamer_.Flush();
    if (spec_.include_text) t.set_text(std::move(text));
    {
      absl::MutexLock lock(&mu_);
      *pending_.add_tokens() = std::move(t);
      WriteNextSoonLocked();  // the write itself not on the engine thread
    }
    return action;
  }

  // Engine thread.
  void OnEngineDone(const absl::Status& s, FinishReason r) {
    bool last_fed = false;
    {
      absl::MutexLock lock(&mu_);
      last_fed = request_ != nullptr && request_->last_token_fed;
      request_.reset();
    }
    if (!s.ok()) {
      if (deps_.metrics) {
        (s.code() == absl::StatusCode::kCancelled ? deps_.metrics->requests_cancelled
                                                  : deps_.metrics->requests_failed)
            ->Increment();
      }
      Fail(s);
      return;
    }
    if (r == FinishReason::kMaxTokens && reason_ == v1::FINISH_REASON_UNSPECIFIED) {
      reason_ = session_limited_ ? v1::FINISH_REASON_SESSION_LIMIT : v1::FINISH_REASON_MAX_TOKENS;
    }
    if (stateless_ || fork_only_) {
      Complete();
      return;
    }
    // Generated tokens join the session, fed but for the last one after max_tokens, which is
    // pending (a stop token is fed: EngineRequest::feed_stop_token). The snapshot is taken here
    // (engine thread, in the device's queue order, so after a step in flight that feeds the stop
    // token); serialising and writing run on the committer, and the client hears back once the
    // commit is durable.
    if (!generated_.empty()) {
      lease_->meta().pending_token =
          last_fed ? std::nullopt : std::optional<int32_t>(generated_.back());
    }
    absl::StatusOr<SessionLease::PreparedCommit> prepared = lease_->PrepareCommit();
    if (!prepared.ok()) {
      Fail(prepared.status());
      return;
    }
    ApplyCommit(deps_.committer, /*async=*/true, deps_.metrics, lease_.get(), std::move(*prepared),
                [this](absl::Status c) {
                  if (!c.ok()) {
                    Fail(c);
                    return;
                  }
                  Complete();
                });
  }

  // After the commit (if any): the Final message, the session released first.
  void Complete() {
    v1::Final final;
    final.set_finish_reason(reason_);
    if (reason_ == v1::FINISH_REASON_STOP_SEQUENCE) final.set_stop_sequence(streamer_.matched());
    if (reason_ == v1::FINISH_REASON_STOP_TOKEN) final.set_stop_token_id(stop_token_);
    if (sampling_.temperature > 0) final.set_seed(sampling_.seed);
    if (!stateless_) {
      final.set_position(lease_->position());
      lease_.reset();  // releases the session before the client hears back
    }
    auto* usage = final.mutable_usage();
    usage->set_prompt_tokens(static_cast<int64_t>(spec_.input.size()));
    usage->set_generated_tokens(static_cast<int64_t>(generated_.size()));
    usage->set_load_time_ms(load_ms_);
    usage->set_queue_time_ms(Ms(start_, queued_));
    if (first_token_) usage->set_time_to_first_token_ms(Ms(start_, *first_token_));
    usage->set_total_time_ms(Ms(start_, Clock::now()));
    if (deps_.metrics) {
      deps_.metrics->generated_tokens->Increment(static_cast<double>(generated_.size()));
      if (!input_committed_) deps_.metrics->prompt_tokens->Increment(static_cast<double>(spec_.input.size()));
      deps_.metrics->requests_ok->Increment();
      deps_.metrics->request_latency->Observe(Ms(start_, Clock::now()) / 1e3);
    }
    bool finish = false;
    {
      absl::MutexLock lock(&mu_);
      final_ = std::move(final);
      final_status_ = grpc::Status::OK;
      finish = WriteNextSoonLocked();  // on the engine or the commit thread
    }
    if (finish) Finish(final_status_);
  }

  void Fail(const absl::Status& s) {
    lease_.reset();  // uncommitted changes are dropped
    bool finish = false;
    {
      absl::MutexLock lock(&mu_);
      failed_ = true;
      final_status_ = ToGrpcStatus(s);
      finish = !writing_ && !finished_;
      if (finish) finished_ = true;
    }
    if (finish) Finish(final_status_);
  }

  // WriteNextLocked on the stream-writer pool when there is one (a write costs its caller a
  // system call, and the engine thread would pay it per token and stream), else here. While the
  // task is queued it counts as the write in flight, so nothing else starts one or finishes the
  // call (which would delete it) before the task has run.
  bool WriteNextSoonLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (deps_.writer == nullptr) return WriteNextLocked();
    if (writing_ || finished_) return false;
    writing_ = true;
    deps_.writer->Run([this] {
      bool finish = false;
      {
        absl::MutexLock lock(&mu_);
        writing_ = false;
        finish = WriteNextLocked();
      }
      if (finish) Finish(final_status_);
    });
    return false;
  }

  // Starts the next write if none is in flight; returns true when the call should Finish now.
  bool WriteNextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finished_) return false;
    if (failed_) {
      finished_ = true;
      return true;
    }
    if (pending_.tokens_size() > 0 && !cancelled_) {
      current_.Clear();
      *current_.mutable_tokens() = std::move(pending_);
      pending_.Clear();
      writing_ = true;
      StartWrite(&current_);
      return false;
    }
    if (final_.has_value()) {
      current_.Clear();
      *current_.mutable_final() = std::move(*final_);
      final_.reset();
      writing_ = true;
      StartWrite(&current_);
      final_sent_ = true;
      return false;
    }
    if (final_sent_) {
      finished_ = true;
      return true;
    }
    return false;
  }

  grpc::CallbackServerContext* ctx_;
  RambaService::Deps deps_;
  GenerateSpec spec_;
  std::string session_id_;
  bool stateless_;
  Clock::time_point start_, queued_, last_token_;
  std::optional<Clock::time_point> first_token_;
  double load_ms_ = 0;
  SamplingOptions sampling_;
  std::vector<LogitBias> logit_bias_;
  std::shared_ptr<SessionLease> lease_;
  std::unique_ptr<SessionState> temp_;
  bool fork_only_ = false;
  bool input_committed_ = false;
  bool session_limited_ = false;
  std::shared_ptr<EngineRequest> request_ ABSL_GUARDED_BY(mu_);
  std::atomic<bool> cancelled_{false};
  std::vector<int32_t> generated_;
  TextStreamer streamer_;
  v1::FinishReason reason_ = v1::FINISH_REASON_UNSPECIFIED;
  int32_t stop_token_ = -1;

  absl::Mutex mu_;
  v1::TokenChunk pending_ ABSL_GUARDED_BY(mu_);
  std::optional<v1::Final> final_ ABSL_GUARDED_BY(mu_);
  v1::GenerateResponse current_;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool final_sent_ ABSL_GUARDED_BY(mu_) = false;
  bool failed_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status final_status_;
};

// AppendStream: collects input pieces, then appends and commits on half-close.
class AppendStreamCall : public grpc::ServerReadReactor<v1::AppendStreamRequest> {
 public:
  AppendStreamCall(grpc::CallbackServerContext* ctx, const RambaService::Deps& deps,
                   v1::AppendResponse* resp)
      : ctx_(ctx), deps_(deps), resp_(resp) {
    StartRead(&msg_);
  }
  void OnReadDone(bool ok) override {
    if (!ok) {  // half-close: run the append
      Run();
      return;
    }
    if (first_) {
      first_ = false;
      id_ = msg_.session_id();
      has_expected_ = msg_.has_expected_position();
      expected_ = msg_.expected_position();
    } else if (!msg_.session_id().empty() && msg_.session_id() != id_) {
      error_ = absl::InvalidArgumentError("session_id may only be set in the first message");
    }
    if (error_.ok() && msg_.has_input()) {
      auto t = ToTokens(msg_.input(), *deps_.tokenizer, deps_.model->config().vocab_size,
                        deps_.options.limits.max_request_input_tokens, "input");
      if (!t.ok()) {
        error_ = t.status();
      } else {
        tokens_.insert(tokens_.end(), t->begin(), t->end());
        if (static_cast<int64_t>(tokens_.size()) > deps_.options.limits.max_request_input_tokens) {
          error_ = absl::ResourceExhaustedError(absl::StrCat(
              "the streamed input exceeds ", deps_.options.limits.max_request_input_tokens,
              " tokens"));
        }
      }
    }
    StartRead(&msg_);
  }
  void OnDone() override { delete this; }

 private:
  void Run() {
    if (!error_.ok()) return Finish(ToGrpcStatus(error_));
    if (first_) return Finish(ToGrpcStatus(absl::InvalidArgumentError("the stream carried no message")));
    auto lease = deps_.sessions->Acquire(id_);
    if (!lease.ok()) return Finish(ToGrpcStatus(lease.status()));
    auto shared = std::make_shared<SessionLease>(std::move(*lease));
    if (absl::Status s = CheckExpected(has_expected_, expected_, shared->position(), id_); !s.ok()) {
      AddPositionTrailer(ctx_, s, shared->position());
      return Finish(ToGrpcStatus(s));
    }
    if (absl::Status s = CheckSessionLimit(deps_.options.limits, shared->position(),
                                           static_cast<int64_t>(tokens_.size()), id_);
        !s.ok()) {
      return Finish(ToGrpcStatus(s));
    }
    const int64_t n = static_cast<int64_t>(tokens_.size());
    SessionManager* sessions = deps_.sessions;
    AppendAndCommit(deps_, shared, tokens_, [this, shared, n, sessions](absl::Status s) mutable {
      if (s.ok()) {
        resp_->set_appended_tokens(n);
        const std::string id = shared->id();
        shared.reset();
        auto view = sessions->Get(id);
        if (view.ok()) ToProto(*view, resp_->mutable_session());
      }
      shared.reset();
      Finish(ToGrpcStatus(s));
    }, ctx_);
  }

  grpc::CallbackServerContext* ctx_;
  RambaService::Deps deps_;
  v1::AppendResponse* resp_;
  v1::AppendStreamRequest msg_;
  bool first_ = true;
  std::string id_;
  bool has_expected_ = false;
  int64_t expected_ = 0;
  std::vector<int32_t> tokens_;
  absl::Status error_;
};

}  // namespace

RambaService::RambaService(RambaModel* model, const Tokenizer* tokenizer, Engine* engine,
                           SessionManager* sessions, Metrics* metrics, ServiceOptions options,
                           TaskPool* committer, TaskPool* writer)
    : deps_{model, tokenizer, engine, sessions, metrics, std::move(options), committer, writer} {}

grpc::ServerUnaryReactor* RambaService::CreateSession(grpc::CallbackServerContext* ctx,
                                                      const v1::CreateSessionRequest* req,
                                                      v1::CreateSessionResponse* resp) {
  if (draining_) return Done(ctx, kDraining);
  SessionMeta meta;
  if (auto s = ValidateLabels(req->labels(), deps_.options.limits.max_labels); !s.ok()) {
    return Done(ctx, s);
  }
  meta.labels.insert(req->labels().begin(), req->labels().end());
  auto sampling =
      FromProto(req->default_sampling(), deps_.model->config().vocab_size, "default_sampling");
  if (!sampling.ok()) return Done(ctx, sampling.status());
  meta.default_sampling = *sampling;
  auto tokens = ToTokens(req->initial_input(), *deps_.tokenizer, deps_.model->config().vocab_size,
                         deps_.options.limits.max_request_input_tokens, "initial_input");
  if (!tokens.ok()) return Done(ctx, tokens.status());
  if (auto s = CheckSessionLimit(deps_.options.limits, 0, static_cast<int64_t>(tokens->size()),
                                 req->session_id());
      !s.ok()) {
    return Done(ctx, s);
  }
  if (deps_.sessions->StoredSessions() >= deps_.options.limits.max_sessions) {
    return Done(ctx, absl::ResourceExhaustedError("the server stores its maximum number of sessions"));
  }
  auto view = deps_.sessions->Create(req->session_id(), meta);
  if (!view.ok()) return Done(ctx, view.status());
  if (tokens->empty()) {
    ToProto(*view, resp->mutable_session());
    return Done(ctx, absl::OkStatus());
  }
  auto lease = deps_.sessions->Acquire(view->id);
  if (!lease.ok()) return Done(ctx, lease.status());
  auto* reactor = ctx->DefaultReactor();
  auto shared = std::make_shared<SessionLease>(std::move(*lease));
  SessionManager* sessions = deps_.sessions;
  const std::string id = view->id;
  AppendAndCommit(deps_, shared, std::move(*tokens),
                  [reactor, resp, shared, sessions, id](absl::Status s) mutable {
                    shared.reset();
                    if (s.ok()) {
                      auto v = sessions->Get(id);
                      if (v.ok()) ToProto(*v, resp->mutable_session());
                      s = v.status();
                    } else {
                      // The session exists but its initial input failed: remove it.
                      sessions->Delete(id, std::nullopt).IgnoreError();
                    }
                    reactor->Finish(ToGrpcStatus(s));
                  },
                  ctx);
  return reactor;
}

grpc::ServerUnaryReactor* RambaService::GetSession(grpc::CallbackServerContext* ctx,
                                                   const v1::GetSessionRequest* req,
                                                   v1::GetSessionResponse* resp) {
  auto view = deps_.sessions->Get(req->session_id());
  if (view.ok()) ToProto(*view, resp->mutable_session());
  return Done(ctx, view.status());
}

grpc::ServerUnaryReactor* RambaService::ListSessions(grpc::CallbackServerContext* ctx,
                                                     const v1::ListSessionsRequest* req,
                                                     v1::ListSessionsResponse* resp) {
  const ServiceLimits& lim = deps_.options.limits;
  if (req->page_size() < 0) {
    return Done(ctx, absl::InvalidArgumentError("page_size must be >= 0"));
  }
  const int size = req->page_size() == 0 ? lim.default_page_size
                                          : std::min(req->page_size(), lim.max_page_size);
  auto page = deps_.sessions->List(req->page_token(), size);
  if (!page.ok()) return Done(ctx, page.status());
  for (const SessionView& v : page->first) {
    bool match = true;
    for (const auto& [k, val] : req->label_filter()) {
      auto it = v.meta.labels.find(k);
      match = match && it != v.meta.labels.end() && it->second == val;
    }
    if (match) ToProto(v, resp->add_sessions());
  }
  resp->set_next_page_token(page->second);
  return Done(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* RambaService::DeleteSession(grpc::CallbackServerContext* ctx,
                                                      const v1::DeleteSessionRequest* req,
                                                      v1::DeleteSessionResponse*) {
  if (draining_) return Done(ctx, kDraining);
  absl::Status s = deps_.sessions->Delete(
      req->session_id(),
      req->has_expected_position() ? std::optional<int64_t>(req->expected_position())
                                   : std::nullopt);
  if (s.code() == absl::StatusCode::kNotFound && req->allow_missing()) s = absl::OkStatus();
  return Done(ctx, s);
}

grpc::ServerUnaryReactor* RambaService::ForkSession(grpc::CallbackServerContext* ctx,
                                                    const v1::ForkSessionRequest* req,
                                                    v1::ForkSessionResponse* resp) {
  if (draining_) return Done(ctx, kDraining);
  if (auto s = ValidateLabels(req->labels(), deps_.options.limits.max_labels); !s.ok()) {
    return Done(ctx, s);
  }
  std::optional<SamplingDefaults> sampling;
  if (req->has_default_sampling()) {
    auto d =
        FromProto(req->default_sampling(), deps_.model->config().vocab_size, "default_sampling");
    if (!d.ok()) return Done(ctx, d.status());
    sampling = *d;
  }
  auto view = deps_.sessions->Fork(
      req->session_id(), req->new_session_id(),
      std::map<std::string, std::string>(req->labels().begin(), req->labels().end()),
      req->has_expected_position() ? std::optional<int64_t>(req->expected_position())
                                   : std::nullopt,
      sampling);
  if (view.ok()) ToProto(*view, resp->mutable_session());
  return Done(ctx, view.status());
}

grpc::ServerUnaryReactor* RambaService::Append(grpc::CallbackServerContext* ctx,
                                               const v1::AppendRequest* req,
                                               v1::AppendResponse* resp) {
  if (draining_) return Done(ctx, kDraining);
  if (!req->has_input()) return Done(ctx, absl::InvalidArgumentError("input is required"));
  auto tokens = ToTokens(req->input(), *deps_.tokenizer, deps_.model->config().vocab_size,
                         deps_.options.limits.max_request_input_tokens, "input");
  if (!tokens.ok()) return Done(ctx, tokens.status());
  auto lease = deps_.sessions->Acquire(req->session_id());
  if (!lease.ok()) return Done(ctx, lease.status());
  auto shared = std::make_shared<SessionLease>(std::move(*lease));
  if (auto s = CheckExpected(req->has_expected_position(), req->expected_position(),
                             shared->position(), req->session_id());
      !s.ok()) {
    AddPositionTrailer(ctx, s, shared->position());
    return Done(ctx, s);
  }
  if (auto s = CheckSessionLimit(deps_.options.limits, shared->position(),
                                 static_cast<int64_t>(tokens->size()), req->session_id());
      !s.ok()) {
    return Done(ctx, s);
  }
  auto* reactor = ctx->DefaultReactor();
  const int64_t n = static_cast<int64_t>(tokens->size());
  SessionManager* sessions = deps_.sessions;
  AppendAndCommit(deps_, shared, std::move(*tokens),
                  [reactor, resp, shared, sessions, n](absl::Status s) mutable {
                    const std::string id = shared->id();
                    shared.reset();
                    if (s.ok()) {
                      resp->set_appended_tokens(n);
                      auto v = sessions->Get(id);
                      if (v.ok()) ToProto(*v, resp->mutable_session());
                      s = v.status();
                    }
                    reactor->Finish(ToGrpcStatus(s));
                  },
                  ctx);
  return reactor;
}

grpc::ServerReadReactor<v1::AppendStreamRequest>* RambaService::AppendStream(
    grpc::CallbackServerContext* ctx, v1::AppendResponse* resp) {
  return new AppendStreamCall(ctx, deps_, resp);
}

grpc::ServerWriteReactor<v1::GenerateResponse>* RambaService::Generate(
    grpc::CallbackServerContext* ctx, const v1::GenerateRequest* req) {
  absl::StatusOr<GenerateSpec> spec =
      draining_ ? absl::StatusOr<GenerateSpec>(kDraining)
                : ParseGenerate(deps_, req->input(), req->sampling(), req->stopping(), req->output());
  if (spec.ok()) {
    spec->commit_input = !req->has_commit_input() || req->commit_input();
    // Unset commit_generated follows commit_input (commit_input = false alone: a read-only query).
    spec->commit_generated =
        req->has_commit_generated() ? req->commit_generated() : spec->commit_input;
    spec->has_expected = req->has_expected_position();
    spec->expected_position = req->expected_position();
  }
  auto* call = new GenerateCall(ctx, deps_, spec.ok() ? *spec : GenerateSpec{},
                                req->session_id(), /*stateless=*/false);
  if (!spec.ok()) {
    call->Finish(ToGrpcStatus(spec.status()));
  } else {
    call->Start();
  }
  return call;
}

grpc::ServerWriteReactor<v1::GenerateResponse>* RambaService::GenerateOnce(
    grpc::CallbackServerContext* ctx, const v1::GenerateOnceRequest* req) {
  absl::StatusOr<GenerateSpec> spec =
      draining_ ? absl::StatusOr<GenerateSpec>(kDraining)
                : ParseGenerate(deps_, req->input(), req->sampling(), req->stopping(), req->output());
  auto* call =
      new GenerateCall(ctx, deps_, spec.ok() ? *spec : GenerateSpec{}, "", /*stateless=*/true);
  if (!spec.ok()) {
    call->Finish(ToGrpcStatus(spec.status()));
  } else {
    call->Start();
  }
  return call;
}

grpc::ServerUnaryReactor* RambaService::Tokenize(grpc::CallbackServerContext* ctx,
                                                 const v1::TokenizeRequest* req,
                                                 v1::TokenizeResponse* resp) {
  for (int32_t id : deps_.tokenizer->Encode(req->text())) resp->add_ids(id);
  return Done(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* RambaService::Detokenize(grpc::CallbackServerContext* ctx,
                                                   const v1::DetokenizeRequest* req,
                                                   v1::DetokenizeResponse* resp) {
  std::vector<int32_t> ids(req->ids().begin(), req->ids().end());
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= deps_.model->config().vocab_size) {
      return Done(ctx, absl::InvalidArgumentError(
                           absl::StrCat("ids[", i, "] = ", ids[i], " is outside the vocabulary")));
    }
  }
  auto text = deps_.tokenizer->Decode(ids);
  if (text.ok()) resp->set_text(*text);
  return Done(ctx, text.status());
}

grpc::ServerUnaryReactor* RambaService::GetModelInfo(grpc::CallbackServerContext* ctx,
                                                     const v1::GetModelInfoRequest*,
                                                     v1::GetModelInfoResponse* resp) {
  const ModelConfig& c = deps_.model->config();
  auto* m = resp->mutable_model();
  m->set_name(deps_.options.model_name);
  m->set_vocab_size(static_cast<int32_t>(c.vocab_size));
  m->set_tokenizer(deps_.tokenizer->kind() == "bpe" ? v1::TOKENIZER_KIND_BYTE_LEVEL_BPE
                                                    : v1::TOKENIZER_KIND_BYTE);
  m->set_bos_token_id(static_cast<int32_t>(c.bos_token_id));
  m->set_eos_token_id(static_cast<int32_t>(c.eos_token_id));
  m->set_chunk_size(static_cast<int32_t>(c.chunk_size));
  m->set_chunk_topk(static_cast<int32_t>(c.chunk_topk));
  m->set_max_context_tokens(0);
  m->set_num_layers(static_cast<int32_t>(c.num_mamba_layers() + c.num_hsa_layers()));
  m->set_d_model(static_cast<int32_t>(c.hidden_size));
  m->set_backend(deps_.options.device == "cuda" ? v1::BACKEND_CUDA : v1::BACKEND_CPU);
  m->set_device(deps_.options.device);
  const ServiceLimits& l = deps_.options.limits;
  auto* lim = resp->mutable_limits();
  lim->set_max_message_bytes(l.max_message_bytes);
  lim->set_max_request_input_tokens(l.max_request_input_tokens);
  lim->set_max_generate_tokens(l.max_generate_tokens);
  lim->set_default_max_tokens(l.default_max_tokens);
  lim->set_max_stop_sequences(l.max_stop_sequences);
  lim->set_max_stop_sequence_bytes(l.max_stop_sequence_bytes);
  lim->set_max_stop_token_ids(l.max_stop_token_ids);
  lim->set_max_labels(l.max_labels);
  lim->set_max_sessions(l.max_sessions);
  lim->set_max_session_tokens(l.max_session_tokens);
  lim->set_default_page_size(l.default_page_size);
  lim->set_max_page_size(l.max_page_size);
  lim->set_max_logit_bias(static_cast<int32_t>(kMaxLogitBiasEntries));
  const SamplingOptions def = ServerSamplingDefaults();
  v1::SamplingParams* ds = lim->mutable_default_sampling();
  ds->set_temperature(def.temperature);
  ds->set_top_k(def.top_k);
  ds->set_top_p(def.top_p);
  ds->set_min_p(def.min_p);
  ds->set_presence_penalty(def.presence_penalty);
  ds->set_frequency_penalty(def.frequency_penalty);
  ds->set_repetition_penalty(def.repetition_penalty);
  resp->set_server_version("ramba 0.1");
  return Done(ctx, absl::OkStatus());
}

}  // namespace ramba::server
