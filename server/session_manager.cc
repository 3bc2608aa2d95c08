#include "server/session_manager.h"

#include <chrono>
#include <random>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"
#include "server/metrics.h"

namespace ramba::server {

// ---- SessionMeta ----

std::string SessionMeta::ToJson() const {
  nlohmann::json j;
  j["version"] = 1;
  j["labels"] = labels;
  nlohmann::json sampling = nlohmann::json::object();
  if (default_sampling.temperature) sampling["temperature"] = *default_sampling.temperature;
  if (default_sampling.top_k) sampling["top_k"] = *default_sampling.top_k;
  if (default_sampling.top_p) sampling["top_p"] = *default_sampling.top_p;
  if (default_sampling.min_p) sampling["min_p"] = *default_sampling.min_p;
  if (default_sampling.presence_penalty) {
    sampling["presence_penalty"] = *default_sampling.presence_penalty;
  }
  if (default_sampling.frequency_penalty) {
    sampling["frequency_penalty"] = *default_sampling.frequency_penalty;
  }
  if (default_sampling.repetition_penalty) {
    sampling["repetition_penalty"] = *default_sampling.repetition_penalty;
  }
  if (default_sampling.seed) sampling["seed"] = *default_sampling.seed;
  if (!default_sampling.logit_bias.empty()) {
    nlohmann::json bias = nlohmann::json::array();
    for (const LogitBias& b : default_sampling.logit_bias) bias.push_back({b.id, b.bias});
    sampling["logit_bias"] = bias;
  }
  j["sampling"] = sampling;
  if (pending_token.has_value()) j["pending_token"] = *pending_token;
  if (!parent_id.empty()) j["parent_id"] = parent_id;
  if (fork_position.has_value()) j["fork_position"] = *fork_position;
  return j.dump();
}

absl::StatusOr<SessionMeta> SessionMeta::FromJson(const std::string& text) {
  SessionMeta m;
  try {
    const nlohmann::json j = nlohmann::json::parse(text);
    if (j.value("version", 0) != 1) {
      return absl::DataLossError(absl::StrCat("session metadata has unknown version ",
                                              j.value("version", 0)));
    }
    m.labels = j.at("labels").get<std::map<std::string, std::string>>();
    const auto& s = j.at("sampling");
    if (s.contains("temperature")) m.default_sampling.temperature = s.at("temperature").get<float>();
    if (s.contains("top_k")) m.default_sampling.top_k = s.at("top_k").get<int32_t>();
    if (s.contains("top_p")) m.default_sampling.top_p = s.at("top_p").get<float>();
    if (s.contains("min_p")) m.default_sampling.min_p = s.at("min_p").get<float>();
    if (s.contains("presence_penalty")) {
      m.default_sampling.presence_penalty = s.at("presence_penalty").get<float>();
    }
    if (s.contains("frequency_penalty")) {
      m.default_sampling.frequency_penalty = s.at("frequency_penalty").get<float>();
    }
    if (s.contains("repetition_penalty")) {
      m.default_sampling.repetition_penalty = s.at("repetition_penalty").get<float>();
    }
    if (s.contains("seed")) m.default_sampling.seed = s.at("seed").get<uint64_t>();
    if (s.contains("logit_bias")) {
      for (const auto& b : s.at("logit_bias")) {
        m.default_sampling.logit_bias.push_back({b.at(0).get<int32_t>(), b.at(1).get<float>()});
      }
    }
    if (j.contains("pending_token")) m.pending_token = j.at("pending_token").get<int32_t>();
    m.parent_id = j.value("parent_id", "");
    if (j.contains("fork_position")) m.fork_position = j.at("fork_position").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    return absl::DataLossError(absl::StrCat("session metadata is malformed: ", e.what()));
  }
  return m;
}

// ---- SessionLease ----

struct SessionLease::Entry {
  std::string id;
  std::unique_ptr<SessionState> state;  // null while being paged in
  SessionMeta meta;
  store::SessionRecord record;  // as last committed
  bool leased = false;
};

SessionLease::SessionLease(SessionManager* manager, std::shared_ptr<Entry> entry)
    : manager_(manager), entry_(std::move(entry)) {}

SessionLease::~SessionLease() {
  if (entry_ != nullptr) {
    // Uncommitted changes are dropped: the entry is paged in again from its last commit.
    const bool unchanged = position() == entry_->record.position &&
                           entry_->state->num_chunks() == entry_->record.num_chunks;
    manager_->Release(entry_, committed_ || unchanged);
  }
}

const std::string& SessionLease::id() const { return entry_->id; }
SessionState* SessionLease::state() { return entry_->state.get(); }
SessionMeta& SessionLease::meta() { return entry_->meta; }
int64_t SessionLease::position() const {
  return entry_->state->position() + (entry_->meta.pending_token.has_value() ? 1 : 0);
}

absl::Status SessionLease::Commit() {
  ASSIGN_OR_RETURN(PreparedCommit prepared, PrepareCommit());
  return ApplyCommit(std::move(prepared));
}

absl::StatusOr<SessionLease::PreparedCommit> SessionLease::PrepareCommit() {
  Entry& e = *entry_;
  PreparedCommit prepared;
  store::CommitRequest& req = prepared.request;
  req.session_id = e.id;
  req.expected_position = e.record.position;
  req.new_position = position();
  req.metadata = e.meta.ToJson();
  ASSIGN_OR_RETURN(prepared.snapshot, e.state->Snapshot(e.record.num_chunks));
  return prepared;
}

absl::Status SessionLease::ApplyCommit(PreparedCommit prepared) {
  Entry& e = *entry_;
  ASSIGN_OR_RETURN(SessionSnapshot::Parts parts, prepared.snapshot->Finish());
  store::CommitRequest req = std::move(prepared.request);
  req.states = std::move(parts.states);
  req.new_chunks = std::move(parts.chunks);
  req.new_landmarks = std::move(parts.landmarks);
  const int64_t to = req.new_chunks.empty() ? e.record.num_chunks : req.new_chunks.back().first + 1;
  RETURN_IF_ERROR(manager_->store_->Commit(req));
  e.record.position = req.new_position;
  e.record.num_chunks = to;
  e.record.metadata = std::move(req.metadata);
  committed_ = true;
  return absl::OkStatus();
}

// ---- SessionManager ----

SessionManager::SessionManager(RambaModel* model, store::SessionStore* store,
                               SessionManagerOptions options)
    : model_(model), store_(store), options_(options) {}

SessionManager::~SessionManager() = default;

absl::Status SessionManager::ValidateId(const std::string& id) {
  if (id.empty() || id.size() > 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("session_id must be 1 to 128 bytes, got ", id.size()));
  }
  for (char c : id) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) {
      return absl::InvalidArgumentError(
          absl::StrCat("session_id '", id, "' may contain only [A-Za-z0-9._-]"));
    }
  }
  return absl::OkStatus();
}

SessionView SessionManager::ViewOf(const store::SessionRecord& record,
                                   const SessionMeta& meta) const {
  SessionView v;
  v.id = record.id;
  v.meta = meta;
  v.position = record.position;
  v.num_chunks = record.num_chunks;
  v.created_unix_micros = record.created_unix_micros;
  v.updated_unix_micros = record.updated_unix_micros;
  return v;
}

absl::StatusOr<SessionView> SessionManager::Create(const std::string& requested_id,
                                                   SessionMeta meta) {
  std::string id = requested_id;
  if (id.empty()) {
    std::random_device rd;
    std::mt19937_64 rng((static_cast<uint64_t>(rd()) << 32) ^ rd());
    id = absl::StrCat("s-", absl::Hex(rng(), absl::kZeroPad16));
  }
  RETURN_IF_ERROR(ValidateId(id));
  ASSIGN_OR_RETURN(std::unique_ptr<SessionState> state, model_->NewSession());
  store::CommitRequest req;
  req.session_id = id;
  req.expected_position = -1;
  req.new_position = 0;
  req.metadata = meta.ToJson();
  ASSIGN_OR_RETURN(req.states, state->SerializeStates());
  RETURN_IF_ERROR(store_->Commit(req));
  ASSIGN_OR_RETURN(store::SessionRecord record, store_->GetRecord(id));
  auto entry = std::make_shared<Entry>();
  entry->id = id;
  entry->state = std::move(state);
  entry->meta = meta;
  entry->record = record;
  {
    absl::MutexLock lock(&mu_);
    resident_[id] = entry;
    lru_.push_back(id);
    EvictLocked(0);
  }
  return ViewOf(record, meta);
}

absl::StatusOr<std::shared_ptr<SessionManager::Entry>> SessionManager::PageIn(
    const std::string& id) {
  ASSIGN_OR_RETURN(store::LoadedSession loaded, store_->Load(id));
  ASSIGN_OR_RETURN(SessionMeta meta, SessionMeta::FromJson(loaded.record.metadata));
  std::vector<std::string> chunks;
  chunks.reserve(loaded.record.num_chunks);
  for (int64_t i = 0; i < loaded.record.num_chunks; ++i) {
    ASSIGN_OR_RETURN(std::string blob, store_->LoadChunk(id, i));
    chunks.push_back(std::move(blob));
  }
  std::vector<std::string_view> chunk_views(chunks.begin(), chunks.end());
  std::vector<std::string_view> landmark_views(loaded.landmarks.begin(), loaded.landmarks.end());
  ASSIGN_OR_RETURN(
      std::unique_ptr<SessionState> state,
      SessionState::Deserialize(model_->config(), model_->backend(), loaded.states, chunk_views,
                                landmark_views, model_->device_chunk_window()));
  auto entry = std::make_shared<Entry>();
  entry->id = id;
  entry->state = std::move(state);
  entry->meta = std::move(meta);
  entry->record = std::move(loaded.record);
  return entry;
}

absl::StatusOr<SessionLease> SessionManager::Acquire(const std::string& id) {
  RETURN_IF_ERROR(ValidateId(id));
  // A resident session's lease (ABORTED while another holds it); nullopt when not resident.
  auto lease_resident =
      [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) -> std::optional<absl::StatusOr<SessionLease>> {
    auto it = resident_.find(id);
    if (it == resident_.end()) return std::nullopt;
    if (it->second->leased) {
      if (options_.metrics != nullptr) options_.metrics->session_leases_busy->Increment();
      return absl::AbortedError(
          absl::StrCat("session '", id, "' is busy with another request; retry when it finishes"));
    }
    it->second->leased = true;
    lru_.remove(id);
    if (options_.metrics != nullptr) options_.metrics->session_cache_hits->Increment();
    return SessionLease(this, it->second);
  };
  {
    absl::MutexLock lock(&mu_);
    if (auto lease = lease_resident()) return std::move(*lease);
  }
  // Not resident: an unknown id fails here, before an idle session is evicted for it.
  RETURN_IF_ERROR(store_->GetRecord(id).status());
  {
    absl::MutexLock lock(&mu_);
    if (auto lease = lease_resident()) return std::move(*lease);  // paged in meanwhile
    EvictLocked(1);
    if (static_cast<int64_t>(resident_.size()) >= options_.max_resident_sessions) {
      if (options_.metrics != nullptr) options_.metrics->session_leases_full->Increment();
      return absl::ResourceExhaustedError(absl::StrCat(
          "all ", options_.max_resident_sessions,
          " resident session slots are busy with requests; retry later"));
    }
    // Reserve the slot so a concurrent Acquire of the same id sees it busy.
    auto placeholder = std::make_shared<Entry>();
    placeholder->id = id;
    placeholder->leased = true;
    resident_[id] = placeholder;
  }
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<std::shared_ptr<Entry>> entry = PageIn(id);
  if (options_.metrics != nullptr && entry.ok()) {
    options_.metrics->session_cache_misses->Increment();
    options_.metrics->session_page_in_latency->Observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  absl::MutexLock lock(&mu_);
  if (!entry.ok()) {
    resident_.erase(id);
    return entry.status();
  }
  (*entry)->leased = true;
  resident_[id] = *entry;
  return SessionLease(this, *entry);
}

void SessionManager::Release(const std::shared_ptr<Entry>& entry, bool keep) {
  absl::MutexLock lock(&mu_);
  auto it = resident_.find(entry->id);
  if (it == resident_.end() || it->second != entry) return;  // deleted meanwhile
  entry->leased = false;
  if (keep) {
    lru_.push_back(entry->id);
    EvictLocked(0);
  } else {
    resident_.erase(it);
  }
}

void SessionManager::EvictLocked(int64_t room) {
  const kernels::Backend* be = model_->backend();
  auto over = [&] {
    return static_cast<int64_t>(resident_.size()) + room > options_.max_resident_sessions ||
           (options_.max_resident_bytes > 0 && be->held_bytes() > options_.max_resident_bytes) ||
           (options_.max_resident_host_bytes > 0 &&
            be->host_held_bytes() > options_.max_resident_host_bytes);
  };
  while (over() && !lru_.empty()) {
    resident_.erase(lru_.front());
    lru_.pop_front();
    if (options_.metrics != nullptr) options_.metrics->session_evictions->Increment();
  }
}

absl::StatusOr<SessionView> SessionManager::Get(const std::string& id) {
  RETURN_IF_ERROR(ValidateId(id));
  ASSIGN_OR_RETURN(store::SessionRecord record, store_->GetRecord(id));
  ASSIGN_OR_RETURN(SessionMeta meta, SessionMeta::FromJson(record.metadata));
  return ViewOf(record, meta);
}

absl::StatusOr<std::pair<std::vector<SessionView>, std::string>> SessionManager::List(
    const std::string& page_token, int page_size) {
  ASSIGN_OR_RETURN(store::ListPage page, store_->List(page_token, page_size));
  std::vector<SessionView> views;
  for (const store::SessionRecord& r : page.sessions) {
    ASSIGN_OR_RETURN(SessionMeta meta, SessionMeta::FromJson(r.metadata));
    views.push_back(ViewOf(r, meta));
  }
  return std::make_pair(std::move(views), page.next_page_token);
}

absl::Status SessionManager::Delete(const std::string& id,
                                    std::optional<int64_t> expected_position) {
  RETURN_IF_ERROR(ValidateId(id));
  if (expected_position.has_value()) {
    ASSIGN_OR_RETURN(store::SessionRecord record, store_->GetRecord(id));
    if (record.position != *expected_position) {
      return absl::FailedPreconditionError(
          absl::StrCat("expected_position ", *expected_position, " but session '", id,
                       "' is at position ", record.position));
    }
  }
  {
    absl::MutexLock lock(&mu_);
    auto it = resident_.find(id);
    if (it != resident_.end()) {
      if (it->second->leased) {
        return absl::AbortedError(
            absl::StrCat("session '", id, "' is busy with another request; retry when it finishes"));
      }
      resident_.erase(it);
      lru_.remove(id);
    }
  }
  return store_->Delete(id);
}

absl::StatusOr<SessionView> SessionManager::Fork(
    const std::string& parent_id, const std::string& requested_child_id,
    std::map<std::string, std::string> labels, std::optional<int64_t> expected_position,
    std::optional<SamplingDefaults> default_sampling) {
  RETURN_IF_ERROR(ValidateId(parent_id));
  ASSIGN_OR_RETURN(store::SessionRecord parent, store_->GetRecord(parent_id));
  if (expected_position.has_value() && parent.position != *expected_position) {
    return absl::FailedPreconditionError(
        absl::StrCat("expected_position ", *expected_position, " but session '", parent_id,
                     "' is at position ", parent.position));
  }
  ASSIGN_OR_RETURN(SessionMeta meta, SessionMeta::FromJson(parent.metadata));
  if (default_sampling.has_value()) meta.default_sampling = *default_sampling;
  meta.fork_position = parent.position;
  std::string child_id = requested_child_id;
  if (child_id.empty()) {
    std::random_device rd;
    child_id = absl::StrCat("s-", absl::Hex((static_cast<uint64_t>(rd()) << 32) ^ rd(),
                                            absl::kZeroPad16));
  }
  RETURN_IF_ERROR(ValidateId(child_id));
  meta.labels = std::move(labels);
  meta.parent_id = parent_id;
  RETURN_IF_ERROR(store_->Fork(parent_id, child_id, meta.ToJson()));
  ASSIGN_OR_RETURN(store::SessionRecord child, store_->GetRecord(child_id));
  return ViewOf(child, meta);
}

absl::Status SessionManager::UpdateMeta(const std::string& id, const SessionMeta& meta) {
  RETURN_IF_ERROR(ValidateId(id));
  absl::MutexLock lock(&mu_);
  auto it = resident_.find(id);
  if (it != resident_.end() && it->second->leased) {
    return absl::AbortedError(absl::StrCat("session '", id, "' is busy with another request"));
  }
  RETURN_IF_ERROR(store_->UpdateMetadata(id, meta.ToJson()));
  if (it != resident_.end()) {
    it->second->meta = meta;
    it->second->record.metadata = meta.ToJson();
  }
  return absl::OkStatus();
}

int64_t SessionManager::ResidentSessions() {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(resident_.size());
}

int64_t SessionManager::StoredSessions() { return store_->NumSessions(); }

}  // namespace ramba::server
