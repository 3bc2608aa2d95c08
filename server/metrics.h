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
  // The engine's iterations (Engine): wall time of one that ran model work (launching a step
  // and, pipelined, collecting the one before it: in steady decode, the step time), and each
  // launched step's size: sequences, and tokens (prompt tokens fed beside it included).
  prometheus::Histogram* engine_iteration_latency;
  prometheus::Histogram* engine_step_sequences;
  prometheus::Histogram* engine_step_tokens;
  // Session cache (SessionManager): leases of resident sessions (hits) against ones paged in
  // from the store (misses, with their page-in time), and idle sessions evicted.
  prometheus::Counter* session_cache_hits;
  prometheus::Counter* session_cache_misses;
  prometheus::Histogram* session_page_in_latency;
  prometheus::Counter* session_evictions;
  // Leases refused: the session is busy with another request (ABORTED), or every resident slot
  // is leased (RESOURCE_EXHAUSTED, --max_resident_sessions).
  prometheus::Counter* session_leases_busy;
  prometheus::Counter* session_leases_full;
  // Chunk selections of steps that had host-tier chunks, by where the chunk was (device: in the
  // --device_chunk_window; cache: in the session's --device_chunk_cache; host: copied in over
  // PCIe). RambaModel::chunk_tier_counts.
  prometheus::Counter* chunk_selections_device;
  prometheus::Counter* chunk_selections_cache;
  prometheus::Counter* chunk_selections_host;
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
  prometheus::Gauge* requests_running;  // in the engine's batches
  prometheus::Gauge* requests_waiting;  // queued for a place among them
  prometheus::Gauge* backend_bytes;    // Backend::held_bytes(): weights, resident sessions
  prometheus::Gauge* backend_host_bytes;  // Backend::host_held_bytes(): chunks in the host tier

 private:
  Metrics() = default;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<MetricsHttpServer> http_;
};

}  // namespace ramba::server

#endif  // RAMBA_SERVER_METRICS_H_
