#include "loadtest/load_generator.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <mutex>
#include <random>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/notification.h"
#include "base/status_macros.h"
#include "grpcpp/grpcpp.h"
#include "nlohmann/json.hpp"
#include "ramba/v1/metadata.h"
#include "ramba/v1/ramba.grpc.pb.h"

namespace ramba::loadtest {
namespace {

namespace v1 = ::ramba::v1;
using Clock = std::chrono::steady_clock;

double Ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

absl::Status FromGrpc(const grpc::Status& s, absl::string_view what) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat(what, ": ", s.error_message()));
}

// A call's deadline and, for a session's calls, its route key (the session id): behind
// deploy/'s router, the metadata that sends the call to the replica holding the session.
void Prepare(grpc::ClientContext* ctx, double seconds, const std::string& session = "") {
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::microseconds(static_cast<int64_t>(seconds * 1e6)));
  if (!session.empty()) ctx->AddMetadata(v1::kRouteKeyMetadata, session);
}

v1::Input RandomTokens(std::mt19937_64& rng, int32_t n, int32_t vocab) {
  v1::Input in;
  auto* ids = in.mutable_tokens();
  std::uniform_int_distribution<int32_t> pick(0, vocab - 1);
  for (int32_t i = 0; i < n; ++i) ids->add_ids(pick(rng));
  return in;
}

// User u's prompt from o.prompt_text (LoadOptions::prompt_text).
v1::Input TextPrompt(const LoadOptions& o, int32_t u) {
  const std::string& t = o.prompt_text;
  const size_t n = std::min<size_t>(o.prompt_tokens, t.size());
  size_t begin = t.size() > n ? static_cast<size_t>(u) * n % (t.size() - n + 1) : 0,
         end = begin + n;
  auto continuation = [&](size_t i) { return (static_cast<unsigned char>(t[i]) & 0xC0) == 0x80; };
  while (begin < end && continuation(begin)) ++begin;
  while (end < t.size() && end > begin && continuation(end)) --end;
  v1::Input in;
  in.set_text(t.substr(begin, end - begin));
  return in;
}

// One Generate call as the client saw it.
struct Sample {
  bool ok = false;
  std::string error;
  int64_t input_tokens = 0, output_tokens = 0;
  double ttft_ms = 0, e2e_ms = 0;
  std::vector<double> gaps_ms;  // between consecutive token messages
};

// `id` empty: a stateless GenerateOnce with `input` as its prompt.
Sample TimedGenerate(v1::RambaService::Stub& stub, const LoadOptions& o, const std::string& id,
                     v1::Input input, uint64_t seed) {
  Sample out;
  v1::SamplingParams sampling;
  sampling.set_temperature(o.temperature);
  if (o.top_k > 0) sampling.set_top_k(o.top_k);
  if (o.top_p < 1.0f) sampling.set_top_p(o.top_p);
  if (o.min_p > 0.0f) sampling.set_min_p(o.min_p);
  if (o.presence_penalty != 0.0f) sampling.set_presence_penalty(o.presence_penalty);
  if (o.frequency_penalty != 0.0f) sampling.set_frequency_penalty(o.frequency_penalty);
  if (o.repetition_penalty != 1.0f) sampling.set_repetition_penalty(o.repetition_penalty);
  sampling.set_seed(seed);
  v1::StoppingCriteria stopping;
  stopping.set_max_tokens(o.max_tokens);
  stopping.set_ignore_eos(true);
  v1::OutputOptions output;
  output.set_include_token_text(false);
  output.set_include_logprobs(o.logprobs);
  out.input_tokens = input.tokens().ids_size();
  grpc::ClientContext ctx;
  Prepare(&ctx, o.timeout_seconds, id);
  const Clock::time_point start = Clock::now();
  Clock::time_point last = start;
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader;
  if (id.empty()) {
    v1::GenerateOnceRequest req;
    *req.mutable_input() = std::move(input);
    *req.mutable_sampling() = sampling;
    *req.mutable_stopping() = stopping;
    *req.mutable_output() = output;
    reader = stub.GenerateOnce(&ctx, req);
  } else {
    v1::GenerateRequest req;
    req.set_session_id(id);
    *req.mutable_input() = std::move(input);
    *req.mutable_sampling() = sampling;
    *req.mutable_stopping() = stopping;
    *req.mutable_output() = output;
    reader = stub.Generate(&ctx, req);
  }
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    if (!msg.has_tokens() || msg.tokens().tokens_size() == 0) continue;
    const Clock::time_point now = Clock::now();
    if (out.output_tokens == 0) {
      out.ttft_ms = Ms(start, now);
    } else {
      out.gaps_ms.push_back(Ms(last, now));
    }
    last = now;
    out.output_tokens += msg.tokens().tokens_size();
  }
  const grpc::Status s = reader->Finish();
  out.e2e_ms = Ms(start, Clock::now());
  out.ok = s.ok();
  if (!s.ok()) out.error = FromGrpc(s, id.empty() ? "GenerateOnce" : "Generate").ToString();
  return out;
}

// Closed loop: each user's session (created with its prompt, not timed), then its requests one
// after another, all users at once.
absl::Status RunSessions(v1::RambaService::Stub* stub, const LoadOptions& o, int32_t vocab,
                         LoadReport& report, std::vector<std::vector<Sample>>& samples) {
  // Setup (not timed): every user's session with its prompt, created concurrently.
  const Clock::time_point setup = Clock::now();
  std::vector<std::string> ids(o.sessions);
  std::vector<absl::Status> created(o.sessions);
  {
    std::vector<std::thread> threads;
    for (int32_t u = 0; u < o.sessions; ++u) {
      threads.emplace_back([&, u] {
        ids[u] = absl::StrCat(o.session_prefix, "-", getpid(), "-", u);
        std::mt19937_64 rng(o.seed * 1000003 + u);
        v1::CreateSessionRequest req;
        req.set_session_id(ids[u]);
        *req.mutable_initial_input() =
            o.prompt_text.empty() ? RandomTokens(rng, o.prompt_tokens, vocab) : TextPrompt(o, u);
        v1::CreateSessionResponse resp;
        grpc::ClientContext ctx;
        Prepare(&ctx, o.timeout_seconds, ids[u]);
        const grpc::Status s = stub->CreateSession(&ctx, req, &resp);
        if (!s.ok()) created[u] = FromGrpc(s, absl::StrCat("CreateSession ", ids[u]));
      });
    }
    for (auto& t : threads) t.join();
  }
  auto cleanup = [&] {
    if (o.keep_sessions) return;
    for (int32_t u = 0; u < o.sessions; ++u) {
      if (!created[u].ok()) continue;
      v1::DeleteSessionRequest req;
      req.set_session_id(ids[u]);
      req.set_allow_missing(true);
      v1::DeleteSessionResponse resp;
      grpc::ClientContext ctx;
      Prepare(&ctx, 30, ids[u]);
      (void)stub->DeleteSession(&ctx, req, &resp);  // best effort: the run's figures stand
    }
  };
  for (const absl::Status& s : created) {
    if (!s.ok()) {
      cleanup();
      return s;
    }
  }
  report.setup_seconds = Ms(setup, Clock::now()) / 1e3;

  // Timed: all users start together and send their requests one after another.
  absl::Notification go;
  std::vector<std::thread> threads;
  for (int32_t u = 0; u < o.sessions; ++u) {
    threads.emplace_back([&, u] {
      std::mt19937_64 rng(o.seed * 7919 + u);
      go.WaitForNotification();
      for (int32_t r = 0; r < o.requests_per_session; ++r) {
        const uint64_t seed = o.seed + static_cast<uint64_t>(u) * 65537 + r;
        samples[u].push_back(
            TimedGenerate(*stub, o, ids[u], RandomTokens(rng, o.turn_tokens, vocab), seed));
      }
    });
  }
  const Clock::time_point start = Clock::now();
  go.Notify();
  for (auto& t : threads) t.join();
  report.wall_seconds = Ms(start, Clock::now()) / 1e3;
  cleanup();

  return absl::OkStatus();
}

// Open loop: stateless requests, each on its own thread, started at its arrival time.
void RunOpenLoop(v1::RambaService::Stub* stub, const LoadOptions& o, int32_t vocab,
                 LoadReport& report, std::vector<Sample>& samples) {
  const int64_t total = static_cast<int64_t>(o.sessions) * o.requests_per_session;
  samples.resize(total);
  std::vector<std::thread> threads;
  std::mt19937_64 rng(o.seed);
  std::exponential_distribution<double> gap(o.request_rate);
  const Clock::time_point start = Clock::now();
  double at = 0;
  for (int64_t i = 0; i < total; ++i) {
    std::this_thread::sleep_until(
        start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(at)));
    v1::Input prompt = RandomTokens(rng, o.prompt_tokens + o.turn_tokens, vocab);
    threads.emplace_back([&samples, stub, &o, i, prompt = std::move(prompt)]() mutable {
      samples[i] = TimedGenerate(*stub, o, "", std::move(prompt), o.seed + i);
    });
    at += gap(rng);
  }
  for (auto& t : threads) t.join();
  report.wall_seconds = Ms(start, Clock::now()) / 1e3;
}

void Aggregate(const std::vector<std::vector<Sample>>& samples, LoadReport& report) {
  std::vector<double> ttft, tpot, itl, e2e;
  for (const std::vector<Sample>& user : samples) {
    for (const Sample& s : user) {
      if (!s.ok) {
        ++report.requests_failed;
        if (report.errors.size() < 5) report.errors.push_back(s.error);
        continue;
      }
      ++report.requests_ok;
      report.input_tokens += s.input_tokens;
      report.output_tokens += s.output_tokens;
      e2e.push_back(s.e2e_ms);
      if (s.output_tokens > 0) ttft.push_back(s.ttft_ms);
      if (s.output_tokens > 1) {
        tpot.push_back((s.e2e_ms - s.ttft_ms) / static_cast<double>(s.output_tokens - 1));
      }
      itl.insert(itl.end(), s.gaps_ms.begin(), s.gaps_ms.end());
    }
  }
  report.ttft_ms = Summarize(std::move(ttft));
  report.tpot_ms = Summarize(std::move(tpot));
  report.itl_ms = Summarize(std::move(itl));
  report.e2e_ms = Summarize(std::move(e2e));
}

}  // namespace

LatencyStats Summarize(std::vector<double> v) {
  LatencyStats s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  s.count = static_cast<int64_t>(v.size());
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / static_cast<double>(v.size());
  // Nearest rank: the smallest value with at least q of the sample at or below it.
  auto rank = [&](double q) {
    const auto i = static_cast<size_t>(std::ceil(q * static_cast<double>(v.size())));
    return v[std::clamp<size_t>(i, 1, v.size()) - 1];
  };
  s.p50 = rank(0.50);
  s.p90 = rank(0.90);
  s.p99 = rank(0.99);
  s.max = v.back();
  return s;
}

absl::StatusOr<LoadReport> RunLoad(const LoadOptions& o) {
  if (o.sessions < 1 || o.requests_per_session < 1 || o.prompt_tokens < 0 || o.turn_tokens < 0 ||
      o.max_tokens < 1 || !(o.timeout_seconds > 0)) {
    return absl::InvalidArgumentError(
        "sessions, requests_per_session and max_tokens must be positive, token counts not "
        "negative, timeout positive");
  }
  if (o.prompt_tokens + o.turn_tokens == 0) {
    return absl::InvalidArgumentError("prompt_tokens + turn_tokens must be positive");
  }
  if (!(o.request_rate >= 0) || std::isinf(o.request_rate)) {
    return absl::InvalidArgumentError("request_rate must be finite and not negative");
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  auto channel = grpc::CreateCustomChannel(o.server, grpc::InsecureChannelCredentials(), args);
  auto stub = v1::RambaService::NewStub(channel);

  LoadReport report;
  report.options = o;
  v1::GetModelInfoResponse info;
  {
    grpc::ClientContext ctx;
    Prepare(&ctx, std::min(o.timeout_seconds, 30.0));
    const grpc::Status s = stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
    if (!s.ok()) return FromGrpc(s, absl::StrCat("GetModelInfo on ", o.server));
  }
  report.model = info.model().name();
  report.device = info.model().device();
  const int32_t vocab = info.model().vocab_size();
  if (vocab < 1) return absl::FailedPreconditionError("the server reports an empty vocabulary");

  std::vector<std::vector<Sample>> samples(o.sessions);
  if (o.request_rate > 0) {
    RunOpenLoop(stub.get(), o, vocab, report, samples[0]);
  } else {
    RETURN_IF_ERROR(RunSessions(stub.get(), o, vocab, report, samples));
  }
  Aggregate(samples, report);
  return report;
}

std::string FormatReport(const LoadReport& r) {
  const LoadOptions& o = r.options;
  std::string filters;
  if (o.top_k > 0) absl::StrAppendFormat(&filters, ", top_k %d", o.top_k);
  if (o.min_p > 0.0f) absl::StrAppendFormat(&filters, ", min_p %g", o.min_p);
  if (o.top_p < 1.0f) absl::StrAppendFormat(&filters, ", top_p %g", o.top_p);
  if (o.presence_penalty != 0.0f) {
    absl::StrAppendFormat(&filters, ", presence_penalty %g", o.presence_penalty);
  }
  if (o.frequency_penalty != 0.0f) {
    absl::StrAppendFormat(&filters, ", frequency_penalty %g", o.frequency_penalty);
  }
  if (o.repetition_penalty != 1.0f) {
    absl::StrAppendFormat(&filters, ", repetition_penalty %g", o.repetition_penalty);
  }
  std::string out =
      o.request_rate > 0
          ? absl::StrFormat(
                "ramba-loadtest: %s (%s on %s), open loop: %d stateless requests arriving at %g "
                "per second; %d prompt tokens in, %d out per request, temperature %g%s\n",
                o.server, r.model, r.device, o.sessions * o.requests_per_session, o.request_rate,
                o.prompt_tokens + o.turn_tokens, o.max_tokens, o.temperature, filters)
          : absl::StrFormat(
                "ramba-loadtest: %s (%s on %s), %d sessions x %d requests; %d prompt + %d turn "
                "tokens in, %d out per request, temperature %g%s\n",
                o.server, r.model, r.device, o.sessions, o.requests_per_session, o.prompt_tokens,
                o.turn_tokens, o.max_tokens, o.temperature, filters);
  const double wall = std::max(r.wall_seconds, 1e-9);
  absl::StrAppendFormat(&out,
                        "requests: %d ok, %d failed in %.3f s = %.2f req/s; output %d tokens = "
                        "%.1f tok/s; input %d tokens\n",
                        r.requests_ok, r.requests_failed, r.wall_seconds, r.requests_ok / wall,
                        r.output_tokens, r.output_tokens / wall, r.input_tokens);
  absl::StrAppendFormat(&out, "setup (sessions created with their prompts, not timed): %.3f s\n",
                        r.setup_seconds);
  absl::StrAppendFormat(&out, "%-10s %8s %10s %10s %10s %10s %10s\n", "ms", "count", "mean", "p50",
                        "p90", "p99", "max");
  auto row = [&out](const char* name, const LatencyStats& s) {
    absl::StrAppendFormat(&out, "%-10s %8d %10.2f %10.2f %10.2f %10.2f %10.2f\n", name, s.count,
                          s.mean, s.p50, s.p90, s.p99, s.max);
  };
  row("TTFT", r.ttft_ms);
  row("TPOT", r.tpot_ms);
  row("ITL", r.itl_ms);
  row("E2E", r.e2e_ms);
  for (const std::string& e : r.errors) absl::StrAppend(&out, "error: ", e, "\n");
  return out;
}

std::string ReportJson(const LoadReport& r) {
  auto stats = [](const LatencyStats& s) {
    return nlohmann::json{{"count", s.count}, {"mean", s.mean}, {"p50", s.p50},
                          {"p90", s.p90},     {"p99", s.p99},   {"max", s.max}};
  };
  const LoadOptions& o = r.options;
  nlohmann::json j = {
      {"server", o.server},
      {"model", r.model},
      {"device", r.device},
      {"sessions", o.sessions},
      {"requests_per_session", o.requests_per_session},
      {"prompt_tokens", o.prompt_tokens},
      {"turn_tokens", o.turn_tokens},
      {"max_tokens", o.max_tokens},
      {"temperature", o.temperature},
      {"top_k", o.top_k},
      {"top_p", o.top_p},
      {"min_p", o.min_p},
      {"presence_penalty", o.presence_penalty},
      {"frequency_penalty", o.frequency_penalty},
      {"repetition_penalty", o.repetition_penalty},
      {"request_rate", o.request_rate},
      {"requests_ok", r.requests_ok},
      {"requests_failed", r.requests_failed},
      {"errors", r.errors},
      {"input_tokens", r.input_tokens},
      {"output_tokens", r.output_tokens},
      {"wall_seconds", r.wall_seconds},
      {"setup_seconds", r.setup_seconds},
      {"ttft_ms", stats(r.ttft_ms)},
      {"tpot_ms", stats(r.tpot_ms)},
      {"itl_ms", stats(r.itl_ms)},
      {"e2e_ms", stats(r.e2e_ms)},
  };
  return j.dump(2);
}

}  // namespace ramba::loadtest
