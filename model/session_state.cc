#include "model/session_state.h"

#include <zlib.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace ramba {
namespace {

// Little-endian writer for part payloads (the project targets little-endian hosts only).
class PartWriter {
 public:
  PartWriter(StatePartKind kind) {
    Put<uint32_t>(kStatePartMagic);
    Put<uint16_t>(kStatePartVersion);
    Put<uint16_t>(static_cast<uint16_t>(kind));
  }
  template <class T>
  void Put(T v) { out_.append(reinterpret_cast<const char*>(&v), sizeof(T)); }
  char* Reserve(size_t bytes) {
    const size_t at = out_.size();
    out_.resize(at + bytes);
    return out_.data() + at;
  }
  std::string Finish() {
    const uint32_t crc = crc32(0L, reinterpret_cast<const Bytef*>(out_.data()), out_.size());
    Put<uint32_t>(crc);
    return std::move(out_);
  }

 private:
  std::string out_;
};

class PartReader {
 public:
  PartReader(std::string_view data, std::string what) : data_(data), what_(std::move(what)) {}

  absl::Status Open(StatePartKind kind) {
    if (data_.size() < 12) return Error("is truncated");
    uint32_t crc_stored;
    std::memcpy(&crc_stored, data_.data() + data_.size() - 4, 4);
    const uint32_t crc = crc32(0L, reinterpret_cast<const Bytef*>(data_.data()), data_.size() - 4);
    data_.remove_suffix(4);
    uint32_t magic = 0;
    uint16_t version = 0, k = 0;
    RETURN_IF_ERROR(Get(&magic));
    if (magic != kStatePartMagic) return Error("is not a ramba state part (bad magic)");
    RETURN_IF_ERROR(Get(&version));
    if (version != kStatePartVersion) {
      return Error(absl::StrCat("has format version ", version, ", this build reads version ",
                                kStatePartVersion));
    }
    RETURN_IF_ERROR(Get(&k));
    if (k != static_cast<uint16_t>(kind)) {
      return Error(absl::StrCat("is a part of kind ", k, ", expected kind ",
                                static_cast<int>(kind)));
    }
    if (crc != crc_stored) return Error("fails its checksum (corrupted)");
    return absl::OkStatus();
  }
  template <class T>
  absl::Status Get(T* v) {
    if (data_.size() - pos_ < sizeof(T)) return Error("is truncated");
    std::memcpy(v, data_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return absl::OkStatus();
  }
  // Reads an int64 that must equal `expected` (a model dimension).
  absl::Status Expect(const char* field, int64_t expected) {
    int64_t v = 0;
    RETURN_IF_ERROR(Get(&v));
    if (v != expected) {
      return Error(absl::StrCat("has ", field, " = ", v, " but the model has ", expected));
    }
    return absl::OkStatus();
  }
  absl::StatusOr<const char*> Bytes(size_t n) {
    if (data_.size() - pos_ < n) return Error("is truncated");
    const char* p = data_.data() + pos_;
    pos_ += n;
    return p;
  }
  absl::Status Done() {
    if (pos_ != data_.size()) return Error("has trailing bytes");
    return absl::OkStatus();
  }
  absl::Status Error(absl::string_view msg) const {
    return absl::DataLossError(absl::StrCat(what_, " ", msg));
  }

 private:
  std::string_view data_;
  std::string what_;
  size_t pos_ = 0;
};

}  // namespace

SessionState::SessionState(const ModelConfig& config, kernels::Backend* backend)
    : config_(config), backend_(backend) {}

int64_t SessionState::recurrent_floats() const {
  return state_floats() + config_.chunk_size * config_.hidden_size;
}

absl::Status SessionState::Init() {
  const size_t bytes = recurrent_floats() * sizeof(float);
  ASSIGN_OR_RETURN(recurrent_, backend_->Allocate(bytes));
  RETURN_IF_ERROR(backend_->Zero(recurrent_.data(), bytes));
  RETURN_IF_ERROR(ReserveLandmarks(16));
  return SyncChunkTable(0);
}

absl::Status SessionState::SyncChunkTable(int64_t from) {
  const int64_t n = num_chunks();
  if (n > chunk_table_capacity_ || chunk_table_.empty()) {
    const int64_t capacity = std::max<int64_t>({16, n, 2 * chunk_table_capacity_});
    ASSIGN_OR_RETURN(chunk_table_, backend_->Allocate(capacity * sizeof(const float*)));
    chunk_table_capacity_ = capacity;
    from = 0;  // a new table starts empty
  }
  if (from < n) {
    RETURN_IF_ERROR(backend_->Upload(chunk_table_.as<const float*>() + from,
                                     chunk_ptrs_.data() + from, (n - from) * sizeof(const float*)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<SessionState>> SessionState::Create(const ModelConfig& config,
                                                                   kernels::Backend* backend) {
  std::unique_ptr<SessionState> s(new SessionState(config, backend));
  RETURN_IF_ERROR(s->Init());
  return s;
}

float* SessionState::conv_state(int64_t layer) const {
  return recurrent_.as<float>() + layer * conv_floats();
}
float* SessionState::ssm_state(int64_t layer) const {
  return recurrent_.as<float>() + config_.num_mamba_layers() * conv_floats() +
         layer * ssm_floats();
}
float* SessionState::chunk_buffer() const { return recurrent_.as<float>() + state_floats(); }
const float* SessionState::landmarks() const { return landmarks_.as<const float>(); }

absl::Status SessionState::ReserveLandmarks(int64_t chunks) {
  if (chunks <= landmark_capacity_) return absl::OkStatus();
  const int64_t capacity = std::max(chunks, 2 * landmark_capacity_);
  const size_t row_bytes = config_.retrieval_dim * sizeof(float);
  ASSIGN_OR_RETURN(kernels::Buffer grown, backend_->Allocate(capacity * row_bytes));
  if (num_chunks() > 0) {
    RETURN_IF_ERROR(backend_->Copy(grown.data(), landmarks_.data(), num_chunks() * row_bytes));
  }
  landmarks_ = std::move(grown);
  landmark_capacity_ = capacity;
  return absl::OkStatus();
}

absl::Status SessionState::AppendChunk(std::shared_ptr<const ChunkKV> chunk,
                                       const float* landmark) {
  RETURN_IF_ERROR(ReserveLandmarks(num_chunks() + 1));
  const size_t row_bytes = config_.retrieval_dim * sizeof(float);
  RETURN_IF_ERROR(backend_->Copy(landmarks_.as<char>() + num_chunks() * row_bytes, landmark,
                                 row_bytes));
  chunk_ptrs_.push_back(chunk->data());
  chunks_.push_back(std::move(chunk));
  return SyncChunkTable(num_chunks() - 1);
}

absl::Status SessionState::KeepChunksOnDevice(int64_t window) {
  const int64_t target = num_chunks() - window;
  if (window <= 0 || target <= host_chunks_) return absl::OkStatus();
  const size_t bytes = chunk_floats() * sizeof(float);
  const int64_t from = host_chunks_;
  absl::Status st;
  for (; host_chunks_ < target; ++host_chunks_) {
    const int64_t i = host_chunks_;
    if (chunks_[i]->host_tier()) continue;  // moved before this session was forked
    auto moved = std::make_shared<ChunkKV>();
    absl::StatusOr<kernels::Buffer> kv = backend_->AllocateHost(bytes);
    if (kv.ok()) st = backend_->Copy(kv->data(), chunks_[i]->data(), bytes);
    if (!kv.ok() || !st.ok()) {
      if (st.ok()) st = kv.status();
      break;
    }
    moved->kv = std::move(*kv);
    chunk_ptrs_[i] = moved->data();
    chunks_[i] = std::move(moved);  // the device block goes once no fork holds it
  }
  RETURN_IF_ERROR(SyncChunkTable(from));
  return st;
}

absl::Status SessionState::EnsureChunkCache(int64_t slots) {
  if (slots == cache_slots_) return absl::OkStatus();
  cache_blocks_ = kernels::Buffer();
  cache_tags_ = kernels::Buffer();
  cache_slots_ = 0;
  if (slots <= 0) return absl::OkStatus();
  const size_t tag_bytes = kernels::ChunkCacheRows::TagWords(slots) * sizeof(int32_t);
  ASSIGN_OR_RETURN(cache_blocks_, backend_->Allocate(slots * chunk_floats() * sizeof(float)));
  ASSIGN_OR_RETURN(cache_tags_, backend_->Allocate(tag_bytes));
  RETURN_IF_ERROR(backend_->Zero(cache_tags_.data(), tag_bytes));
  cache_slots_ = slots;
  return absl::OkStatus();
}

absl::Status SessionState::ResetTokenCounts(absl::Span<const int32_t> prompt,
                                            absl::Span<const int32_t> held_back) {
  const int64_t vocab = config_.vocab_size;
  std::vector<int32_t> counts(static_cast<size_t>(vocab), 0);
  for (const auto& [tokens, mark] : {std::pair(prompt, kernels::PenaltyParams::kPromptTokenBit),
                                     std::pair(held_back, kernels::PenaltyParams::kHeldBackBit)}) {
    for (const int32_t t : tokens) {
      if (t < 0 || t >= vocab) {
        return absl::InvalidArgumentError(
            absl::StrCat("ResetTokenCounts: token id ", t, " is outside [0, ", vocab, ")"));
      }
      counts[t] |= mark;
    }
  }
  const size_t bytes = counts.size() * sizeof(int32_t);
  if (token_counts_.empty()) {
    ASSIGN_OR_RETURN(token_counts_, backend_->Allocate(bytes));
  }
  return backend_->Upload(token_counts_.data(), counts.data(), bytes);
}

absl::Status SessionState::SetLogitBias(absl::Span<const LogitBias> bias) {
  const int64_t vocab = config_.vocab_size;
  RETURN_IF_ERROR(ValidateLogitBias(bias, vocab));
  std::vector<float> dense(static_cast<size_t>(vocab), 0.0f);
  for (const LogitBias& b : bias) dense[b.id] = b.bias;
  const size_t bytes = dense.size() * sizeof(float);
  if (logit_bias_.empty()) {
    ASSIGN_OR_RETURN(logit_bias_, backend_->Allocate(bytes));
  }
  return backend_->Upload(logit_bias_.data(), dense.data(), bytes);
}

absl::StatusOr<std::unique_ptr<SessionState>> SessionState::Fork() const {
  std::unique_ptr<SessionState> s(new SessionState(config_, backend_));
  const size_t bytes = recurrent_floats() * sizeof(float);
  ASSIGN_OR_RETURN(s->recurrent_, backend_->Allocate(bytes));
  RETURN_IF_ERROR(backend_->Copy(s->recurrent_.data(), recurrent_.data(), bytes));
  RETURN_IF_ERROR(s->ReserveLandmarks(std::max<int64_t>(16, num_chunks())));
  if (num_chunks() > 0) {
    RETURN_IF_ERROR(backend_->Copy(s->landmarks_.data(), landmarks_.data(),
                                   num_chunks() * config_.retrieval_dim * sizeof(float)));
  }
  s->chunks_ = chunks_;
  s->chunk_ptrs_ = chunk_ptrs_;
  s->host_chunks_ = host_chunks_;
  RETURN_IF_ERROR(s->SyncChunkTable(0));
  s->position_ = position_;
  return s;
}

namespace {

// The parts' headers, shared by the Serialize* calls and SessionSnapshot.
PartWriter StatesPart(const ModelConfig& c, int64_t position, int64_t num_chunks) {
  PartWriter w(StatePartKind::kStates);
  w.Put<int64_t>(position);
  w.Put<int64_t>(num_chunks);
  for (int64_t v : {c.num_mamba_layers(), c.conv_kernel, c.conv_dim(), c.num_heads, c.head_dim,
                    c.state_size, c.chunk_size, c.hidden_size}) {
    w.Put<int64_t>(v);
  }
  return w;
}

PartWriter ChunkPart(const ModelConfig& c, int64_t index) {
  PartWriter w(StatePartKind::kChunk);
  w.Put<int64_t>(index);
  w.Put<int64_t>(c.chunk_size);
  w.Put<int64_t>(c.kv_dim());
  return w;
}

PartWriter LandmarksPart(const ModelConfig& c, int64_t begin, int64_t count) {
  PartWriter w(StatePartKind::kLandmarks);
  w.Put<int64_t>(begin);
  w.Put<int64_t>(count);
  w.Put<int64_t>(c.retrieval_dim);
  return w;
}

}  // namespace

absl::StatusOr<std::string> SessionState::SerializeStates() const {
  PartWriter w = StatesPart(config_, position_, num_chunks());
  // Recurrent states always; the chunk buffer only up to its filled rows.
  const size_t state_bytes = state_floats() * sizeof(float);
  const size_t buffer_bytes = buffered_rows() * config_.hidden_size * sizeof(float);
  RETURN_IF_ERROR(backend_->Download(w.Reserve(state_bytes), recurrent_.data(), state_bytes));
  RETURN_IF_ERROR(backend_->Download(w.Reserve(buffer_bytes), chunk_buffer(), buffer_bytes));
  return w.Finish();
}

absl::StatusOr<std::unique_ptr<SessionSnapshot>> SessionState::Snapshot(int64_t first_chunk) const {
  if (first_chunk < 0 || first_chunk > num_chunks()) {
    return absl::OutOfRangeError(
        absl::StrCat("snapshot from chunk ", first_chunk, " outside [0, ", num_chunks(), "]"));
  }
  std::unique_ptr<SessionSnapshot> snap(new SessionSnapshot);
  snap->backend_ = backend_;
  snap->config_ = config_;
  snap->position_ = position_;
  snap->num_chunks_ = num_chunks();
  snap->first_chunk_ = first_chunk;
  snap->state_bytes_ = state_floats() * sizeof(float);
  snap->buffer_bytes_ = buffered_rows() * config_.hidden_size * sizeof(float);
  const size_t row_bytes = config_.retrieval_dim * sizeof(float);
  const size_t landmark_bytes = (num_chunks() - first_chunk) * row_bytes;
  absl::StatusOr<kernels::Buffer> copy =
      backend_->Allocate(snap->state_bytes_ + snap->buffer_bytes_ + landmark_bytes);
  if (!copy.ok()) {
    if (copy.status().code() != absl::StatusCode::kResourceExhausted) return copy.status();
    SessionSnapshot::Parts parts;
    ASSIGN_OR_RETURN(parts.states, SerializeStates());
    for (int64_t i = first_chunk; i < num_chunks(); ++i) {
      ASSIGN_OR_RETURN(std::string blob, SerializeChunk(i));
      parts.chunks.emplace_back(i, std::move(blob));
    }
    if (num_chunks() > first_chunk) {
      ASSIGN_OR_RETURN(parts.landmarks, SerializeLandmarks(first_chunk, num_chunks()));
    }
    snap->parts_ = std::move(parts);
    return snap;
  }
  snap->copy_ = *std::move(copy);
  char* at = snap->copy_.as<char>();
  RETURN_IF_ERROR(backend_->Copy(at, recurrent_.data(), snap->state_bytes_));
  at += snap->state_bytes_;
  RETURN_IF_ERROR(backend_->Copy(at, chunk_buffer(), snap->buffer_bytes_));
  at += snap->buffer_bytes_;
  RETURN_IF_ERROR(
      backend_->Copy(at, landmarks_.as<const char>() + first_chunk * row_bytes, landmark_bytes));
  snap->chunks_.assign(chunks_.begin() + first_chunk, chunks_.end());
  ASSIGN_OR_RETURN(snap->fence_, backend_->RecordFence());
  return snap;
}

absl::StatusOr<SessionSnapshot::Parts> SessionSnapshot::Finish() {
  if (finished_) return absl::FailedPreconditionError("SessionSnapshot: finished already");
  finished_ = true;
  if (parts_.has_value()) return *std::move(parts_);
  RETURN_IF_ERROR(fence_->Wait());
  fence_.reset();
  kernels::Backend* be = backend_;
  Parts parts;
  const char* at = copy_.as<const char>();
  PartWriter states = StatesPart(config_, position_, num_chunks_);
  RETURN_IF_ERROR(be->DownloadSettled(states.Reserve(state_bytes_), at, state_bytes_));
  at += state_bytes_;
  RETURN_IF_ERROR(be->DownloadSettled(states.Reserve(buffer_bytes_), at, buffer_bytes_));
  at += buffer_bytes_;
  parts.states = states.Finish();
  const size_t chunk_bytes = config_.chunk_kv_floats() * sizeof(float);
  for (size_t i = 0; i < chunks_.size(); ++i) {
    const int64_t index = first_chunk_ + static_cast<int64_t>(i);
    PartWriter w = ChunkPart(config_, index);
    RETURN_IF_ERROR(be->DownloadSettled(w.Reserve(chunk_bytes), chunks_[i]->data(), chunk_bytes));
    parts.chunks.emplace_back(index, w.Finish());
  }
  if (!chunks_.empty()) {
    const int64_t n = static_cast<int64_t>(chunks_.size());
    const size_t bytes = n * config_.retrieval_dim * sizeof(float);
    PartWriter w = LandmarksPart(config_, first_chunk_, n);
    RETURN_IF_ERROR(be->DownloadSettled(w.Reserve(bytes), at, bytes));
    parts.landmarks = w.Finish();
  }
  copy_.Reset();
  chunks_.clear();
  return parts;
}

absl::StatusOr<std::string> SessionState::SerializeChunk(int64_t index) const {
  if (index < 0 || index >= num_chunks()) {
    return absl::OutOfRangeError(
        absl::StrCat("chunk ", index, " does not exist (session has ", num_chunks(), ")"));
  }
  PartWriter w = ChunkPart(config_, index);
  const size_t bytes = chunk_floats() * sizeof(float);
  RETURN_IF_ERROR(backend_->Download(w.Reserve(bytes), chunks_[index]->data(), bytes));
  return w.Finish();
}

absl::StatusOr<std::string> SessionState::SerializeLandmarks(int64_t begin, int64_t end) const {
  if (begin < 0 || end < begin || end > num_chunks()) {
    return absl::OutOfRangeError(absl::StrCat("landmark range [", begin, ", ", end,
                                              ") is outside [0, ", num_chunks(), ")"));
  }
  PartWriter w = LandmarksPart(config_, begin, end - begin);
  const size_t row_bytes = config_.retrieval_dim * sizeof(float);
  const size_t bytes = (end - begin) * row_bytes;
  RETURN_IF_ERROR(backend_->Download(w.Reserve(bytes), landmarks_.as<char>() + begin * row_bytes,
                                     bytes));
  return w.Finish();
}

absl::StatusOr<std::unique_ptr<SessionState>> SessionState::Deserialize(
    const ModelConfig& c, kernels::Backend* backend, std::string_view states,
    absl::Span<const std::string_view> chunks, absl::Span<const std::string_view> landmarks,
    int64_t device_chunk_window) {
  ASSIGN_OR_RETURN(std::unique_ptr<SessionState> s, Create(c, backend));
  PartReader r(states, "states part");
  RETURN_IF_ERROR(r.Open(StatePartKind::kStates));
  int64_t position = 0, n = 0;
  RETURN_IF_ERROR(r.Get(&position));
  RETURN_IF_ERROR(r.Get(&n));
  if (position < 0 || n != position / c.chunk_size) {
    return r.Error(absl::StrCat("has position ", position, " with ", n, " chunks"));
  }
  RETURN_IF_ERROR(r.Expect("num_mamba_layers", c.num_mamba_layers()));
  RETURN_IF_ERROR(r.Expect("conv_kernel", c.conv_kernel));
  RETURN_IF_ERROR(r.Expect("conv_dim", c.conv_dim()));
  RETURN_IF_ERROR(r.Expect("num_heads", c.num_heads));
  RETURN_IF_ERROR(r.Expect("head_dim", c.head_dim));
  RETURN_IF_ERROR(r.Expect("state_size", c.state_size));
  RETURN_IF_ERROR(r.Expect("chunk_size", c.chunk_size));
  RETURN_IF_ERROR(r.Expect("hidden_size", c.hidden_size));
  s->position_ = position;
  const size_t state_bytes =
      c.num_mamba_layers() * (s->conv_floats() + s->ssm_floats()) * sizeof(float);
  const size_t buffer_bytes = s->buffered_rows() * c.hidden_size * sizeof(float);
  ASSIGN_OR_RETURN(const char* sp, r.Bytes(state_bytes));
  RETURN_IF_ERROR(backend->Upload(s->recurrent_.data(), sp, state_bytes));
  ASSIGN_OR_RETURN(const char* bp, r.Bytes(buffer_bytes));
  RETURN_IF_ERROR(backend->Upload(s->chunk_buffer(), bp, buffer_bytes));
  RETURN_IF_ERROR(r.Done());

  if (static_cast<int64_t>(chunks.size()) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("states part has ", n, " chunks but ", chunks.size(), " chunk parts given"));
  }
  // Landmarks first (contiguous rows), then each chunk's K/V.
  RETURN_IF_ERROR(s->ReserveLandmarks(std::max<int64_t>(16, n)));
  const size_t row_bytes = c.retrieval_dim * sizeof(float);
  int64_t covered = 0;
  for (std::string_view part : landmarks) {
    PartReader lr(part, absl::StrCat("landmarks part at chunk ", covered));
    RETURN_IF_ERROR(lr.Open(StatePartKind::kLandmarks));
    int64_t begin = 0, count = 0;
    RETURN_IF_ERROR(lr.Get(&begin));
    RETURN_IF_ERROR(lr.Get(&count));
    RETURN_IF_ERROR(lr.Expect("retrieval_dim", c.retrieval_dim));
    if (begin != covered || count < 0 || begin + count > n) {
      return lr.Error(absl::StrCat("covers [", begin, ", ", begin + count, "), expected to start at ",
                                   covered, " within [0, ", n, ")"));
    }
    ASSIGN_OR_RETURN(const char* lp, lr.Bytes(count * row_bytes));
    RETURN_IF_ERROR(lr.Done());
    RETURN_IF_ERROR(backend->Upload(s->landmarks_.as<char>() + begin * row_bytes, lp,
                                    count * row_bytes));
    covered += count;
  }
  if (covered != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("landmark parts cover ", covered, " chunks, the states part has ", n));
  }
  const size_t kv_bytes = s->chunk_floats() * sizeof(float);
  for (int64_t i = 0; i < n; ++i) {
    PartReader cr(chunks[i], absl::StrCat("chunk part ", i));
    RETURN_IF_ERROR(cr.Open(StatePartKind::kChunk));
    RETURN_IF_ERROR(cr.Expect("chunk index", i));
    RETURN_IF_ERROR(cr.Expect("chunk_size", c.chunk_size));
    RETURN_IF_ERROR(cr.Expect("kv_dim", c.kv_dim()));
    ASSIGN_OR_RETURN(const char* kp, cr.Bytes(kv_bytes));
    RETURN_IF_ERROR(cr.Done());
    auto chunk = std::make_shared<ChunkKV>();
    const bool host_tier = device_chunk_window > 0 && i < n - device_chunk_window;
    if (host_tier) {
      ASSIGN_OR_RETURN(chunk->kv, backend->AllocateHostCopy(kp, kv_bytes));
    } else {
      ASSIGN_OR_RETURN(chunk->kv, backend->Allocate(kv_bytes));
      RETURN_IF_ERROR(backend->Upload(chunk->kv.data(), kp, kv_bytes));
    }
    s->chunk_ptrs_.push_back(chunk->data());
    s->host_chunks_ += host_tier ? 1 : 0;
    s->chunks_.push_back(std::move(chunk));
  }
  RETURN_IF_ERROR(s->SyncChunkTable(0));
  return s;
}

}  // namespace ramba
