// ramba-server: the ramba.v1 gRPC service over a RAMba model, sessions persisted in RocksDB,
// Prometheus metrics on a separate HTTP port.
//
//   ramba-server --model models/ramba-tiny --data_dir /var/lib/ramba --port 50051
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "kernels/backend.h"
#include "model/ramba_model.h"
#include "model/tokenizer.h"
#include "server/engine.h"
#include "server/metrics.h"
#include "server/service.h"
#include "server/session_manager.h"
#include "store/session_store.h"

ABSL_FLAG(std::string, model, "models/ramba-tiny", "Model directory (config.json, model.safetensors, tokenizer).");
ABSL_FLAG(std::string, data_dir, "ramba-data", "RocksDB directory for sessions (created when missing).");
ABSL_FLAG(std::string, host, "0.0.0.0", "Address to listen on.");
ABSL_FLAG(int32_t, port, 50051, "gRPC port (0: any free port; the chosen one is printed).");
ABSL_FLAG(int32_t, metrics_port, 9090, "Prometheus /metrics HTTP port (-1: off; 0: any free port).");
ABSL_FLAG(std::string, device, "auto", "cpu, cuda or auto (cuda when a GPU is present).");
ABSL_FLAG(int32_t, threads, 0, "CPU threads for the CPU backend (0: all cores).");
ABSL_FLAG(int64_t, max_batch_tokens, 1024, "Tokens per engine step across all sessions.");
ABSL_FLAG(int64_t, max_active_requests, 256, "Requests the engine runs at once; more wait.");
ABSL_FLAG(int64_t, max_resident_sessions, 64, "Sessions kept in memory; idle ones are evicted (they are always on disk).");
ABSL_FLAG(int64_t, max_resident_bytes, 0,
          "Backend memory (weights, resident sessions, workspaces; GPU memory with --device cuda) "
          "above which idle sessions are evicted too, LRU first (0: no limit; see "
          "ramba_backend_memory_bytes).");
ABSL_FLAG(int64_t, max_resident_host_bytes, 0,
          "Pinned host memory holding chunks moved out of GPU memory (--device_chunk_window) "
          "above which idle sessions are evicted too, LRU first (0: no limit; see "
          "ramba_backend_host_memory_bytes).");
ABSL_FLAG(int64_t, device_chunk_window, 0,
          "Chunks per session whose K/V stay in GPU memory; older ones move to pinned host "
          "memory (a decode step copies the few it selects to the GPU, a prefill the distinct "
          "ones its rows select, up to --host_chunk_staging_mb), so GPU memory per session stays "
          "bounded at any length. 0: all stay in GPU memory.");
ABSL_FLAG(int64_t, device_chunk_cache, 32,
          "With --device_chunk_window: host-tier chunks each session keeps in GPU memory as an "
          "LRU cache, so that a decode step copies over PCIe only the picks it has not met "
          "recently (0-4096; 0: copy every host-tier pick for its step).");
ABSL_FLAG(int64_t, host_chunk_staging_mb, 256,
          "GPU memory a prefill (or any batch that is not a decode step) may use to copy the "
          "host-tier chunks its rows select (--device_chunk_window); beyond it they are read in "
          "place over PCIe.");
ABSL_FLAG(int64_t, max_sessions, 1000000, "Sessions the store may hold (RESOURCE_EXHAUSTED beyond).");
ABSL_FLAG(int64_t, max_session_tokens, int64_t{1} << 40, "Tokens a session may hold (RESOURCE_EXHAUSTED / SESSION_LIMIT beyond).");
ABSL_FLAG(int64_t, max_request_tokens, 1 << 22, "Input tokens one request may carry.");
ABSL_FLAG(int32_t, max_generate_tokens, 1 << 16, "Largest max_tokens a Generate may ask for.");
ABSL_FLAG(int64_t, max_message_bytes, 16 << 20, "Largest gRPC message accepted.");
ABSL_FLAG(bool, sync_commits, true, "fsync every commit (acknowledged = durable).");
ABSL_FLAG(int64_t, state_slot_min_bytes, ramba::store::StoreOptions().state_slot_min_bytes,
          "State snapshots of at least this many bytes are written to state slot files beside "
          "RocksDB (<store>/state-slots), smaller ones through RocksDB.");
ABSL_FLAG(int32_t, commit_threads, -1,
          "Threads writing store commits off the engine thread (concurrent syncs share one "
          "fsync); 0: the engine thread writes them; -1: 16 on a GPU, 0 on the CPU (whose "
          "engine thread keeps every core busy).");
ABSL_FLAG(int32_t, stream_writer_threads, -1,
          "Threads starting Generate's stream writes, so the engine thread does not pay a "
          "system call per token and stream; 0: the engine thread starts them; -1: 2 on a GPU, "
          "0 on the CPU.");
ABSL_FLAG(bool, warmup, true,
          "Before listening, run a throwaway session through a prefill and decode steps up to a "
          "chunk completion, so the first request does not pay the backend's one-time costs.");
ABSL_FLAG(bool, pipeline_decode, true,
          "Launch each step before the previous one's tokens are back (rows going on take "
          "theirs on the device), so the GPU does not wait while tokens are streamed (a stop "
          "token is then fed before generation ends; see EngineOptions).");
ABSL_FLAG(int32_t, split_prefill, -1,
          "1: prompts are fed apart from the decode rows' steps (which a GPU then replays as "
          "recorded graphs); 0: in the same batches (the weights read once for both); -1: 1 on a "
          "GPU, 0 on the CPU.");
ABSL_FLAG(int32_t, drain_seconds, 30, "Grace period for running calls on SIGTERM.");

namespace {

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "ramba-server: %s\n", s.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Serves a RAMba model over gRPC (ramba.v1.RambaService) with persistent sessions.\n"
      "  ramba-server --model DIR --data_dir DIR [--port 50051] [--metrics_port 9090]");
  absl::ParseCommandLine(argc, argv);
  using namespace ramba;

  auto backend = kernels::CreateBackend(absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_threads));
  if (!backend.ok()) return Fail(backend.status());
  const std::string model_dir = absl::GetFlag(FLAGS_model);
  auto model = RambaModel::Load(model_dir, backend->get());
  if (!model.ok()) return Fail(model.status());
  if (absl::GetFlag(FLAGS_device_chunk_window) < 0 ||
      absl::GetFlag(FLAGS_host_chunk_staging_mb) < 0) {
    return Fail(absl::InvalidArgumentError(
        "--device_chunk_window and --host_chunk_staging_mb must be >= 0"));
  }
  if (absl::GetFlag(FLAGS_device_chunk_cache) < 0 ||
      absl::GetFlag(FLAGS_device_chunk_cache) > kernels::ChunkCacheRows::kMaxSlots) {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--device_chunk_cache must be in [0, ",
                                                        kernels::ChunkCacheRows::kMaxSlots, "]")));
  }
  if ((*backend)->host_accessible()) {
    // The CPU backend's memory is host memory already: moving chunks would only copy them.
    if (absl::GetFlag(FLAGS_device_chunk_window) > 0) {
      std::fprintf(stderr, "ramba-server: --device_chunk_window has no effect on the CPU\n");
    }
  } else {
    (*model)->set_device_chunk_window(absl::GetFlag(FLAGS_device_chunk_window));
    (*model)->set_device_chunk_cache(absl::GetFlag(FLAGS_device_chunk_cache));
    (*model)->set_host_chunk_staging_bytes(absl::GetFlag(FLAGS_host_chunk_staging_mb) << 20);
  }
  auto tokenizer = LoadTokenizer(model_dir, (*model)->config().vocab_size);
  if (!tokenizer.ok()) return Fail(tokenizer.status());

  store::StoreOptions store_options;
  store_options.path = absl::GetFlag(FLAGS_data_dir);
  store_options.sync_commits = absl::GetFlag(FLAGS_sync_commits);
  store_options.state_slot_min_bytes = absl::GetFlag(FLAGS_state_slot_min_bytes);
  auto store = store::SessionStore::Open(store_options);
  if (!store.ok()) return Fail(store.status());

  const int32_t metrics_port = absl::GetFlag(FLAGS_metrics_port);
  auto metrics = server::Metrics::Create(
      metrics_port < 0 ? "" : absl::StrCat(absl::GetFlag(FLAGS_host), ":", metrics_port));
  if (!metrics.ok()) return Fail(metrics.status());

  server::EngineOptions engine_options;
  engine_options.max_batch_tokens = absl::GetFlag(FLAGS_max_batch_tokens);
  engine_options.max_active_requests = absl::GetFlag(FLAGS_max_active_requests);
  engine_options.warmup = absl::GetFlag(FLAGS_warmup);
  engine_options.pipeline_decode = absl::GetFlag(FLAGS_pipeline_decode);
  // Flags at -1 take their GPU or CPU default.
  const bool gpu = !(*backend)->host_accessible();
  const int32_t split = absl::GetFlag(FLAGS_split_prefill);
  engine_options.split_prefill = split < 0 ? gpu : split > 0;
  engine_options.metrics = metrics->get();
  const auto warmup_start = std::chrono::steady_clock::now();
  server::Engine engine(model->get(), engine_options);
  if (absl::Status st = engine.WaitForWarmup(); !st.ok()) return Fail(st);
  if (engine_options.warmup) {
    std::fprintf(
        stderr, "ramba-server warmed up in %.1f ms\n",
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - warmup_start)
            .count());
  }
  server::SessionManagerOptions session_options;
  session_options.max_resident_sessions = absl::GetFlag(FLAGS_max_resident_sessions);
  session_options.max_resident_bytes = absl::GetFlag(FLAGS_max_resident_bytes);
  session_options.max_resident_host_bytes = absl::GetFlag(FLAGS_max_resident_host_bytes);
  session_options.metrics = metrics->get();
  server::SessionManager sessions(model->get(), store->get(), session_options);

  server::ServiceOptions service_options;
  service_options.model_name = model_dir;
  service_options.device = std::string((*backend)->name());
  service_options.limits.max_sessions = absl::GetFlag(FLAGS_max_sessions);
  service_options.limits.max_request_input_tokens = absl::GetFlag(FLAGS_max_request_tokens);
  service_options.limits.max_session_tokens = absl::GetFlag(FLAGS_max_session_tokens);
  service_options.limits.max_generate_tokens = absl::GetFlag(FLAGS_max_generate_tokens);
  service_options.limits.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  // The pools are declared before the service and the gRPC server, so that they outlive the
  // calls whose commits and writes they run.
  auto pool = [gpu](int32_t threads, int32_t on_gpu) {
    if (threads < 0) threads = gpu ? on_gpu : 0;
    return threads > 0 ? std::make_unique<server::TaskPool>(threads) : nullptr;
  };
  // Commits write their state slots in parallel and share RocksDB write groups and fsyncs, so
  // more threads take more commits a second (ramba-tiny on an H100, 64 streams: 31K output tok/s
  // with 4, 34-37K with 16 before state slots; the store alone with slots: 1.8K / 5.8K / 9.5K
  // commits/s unsynced on 1 / 4 / 16 threads; docs/benchmarks.md, 28th and 29th sessions).
  std::unique_ptr<server::TaskPool> committer = pool(absl::GetFlag(FLAGS_commit_threads), 16);
  std::unique_ptr<server::TaskPool> writer = pool(absl::GetFlag(FLAGS_stream_writer_threads), 2);
  server::RambaService service(model->get(), tokenizer->get(), &engine, &sessions, metrics->get(),
                               service_options, committer.get(), writer.get());

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int bound_port = 0;
  builder.AddListeningPort(absl::StrCat(absl::GetFlag(FLAGS_host), ":", absl::GetFlag(FLAGS_port)),
                           grpc::InsecureServerCredentials(), &bound_port);
  builder.SetMaxReceiveMessageSize(static_cast<int>(service_options.limits.max_message_bytes));
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || bound_port == 0) {
    return Fail(absl::UnavailableError("cannot listen on the gRPC port"));
  }
  server->GetHealthCheckService()->SetServingStatus(true);
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  // Tests and scripts read these lines to find the ports.
  std::printf("ramba-server listening on port %d, metrics on port %d, model %s on %s, data %s\n",
              bound_port, (*metrics)->port(), model_dir.c_str(),
              std::string((*backend)->name()).c_str(), store_options.path.c_str());
  std::fflush(stdout);

  // Refresh level gauges while serving; exit on SIGTERM/SIGINT.
  while (!g_stop) {
    (*metrics)->active_sessions->Set(static_cast<double>(sessions.ResidentSessions()));
    (*metrics)->stored_sessions->Set(static_cast<double>(sessions.StoredSessions()));
    (*metrics)->store_bytes->Set(static_cast<double>((*store)->ApproximateBytes()));
    const int64_t waiting = engine.QueueDepth(), running = engine.ActiveRequests();
    (*metrics)->queue_depth->Set(static_cast<double>(waiting + running));
    (*metrics)->requests_waiting->Set(static_cast<double>(waiting));
    (*metrics)->requests_running->Set(static_cast<double>(running));
    (*metrics)->backend_bytes->Set(static_cast<double>((*backend)->held_bytes()));
    (*metrics)->backend_host_bytes->Set(static_cast<double>((*backend)->host_held_bytes()));
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  // Graceful drain: refuse new calls, report NOT_SERVING, let running calls finish within the
  // grace period, then cancel what is left.
  std::printf("ramba-server: draining\n");
  std::fflush(stdout);
  service.StartDraining();
  server->GetHealthCheckService()->SetServingStatus(false);
  // At the deadline Shutdown cancels the calls still running, but it then waits for their
  // reactors, and a call whose model work ignores cancellation (a long Append's prefill) finishes
  // only when the engine fails its request: stop the engine when the grace period ends.
  const auto drain_end = std::chrono::system_clock::now() +
                         std::chrono::seconds(absl::GetFlag(FLAGS_drain_seconds));
  absl::Notification drained;
  std::thread stopper([&] {
    drained.WaitForNotificationWithDeadline(absl::FromChrono(drain_end));
    engine.Stop();
  });
  server->Shutdown(drain_end);
  drained.Notify();
  stopper.join();
  server->Wait();
  std::printf("ramba-server: stopped\n");
  return 0;
}
