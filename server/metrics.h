// Prometheus metrics of the server (prometheus-cpp registry), served as text at
// http://HOST:PORT/metrics by MetricsHttpServer. One Metrics object per process; its members are
// thread-safe.
#ifndef RAMBA_SERVER_METRICS_H_
#define RAMBA_SERVER_METRICS_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "server/metrics_http.h"

namespace ramba::server {

class Metrics {
 public:
  // Registers every metric. Serves them over HTTP when `listen_address` (e.g. "0.0.0.0:9090",
  // port 0 for any free port) is non-empty.
  static absl::StatusOr<std::unique_ptr<Metrics>> Create(const std::string& listen_address);

  // The port the exposer listens on (0 when not serving).
  int port() const;
  prometheus::Registry& registry() { return *registry_; }

  // Request latencies, seconds.
  prometheus::Histogram* time_to_first_token;
  prometheus::Histogram* inter_token_latency;
  prometheus::Histogram* request_latency;  // end to end, per RPC that runs the model
  prometheus::Histogram* commit_latency;   // one store commit
  // Token counters.
  prometheus::Counter* prompt_tokens;
  prometheus::Counter* generated_tokens;
  // Requests by outcome: ok, cancelled, error.
  prometheus::Counter* requests_ok;
  prometheus::Counter* requests_cancelled;
  prometheus::Counter* requests_failed;
  // Levels.
  prometheus::Gauge* active_sessions;  // resident in memory
  prometheus::Gauge* stored_sessions;
  prometheus::Gauge* store_bytes;
  prometheus::Gauge* queue_depth;      // engine requests waiting or running
  prometheus::Gauge* backend_bytes;    // Backend::held_bytes(): weights, resident sessions
  prometheus::Gauge* backend_host_bytes;  // Backend::host_held_bytes(): chunks in the host tier

 private:
  Metrics() = default;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<MetricsHttpServer> http_;
};

}  // namespace ramba::server

#endif  // RAMBA_SERVER_METRICS_H_
