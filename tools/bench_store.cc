// bench-store: the session store's commit cost, the server's own path (SessionStore::Commit, one
// WriteBatch per commit carrying a whole recurrent-state snapshot), for a state of a given size
// from several threads at once (the server's --commit_threads). Prints ms per commit and the
// store's write rate. docs/benchmarks.md has figures.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "store/session_store.h"

ABSL_FLAG(std::string, path, "/tmp/ramba-bench-store", "Store directory (emptied first)");
ABSL_FLAG(int64_t, state_bytes, 1153434, "Bytes of one state snapshot (ramba-tiny: 1153434)");
ABSL_FLAG(int32_t, sessions, 16, "Sessions the commits cycle over");
ABSL_FLAG(int32_t, commits, 200, "Commits per thread");
ABSL_FLAG(int32_t, threads, 1, "Threads committing at once");
ABSL_FLAG(bool, sync, false, "fsync every commit (the server's default)");
ABSL_FLAG(int64_t, state_slot_min_bytes, ramba::store::StoreOptions().state_slot_min_bytes,
          "States of at least this many bytes go to state slot files; larger than --state_bytes: "
          "through RocksDB (the store before slots)");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string path = absl::GetFlag(FLAGS_path);
  std::filesystem::remove_all(path);
  ramba::store::StoreOptions options;
  options.path = path;
  options.sync_commits = absl::GetFlag(FLAGS_sync);
  options.state_slot_min_bytes = absl::GetFlag(FLAGS_state_slot_min_bytes);
  auto store = ramba::store::SessionStore::Open(options);
  if (!store.ok()) {
    std::fprintf(stderr, "bench-store: %s\n", store.status().ToString().c_str());
    return 1;
  }
  const int32_t sessions = absl::GetFlag(FLAGS_sessions), threads = absl::GetFlag(FLAGS_threads);
  const int32_t commits = absl::GetFlag(FLAGS_commits);
  std::string state(static_cast<size_t>(absl::GetFlag(FLAGS_state_bytes)), '\0');
  std::mt19937 rng(1);
  for (char& c : state) c = static_cast<char>(rng());  // incompressible, as float states are
  if (threads < 1 || sessions < threads || commits < 1) {
    std::fprintf(stderr, "bench-store: needs --threads >= 1, --sessions >= --threads, --commits >= 1\n");
    return 1;
  }
  for (int32_t s = 0; s < sessions; ++s) {
    ramba::store::CommitRequest req;
    req.session_id = absl::StrCat("s", s);
    req.expected_position = -1;
    req.states = state;
    if (absl::Status st = (*store)->Commit(req); !st.ok()) {
      std::fprintf(stderr, "bench-store: %s\n", st.ToString().c_str());
      return 1;
    }
  }
  std::atomic<int> failures{0};
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (int32_t t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      // Thread t owns sessions t, t + threads, ...: no two threads commit to one session.
      const int32_t owned = sessions / threads;
      std::vector<int64_t> position(sessions, 0);
      for (int32_t i = 0; i < commits; ++i) {
        const int32_t s = t + threads * (i % owned);
        ramba::store::CommitRequest req;
        req.session_id = absl::StrCat("s", s);
        req.expected_position = position[s];
        req.new_position = ++position[s];
        req.states = state;
        if (!(*store)->Commit(req).ok()) ++failures;
      }
    });
  }
  for (std::thread& th : pool) th.join();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (failures > 0) {
    std::fprintf(stderr, "bench-store: %d commits failed\n", failures.load());
    return 1;
  }
  const double total = static_cast<double>(commits) * threads;
  const bool slots = static_cast<int64_t>(state.size()) >= options.state_slot_min_bytes;
  std::printf(
      "%d thread(s), %lld-byte states in %s, sync %d: %.3f ms per commit per thread, "
      "%.0f commits/s, %.2f GB/s\n",
      threads, static_cast<long long>(state.size()), slots ? "slot files" : "RocksDB",
      options.sync_commits ? 1 : 0, 1e3 * s / commits, total / s, total * state.size() / s / 1e9);
  return 0;
}
