// Store commits off the engine thread. When a request ends, the engine thread serialises its
// session (SessionLease::PrepareCommit: the model's memory is only touched there) and hands the
// write to a Committer, so that the next decode step does not wait for the write's fsync; the
// committer writes, then answers the client and releases the session. With several threads,
// concurrent sync writes share one fsync (RocksDB's group commit). Off by default
// (ramba-server --commit_threads): where fsync is fast and the CPU backend keeps every core busy,
// the extra threads cost more than they save (docs/benchmarks.md).
#ifndef RAMBA_SERVER_COMMITTER_H_
#define RAMBA_SERVER_COMMITTER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"

namespace ramba::server {

// A small thread pool for commit tasks. Thread-safe.
class Committer {
 public:
  explicit Committer(int threads);
  ~Committer();  // runs every task already queued, then joins

  // Queues `task`; after Stop it runs on the caller's thread (nothing is dropped).
  void Run(std::function<void()> task);
  // Tasks queued or running.
  int64_t Pending() const;
  // Runs what is queued, then joins the threads.
  void Stop();

 private:
  void Loop();

  mutable absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  int64_t running_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace ramba::server

#endif  // RAMBA_SERVER_COMMITTER_H_
