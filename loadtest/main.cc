// ramba-loadtest: concurrent sessions streaming Generate against a running ramba-server, with a
// latency report (TTFT, TPOT, ITL, end to end) and throughput; see load_generator.h.
//
//   ramba-loadtest --server localhost:50051 --sessions 32 --requests_per_session 4 \
//       --prompt_tokens 4096 --turn_tokens 64 --max_tokens 128 --json report.json
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "loadtest/load_generator.h"

ABSL_FLAG(std::string, server, "localhost:50051", "Server address host:port.");
ABSL_FLAG(int32_t, sessions, 8, "Concurrent virtual users, each with its own session.");
ABSL_FLAG(int32_t, requests_per_session, 4, "Generate calls per user, one after another.");
ABSL_FLAG(int32_t, prompt_tokens, 512,
          "Random token ids in each session before its first call (setup, not timed).");
ABSL_FLAG(std::string, prompt_file, "",
          "Take each session's prompt from this text file instead (prompt_tokens bytes of it, "
          "a different stretch per session, tokenised by the server).");
ABSL_FLAG(int32_t, turn_tokens, 32, "Random token ids each call appends before generating.");
ABSL_FLAG(int32_t, max_tokens, 64, "Tokens generated per call (end-of-sequence ignored).");
ABSL_FLAG(float, temperature, 0.0f, "Sampling temperature (0: greedy).");
ABSL_FLAG(int32_t, top_k, 0, "Top-k filter (0: off).");
ABSL_FLAG(float, top_p, 1.0f, "Nucleus filter (1: off).");
ABSL_FLAG(float, min_p, 0.0f, "Min-p filter (0: off).");
ABSL_FLAG(float, presence_penalty, 0.0f, "Presence penalty in [-2, 2] (0: off).");
ABSL_FLAG(float, frequency_penalty, 0.0f, "Frequency penalty in [-2, 2] (0: off).");
ABSL_FLAG(float, repetition_penalty, 1.0f, "Repetition penalty, > 0 (1: off).");
ABSL_FLAG(bool, logprobs, false, "Ask for each generated token's logprob.");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the token ids and of the sampling.");
ABSL_FLAG(double, timeout, 600, "Deadline of each call in seconds.");
ABSL_FLAG(bool, keep_sessions, false, "Leave the sessions on the server (default: delete them).");
ABSL_FLAG(std::string, session_prefix, "loadtest", "Session ids are PREFIX-PID-USER.");
ABSL_FLAG(std::string, json, "", "Also write the report as JSON to this file.");
ABSL_FLAG(double, request_rate, 0,
          "> 0: open loop instead: sessions x requests_per_session stateless requests (prompt "
          "+ turn tokens each) arriving at this many per second (Poisson).");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "usage: ramba-loadtest --server HOST:PORT [--sessions N] [--requests_per_session R]\n"
      "  [--prompt_tokens P] [--turn_tokens T] [--max_tokens M] [--json FILE]");
  absl::ParseCommandLine(argc, argv);
  ramba::loadtest::LoadOptions o;
  o.server = absl::GetFlag(FLAGS_server);
  o.sessions = absl::GetFlag(FLAGS_sessions);
  o.requests_per_session = absl::GetFlag(FLAGS_requests_per_session);
  o.prompt_tokens = absl::GetFlag(FLAGS_prompt_tokens);
  o.turn_tokens = absl::GetFlag(FLAGS_turn_tokens);
  if (const std::string path = absl::GetFlag(FLAGS_prompt_file); !path.empty()) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
      std::fprintf(stderr, "ramba-loadtest: cannot read --prompt_file %s\n", path.c_str());
      return 1;
    }
    o.prompt_text.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  o.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  o.temperature = absl::GetFlag(FLAGS_temperature);
  o.top_k = absl::GetFlag(FLAGS_top_k);
  o.top_p = absl::GetFlag(FLAGS_top_p);
  o.min_p = absl::GetFlag(FLAGS_min_p);
  o.presence_penalty = absl::GetFlag(FLAGS_presence_penalty);
  o.frequency_penalty = absl::GetFlag(FLAGS_frequency_penalty);
  o.repetition_penalty = absl::GetFlag(FLAGS_repetition_penalty);
  o.logprobs = absl::GetFlag(FLAGS_logprobs);
  o.seed = absl::GetFlag(FLAGS_seed);
  o.timeout_seconds = absl::GetFlag(FLAGS_timeout);
  o.keep_sessions = absl::GetFlag(FLAGS_keep_sessions);
  o.session_prefix = absl::GetFlag(FLAGS_session_prefix);
  o.request_rate = absl::GetFlag(FLAGS_request_rate);
  absl::StatusOr<ramba::loadtest::LoadReport> report = ramba::loadtest::RunLoad(o);
  if (!report.ok()) {
    std::fprintf(stderr, "ramba-loadtest: %s\n", report.status().ToString().c_str());
    return 1;
  }
  std::fputs(ramba::loadtest::FormatReport(*report).c_str(), stdout);
  const std::string json_path = absl::GetFlag(FLAGS_json);
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    f << ramba::loadtest::ReportJson(*report) << "\n";
    if (!f) {
      std::fprintf(stderr, "ramba-loadtest: cannot write %s\n", json_path.c_str());
      return 1;
    }
  }
  return report->requests_failed == 0 ? 0 : 2;
}
