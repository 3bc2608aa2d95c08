#include "store/session_store.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <functional>
#include <map>
#include <string_view>
#include <unordered_set>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "base/status_macros.h"
#include "rocksdb/db.h"
#include "rocksdb/filter_policy.h"
#include "rocksdb/options.h"
#include "rocksdb/slice.h"
#include "rocksdb/table.h"
#include "rocksdb/write_batch.h"
#include "store/crc32c.h"
#include "store/keys.h"
#include "store/record.h"
#include "store/state_slots.h"
#include "store/testing.h"

namespace ramba::store {
namespace {

enum Cf : int { kSessions, kStates, kChunks, kLandmarks, kRefcounts, kMeta, kNumCfs };
constexpr const char* kCfNames[kNumCfs] = {"sessions",  "states",    "chunks",
                                           "landmarks", "refcounts", "meta"};

// Version 2 added state slot pointers; a version-1 store is upgraded when opened.
constexpr uint32_t kStoreFormatVersion = 2;
constexpr char kStateSlotsDir[] = "state-slots";
constexpr char kMetaFormatKey[] = "format";
constexpr char kMetaNextOriginKey[] = "next_origin";

// The one place a rocksdb::Status becomes an absl::Status. `context` says what was being done.
absl::Status FromRocks(const rocksdb::Status& s, absl::string_view context) {
  if (s.ok()) return absl::OkStatus();
  std::string msg = absl::StrCat(context, ": rocksdb: ", s.ToString());
  using C = rocksdb::Status::Code;
  switch (s.code()) {
    case C::kNotFound: return absl::NotFoundError(msg);
    case C::kCorruption: return absl::DataLossError(msg);
    case C::kNotSupported: return absl::UnimplementedError(msg);
    case C::kInvalidArgument: return absl::InvalidArgumentError(msg);
    case C::kIOError:
      if (s.IsNoSpace()) return absl::ResourceExhaustedError(msg);
      return absl::InternalError(msg);
    case C::kAborted: return absl::AbortedError(msg);
    case C::kBusy:
    case C::kTryAgain:
    case C::kShutdownInProgress:
    case C::kIncomplete: return absl::UnavailableError(msg);
    case C::kTimedOut:
    case C::kExpired: return absl::DeadlineExceededError(msg);
    default: return absl::InternalError(msg);
  }
}

// Same code, message prefixed with what the failing record was.
absl::Status Annotate(const absl::Status& s, absl::string_view prefix) {
  return absl::Status(s.code(), absl::StrCat(prefix, ": ", s.message()));
}

int64_t NowMicros() { return absl::ToUnixMicros(absl::Now()); }

std::string SessionWhat(absl::string_view id) { return absl::StrCat("session ", Quote(id)); }

// Owns the DB and its column family handles; handles are destroyed before the DB closes.
class Db {
 public:
  Db(rocksdb::DB* db, std::vector<rocksdb::ColumnFamilyHandle*> handles)
      : db_(db), handles_(std::move(handles)) {}
  Db(const Db&) = delete;
  Db& operator=(const Db&) = delete;
  ~Db() {
    for (rocksdb::ColumnFamilyHandle* h : handles_) db_->DestroyColumnFamilyHandle(h);
    db_->Close().PermitUncheckedError();
  }
  rocksdb::DB* get() const { return db_.get(); }
  const std::vector<rocksdb::ColumnFamilyHandle*>& handles() const { return handles_; }

 private:
  std::unique_ptr<rocksdb::DB> db_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
};

class RocksSessionStore final : public SessionStore {
 public:
  RocksSessionStore(const StoreOptions& options, std::unique_ptr<Db> db,
                    std::array<rocksdb::ColumnFamilyHandle*, kNumCfs> cfs,
                    std::unique_ptr<StateSlots> slots, uint64_t next_origin, int64_t num_sessions)
      : options_(options),
        db_(std::move(db)),
        cfs_(cfs),
        slots_(std::move(slots)),
        next_origin_(next_origin),
        num_sessions_(num_sessions) {
    write_options_.sync = options.sync_commits;
  }

  absl::Status Commit(const CommitRequest& request) override;
  absl::StatusOr<SessionRecord> GetRecord(const std::string& id) override;
  absl::StatusOr<LoadedSession> Load(const std::string& id) override;
  absl::StatusOr<std::string> LoadChunk(const std::string& id, int64_t index) override;
  absl::StatusOr<std::vector<std::string>> LoadChunks(const std::string& id,
                                                      const std::vector<int64_t>& indices) override;
  absl::StatusOr<ListPage> List(const std::string& page_token, int page_size) override;
  absl::Status Delete(const std::string& id) override;
  absl::Status Fork(const std::string& parent_id, const std::string& child_id,
                    const std::string& child_metadata) override;
  absl::Status UpdateMetadata(const std::string& id, const std::string& metadata) override;
  int64_t NumSessions() override { return num_sessions_.load(std::memory_order_relaxed); }
  int64_t ApproximateBytes() override;
  absl::Status CompactAll() override;

  // Test hooks (store/testing.h).
  absl::StatusOr<rocksdb::ColumnFamilyHandle*> CfByName(const std::string& name) const {
    for (int i = 0; i < kNumCfs; ++i) {
      if (name == kCfNames[i]) return cfs_[i];
    }
    return absl::InvalidArgumentError(absl::StrCat("no column family ", Quote(name)));
  }
  rocksdb::DB* db() const { return db_->get(); }

 private:
  // Writers of one session id (Commit, Delete, Fork, UpdateMetadata) hold its stripe, so a
  // read-modify-write of a session record never interleaves with another of the same id.
  static constexpr size_t kStripes = 64;
  class StripeLock {
   public:
    StripeLock(RocksSessionStore* s, absl::string_view a, absl::string_view b = {}) {
      size_t i = Index(a);
      size_t j = b.empty() ? i : Index(b);
      if (j < i) std::swap(i, j);
      first_ = &s->stripes_[i];
      second_ = j != i ? &s->stripes_[j] : nullptr;
      first_->Lock();
      if (second_ != nullptr) second_->Lock();
    }
    ~StripeLock() {
      if (second_ != nullptr) second_->Unlock();
      first_->Unlock();
    }
    StripeLock(const StripeLock&) = delete;
    StripeLock& operator=(const StripeLock&) = delete;

   private:
    static size_t Index(absl::string_view id) {
      return std::hash<std::string_view>{}(std::string_view(id.data(), id.size())) % kStripes;
    }
    absl::Mutex* first_;
    absl::Mutex* second_;
  };

  // Reads into `value`; NotFound (unannotated) when absent.
  absl::Status Get(const rocksdb::ReadOptions& ro, Cf cf, absl::string_view key, std::string* value,
                   absl::string_view what) {
    rocksdb::Status s = db()->Get(ro, cfs_[cf], rocksdb::Slice(key.data(), key.size()), value);
    if (s.IsNotFound()) return absl::NotFoundError(absl::StrCat(what, " not found"));
    return FromRocks(s, absl::StrCat("reading ", what));
  }
  absl::StatusOr<SessionRecord> ReadRecord(const rocksdb::ReadOptions& ro, const std::string& id);
  absl::Status CheckAbsent(const std::string& id);
  absl::StatusOr<Refcount> ReadRefcount(const std::string& origin);

  void PutRecord(rocksdb::WriteBatch* batch, Cf cf, RecordKind kind, absl::string_view key,
                 absl::string_view payload) {
    const std::string header = EncodeRecordHeader(kind, key, payload);
    rocksdb::Slice key_slice(key.data(), key.size());
    rocksdb::Slice value_parts[2] = {rocksdb::Slice(header),
                                     rocksdb::Slice(payload.data(), payload.size())};
    // SliceParts: the blob is copied once, into the batch, not first into a header+blob string.
    batch->Put(cfs_[cf], rocksdb::SliceParts(&key_slice, 1), rocksdb::SliceParts(value_parts, 2))
        .PermitUncheckedError();
  }
  void DeleteChunksFrom(rocksdb::WriteBatch* batch, const std::string& origin, int64_t from) {
    const KeyRange r = ChunkKeyRange(origin, from);
    batch->DeleteRange(cfs_[kChunks], r.begin, r.end).PermitUncheckedError();
    batch->DeleteRange(cfs_[kLandmarks], r.begin, r.end).PermitUncheckedError();
  }
  absl::Status ValidateCommit(const CommitRequest& req, int64_t stored_chunks);
  // Adds the chunks, landmarks, states (PutStates) and the advanced record of `req` to `batch`.
  absl::Status AddCommitWrites(const CommitRequest& req, SessionRecord* record, int slot,
                               rocksdb::WriteBatch* batch);

  // States snapshots. A session's slot files are numbered by its origin; callers hold the
  // session's stripe, so no slot of it is being written while they read or write one.
  absl::StatusOr<uint64_t> SlotFile(const SessionRecord& record) {
    std::optional<uint64_t> n = OriginNumber(record.origin);
    if (!n) {
      return absl::DataLossError(absl::StrCat(SessionWhat(record.id), ": origin ",
                                              Quote(record.origin), " has no number"));
    }
    return *n;
  }
  // The slot pointer stored as `value` under `id` (DataLoss when it does not verify).
  static absl::StatusOr<StateSlotPointer> SlotPointer(const std::string& id,
                                                      absl::string_view value) {
    ASSIGN_OR_RETURN(absl::string_view payload, UnwrapRecord(RecordKind::kStateSlot, id, value));
    return DecodeStateSlotPointer(payload);
  }
  // The snapshot of `record`'s session, inline or from its slot.
  absl::StatusOr<std::string> ReadStates(const rocksdb::ReadOptions& ro,
                                         const SessionRecord& record);
  // The slot to write `id`'s next snapshot to: the one its stored pointer does not name.
  absl::StatusOr<int> NextSlot(const std::string& id);
  // Adds `states` of `record`'s session to `batch`: inline below state_slot_min_bytes, else
  // written (durably when commits sync) to `slot` first and a pointer to it added.
  absl::Status PutStates(rocksdb::WriteBatch* batch, const SessionRecord& record, int slot,
                         absl::string_view states);
  absl::Status Create(const CommitRequest& req);
  absl::Status Write(rocksdb::WriteBatch* batch, absl::string_view what) {
    return FromRocks(db()->Write(write_options_, batch), absl::StrCat("writing ", what));
  }
  // Allocates the next origin for `id`; the batch persists the counter.
  std::string AllocateOrigin(const std::string& id, rocksdb::WriteBatch* batch)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(refcount_mu_) {
    const std::string origin = MakeOrigin(id, next_origin_);
    std::string counter;
    PutFixed64(&counter, next_origin_ + 1);
    PutRecord(batch, kMeta, RecordKind::kMeta, kMetaNextOriginKey, counter);
    return origin;
  }

  const StoreOptions options_;
  rocksdb::WriteOptions write_options_;
  std::unique_ptr<Db> db_;
  const std::array<rocksdb::ColumnFamilyHandle*, kNumCfs> cfs_;
  const std::unique_ptr<StateSlots> slots_;
  std::array<absl::Mutex, kStripes> stripes_;
  // Guards every refcount read-modify-write (forks and deletes of different sessions may touch
  // the same origin) and the origin counter; held across the batch write that persists them.
  absl::Mutex refcount_mu_;
  uint64_t next_origin_ ABSL_GUARDED_BY(refcount_mu_);
  std::atomic<int64_t> num_sessions_;
};

absl::StatusOr<SessionRecord> RocksSessionStore::ReadRecord(const rocksdb::ReadOptions& ro,
                                                            const std::string& id) {
  const std::string what = SessionWhat(id);
  std::string value;
  RETURN_IF_ERROR(Get(ro, kSessions, id, &value, what));
  absl::StatusOr<absl::string_view> payload = UnwrapRecord(RecordKind::kSession, id, value);
  if (!payload.ok()) return Annotate(payload.status(), absl::StrCat(what, ": session record"));
  absl::StatusOr<SessionRecord> record = DecodeSessionRecord(*payload);
  if (!record.ok()) return Annotate(record.status(), what);
  if (record->id != id) {
    return absl::DataLossError(absl::StrCat(what, ": record names session ", Quote(record->id)));
  }
  return record;
}

absl::Status RocksSessionStore::CheckAbsent(const std::string& id) {
  std::string value;
  absl::Status s = Get(rocksdb::ReadOptions(), kSessions, id, &value, SessionWhat(id));
  if (s.ok()) return absl::AlreadyExistsError(absl::StrCat(SessionWhat(id), " already exists"));
  if (absl::IsNotFound(s)) return absl::OkStatus();
  return s;
}

absl::StatusOr<Refcount> RocksSessionStore::ReadRefcount(const std::string& origin) {
  const std::string what = absl::StrCat("refcount of chunk origin ", Quote(origin));
  std::string value;
  absl::Status s = Get(rocksdb::ReadOptions(), kRefcounts, origin, &value, what);
  // A referenced origin without a refcount means the store lost a write: not the caller's error.
  if (absl::IsNotFound(s)) return absl::DataLossError(absl::StrCat(what, " is missing"));
  RETURN_IF_ERROR(s);
  absl::StatusOr<absl::string_view> payload = UnwrapRecord(RecordKind::kRefcount, origin, value);
  if (!payload.ok()) return Annotate(payload.status(), what);
  absl::StatusOr<Refcount> r = DecodeRefcount(*payload);
  if (!r.ok()) return Annotate(r.status(), what);
  return r;
}

absl::Status RocksSessionStore::ValidateCommit(const CommitRequest& req, int64_t stored_chunks) {
  const std::string what = SessionWhat(req.session_id);
  for (size_t i = 0; i < req.new_chunks.size(); ++i) {
    const int64_t want = stored_chunks + static_cast<int64_t>(i);
    if (req.new_chunks[i].first != want) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": new_chunks[", i, "] has index ", req.new_chunks[i].first, ", expected ", want,
          " (new chunks are consecutive from the stored chunk count ", stored_chunks, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> RocksSessionStore::ReadStates(const rocksdb::ReadOptions& ro,
                                                          const SessionRecord& record) {
  const std::string what = absl::StrCat(SessionWhat(record.id), ": states snapshot");
  std::string value;
  absl::Status s = Get(ro, kStates, record.id, &value, what);
  if (absl::IsNotFound(s)) return absl::DataLossError(absl::StrCat(what, " is missing"));
  RETURN_IF_ERROR(s);
  if (PeekRecordKind(value) != RecordKind::kStateSlot) {
    absl::StatusOr<absl::string_view> payload = UnwrapRecord(RecordKind::kStates, record.id, value);
    if (!payload.ok()) return Annotate(payload.status(), what);
    value.erase(0, kRecordHeaderBytes);
    return value;
  }
  absl::StatusOr<StateSlotPointer> pointer = SlotPointer(record.id, value);
  if (!pointer.ok()) return Annotate(pointer.status(), what);
  ASSIGN_OR_RETURN(uint64_t file, SlotFile(record));
  if (pointer->file != file) {
    return absl::DataLossError(
        absl::StrCat(what, " points to slot file ", pointer->file, ", the session's is ", file));
  }
  absl::StatusOr<std::string> states =
      slots_->Read(pointer->file, pointer->slot, pointer->length, pointer->crc);
  if (!states.ok()) return Annotate(states.status(), what);
  return states;
}

absl::StatusOr<int> RocksSessionStore::NextSlot(const std::string& id) {
  std::string value;
  absl::Status s = Get(rocksdb::ReadOptions(), kStates, id, &value, SessionWhat(id));
  if (absl::IsNotFound(s)) return 0;
  RETURN_IF_ERROR(s);
  if (PeekRecordKind(value) != RecordKind::kStateSlot) return 0;
  // An unreadable pointer names no slot that could be read: either may be written.
  absl::StatusOr<StateSlotPointer> pointer = SlotPointer(id, value);
  return pointer.ok() ? 1 - pointer->slot : 0;
}

absl::Status RocksSessionStore::PutStates(rocksdb::WriteBatch* batch, const SessionRecord& record,
                                          int slot, absl::string_view states) {
  if (static_cast<int64_t>(states.size()) < options_.state_slot_min_bytes) {
    PutRecord(batch, kStates, RecordKind::kStates, record.id, states);
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(uint64_t file, SlotFile(record));
  absl::Status s = slots_->Write(file, slot, states, options_.sync_commits);
  if (!s.ok()) return Annotate(s, absl::StrCat(SessionWhat(record.id), ": states snapshot"));
  const StateSlotPointer pointer{file, slot, states.size(), Crc32c(states)};
  PutRecord(batch, kStates, RecordKind::kStateSlot, record.id, EncodeStateSlotPointer(pointer));
  return absl::OkStatus();
}

absl::Status RocksSessionStore::AddCommitWrites(const CommitRequest& req, SessionRecord* record,
                                                int slot, rocksdb::WriteBatch* batch) {
  const int64_t first = record->num_chunks;
  const auto added = static_cast<int64_t>(req.new_chunks.size());
  for (const auto& [index, blob] : req.new_chunks) {
    PutRecord(batch, kChunks, RecordKind::kChunk, ChunkKey(record->origin, index), blob);
  }
  if (added > 0) {
    std::string payload = EncodeLandmarkPayloadHeader(first + added);
    payload.append(req.new_landmarks);
    PutRecord(batch, kLandmarks, RecordKind::kLandmarks, ChunkKey(record->origin, first), payload);
    std::vector<ChunkSource>& sources = record->chunk_sources;
    if (!sources.empty() && sources.back().origin == record->origin && sources.back().end == first) {
      sources.back().end = first + added;
    } else {
      sources.push_back(ChunkSource{record->origin, first, first + added});
    }
  }
  record->num_chunks = first + added;
  record->position = req.new_position;
  record->metadata = req.metadata;
  record->updated_unix_micros = NowMicros();
  PutRecord(batch, kSessions, RecordKind::kSession, record->id, EncodeSessionRecord(*record));
  return PutStates(batch, *record, slot, req.states);
}

absl::Status RocksSessionStore::Commit(const CommitRequest& req) {
  RETURN_IF_ERROR(ValidateSessionId(req.session_id));
  const std::string what = SessionWhat(req.session_id);
  if (req.expected_position < -1) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": expected_position ",
                                                   req.expected_position, " is below -1"));
  }
  if (req.new_position < std::max<int64_t>(req.expected_position, 0)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": new_position ", req.new_position,
                                                   " is below expected_position ",
                                                   req.expected_position));
  }
  if (req.new_chunks.empty() != req.new_landmarks.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": new_landmarks must be given exactly when there are new chunks (",
        req.new_chunks.size(), " new chunks, ", req.new_landmarks.size(), " landmark bytes)"));
  }
  StripeLock lock(this, req.session_id);
  if (req.expected_position == -1) return Create(req);

  ASSIGN_OR_RETURN(SessionRecord record, ReadRecord(rocksdb::ReadOptions(), req.session_id));
  if (record.position != req.expected_position) {
    return absl::FailedPreconditionError(absl::StrCat(
        what, " is at position ", record.position, ", but the commit expected position ",
        req.expected_position, " (another writer committed first)"));
  }
  RETURN_IF_ERROR(ValidateCommit(req, record.num_chunks));
  int slot = 0;
  if (static_cast<int64_t>(req.states.size()) >= options_.state_slot_min_bytes) {
    ASSIGN_OR_RETURN(slot, NextSlot(req.session_id));
  }
  rocksdb::WriteBatch batch;
  RETURN_IF_ERROR(AddCommitWrites(req, &record, slot, &batch));
  return Write(&batch, absl::StrCat("the commit of ", what));
}

absl::Status RocksSessionStore::Create(const CommitRequest& req) {
  RETURN_IF_ERROR(CheckAbsent(req.session_id));
  RETURN_IF_ERROR(ValidateCommit(req, 0));
  SessionRecord record;
  record.id = req.session_id;
  record.created_unix_micros = NowMicros();
  rocksdb::WriteBatch batch;
  absl::MutexLock lock(&refcount_mu_);
  record.origin = AllocateOrigin(req.session_id, &batch);
  PutRecord(&batch, kRefcounts, RecordKind::kRefcount, record.origin,
            EncodeRefcount(Refcount{1, 0}));
  absl::Status s = AddCommitWrites(req, &record, 0, &batch);
  if (s.ok()) s = Write(&batch, absl::StrCat("the creation of ", SessionWhat(req.session_id)));
  if (!s.ok()) {
    slots_->Remove(next_origin_);  // written for a session that was not created
    return s;
  }
  ++next_origin_;
  num_sessions_.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::StatusOr<SessionRecord> RocksSessionStore::GetRecord(const std::string& id) {
  RETURN_IF_ERROR(ValidateSessionId(id));
  return ReadRecord(rocksdb::ReadOptions(), id);
}

absl::StatusOr<LoadedSession> RocksSessionStore::Load(const std::string& id) {
  RETURN_IF_ERROR(ValidateSessionId(id));
  const std::string what = SessionWhat(id);
  // The stripe keeps the session's slots still; one snapshot gives the record, states and
  // landmarks of one commit.
  StripeLock lock(this, id);
  rocksdb::ManagedSnapshot snapshot(db());
  rocksdb::ReadOptions ro;
  ro.snapshot = snapshot.snapshot();
  LoadedSession out;
  ASSIGN_OR_RETURN(out.record, ReadRecord(ro, id));
  ASSIGN_OR_RETURN(out.states, ReadStates(ro, out.record));

  for (const ChunkSource& source : out.record.chunk_sources) {
    const std::string begin = ChunkKey(source.origin, source.begin);
    const std::string end = ChunkKey(source.origin, source.end);
    rocksdb::Slice upper(end);
    rocksdb::ReadOptions iro = ro;
    iro.iterate_upper_bound = &upper;
    std::unique_ptr<rocksdb::Iterator> it(db()->NewIterator(iro, cfs_[kLandmarks]));
    int64_t next = source.begin;
    for (it->Seek(begin); it->Valid() && next < source.end; it->Next()) {
      const std::string lwhat = absl::StrCat(what, ": landmarks at chunk ", next, " (origin ",
                                             Quote(source.origin), ")");
      const absl::string_view key(it->key().data(), it->key().size());
      absl::StatusOr<DecodedChunkKey> k = DecodeChunkKey(key);
      if (!k.ok() || k->origin != source.origin || k->index != next) {
        return absl::DataLossError(absl::StrCat(lwhat, " are missing"));
      }
      absl::StatusOr<absl::string_view> payload = UnwrapRecord(
          RecordKind::kLandmarks, key, absl::string_view(it->value().data(), it->value().size()));
      if (!payload.ok()) return Annotate(payload.status(), lwhat);
      absl::StatusOr<LandmarkBlob> blob = DecodeLandmarkPayload(*payload);
      if (!blob.ok()) return Annotate(blob.status(), lwhat);
      if (blob->end <= next || blob->end > source.end) {
        return absl::DataLossError(absl::StrCat(lwhat, " claim to end at chunk ", blob->end,
                                                ", outside (", next, ", ", source.end, "]"));
      }
      out.landmarks.emplace_back(blob->blob.data(), blob->blob.size());
      next = blob->end;
    }
    RETURN_IF_ERROR(FromRocks(it->status(), absl::StrCat("reading the landmarks of ", what)));
    if (next != source.end) {
      return absl::DataLossError(absl::StrCat(what, ": landmarks for chunks [", next, ", ",
                                              source.end, ") of origin ", Quote(source.origin),
                                              " are missing"));
    }
  }
  return out;
}

absl::StatusOr<std::string> RocksSessionStore::LoadChunk(const std::string& id, int64_t index) {
  ASSIGN_OR_RETURN(std::vector<std::string> chunks, LoadChunks(id, {index}));
  return std::move(chunks[0]);
}

absl::StatusOr<std::vector<std::string>> RocksSessionStore::LoadChunks(
    const std::string& id, const std::vector<int64_t>& indices) {
  RETURN_IF_ERROR(ValidateSessionId(id));
  const std::string what = SessionWhat(id);
  rocksdb::ManagedSnapshot snapshot(db());
  rocksdb::ReadOptions ro;
  ro.snapshot = snapshot.snapshot();
  ASSIGN_OR_RETURN(SessionRecord record, ReadRecord(ro, id));

  std::vector<std::string> keys;
  keys.reserve(indices.size());
  for (int64_t index : indices) {
    if (index < 0 || index >= record.num_chunks) {
      return absl::OutOfRangeError(absl::StrCat(what, " has ", record.num_chunks,
                                                " chunks; chunk ", index, " was requested"));
    }
    // Sources tile [0, num_chunks) in order: the first whose end is above `index` holds it.
    auto source = std::upper_bound(
        record.chunk_sources.begin(), record.chunk_sources.end(), index,
        [](int64_t i, const ChunkSource& s) { return i < s.end; });
    keys.push_back(ChunkKey(source->origin, index));
  }
  std::vector<rocksdb::Slice> key_slices(keys.begin(), keys.end());
  std::vector<rocksdb::ColumnFamilyHandle*> cfs(keys.size(), cfs_[kChunks]);
  std::vector<std::string> values;
  std::vector<rocksdb::Status> statuses = db()->MultiGet(ro, cfs, key_slices, &values);
  for (size_t i = 0; i < keys.size(); ++i) {
    const std::string cwhat = absl::StrCat(what, ": chunk ", indices[i]);
    if (statuses[i].IsNotFound()) return absl::DataLossError(absl::StrCat(cwhat, " is missing"));
    RETURN_IF_ERROR(FromRocks(statuses[i], absl::StrCat("reading ", cwhat)));
    absl::StatusOr<absl::string_view> payload =
        UnwrapRecord(RecordKind::kChunk, keys[i], values[i]);
    if (!payload.ok()) return Annotate(payload.status(), cwhat);
    values[i].erase(0, kRecordHeaderBytes);
  }
  return values;
}

absl::StatusOr<ListPage> RocksSessionStore::List(const std::string& page_token, int page_size) {
  if (page_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("page_size must be >= 1, got ", page_size));
  }
  if (page_token.size() > kMaxSessionIdBytes) {
    return absl::InvalidArgumentError("page_token is not a session id (longer than 128 bytes)");
  }
  ListPage page;
  std::unique_ptr<rocksdb::Iterator> it(db()->NewIterator(rocksdb::ReadOptions(), cfs_[kSessions]));
  if (page_token.empty()) {
    it->SeekToFirst();
  } else {
    it->Seek(page_token);
    if (it->Valid() && it->key() == rocksdb::Slice(page_token)) it->Next();
  }
  for (; it->Valid() && static_cast<int>(page.sessions.size()) < page_size; it->Next()) {
    const std::string id = it->key().ToString();
    const std::string what = SessionWhat(id);
    absl::StatusOr<absl::string_view> payload = UnwrapRecord(
        RecordKind::kSession, id, absl::string_view(it->value().data(), it->value().size()));
    if (!payload.ok()) return Annotate(payload.status(), absl::StrCat(what, ": session record"));
    absl::StatusOr<SessionRecord> record = DecodeSessionRecord(*payload);
    if (!record.ok()) return Annotate(record.status(), what);
    record->chunk_sources.clear();
    page.sessions.push_back(*std::move(record));
  }
  RETURN_IF_ERROR(FromRocks(it->status(), "listing sessions"));
  if (it->Valid() && !page.sessions.empty()) page.next_page_token = page.sessions.back().id;
  return page;
}

absl::Status RocksSessionStore::Delete(const std::string& id) {
  RETURN_IF_ERROR(ValidateSessionId(id));
  const std::string what = SessionWhat(id);
  StripeLock lock(this, id);
  ASSIGN_OR_RETURN(SessionRecord record, ReadRecord(rocksdb::ReadOptions(), id));
  rocksdb::WriteBatch batch;
  batch.Delete(cfs_[kSessions], id).PermitUncheckedError();
  batch.Delete(cfs_[kStates], id).PermitUncheckedError();
  // The session holds one reference on its own origin and on each origin its sources name.
  std::map<std::string, bool> origins;
  for (const ChunkSource& s : record.chunk_sources) origins[s.origin] = true;
  origins[record.origin] = true;

  absl::MutexLock ref_lock(&refcount_mu_);
  for (const auto& [origin, unused] : origins) {
    ASSIGN_OR_RETURN(Refcount ref, ReadRefcount(origin));
    if (--ref.count == 0) {
      batch.Delete(cfs_[kRefcounts], origin).PermitUncheckedError();
      DeleteChunksFrom(&batch, origin, 0);
      continue;
    }
    PutRecord(&batch, kRefcounts, RecordKind::kRefcount, origin, EncodeRefcount(ref));
    // Forks still see this session's chunks below `shared_end`; nobody can see those above it,
    // and with the owner gone nobody will write there again.
    if (origin == record.origin) DeleteChunksFrom(&batch, origin, ref.shared_end);
  }
  RETURN_IF_ERROR(Write(&batch, absl::StrCat("the deletion of ", what)));
  // A crash before this leaves the files to the next Open's sweep.
  if (std::optional<uint64_t> file = OriginNumber(record.origin)) slots_->Remove(*file);
  num_sessions_.fetch_sub(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status RocksSessionStore::Fork(const std::string& parent_id, const std::string& child_id,
                                     const std::string& child_metadata) {
  RETURN_IF_ERROR(ValidateSessionId(parent_id, "parent session id"));
  RETURN_IF_ERROR(ValidateSessionId(child_id, "child session id"));
  const std::string what = SessionWhat(parent_id);
  StripeLock lock(this, parent_id, child_id);
  RETURN_IF_ERROR(CheckAbsent(child_id));
  ASSIGN_OR_RETURN(SessionRecord parent, ReadRecord(rocksdb::ReadOptions(), parent_id));
  ASSIGN_OR_RETURN(std::string states, ReadStates(rocksdb::ReadOptions(), parent));

  SessionRecord child;
  child.id = child_id;
  child.metadata = child_metadata;
  child.position = parent.position;
  child.num_chunks = parent.num_chunks;
  child.created_unix_micros = child.updated_unix_micros = NowMicros();
  child.chunk_sources = parent.chunk_sources;
  std::map<std::string, int64_t> shared;  // origin -> highest chunk end the child sees
  for (const ChunkSource& src : parent.chunk_sources) {
    shared[src.origin] = std::max(shared[src.origin], src.end);
  }

  rocksdb::WriteBatch batch;
  absl::MutexLock ref_lock(&refcount_mu_);
  for (const auto& [origin, end] : shared) {
    ASSIGN_OR_RETURN(Refcount ref, ReadRefcount(origin));
    ++ref.count;
    ref.shared_end = std::max(ref.shared_end, end);
    PutRecord(&batch, kRefcounts, RecordKind::kRefcount, origin, EncodeRefcount(ref));
  }
  child.origin = AllocateOrigin(child_id, &batch);
  PutRecord(&batch, kRefcounts, RecordKind::kRefcount, child.origin,
            EncodeRefcount(Refcount{1, 0}));
  PutRecord(&batch, kSessions, RecordKind::kSession, child_id, EncodeSessionRecord(child));
  absl::Status s = PutStates(&batch, child, 0, states);
  if (s.ok()) {
    s = Write(&batch, absl::StrCat("the fork of ", what, " into ", SessionWhat(child_id)));
  }
  if (!s.ok()) {
    slots_->Remove(next_origin_);
    return s;
  }
  ++next_origin_;
  num_sessions_.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status RocksSessionStore::UpdateMetadata(const std::string& id, const std::string& metadata) {
  RETURN_IF_ERROR(ValidateSessionId(id));
  StripeLock lock(this, id);
  ASSIGN_OR_RETURN(SessionRecord record, ReadRecord(rocksdb::ReadOptions(), id));
  record.metadata = metadata;
  record.updated_unix_micros = NowMicros();
  rocksdb::WriteBatch batch;
  PutRecord(&batch, kSessions, RecordKind::kSession, id, EncodeSessionRecord(record));
  return Write(&batch, absl::StrCat("the metadata of ", SessionWhat(id)));
}

int64_t RocksSessionStore::ApproximateBytes() {
  uint64_t total = 0;
  for (rocksdb::ColumnFamilyHandle* cf : db_->handles()) {
    uint64_t v = 0;
    if (db()->GetIntProperty(cf, "rocksdb.total-sst-files-size", &v)) total += v;
    if (db()->GetIntProperty(cf, "rocksdb.cur-size-all-mem-tables", &v)) total += v;
  }
  rocksdb::VectorLogPtr wal_files;
  if (db()->GetSortedWalFiles(wal_files).ok()) {
    for (const auto& f : wal_files) total += f->SizeFileBytes();
  }
  return static_cast<int64_t>(total) + slots_->bytes();
}

absl::Status RocksSessionStore::CompactAll() {
  rocksdb::FlushOptions fo;
  fo.wait = true;
  RETURN_IF_ERROR(FromRocks(db()->Flush(fo, db_->handles()), "flushing the store"));
  rocksdb::CompactRangeOptions co;
  // Range tombstones and deleted values are dropped only by a bottommost compaction.
  co.bottommost_level_compaction = rocksdb::BottommostLevelCompaction::kForce;
  for (rocksdb::ColumnFamilyHandle* cf : db_->handles()) {
    RETURN_IF_ERROR(FromRocks(db()->CompactRange(co, cf, nullptr, nullptr),
                              absl::StrCat("compacting column family ", cf->GetName())));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<SessionStore>> SessionStore::Open(const StoreOptions& options) {
  if (options.path.empty()) return absl::InvalidArgumentError("StoreOptions.path is empty");
  const std::string what = absl::StrCat("the session store at ", Quote(options.path));

  rocksdb::BlockBasedTableOptions table;
  table.block_cache = rocksdb::NewLRUCache(options.block_cache_bytes);
  table.filter_policy.reset(rocksdb::NewBloomFilterPolicy(10));  // chunk point lookups
  rocksdb::ColumnFamilyOptions cf_options;
  cf_options.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));
  cf_options.level_compaction_dynamic_level_bytes = true;

  rocksdb::DBOptions db_options;
  db_options.create_if_missing = true;
  db_options.create_missing_column_families = true;
  db_options.paranoid_checks = true;
  db_options.keep_log_file_num = 4;
  db_options.max_background_jobs = 2;
  // A commit could carry a whole recurrent-state snapshot (1 MiB for ramba-tiny, 48 MiB for the
  // 370M; now only below state_slot_min_bytes, or in stores opened with a larger one): with the
  // default 1 MiB group limit each concurrent commit wrote the WAL and synced it alone. Groups up
  // to 64 MiB share one write and one fsync, and pipelined writes let the next group's WAL write
  // overlap this one's memtable inserts (ramba-tiny, 64 streams on the GPU host: 32-36K -> 38-41K
  // output tok/s; docs/benchmarks.md).
  db_options.max_write_batch_group_size_bytes = uint64_t{64} << 20;
  db_options.enable_pipelined_write = true;

  // Open every column family the directory has (RocksDB requires it), ours plus any unknown one.
  std::vector<std::string> existing;
  rocksdb::DB::ListColumnFamilies(db_options, options.path, &existing).PermitUncheckedError();
  std::vector<rocksdb::ColumnFamilyDescriptor> descriptors;
  descriptors.emplace_back(rocksdb::kDefaultColumnFamilyName, cf_options);
  for (const char* name : kCfNames) descriptors.emplace_back(name, cf_options);
  for (const std::string& name : existing) {
    bool known = name == rocksdb::kDefaultColumnFamilyName;
    for (const char* n : kCfNames) known = known || name == n;
    if (!known) descriptors.emplace_back(name, rocksdb::ColumnFamilyOptions());
  }
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  RETURN_IF_ERROR(FromRocks(rocksdb::DB::Open(db_options, options.path, descriptors, &handles, &raw),
                            absl::StrCat("opening ", what)));
  auto db = std::make_unique<Db>(raw, handles);
  std::array<rocksdb::ColumnFamilyHandle*, kNumCfs> cfs{};
  for (int i = 0; i < kNumCfs; ++i) cfs[i] = handles[1 + i];

  rocksdb::WriteOptions sync_write;
  sync_write.sync = true;
  // Format version: written on first open, checked on every later one.
  std::string value;
  rocksdb::Status s = raw->Get(rocksdb::ReadOptions(), cfs[kMeta], kMetaFormatKey, &value);
  uint64_t version = kStoreFormatVersion;
  if (!s.IsNotFound()) {
    RETURN_IF_ERROR(FromRocks(s, absl::StrCat("reading the format of ", what)));
    absl::StatusOr<absl::string_view> payload = UnwrapRecord(RecordKind::kMeta, kMetaFormatKey, value);
    if (!payload.ok()) return Annotate(payload.status(), absl::StrCat(what, ": format record"));
    absl::string_view in = *payload;
    if (!GetFixed64(&in, &version)) {
      return absl::DataLossError(absl::StrCat(what, ": format record is truncated"));
    }
    if (version < 1 || version > kStoreFormatVersion) {
      return absl::FailedPreconditionError(absl::StrCat(what, " has format version ", version,
                                                        "; this build reads versions 1 to ",
                                                        kStoreFormatVersion));
    }
  }
  // Written first (a new store) or upgraded (so that an older build refuses what it cannot read).
  if (s.IsNotFound() || version != kStoreFormatVersion) {
    std::string payload;
    PutFixed64(&payload, kStoreFormatVersion);
    RETURN_IF_ERROR(FromRocks(raw->Put(sync_write, cfs[kMeta], kMetaFormatKey,
                                       WrapRecord(RecordKind::kMeta, kMetaFormatKey, payload)),
                              absl::StrCat("writing the format of ", what)));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<StateSlots> slots,
                   StateSlots::Open(absl::StrCat(options.path, "/", kStateSlotsDir)));

  uint64_t next_origin = 1;
  s = raw->Get(rocksdb::ReadOptions(), cfs[kMeta], kMetaNextOriginKey, &value);
  if (!s.IsNotFound()) {
    RETURN_IF_ERROR(FromRocks(s, absl::StrCat("reading the origin counter of ", what)));
    absl::StatusOr<absl::string_view> payload =
        UnwrapRecord(RecordKind::kMeta, kMetaNextOriginKey, value);
    if (!payload.ok()) return Annotate(payload.status(), absl::StrCat(what, ": origin counter"));
    absl::string_view in = *payload;
    if (!GetFixed64(&in, &next_origin)) {
      return absl::DataLossError(absl::StrCat(what, ": origin counter is truncated"));
    }
  }

  // Count the sessions and sweep the slot files of sessions that no longer exist (only when every
  // record names its origin: a file is never removed on a guess).
  int64_t num_sessions = 0;
  std::unordered_set<uint64_t> live;
  bool all_known = true;
  {
    rocksdb::ReadOptions ro;
    ro.fill_cache = false;
    std::unique_ptr<rocksdb::Iterator> it(raw->NewIterator(ro, cfs[kSessions]));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      ++num_sessions;
      const absl::string_view key(it->key().data(), it->key().size());
      absl::StatusOr<absl::string_view> payload = UnwrapRecord(
          RecordKind::kSession, key, absl::string_view(it->value().data(), it->value().size()));
      absl::StatusOr<SessionRecord> record =
          payload.ok() ? DecodeSessionRecord(*payload) : payload.status();
      std::optional<uint64_t> n = record.ok() ? OriginNumber(record->origin) : std::nullopt;
      if (n) live.insert(*n);
      all_known = all_known && n.has_value();
    }
    RETURN_IF_ERROR(FromRocks(it->status(), absl::StrCat("counting the sessions of ", what)));
  }
  if (all_known) RETURN_IF_ERROR(slots->RemoveAllBut(live));
  return std::unique_ptr<SessionStore>(new RocksSessionStore(
      options, std::move(db), cfs, std::move(slots), next_origin, num_sessions));
}

namespace testing {
namespace {
absl::StatusOr<RocksSessionStore*> Impl(SessionStore& store) {
  auto* impl = dynamic_cast<RocksSessionStore*>(&store);
  if (impl == nullptr) return absl::InvalidArgumentError("not a store made by SessionStore::Open");
  return impl;
}
}  // namespace

absl::StatusOr<std::string> GetRaw(SessionStore& store, const std::string& column_family,
                                   const std::string& key) {
  ASSIGN_OR_RETURN(RocksSessionStore * impl, Impl(store));
  ASSIGN_OR_RETURN(rocksdb::ColumnFamilyHandle * cf, impl->CfByName(column_family));
  std::string value;
  RETURN_IF_ERROR(FromRocks(impl->db()->Get(rocksdb::ReadOptions(), cf, key, &value), "GetRaw"));
  return value;
}

absl::Status PutRaw(SessionStore& store, const std::string& column_family, const std::string& key,
                    const std::string& value) {
  ASSIGN_OR_RETURN(RocksSessionStore * impl, Impl(store));
  ASSIGN_OR_RETURN(rocksdb::ColumnFamilyHandle * cf, impl->CfByName(column_family));
  rocksdb::WriteOptions wo;
  wo.sync = true;
  return FromRocks(impl->db()->Put(wo, cf, key, value), "PutRaw");
}

absl::StatusOr<int64_t> CountKeys(SessionStore& store, const std::string& column_family) {
  ASSIGN_OR_RETURN(RocksSessionStore * impl, Impl(store));
  ASSIGN_OR_RETURN(rocksdb::ColumnFamilyHandle * cf, impl->CfByName(column_family));
  std::unique_ptr<rocksdb::Iterator> it(impl->db()->NewIterator(rocksdb::ReadOptions(), cf));
  int64_t n = 0;
  for (it->SeekToFirst(); it->Valid(); it->Next()) ++n;
  RETURN_IF_ERROR(FromRocks(it->status(), "CountKeys"));
  return n;
}

}  // namespace testing
}  // namespace ramba::store
