#include "server/metrics.h"

#include <exception>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "prometheus/text_serializer.h"

namespace ramba::server {
namespace {

// Latency buckets from 1 ms to ~100 s, roughly x2.5 apart.
prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100};
}

// Engine iterations from 100 us (a small decode step on a GPU) to 2.5 s (a long prefill on a CPU).
prometheus::Histogram::BucketBoundaries IterationBuckets() {
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5};
}

// Powers of two from 1 to `max`: batch sizes.
prometheus::Histogram::BucketBoundaries PowersOfTwo(double max) {
  prometheus::Histogram::BucketBoundaries b;
  for (double v = 1; v <= max; v *= 2) b.push_back(v);
  return b;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Create(const std::string& listen_address) {
  std::unique_ptr<Metrics> m(new Metrics());
  m->registry_ = std::make_shared<prometheus::Registry>();
  auto& reg = *m->registry_;
  // Families by kind; a metric without labels is its family's one child (.Add({})).
  auto histogram = [&](const std::string& name, const std::string& help,
                       prometheus::Histogram::BucketBoundaries buckets = LatencyBuckets()) {
    return &prometheus::BuildHistogram().Name(name).Help(help).Register(reg).Add(
        {}, std::move(buckets));
  };
  auto counters = [&](const std::string& name,
                      const std::string& help) -> prometheus::Family<prometheus::Counter>& {
    return prometheus::BuildCounter().Name(name).Help(help).Register(reg);
  };
  auto gauges = [&](const std::string& name,
                    const std::string& help) -> prometheus::Family<prometheus::Gauge>& {
    return prometheus::BuildGauge().Name(name).Help(help).Register(reg);
  };
  auto gauge = [&](const std::string& name, const std::string& help) {
    return &gauges(name, help).Add({});
  };
  m->time_to_first_token = histogram("ramba_time_to_first_token_seconds",
                                     "Time from a Generate request to its first token.");
  m->inter_token_latency = histogram("ramba_inter_token_latency_seconds",
                                     "Time between consecutive generated tokens of one request.");
  m->request_latency = histogram("ramba_request_duration_seconds",
                                 "End-to-end duration of requests that run the model.");
  m->commit_latency = histogram("ramba_store_commit_duration_seconds",
                                "Duration of one atomic session commit to RocksDB.");
  m->engine_iteration_latency = histogram(
      "ramba_engine_iteration_duration_seconds",
      "Wall time of one engine iteration that ran model work: launching a step and, pipelined, "
      "collecting the one before it (in steady decode, the time per step).",
      IterationBuckets());
  m->engine_step_sequences = histogram("ramba_engine_step_sequences",
                                       "Sessions in one launched engine step.", PowersOfTwo(1024));
  m->engine_step_tokens = histogram(
      "ramba_engine_step_tokens",
      "Tokens in one launched engine step (decode rows and prompt tokens, fed beside it included).",
      PowersOfTwo(16384));
  m->session_page_in_latency =
      histogram("ramba_session_page_in_duration_seconds",
                "Time to load a session that was not resident from RocksDB into the backend.");
  auto& lookups = counters("ramba_session_cache_lookups_total",
                           "Session leases by whether the session was resident (hit) or had to "
                           "be paged in from the store (miss).");
  m->session_cache_hits = &lookups.Add({{"result", "hit"}});
  m->session_cache_misses = &lookups.Add({{"result", "miss"}});
  m->session_evictions = &counters("ramba_session_evictions_total",
                                   "Idle sessions dropped from memory to make room (they stay in "
                                   "the store).")
                              .Add({});
  auto& refused = counters("ramba_session_lease_rejections_total",
                           "Requests refused a session lease: busy (the session runs another "
                           "request; ABORTED) or full (every resident slot is leased; "
                           "RESOURCE_EXHAUSTED, --max_resident_sessions).");
  m->session_leases_busy = &refused.Add({{"reason", "busy"}});
  m->session_leases_full = &refused.Add({{"reason", "full"}});
  auto& selections = counters(
      "ramba_chunk_selections_total",
      "Chunk selections (row x retrieval head x top-k picks) of steps whose sessions had chunks in "
      "the host tier, by where the chunk was: device (within --device_chunk_window), cache (a "
      "host-tier chunk a decode step found in its session's --device_chunk_cache) or host "
      "(copied in over PCIe). (device + cache) / all is the GPU tiers' hit ratio.");
  m->chunk_selections_device = &selections.Add({{"tier", "device"}});
  m->chunk_selections_cache = &selections.Add({{"tier", "cache"}});
  m->chunk_selections_host = &selections.Add({{"tier", "host"}});
  auto& tokens = counters("ramba_tokens_total",
                          "Tokens processed, by kind (prompt: fed to the model, generated).");
  m->prompt_tokens = &tokens.Add({{"kind", "prompt"}});
  m->generated_tokens = &tokens.Add({{"kind", "generated"}});
  auto& requests = counters("ramba_requests_total", "Model-running requests by outcome.");
  m->requests_ok = &requests.Add({{"outcome", "ok"}});
  m->requests_cancelled = &requests.Add({{"outcome", "cancelled"}});
  m->requests_failed = &requests.Add({{"outcome", "error"}});
  m->active_sessions = gauge("ramba_sessions_active", "Sessions resident in memory.");
  m->stored_sessions = gauge("ramba_sessions_stored", "Sessions in the store.");
  m->store_bytes = gauge("ramba_store_bytes", "Approximate bytes of the RocksDB store on disk.");
  m->queue_depth = gauge("ramba_engine_queue_depth", "Engine requests waiting or running.");
  auto& requests_by_state = gauges("ramba_engine_requests",
                                   "Engine requests by state: running (in the batches) or waiting "
                                   "(queued for a place, --max_active_requests).");
  m->requests_running = &requests_by_state.Add({{"state", "running"}});
  m->requests_waiting = &requests_by_state.Add({{"state", "waiting"}});
  m->backend_bytes =
      gauge("ramba_backend_memory_bytes",
            "Memory the model's backend holds (GPU memory with --device cuda): weights, resident "
            "sessions' states and chunk K/V, workspaces.");
  m->backend_host_bytes =
      gauge("ramba_backend_host_memory_bytes",
            "Pinned host memory the GPU backend holds for chunk K/V moved out of GPU memory "
            "(--device_chunk_window); 0 on the CPU backend, whose chunks are all in its memory.");
  if (!listen_address.empty()) {
    std::weak_ptr<prometheus::Registry> registry = m->registry_;
    ASSIGN_OR_RETURN(m->http_, MetricsHttpServer::Start(listen_address, [registry] {
                       auto r = registry.lock();
                       return r == nullptr ? std::string()
                                           : prometheus::TextSerializer().Serialize(r->Collect());
                     }));
  }
  return m;
}

int Metrics::port() const { return http_ == nullptr ? 0 : http_->port(); }

}  // namespace ramba::server
