// Everything one RAMba session keeps between calls (spec section 6), resident on a backend, and its
// versioned serialisation into separately storable parts.
#ifndef RAMBA_MODEL_SESSION_STATE_H_
#define RAMBA_MODEL_SESSION_STATE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/backend.h"
#include "model/config.h"
#include "model/sampler.h"

namespace ramba {

// Keys and values of one completed chunk: K [chunk_size, kv_dim] followed by V [chunk_size,
// kv_dim], float32 in backend memory, or in the backend's host memory (Backend::AllocateHost,
// read in place) once it has moved to the host tier. Immutable once written, so forked sessions
// share it.
struct ChunkKV {
  kernels::Buffer kv;
  const float* data() const { return kv.as<const float>(); }
  bool host_tier() const { return kv.host(); }
};

// Serialised parts. Each part starts with a magic number, a format version and its kind, then its
// sizes, float32 little-endian payload and a CRC-32 of everything before it, so a reader can
// reject a part of another model shape or a corrupted one with a clear error.
enum class StatePartKind : uint16_t { kStates = 1, kChunk = 2, kLandmarks = 3 };
inline constexpr uint32_t kStatePartMagic = 0x53424D52;  // "RMBS" little-endian
inline constexpr uint16_t kStatePartVersion = 1;

// A session's parts for a commit as they stood when it was taken (SessionState::Snapshot), read
// later, on any thread, without waiting for the work the backend queued since.
class SessionSnapshot {
 public:
  struct Parts {
    std::string states;                                   // as SerializeStates
    std::vector<std::pair<int64_t, std::string>> chunks;  // (index, SerializeChunk(index))
    std::string landmarks;  // SerializeLandmarks over the chunks; empty when there are none
  };
  // Waits for the snapshot's copies and writes the parts. Once.
  absl::StatusOr<Parts> Finish();

 private:
  friend class SessionState;
  SessionSnapshot() = default;

  kernels::Backend* backend_ = nullptr;
  ModelConfig config_;
  int64_t position_ = 0, num_chunks_ = 0, first_chunk_ = 0;
  size_t state_bytes_ = 0, buffer_bytes_ = 0;
  kernels::Buffer copy_;  // states, buffer rows, landmark rows of the new chunks
  std::vector<std::shared_ptr<const ChunkKV>> chunks_;  // immutable: read where they are
  std::unique_ptr<kernels::Backend::Fence> fence_;
  std::optional<Parts> parts_;  // serialised at once: no backend memory was left for copies
  bool finished_ = false;
};

// Per-session model state. Not thread-safe: one writer at a time (the server's session lock).
// The backend must outlive the state.
class SessionState {
 public:
  static absl::StatusOr<std::unique_ptr<SessionState>> Create(const ModelConfig& config,
                                                              kernels::Backend* backend);

  // Tokens consumed so far.
  int64_t position() const { return position_; }
  // Completed chunks in the chunk memory (== position / chunk_size).
  int64_t num_chunks() const { return static_cast<int64_t>(chunks_.size()); }
  // Lower-decoder outputs buffered for the current partial chunk.
  int64_t buffered_rows() const { return position_ % config_.chunk_size; }
  const ModelConfig& config() const { return config_; }
  kernels::Backend* backend() const { return backend_; }

  // A new state equal to this one. Recurrent states and landmarks are copied; chunk K/V are
  // shared (they are immutable), so a fork costs O(states + landmarks), not O(context).
  absl::StatusOr<std::unique_ptr<SessionState>> Fork() const;

  // ---- Serialisation ----
  // Position, every Mamba layer's conv and SSM state, the partial-chunk buffer, the chunk count.
  absl::StatusOr<std::string> SerializeStates() const;
  // K/V of chunk `index` (0 <= index < num_chunks()).
  absl::StatusOr<std::string> SerializeChunk(int64_t index) const;
  // Landmarks of chunks [begin, end).
  absl::StatusOr<std::string> SerializeLandmarks(int64_t begin, int64_t end) const;
  // SerializeStates and, for chunks [first_chunk, num_chunks()), SerializeChunk and
  // SerializeLandmarks, as this state stands once the work queued so far has run, without
  // waiting for it: the mutable parts are copied in queue order, the immutable chunks held.
  // SessionSnapshot::Finish writes them later, on any thread; the state may go on meanwhile.
  // The server's engine thread takes one when a request ends, so it never waits for the step in
  // flight to serialise a session. When the backend has no memory left for the copies, the parts
  // are serialised at once instead (waiting for the queued work), so a commit never fails for
  // want of the snapshot's memory.
  absl::StatusOr<std::unique_ptr<SessionSnapshot>> Snapshot(int64_t first_chunk) const;

  // Rebuilds a state from its parts: `states`, then `chunks` for indices 0..n-1 in order, and
  // landmark parts that together cover [0, n) in order (n = the chunk count in `states`). Any
  // mismatch (other model shape, missing or extra chunk, bad checksum) is an error naming it.
  // With device_chunk_window > 0, all chunks but the newest that many go to the host tier (see
  // KeepChunksOnDevice) straight away.
  static absl::StatusOr<std::unique_ptr<SessionState>> Deserialize(
      const ModelConfig& config, kernels::Backend* backend, std::string_view states,
      absl::Span<const std::string_view> chunks, absl::Span<const std::string_view> landmarks,
      int64_t device_chunk_window = 0);

  // ---- Tiers ----
  // Moves the K/V of every chunk but the newest `window` to the backend's host memory, where
  // ops read them in place (on a GPU, over PCIe: a decode step reads only its top-K chunks), so
  // backend memory per session stays bounded however long the session grows. Landmarks stay.
  // window <= 0: nothing moves. A chunk shared with a fork is copied; the fork keeps its own.
  absl::Status KeepChunksOnDevice(int64_t window);
  // Chunks [0, host_chunks()) are in the host tier.
  int64_t host_chunks() const { return host_chunks_; }
  // A cache of `slots` host-tier chunks in backend memory, which decode steps keep as an LRU
  // (Backend::StageHostChunks; ChunkCacheRows gives its layout): made empty on first use or
  // when the size changes; not copied by Fork nor serialised (a fork or a restored session
  // starts cold); slots <= 0 frees it.
  absl::Status EnsureChunkCache(int64_t slots);
  float* chunk_cache_blocks() const { return cache_blocks_.as<float>(); }
  int32_t* chunk_cache_tags() const { return cache_tags_.as<int32_t>(); }
  int64_t chunk_cache_slots() const { return cache_slots_; }

  // ---- Generation scratch ----
  // What sampling keeps on the backend for the generation in progress. Not copied by Fork nor
  // serialised (a generation does not outlive its request); null until set, and again after
  // ReleaseGenerationScratch (work already queued keeps its memory).
  // Token counts, for repetition penalties and held-back tokens: [vocab] int32 in
  // kernels::PenaltyParams' layout, zero but for `prompt`'s tokens marked as the prompt's and
  // `held_back`'s as held back (ids outside [0, vocab) are an error); steps sampling with
  // penalties count their tokens.
  absl::Status ResetTokenCounts(absl::Span<const int32_t> prompt,
                                absl::Span<const int32_t> held_back = {});
  int32_t* token_counts() const { return token_counts_.as<int32_t>(); }
  // Logit bias: [vocab] floats, zero but for `bias`'s entries (valid: ValidateLogitBias).
  absl::Status SetLogitBias(absl::Span<const LogitBias> bias);
  const float* logit_bias() const { return logit_bias_.as<float>(); }
  void ReleaseGenerationScratch() {
    token_counts_.Reset();
    logit_bias_.Reset();
  }

  // ---- Access for the model's forward pass (backend memory) ----
  float* conv_state(int64_t layer) const;  // [conv_kernel - 1, conv_dim]
  float* ssm_state(int64_t layer) const;   // [num_heads, head_dim, state_size]
  float* chunk_buffer() const;             // [chunk_size, hidden]
  const float* landmarks() const;          // [num_chunks, retrieval_dim]
  // Pointers to every chunk's K/V block, index = chunk number (host copy).
  const std::vector<const float*>& chunk_pointers() const { return chunk_ptrs_; }
  // The same table in backend memory, kept in step with the chunks, so a batch passes one
  // pointer per session instead of uploading O(context) pointers every step.
  const float* const* chunk_table() const { return chunk_table_.as<const float* const>(); }
  // Appends a chunk whose K/V block and landmark row are already in backend memory.
  absl::Status AppendChunk(std::shared_ptr<const ChunkKV> chunk, const float* landmark);
  void AdvancePosition(int64_t n) { position_ += n; }
  int64_t chunk_floats() const { return config_.chunk_kv_floats(); }

 private:
  SessionState(const ModelConfig& config, kernels::Backend* backend);
  absl::Status Init();
  absl::Status ReserveLandmarks(int64_t chunks);
  // Grows the backend chunk table to hold `chunks` entries and uploads chunk_ptrs_[from, n).
  absl::Status SyncChunkTable(int64_t from);
  int64_t conv_floats() const { return (config_.conv_kernel - 1) * config_.conv_dim(); }
  int64_t ssm_floats() const {
    return config_.num_heads * config_.head_dim * config_.state_size;
  }
  // Every Mamba layer's conv and SSM state (recurrent_ holds them, then the chunk buffer).
  int64_t state_floats() const {
    return config_.num_mamba_layers() * (conv_floats() + ssm_floats());
  }
  int64_t recurrent_floats() const;

  ModelConfig config_;
  kernels::Backend* backend_;
  int64_t position_ = 0;
  // One allocation: [layers][conv] then [layers][ssm] then the chunk buffer.
  kernels::Buffer recurrent_;
  kernels::Buffer landmarks_;  // capacity landmark_capacity_ rows
  int64_t landmark_capacity_ = 0;
  std::vector<std::shared_ptr<const ChunkKV>> chunks_;
  std::vector<const float*> chunk_ptrs_;
  int64_t host_chunks_ = 0;      // chunks_[0, host_chunks_) are in the host tier
  kernels::Buffer chunk_table_;  // capacity chunk_table_capacity_ pointers
  int64_t chunk_table_capacity_ = 0;
  kernels::Buffer cache_blocks_, cache_tags_;  // EnsureChunkCache
  int64_t cache_slots_ = 0;
  kernels::Buffer token_counts_;  // ResetTokenCounts
  kernels::Buffer logit_bias_;    // SetLogitBias
};

}  // namespace ramba

#endif  // RAMBA_MODEL_SESSION_STATE_H_
