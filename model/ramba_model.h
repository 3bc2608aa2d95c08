// The RAMba language model: weights on a backend plus prefill and decode over session states.
#ifndef RAMBA_MODEL_RAMBA_MODEL_H_
#define RAMBA_MODEL_RAMBA_MODEL_H_

#include <array>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "kernels/backend.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "model/sampler.h"
#include "model/session_state.h"
#include "model/weights.h"

namespace ramba {

// One of the most likely tokens at a sampled token's place, with its logprob under the raw
// distribution (Backend::TopLogprobs).
struct TopLogprob {
  int32_t id = -1;
  float logprob = 0.0f;
  bool operator==(const TopLogprob& o) const { return id == o.id && logprob == o.logprob; }
};

// Which rows of a forward pass produce logits.
enum class LogitsMode {
  kNone,  // no logits (intermediate prefill segments)
  kLast,  // the last token of every sequence: [num_seqs, vocab]
  kAll,   // every token: [total_tokens, vocab]
};

// Thread-safe: Forward calls are serialised internally (they share one scratch workspace and the
// backend). Weights are immutable after loading. The backend must outlive the model.
class RambaModel {
 public:
  // Loads config.json and model.safetensors from `model_dir`.
  static absl::StatusOr<std::unique_ptr<RambaModel>> Load(const std::string& model_dir,
                                                          kernels::Backend* backend);
  // Builds a model from tensors already in memory (tests, random-weight benchmarks).
  static absl::StatusOr<std::unique_ptr<RambaModel>> Create(ModelConfig config,
                                                            const TensorMap& tensors,
                                                            kernels::Backend* backend);

  ~RambaModel();

  const ModelConfig& config() const { return config_; }

  // Chunks per session whose K/V stay in backend memory: as chunks complete, older ones move to
  // the backend's host memory (SessionState::KeepChunksOnDevice). 0 (the default): all stay.
  // Set before use.
  void set_device_chunk_window(int64_t chunks) { device_chunk_window_ = chunks; }
  int64_t device_chunk_window() const { return device_chunk_window_; }
  // Backend memory a prefill (or any batch not run as a decode step) may use to copy the host-tier
  // chunks its rows select, once for all its HSA layers (Backend::StageSelectedHostChunks); chunks
  // beyond it are read in place. Set before use.
  void set_host_chunk_staging_bytes(int64_t bytes) { host_chunk_staging_bytes_ = bytes; }
  // Host-tier chunks each session keeps in backend memory for decode steps, as an LRU cache
  // (SessionState::EnsureChunkCache, Backend::StageHostChunks): a decode step copies over PCIe
  // only the picks its session's cache lacks. Used with a device chunk window; 0 (the default):
  // every host-tier pick is copied for its step only. Set before use.
  void set_device_chunk_cache(int64_t slots) { device_chunk_cache_ = slots; }
  // Chunk selections (row x retrieval head x top-k picks) of the steps that had host-tier chunks,
  // how many of them were in the host tier, and how many of those a decode step found in its
  // session's chunk cache: (selected - host + cached) / selected is the device tiers' hit
  // ratio. Cumulative since the model was made; counted on the backend and brought back with
  // the sampled tokens of the step that counted, so steps that sample nothing show later.
  struct ChunkTierCounts {
    uint64_t selected = 0;
    uint64_t host = 0;
    uint64_t cached = 0;
  };
  ChunkTierCounts chunk_tier_counts() const {
    absl::MutexLock lock(&mu_);
    return chunk_tier_counts_;
  }
  kernels::Backend* backend() const { return backend_; }

  // An empty session (position 0).
  absl::StatusOr<std::unique_ptr<SessionState>> NewSession() const;

  // Runs tokens[s] through the model on top of states[s] for every s (a ragged batch: prefill is
  // one long sequence, batched decode many one-token sequences), advancing each state. Logits
  // (float32, host memory) per `mode`. Token ids must be in [0, vocab_size): checked, and a bad id
  // leaves every state untouched. Empty token lists are allowed (that sequence is skipped).
  absl::Status Forward(absl::Span<SessionState* const> states,
                       absl::Span<const absl::Span<const int32_t>> tokens, LogitsMode mode,
                       std::vector<float>* logits);

  // Forward with LogitsMode::kLast, then one token per sequence drawn on the backend from its
  // last-token logits with options[s] (sampler.h: the uniform is keyed by the position the token
  // will take), so logits never leave the device: only the tokens are downloaded. Options are
  // validated before any state changes.
  //
  // With `logprobs`, (*logprobs)[s] is the natural log of sampled[s]'s probability under the raw
  // distribution (softmax of the logits, before temperature, top-k and top-p) for the sequences
  // with logprob_rows[s] set (one span entry per sequence), NaN for the others; only those rows'
  // logits are downloaded. With top_logprobs = n > 0 as well (n <= min(vocab,
  // Backend::kMaxTopLogprobs)), (*top)[s * n + j] is sequence s's j-th most likely token.
  absl::Status ForwardAndSample(absl::Span<SessionState* const> states,
                                absl::Span<const absl::Span<const int32_t>> tokens,
                                absl::Span<const SamplingOptions> options,
                                std::vector<int32_t>* sampled,
                                absl::Span<const bool> logprob_rows = {},
                                std::vector<float>* logprobs = nullptr, int top_logprobs = 0,
                                std::vector<TopLogprob>* top = nullptr);

  // Decode steps queued ahead of their results, so the device need not idle while the caller
  // handles a step's tokens (vLLM's async scheduling). LaunchDecode queues one step of one token
  // per session, sampled on the backend with options[s] as ForwardAndSample does, and returns
  // before it has run (a backend without graphs runs it inside the call); CollectDecode waits for
  // the oldest uncollected step and returns its tokens. `tokens` holds each session's input
  // token, or is empty to feed each session the token the previous launch sampled for it, still
  // on the device; that launch must have had the same sessions in the same order, none of them
  // fed since (other forward calls may come between). States advance at launch; at most
  // kMaxDecodesInFlight steps may be uncollected. Options and tokens are validated before any
  // state changes. With `logprobs`, every sampled token's logprob (as ForwardAndSample's) is
  // computed on the backend and comes back with the tokens; with top_logprobs = n > 0, each
  // row's n most likely tokens too (implies logprobs).
  static constexpr int kMaxDecodesInFlight = 2;
  absl::Status LaunchDecode(absl::Span<SessionState* const> states,
                            absl::Span<const int32_t> tokens,
                            absl::Span<const SamplingOptions> options, bool logprobs = false,
                            int top_logprobs = 0);
  // LaunchDecode's general form: tokens[s] (one or more, as ForwardAndSample takes them) for each
  // session, one token sampled per session; a later LaunchDecode without tokens may follow it.
  // `carried` (empty, or one entry per session) lets rows join, leave or move between launches
  // without waiting for the last one's tokens (vLLM's async scheduling): carried[s] >= 0 feeds
  // session s the token the last launch sampled for its row carried[s], still on the device; that
  // row's session must be states[s], not fed since, and tokens[s] must be empty. -1: tokens[s].
  absl::Status LaunchForward(absl::Span<SessionState* const> states,
                             absl::Span<const absl::Span<const int32_t>> tokens,
                             absl::Span<const SamplingOptions> options, bool logprobs = false,
                             absl::Span<const int32_t> carried = {}, int top_logprobs = 0);
  // Forward without logits (LogitsMode::kNone) that returns once the work is queued on the
  // backend instead of waiting for it, so a prompt's tokens can be fed beside launched decode
  // steps: a server runs the decode rows as one recorded step and the prompts' tokens here,
  // rather than all of them in one batch that cannot be recorded. Later calls (launches,
  // snapshots, downloads) are ordered after it on the backend.
  absl::Status Feed(absl::Span<SessionState* const> states,
                    absl::Span<const absl::Span<const int32_t>> tokens);
  // The oldest launched step's tokens and, when given, their logprobs (NaN when that launch
  // computed none) and each row's top_logprobs most likely tokens (rows * n entries, row-major;
  // empty when that launch asked for none).
  absl::Status CollectDecode(std::vector<int32_t>* sampled, std::vector<float>* logprobs = nullptr,
                             std::vector<TopLogprob>* top = nullptr);
  int decodes_in_flight() const;

  // Feeds `tokens` to one session in segments of at most `segment_tokens` (bounded scratch
  // memory; the result equals a single pass). Writes the last token's logits when `last_logits`
  // is non-null (and tokens is non-empty).
  absl::Status Prefill(SessionState* state, absl::Span<const int32_t> tokens,
                       std::vector<float>* last_logits, int64_t segment_tokens = 1024);

  // Runs a throwaway session through the paths whose first call on a backend costs the most (on a
  // GPU: kernel modules loaded at first launch, cuBLASLt's algorithm queries, the batch-1 decode
  // graph): a prefill that completes one chunk, then greedy single-token steps through the next
  // chunk's completion. Leaves other sessions untouched. Call it from the thread that will run
  // the model (the server's engine thread, before it listens): the CPU backend's OpenMP team
  // belongs to the calling thread, and a second team makes libgomp stop spinning.
  absl::Status Warmup();

  // One token for each of a batch of sessions; logits [num_states, vocab].
  absl::Status Decode(absl::Span<SessionState* const> states, absl::Span<const int32_t> tokens,
                      std::vector<float>* logits);

 private:
  struct Workspace;
  struct Batch;
  // Backend addresses a recorded graph's ops return (the decode step: its logits; the chunk
  // encoder: K, V and landmarks), kept with the graph for its replays.
  using GraphOutputs = std::array<float*, 3>;
  // (batch size, chunk bucket) for a decode step; (0, chunks) for the chunk encoder after one.
  // (batch size, chunk bucket, staging host-tier chunks) for a decode step; (0, chunks, false)
  // for the chunk encoder after one.
  using GraphKey = std::tuple<int64_t, int64_t, bool>;
  struct Graph {
    int64_t id = 0;
    uint64_t generation = 0;  // workspace + backend scratch generation at recording
    GraphOutputs outputs = {};
  };
  RambaModel(ModelConfig config, ModelWeights weights, kernels::Backend* backend);
  // A launched step awaiting CollectDecode: the download of its tokens, then its logprobs, then
  // each row's top_n most likely ids and their logprobs, then (after a step that counted chunk
  // tiers) the counts.
  static constexpr int64_t kTierWords = 2 * kernels::StagedChunks::kTierCounts;  // uint64 each
  struct LaunchedStep {
    int64_t ticket = -1;
    int64_t rows = 0;
    bool logprobs = false;     // every row's logprob follows the tokens
    int64_t top_n = 0;         // then top ids [rows, top_n], then their logprobs (logprobs set)
    bool tier_counts = false;  // the counts follow
    int64_t top_offset() const { return 2 * rows; }
    int64_t tier_offset() const { return 2 * rows + 2 * rows * top_n; }
    // 4-byte words of that download.
    int64_t words() const {
      if (!logprobs && !tier_counts) return rows;
      return tier_offset() + (tier_counts ? kTierWords : 0);
    }
  };
  // Where a forward pass's last-token logits go: downloaded, sampled on the backend, or both.
  struct Output {
    std::vector<float>* logits = nullptr;
    absl::Span<const SamplingOptions> options;  // sample when sampled != null
    std::vector<int32_t>* sampled = nullptr;
    absl::Span<const bool> logprob_rows;  // with logprobs: rows whose sampled token's logprob
    std::vector<float>* logprobs = nullptr;
    int64_t top_n = 0;  // with logprobs: each row's top_n most likely tokens into *top
    std::vector<TopLogprob>* top = nullptr;
    // With sampled: queue the tokens' download (launched->ticket, tier_counts set here) instead
    // of waiting for it (LaunchDecode), every row's logprob after the tokens when
    // launched->logprobs is set.
    LaunchedStep* launched = nullptr;
    // kNone: return once the work is queued instead of waiting for the backend (Feed).
    bool queue_only = false;
  };
  // Input tokens copied on the backend from the last launch's samples (LaunchForward's carried):
  // (sequence of this batch, whose one token it is; row of the last launch).
  struct CarriedTokens {
    const int32_t* from = nullptr;  // the last launch's sampled tokens (backend memory)
    std::vector<std::pair<int64_t, int64_t>> rows;
  };
  absl::Status ForwardLocked(absl::Span<SessionState* const> states,
                             absl::Span<const absl::Span<const int32_t>> tokens, LogitsMode mode,
                             const Output& output, const CarriedTokens& carried)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A decode batch through its recorded graph; `carried` rows read their tokens from the last
  // launch's samples instead of `tokens`.
  absl::Status DecodeStepLocked(absl::Span<SessionState* const> states,
                                const std::vector<int32_t>& tokens, const Output& output,
                                const CarriedTokens& carried) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Copies carried tokens into a batch's token array (`seq_offsets`: where each sequence's
  // tokens start), one copy per run of consecutive rows.
  absl::Status CopyCarried(const CarriedTokens& carried, const int64_t* seq_offsets,
                           const int32_t* tokens);
  // LaunchDecode and LaunchForward: host tokens and/or (carried[s] >= 0) the last launch's
  // samples; `chained`: LaunchDecode without tokens (the same sessions as the last launch).
  absl::Status LaunchStep(absl::Span<SessionState* const> states,
                          absl::Span<const absl::Span<const int32_t>> tokens,
                          absl::Span<const SamplingOptions> options,
                          absl::Span<const int32_t> carried, bool chained, bool logprobs,
                          int top_logprobs);
  // Downloads and/or samples `rows` rows of logits at backend address `out` (states advanced).
  absl::Status Deliver(absl::Span<SessionState* const> states, const float* out, int64_t rows,
                       const Output& output) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Stages of a forward pass (mu_ held).
  absl::Status PrepareBatch(absl::Span<SessionState* const> states,
                            const std::vector<int32_t>& tokens,
                            const std::vector<int64_t>& offsets, Batch* b);
  absl::Status LowerLayers(const Batch& b);
  absl::Status MambaBlocks(const Batch& b, int64_t first, int64_t count);
  // Runs `ops` through the graph recorded for `key`: eagerly the first time at that key (which
  // sizes every buffer), recorded the second, replayed after that; a graph whose buffers have
  // moved since it was recorded is recorded again.
  absl::StatusOr<GraphOutputs> RunGraphed(GraphKey key,
                                          absl::FunctionRef<absl::StatusOr<GraphOutputs>()> ops)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // One encoder input block at dst: a chunk's first `buffered` rows from a session's partial-chunk
  // buffer, its other chunk_size - buffered rows from `rows`, then the CLS row when the model has
  // one (encoder_block_len() rows of d in all).
  absl::Status GatherChunkBlock(float* dst, const float* buffer, int64_t buffered,
                                const float* rows);
  // The chunk encoder on X's new_chunks gathered blocks (EncodeChunkOps: K, V and landmarks in
  // the workspace), then block i appended to owners[i] (AppendEncoded).
  absl::Status EncodeChunks(float* X, int64_t new_chunks, absl::Span<SessionState* const> owners);
  absl::StatusOr<GraphOutputs> EncodeChunkOps(float* X, int64_t new_chunks);
  absl::Status AppendEncoded(const GraphOutputs& encoded, absl::Span<SessionState* const> owners);
  absl::Status UpperLayers(const Batch& b);
  absl::Status StageSelectedHostChunks(const Batch& b, const int32_t* idx,
                                       kernels::ChunkMemoryBatch* mem);
  absl::StatusOr<float*> Head(const float* src, int64_t rows);
  absl::Status MemoryBatch(absl::Span<SessionState* const> states,
                           const std::vector<int32_t>& row_seq, const std::vector<int64_t>& row_pos,
                           bool bucket, kernels::ChunkMemoryBatch* mem);
  static int64_t ChunkBucket(int64_t max_chunks);

  ModelConfig config_;
  ModelWeights weights_;
  kernels::Backend* backend_;
  int64_t device_chunk_window_ = 0;
  int64_t device_chunk_cache_ = 0;
  int64_t host_chunk_staging_bytes_ = int64_t{256} << 20;
  mutable absl::Mutex mu_;
  std::unique_ptr<Workspace> workspace_ ABSL_GUARDED_BY(mu_);
  // Recorded graphs (decode steps and the decode-time chunk encoder) by key, and keys already run
  // once eagerly.
  std::map<GraphKey, Graph> graphs_ ABSL_GUARDED_BY(mu_);
  std::set<GraphKey> seen_shapes_ ABSL_GUARDED_BY(mu_);
  // Launched steps awaiting CollectDecode, oldest first, and the last launch's sessions with
  // their positions after it (a chained launch must match them).
  std::deque<LaunchedStep> decodes_in_flight_ ABSL_GUARDED_BY(mu_);
  std::vector<std::pair<SessionState*, int64_t>> chain_ ABSL_GUARDED_BY(mu_);
  // Launches write their tokens to two workspace slots in turn, so that a launch with more rows
  // than the last can grow its own slot while it still reads the last one's tokens.
  int launch_parity_ ABSL_GUARDED_BY(mu_) = 0;
  // ChunkTierCounts on the backend ([kTierCounts] uint64: selected, host, cached; allocated and
  // zeroed by the first step that stages host-tier chunks, so never while a graph records),
  // whether a step counted since the last delivery, and the last values brought back.
  // TierCountsLocked hands the counters to a staging op and marks them for the next delivery.
  absl::StatusOr<uint64_t*> TierCountsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void TakeTierCounts(const int32_t* words) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A step's top logprobs from its download's words (layout: where they are).
  static void TakeTopLogprobs(const LaunchedStep& layout, const int32_t* words,
                              std::vector<TopLogprob>* top);
  kernels::Buffer tier_counts_buffer_ ABSL_GUARDED_BY(mu_);
  bool tier_counts_dirty_ ABSL_GUARDED_BY(mu_) = false;
  ChunkTierCounts chunk_tier_counts_ ABSL_GUARDED_BY(mu_);
  // A step's logits after logit bias, held-back tokens and penalties (Deliver), outside the
  // workspace since no graph reads them.
  kernels::Buffer penalized_logits_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ramba

#endif  // RAMBA_MODEL_RAMBA_MODEL_H_
