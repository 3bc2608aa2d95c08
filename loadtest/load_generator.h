// A gRPC load generator for ramba-server: `sessions` virtual users, each with its own session
// (created with a prompt of random token ids), send `requests_per_session` streaming Generate
// calls one after another (a turn of new input, then `max_tokens` generated tokens), all users at
// once. It measures what a serving user sees, on the client side of the network, as vLLM's
// serving benchmark does: time to first token (TTFT), time per output token after the first
// (TPOT), the gaps between token messages as they arrive (ITL; the server coalesces tokens into
// fewer messages for slow readers), end-to-end latency, and throughput. Talks to the server over
// the network only (ramba.v1 API); it loads no model.
//
// With request_rate > 0 the load is open-loop instead: sessions x requests_per_session stateless
// GenerateOnce calls (a prompt of prompt_tokens + turn_tokens ids each) arrive at exponential
// intervals of mean 1 / request_rate seconds whether or not earlier ones have finished, so
// queueing shows in TTFT as the rate nears what the server sustains.
#ifndef RAMBA_LOADTEST_LOAD_GENERATOR_H_
#define RAMBA_LOADTEST_LOAD_GENERATOR_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ramba::loadtest {

struct LoadOptions {
  std::string server = "localhost:50051";
  int32_t sessions = 8;              // concurrent virtual users
  int32_t requests_per_session = 4;  // Generate calls per user, one after another
  int32_t prompt_tokens = 512;       // random ids in each session before its first request
  // Non-empty: each session's prompt is instead prompt_tokens bytes of this text (user u's from
  // byte u * prompt_tokens, wrapping; trimmed to whole UTF-8 characters), sent as text for the
  // server to tokenise, so that the model meets real content (retrieval patterns differ).
  std::string prompt_text;
  int32_t turn_tokens = 32;          // random ids appended by each request before generating
  int32_t max_tokens = 64;           // generated per request (end-of-sequence ignored)
  float temperature = 0.0f;
  int32_t top_k = 0;  // the filters, sent when set (0, 1, 0: off)
  float top_p = 1.0f;
  float min_p = 0.0f;
  float presence_penalty = 0.0f;  // the penalties, sent when set (0, 0, 1: off)
  float frequency_penalty = 0.0f;
  float repetition_penalty = 1.0f;
  bool logprobs = false;         // ask for each token's logprob (output.include_logprobs)
  uint64_t seed = 1;             // token ids and sampling seeds
  double timeout_seconds = 600;  // deadline of each call
  bool keep_sessions = false;    // leave the sessions on the server (default: delete them)
  double request_rate = 0;       // > 0: open-loop stateless requests per second (above)
  std::string session_prefix = "loadtest";
};

// count, mean and nearest-rank percentiles of a sample, in milliseconds; all zero when empty.
struct LatencyStats {
  int64_t count = 0;
  double mean = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
};
LatencyStats Summarize(std::vector<double> samples);

struct LoadReport {
  LoadOptions options;
  std::string model;  // GetModelInfo's name and device
  std::string device;
  int64_t requests_ok = 0;
  int64_t requests_failed = 0;
  std::vector<std::string> errors;  // the first few failures' messages
  int64_t input_tokens = 0;         // turn tokens sent by ok requests (prompts: at setup)
  int64_t output_tokens = 0;        // tokens received (ok requests)
  double wall_seconds = 0;          // from the first request to the last response
  double setup_seconds = 0;         // creating the sessions with their prompts
  LatencyStats ttft_ms, tpot_ms, itl_ms, e2e_ms;
};

// Runs the load and reports; an error only when the run could not start (server unreachable,
// sessions not created).
absl::StatusOr<LoadReport> RunLoad(const LoadOptions& options);

// A human-readable table, and the same figures as JSON.
std::string FormatReport(const LoadReport& report);
std::string ReportJson(const LoadReport& report);

}  // namespace ramba::loadtest

#endif  // RAMBA_LOADTEST_LOAD_GENERATOR_H_
