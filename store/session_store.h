// Durable session storage on RocksDB. Stores typed byte blobs (the model's serialised state
// parts, the server's session metadata); knows nothing about models, CUDA or gRPC.
//
// Column families:
//   sessions   id -> SessionRecord (metadata blob, position, chunk count, chunk sources)
//   states     id -> latest recurrent-state snapshot (one per session, overwritten per commit),
//              or for snapshots of StoreOptions::state_slot_min_bytes or more a pointer to it in
//              a state slot file beside RocksDB (<path>/state-slots, store/state_slots.h)
//   chunks     (origin, chunk index) -> chunk K/V blob
//   landmarks  (origin, first chunk index) -> landmark blob covering a range of chunks
//   refcounts  origin -> number of sessions whose chunk sources name it (or that own it), and the
//              highest chunk end any fork took from it
//   meta       store format version, origin counter
// Keys are described in store/keys.h, record formats in store/record.h. Every value is wrapped in
// a record header (magic, format version, CRC-32C of key + header + payload), so a torn or
// corrupted record is reported as DataLoss, never returned.
//
// Forks share chunks: a session's chunks [0, n) are described by `chunk sources`, ranges of
// chunks owned by an origin (the session incarnation that first wrote them: "<id>#<n>", unique
// even when a deleted id is reused). A fork copies its parent's sources and takes a reference on
// each origin, in the same WriteBatch that creates it; an origin's chunks and landmarks are
// deleted when its last referencing session is deleted, and when only forks still reference it,
// the chunks none of them can see are deleted with their owner. So deleting a parent keeps its
// forks intact, and deleting every session reclaims all space (after compaction).
//
// Thread-safe: all methods may be called concurrently. The store also serialises writers of one
// session internally (striped locks), so a racing Commit/Delete/Fork of one id cannot resurrect or
// tear a session; the caller's one-writer-per-session lock is still what makes `expected_position`
// meaningful. Creates, forks and deletes take one store-wide mutex around the refcount update.
#ifndef RAMBA_STORE_SESSION_STORE_H_
#define RAMBA_STORE_SESSION_STORE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace ramba::store {

struct StoreOptions {
  std::string path;  // RocksDB directory; created when missing
  // Sync the write-ahead log (and the state slot) on every commit: an acknowledged commit
  // survives power loss. false trades that for latency (a crash of the process alone still loses
  // nothing); after a power loss a session whose recent commits were lost may then read as
  // DataLoss rather than rolled back, when a lost commit had rewritten its older slot.
  bool sync_commits = true;
  size_t block_cache_bytes = 64 << 20;
  // States snapshots of at least this many bytes go to state slot files (store/state_slots.h)
  // instead of through RocksDB's write-ahead log, memtables and compactions: 19x cheaper for
  // ramba-tiny's 1.1 MiB, 16x for the 370M's 48 MiB (docs/benchmarks.md).
  int64_t state_slot_min_bytes = 64 << 10;
};

// A range of chunks [begin, end) stored under `origin`.
struct ChunkSource {
  std::string origin;
  int64_t begin = 0;
  int64_t end = 0;
};

struct SessionRecord {
  std::string id;
  std::string metadata;  // opaque to the store (the server's serialised session info)
  // Chunk namespace this session writes its new chunks under (assigned by the store at create or
  // fork; read-only for callers).
  std::string origin;
  int64_t position = 0;   // tokens committed
  int64_t num_chunks = 0;
  int64_t created_unix_micros = 0;
  int64_t updated_unix_micros = 0;
  std::vector<ChunkSource> chunk_sources;  // cover [0, num_chunks) in order
};

// Everything one commit writes, atomically (one WriteBatch).
struct CommitRequest {
  std::string session_id;
  // The position the caller read before computing this commit; the commit fails with
  // FailedPrecondition when the stored position differs (lost update). -1 for a new session.
  int64_t expected_position = 0;
  int64_t new_position = 0;  // >= expected_position (>= 0 for a new session)
  std::string metadata;      // replaces the stored metadata
  std::string states;  // the new recurrent-state snapshot
  // Chunks completed since the last commit: (index, blob), indices consecutive from the stored
  // num_chunks.
  std::vector<std::pair<int64_t, std::string>> new_chunks;
  // Landmark blob covering the new chunks: required (non-empty) when there are new chunks, must be
  // empty when there are none.
  std::string new_landmarks;
};

// A session as loaded for resuming: its record, its states snapshot, and its landmark blobs in
// order. Chunk K/V blobs are fetched one by one (LoadChunk) so a server can page them lazily.
struct LoadedSession {
  SessionRecord record;
  std::string states;
  std::vector<std::string> landmarks;
};

struct ListPage {
  std::vector<SessionRecord> sessions;  // metadata included, chunk sources omitted
  std::string next_page_token;          // empty at the end
};

class SessionStore {
 public:
  static absl::StatusOr<std::unique_ptr<SessionStore>> Open(const StoreOptions& options);
  virtual ~SessionStore() = default;

  // Creates (expected_position == -1) or advances a session. AlreadyExists when creating an
  // existing id, NotFound when advancing a missing one, FailedPrecondition on a position mismatch.
  virtual absl::Status Commit(const CommitRequest& request) = 0;

  virtual absl::StatusOr<SessionRecord> GetRecord(const std::string& id) = 0;
  virtual absl::StatusOr<LoadedSession> Load(const std::string& id) = 0;
  // Chunk `index` of session `id`, resolved through its chunk sources. OutOfRange when `index` is
  // not in [0, num_chunks).
  virtual absl::StatusOr<std::string> LoadChunk(const std::string& id, int64_t index) = 0;
  // Several chunks of one session in one consistent read (RocksDB MultiGet), in `indices` order:
  // what a server prefetching a token's top-K chunks wants. Added to the original interface.
  virtual absl::StatusOr<std::vector<std::string>> LoadChunks(const std::string& id,
                                                              const std::vector<int64_t>& indices) = 0;

  // Sessions in id order (bytewise), starting after `page_token` (empty: from the start; else the
  // last id of the previous page). InvalidArgument when page_size < 1.
  virtual absl::StatusOr<ListPage> List(const std::string& page_token, int page_size) = 0;

  // Removes the session; chunks owned by it stay while forks reference them. NotFound if absent.
  virtual absl::Status Delete(const std::string& id) = 0;

  // Creates `child_id` at the parent's current commit, sharing its chunks (no copy of K/V).
  virtual absl::Status Fork(const std::string& parent_id, const std::string& child_id,
                            const std::string& child_metadata) = 0;

  // Updates only the metadata blob (labels, defaults) of a session.
  virtual absl::Status UpdateMetadata(const std::string& id, const std::string& metadata) = 0;

  // Stored sessions (kept in memory; counted once at Open).
  virtual int64_t NumSessions() = 0;
  // Approximate bytes on disk (SST + WAL + memtables).
  virtual int64_t ApproximateBytes() = 0;
  // Forces a compaction so deleted data leaves the disk (tests, operators).
  virtual absl::Status CompactAll() = 0;
};

}  // namespace ramba::store

#endif  // RAMBA_STORE_SESSION_STORE_H_
