// Sessions in memory and on disk: pages session state in from the store on use, gives one writer
// at a time exclusive access through a lease, commits a lease's changes to the store atomically,
// and evicts idle sessions to keep memory bounded.
#ifndef RAMBA_SERVER_SESSION_MANAGER_H_
#define RAMBA_SERVER_SESSION_MANAGER_H_

#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "model/ramba_model.h"
#include "model/sampler.h"
#include "store/session_store.h"

namespace ramba::server {

class Metrics;

// Sampling fields a session or request may leave unset ("use the next default").
struct SamplingDefaults {
  std::optional<float> temperature;
  std::optional<int32_t> top_k;
  std::optional<float> top_p;
  std::optional<float> min_p;
  std::optional<float> presence_penalty;
  std::optional<float> frequency_penalty;
  std::optional<float> repetition_penalty;
  std::optional<uint64_t> seed;
  std::vector<LogitBias> logit_bias;  // empty: unset; by id
};

// What the server keeps about a session besides the model state (stored as the record's
// metadata blob, JSON).
struct SessionMeta {
  std::map<std::string, std::string> labels;
  SamplingDefaults default_sampling;
  // The newest token of the history, not yet fed to the model: generation samples from the
  // logits of the last fed token, so the last token of every request is kept back and fed first
  // by the next one. History length = state position + (pending_token ? 1 : 0).
  std::optional<int32_t> pending_token;
  std::string parent_id;  // set for forks
  std::optional<int64_t> fork_position;  // the parent's position when forked

  std::string ToJson() const;
  static absl::StatusOr<SessionMeta> FromJson(const std::string& json);
};

// A snapshot of a session for API responses.
struct SessionView {
  std::string id;
  SessionMeta meta;
  int64_t position = 0;  // history length in tokens (fed + pending)
  int64_t num_chunks = 0;
  int64_t created_unix_micros = 0;
  int64_t updated_unix_micros = 0;
};

struct SessionManagerOptions {
  // Sessions whose state stays in memory between requests (idle ones are evicted LRU first;
  // they are always committed, so eviction loses nothing). Leased sessions are never evicted: a
  // new lease beyond this limit fails with RESOURCE_EXHAUSTED.
  int64_t max_resident_sessions = 64;
  // Backend memory (Backend::held_bytes(): weights, resident sessions' states and chunks,
  // workspaces) above which idle sessions are evicted too, LRU first; 0: no limit. Leased
  // sessions stay, so this bounds what idle sessions keep, not what running ones need.
  int64_t max_resident_bytes = 0;
  // The same bound on the backend's host-tier memory (Backend::host_held_bytes(): chunks moved
  // out of GPU memory by RambaModel::set_device_chunk_window); 0: no limit.
  int64_t max_resident_host_bytes = 0;
  // Where leases (resident or paged in, and the page-in time) and evictions are counted
  // (Metrics::session_*); null: nowhere. Must outlive the manager.
  Metrics* metrics = nullptr;
};

class SessionManager;

// Exclusive access to one session while a request runs. Destroying the lease without Commit
// drops the in-memory changes (the session is paged in again from its last commit).
class SessionLease {
 public:
  SessionLease(SessionLease&&) = default;
  ~SessionLease();

  const std::string& id() const;
  SessionState* state();
  SessionMeta& meta();
  // History length (fed tokens + pending token).
  int64_t position() const;
  // Writes the state, the chunks completed since the last commit, their landmarks and the
  // metadata in one atomic store commit. After it returns OK the changes survive a crash.
  absl::Status Commit();
  // Commit in two steps, so that the serialisation and the write (and its fsync) can run off the
  // engine thread: PrepareCommit, where the model runs, takes a snapshot of the state in the
  // backend's queue order without waiting for it (SessionState::Snapshot); ApplyCommit
  // serialises the snapshot and writes it (any thread, the lease still held in between).
  struct PreparedCommit {
    store::CommitRequest request;  // all but the serialised parts
    std::unique_ptr<SessionSnapshot> snapshot;
  };
  absl::StatusOr<PreparedCommit> PrepareCommit();
  absl::Status ApplyCommit(PreparedCommit prepared);

 private:
  friend class SessionManager;
  struct Entry;
  SessionLease(SessionManager* manager, std::shared_ptr<Entry> entry);
  SessionManager* manager_;
  std::shared_ptr<Entry> entry_;
  bool committed_ = false;
};

// Thread-safe.
class SessionManager {
 public:
  SessionManager(RambaModel* model, store::SessionStore* store, SessionManagerOptions options);
  ~SessionManager();

  // Creates an empty session (committed at once). `id` empty: a fresh random id.
  absl::StatusOr<SessionView> Create(const std::string& id, SessionMeta meta);
  // Exclusive access; NOT_FOUND for an unknown id, ABORTED when another request holds it,
  // RESOURCE_EXHAUSTED when memory is full of leased sessions.
  absl::StatusOr<SessionLease> Acquire(const std::string& id);
  absl::StatusOr<SessionView> Get(const std::string& id);
  absl::StatusOr<std::pair<std::vector<SessionView>, std::string>> List(const std::string& page_token,
                                                                        int page_size);
  // ABORTED while a request holds the session.
  // A new session sharing the parent's committed history (chunks are not copied).
  // `expected_position` (when set) must equal the parent's committed position.
  // `default_sampling` (when set) replaces the parent's defaults in the child.
  absl::StatusOr<SessionView> Fork(const std::string& parent_id, const std::string& child_id,
                                   std::map<std::string, std::string> labels,
                                   std::optional<int64_t> expected_position = std::nullopt,
                                   std::optional<SamplingDefaults> default_sampling = std::nullopt);
  // Deletes with an optional position check (FAILED_PRECONDITION on mismatch).
  absl::Status Delete(const std::string& id, std::optional<int64_t> expected_position);
  absl::Status UpdateMeta(const std::string& id, const SessionMeta& meta);

  int64_t ResidentSessions();
  int64_t StoredSessions();

  // Checks an id: 1..128 bytes of [A-Za-z0-9._-].
  static absl::Status ValidateId(const std::string& id);

 private:
  friend class SessionLease;
  using Entry = SessionLease::Entry;
  absl::StatusOr<std::shared_ptr<Entry>> PageIn(const std::string& id);
  void Release(const std::shared_ptr<Entry>& entry, bool keep);
  // Drops idle sessions, least recently used first, until `room` more fit and the backend holds
  // at most max_resident_bytes (and max_resident_host_bytes in its host tier).
  void EvictLocked(int64_t room) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  SessionView ViewOf(const store::SessionRecord& record, const SessionMeta& meta) const;

  RambaModel* model_;
  store::SessionStore* store_;
  SessionManagerOptions options_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Entry>> resident_ ABSL_GUARDED_BY(mu_);
  std::list<std::string> lru_ ABSL_GUARDED_BY(mu_);  // idle resident ids, least recent first
};

}  // namespace ramba::server

#endif  // RAMBA_SERVER_SESSION_MANAGER_H_
