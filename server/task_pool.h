// A small thread pool that takes work off the engine thread, whose every microsecond stalls all
// running streams. The server keeps two:
// - commits: when a request ends, the engine thread takes a snapshot of its session
//   (SessionLease::PrepareCommit: copies queued on the device, no wait) and hands the rest to the
//   pool, which serialises the snapshot, writes it, then answers the client and releases the
//   session. With several threads, concurrent sync writes share one fsync (RocksDB's group
//   commit). ramba-server --commit_threads.
// - stream writes: a token reported on the engine thread is queued on its call, and the gRPC
//   write (a system call, ~20 us on the caller) starts on the pool; tokens that arrive meanwhile
//   go out together in the next message. ramba-server --stream_writer_threads.
#ifndef RAMBA_SERVER_TASK_POOL_H_
#define RAMBA_SERVER_TASK_POOL_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"

namespace ramba::server {

// Thread-safe.
class TaskPool {
 public:
  explicit TaskPool(int threads);
  ~TaskPool();  // runs every task already queued, then joins

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

#endif  // RAMBA_SERVER_TASK_POOL_H_
