// The narrow compute interface RAMba runs on. A backend owns memory (host memory for the CPU
// backend, device memory for CUDA) and implements every op the model needs on that memory.
// The model is written once against this interface; the CPU backend (kernels/cpu/) is the
// reference and CI's only backend, the CUDA backend (kernels/cuda/) implements the same ops.
//
// Conventions shared by every op:
//  - Activations are float32, row-major. `ld*` arguments are row strides in elements, so an op can
//    read a column slice of a wider matrix (e.g. z | xBC | dt inside the in_proj output) in place.
//  - Every pointer argument, including index and pointer arrays, points into this backend's memory
//    (Allocate / Upload). Small parameter structs are passed by value from the host.
//  - A batch is ragged: sequence s owns rows [seq_offsets[s], seq_offsets[s+1]). Prefill is one
//    sequence of many rows; batched decode is many sequences of one row each; both go through the
//    same ops.
//  - Ops are asynchronous with respect to the host on backends that can be (CUDA); results are
//    visible after Synchronize() or a Download(). They return an error instead of crashing.
// One thread drives a backend instance (the engine thread in server/): ops, graphs, Synchronize.
// Memory calls on distinct buffers (Allocate, Free, Upload, Download, Copy, Zero) may also come
// from other threads (the server creates and pages in sessions on its RPC threads); they never
// become part of a graph the driving thread is recording.
#ifndef RAMBA_KERNELS_BACKEND_H_
#define RAMBA_KERNELS_BACKEND_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ramba::kernels {

enum class DType : uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2 };
size_t DTypeSize(DType t);
std::string_view DTypeName(DType t);

// bf16 / f16 <-> f32 conversions used by loaders and backends (round-to-nearest-even on narrowing).
float Bf16ToF32(uint16_t v);
uint16_t F32ToBf16(float v);
float F16ToF32(uint16_t v);
uint16_t F32ToF16(float v);

class Backend;

// Backend memory, released through its backend when destroyed. Move-only; empty when default
// constructed. The Backend must outlive every Buffer it allocated.
class Buffer {
 public:
  Buffer() = default;
  // Counted in owner->held_bytes(), or with `host` in owner->host_held_bytes() and freed by
  // FreeHost (Backend::AllocateHost).
  Buffer(Backend* owner, void* data, size_t bytes, bool host = false);
  ~Buffer() { Reset(); }
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void Reset();
  void* data() const { return data_; }
  size_t size() const { return bytes_; }
  bool empty() const { return data_ == nullptr; }
  bool host() const { return host_; }
  template <class T>
  T* as() const { return static_cast<T*>(data_); }

 private:
  friend class Backend;
  // Uncounts and gives up the memory without freeing it (Backend::AllocateHost's default).
  void* Release();

  Backend* owner_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
  bool host_ = false;
};

// A matrix in backend memory, row-major [rows, cols]. A Linear weight is [out_features, in_features].
struct MatrixView {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;
};

// Mamba-2 selective-state-space parameters of one layer (all in backend memory, float32).
struct SsmParams {
  const float* A_log = nullptr;    // [nheads]; A = -exp(A_log)
  const float* D = nullptr;        // [nheads]
  const float* dt_bias = nullptr;  // [nheads]
  int64_t nheads = 0;
  int64_t headdim = 0;
  int64_t d_state = 0;
  int64_t ngroups = 0;  // head h uses B/C group h / (nheads / ngroups)
  float dt_min = 0.0f;  // softplus(dt + dt_bias) is clamped to [dt_min, dt_max]
  float dt_max = 0.0f;  // (0, +inf) means no clamp
};

// Per-row view of every sequence's chunk memory, for retrieval and sparse attention.
struct ChunkMemoryBatch {
  const int32_t* row_seq = nullptr;        // [rows] sequence index of each row
  const int64_t* row_position = nullptr;   // [rows] absolute token position of each row
  const float* const* landmarks = nullptr; // [num_seqs] -> [num_chunks[s], retrieval_dim]
  const int64_t* num_chunks = nullptr;     // [num_seqs] chunks stored per sequence
  // [num_seqs] -> [num_chunks[s]] -> one chunk: K [chunk_size, kv_heads, head_dim] followed by
  // V [chunk_size, kv_heads, head_dim]. A table of pointers lets chunks live anywhere (and be
  // shared between forked sessions) without copying.
  const float* const* const* chunk_kv = nullptr;
  // Host-side bound on num_chunks[s] over the batch, so device backends can size their grids
  // without reading device memory; -1 when unknown (the CPU backend ignores it).
  int64_t max_num_chunks = -1;
  // Host-side count of sequences (entries of landmarks / num_chunks / chunk_kv); -1 when unknown.
  // With max_num_chunks it lets a device backend size per-(sequence, chunk) scratch.
  int64_t num_seqs = -1;
};

// Each decode row's session cache of host-tier chunks (SessionState::chunk_cache), in backend
// memory, for Backend::StageHostChunks. Its tags: [slots] chunk index + 1 per slot (0: empty),
// [slots] the slot's last use, [1] the row's use clock; all zero when the cache is new.
struct ChunkCacheRows {
  float* const* blocks = nullptr;  // [rows] -> [slots, chunk_floats]; null entry: no cache
  int32_t* const* tags = nullptr;  // [rows] -> [2 * slots + 1]
  int64_t slots = 0;               // per cache; 0: no caches
  static int64_t TagWords(int64_t slots) { return 2 * slots + 1; }
  // The most slots a cache may have (the CUDA staging keeps a row's tags in shared memory).
  static constexpr int64_t kMaxSlots = 4096;
};

// Backend memory for Backend::StageHostChunks, for `slots` = rows * heads * top_k entries.
struct StagedChunks {
  float* blocks = nullptr;                // [slots, chunk_floats] copies of host-tier chunks
  const float** slots = nullptr;          // [slots] each slot's chunk
  const float* const** tables = nullptr;  // [rows] row r's table: slots + r * heads * top_k
  int64_t* num_chunks = nullptr;          // [rows] heads * top_k
  int32_t* indices = nullptr;             // [rows, heads, top_k] slot numbers; -1 kept
  // Optional [kTierCounts], backend memory: += the step's selections (indices >= 0), += those in
  // the host tier, += those of them found in a row's chunk cache (the device tiers' hit ratio for
  // operators; RambaModel::chunk_tier_counts).
  uint64_t* tier_counts = nullptr;
  static constexpr int kTierCounts = 3;
  // Optional: the rows' chunk caches, kept as LRUs across steps (see StageHostChunks).
  ChunkCacheRows cache;
  int32_t* copies = nullptr;  // [slots] scratch when `cache` is set
};

// Backend memory for Backend::StageSelectedHostChunks. The offsets (prefix sums over the batch's
// sequences) and the totals beside them are computed by the caller, which knows each sequence's
// chunk counts.
struct StagedChunkTables {
  float* blocks = nullptr;                 // [capacity, chunk_floats] copies of host-tier chunks
  int64_t capacity = 0;                    // chunks `blocks` holds
  const int64_t* host_offsets = nullptr;   // [num_seqs + 1] prefix sums of the host-tier counts
  int64_t total_host = 0;                  // host_offsets[num_seqs], host-side
  int32_t* picks = nullptr;                // [total_host] scratch: picks, then staging slots
  const float** sources = nullptr;         // [capacity] scratch
  int32_t* staged = nullptr;               // [1] chunks staged
  const int64_t* table_offsets = nullptr;  // [num_seqs + 1] prefix sums of num_chunks
  const float** entries = nullptr;         // [table_offsets[num_seqs]] the new tables' entries
  const float* const** tables = nullptr;   // [num_seqs] sequence s's table: entries + offset
  uint64_t* tier_counts = nullptr;         // optional [kTierCounts], as StagedChunks::tier_counts
                                           // (no chunk caches here: the third stays)
};

// One layer's Mamba-2 mixer: everything after in_proj, optionally through out_proj
// (Backend::MambaMixer). rows = host_seq_offsets[num_seqs] - host_seq_offsets[0];
// d_inner = nheads * headdim; conv_dim = d_inner + 2 * ngroups * d_state.
struct MambaMixerArgs {
  const float* zxbcdt = nullptr;  // [rows, ...]: z [d_inner] | xBC [conv_dim] | dt [nheads]
  int64_t ld = 0;                 // row stride of zxbcdt
  const int64_t* seq_offsets = nullptr;
  const int64_t* host_seq_offsets = nullptr;  // host copy (required by device backends)
  int64_t num_seqs = 0;
  float* const* conv_states = nullptr;  // [num_seqs] -> [conv_kernel - 1, conv_dim]
  const float* conv_weight = nullptr;   // [conv_dim, conv_kernel]
  const float* conv_bias = nullptr;     // [conv_dim] or null
  int64_t conv_kernel = 0;
  float* const* ssm_states = nullptr;   // [num_seqs] -> [nheads, headdim, d_state]
  SsmParams ssm;
  const float* norm_weight = nullptr;   // [d_inner], the gated norm's weight
  int64_t norm_group_size = 0;
  float eps = 0.0f;
  float* xbc = nullptr;  // scratch [rows, conv_dim]: conv output
  float* y = nullptr;    // scratch [rows, d_inner]: SSM output
  float* g = nullptr;    // output [rows, d_inner]: the gated, normed values out_proj reads
  // Optional out projection (out_proj.data non-null): the op ends with
  // out[rows, out_proj.rows] += g * out_proj^T (row stride ld_out; the residual stream) through
  // GatedRmsNormMatmul, and g is then scratch that a backend may leave unwritten.
  MatrixView out_proj;
  float* out = nullptr;
  int64_t ld_out = 0;
};

// One Mamba decoder block on the residual stream h = mixer.out (row stride mixer.ld_out, the
// mixer's rows): h += out_proj(mixer(in_proj(RmsNorm(h)))). mixer.out_proj must be set;
// mixer.zxbcdt is in_proj's output (scratch here, written by the op).
struct MambaBlockArgs {
  const float* norm_weight = nullptr;  // [in_proj.cols], the block's RMSNorm weight
  float eps = 0.0f;
  MatrixView in_proj;    // [in_proj width, d]
  float* xn = nullptr;   // scratch [rows, ld_out]: the normed rows, for backends that need them
  MambaMixerArgs mixer;  // zxbcdt non-const through the op: see above
};

// One HSA decoder block on the residual stream h (row stride ldh, `rows` rows):
// h += o_proj(SparseChunkAttention(q_proj(RmsNorm(h)))), reading the chunks and weights that
// retrieval picked for each row (the SparseChunkAttention arguments below).
struct HsaBlockArgs {
  float* h = nullptr;
  int64_t ldh = 0;
  int64_t rows = 0;
  const float* norm_weight = nullptr;  // [q_proj.cols], the block's pre-attention RMSNorm
  float eps = 0.0f;
  MatrixView q_proj;  // [nh * hd, d]
  MatrixView o_proj;  // [d, nh * hd]
  ChunkMemoryBatch mem;
  const int32_t* indices = nullptr;  // [rows, retrieval_heads, top_k]
  const float* weights = nullptr;    // [rows, retrieval_heads, top_k]
  int64_t retrieval_heads = 0;
  int64_t top_k = 0;
  int64_t nh = 0;
  int64_t nkv = 0;
  int64_t hd = 0;
  int64_t chunk_size = 0;
  // Scratch [rows, ldh], [rows, nh * hd], [rows, nh * hd] for backends that run the three ops;
  // a backend fusing them may leave them unwritten.
  float* xn = nullptr;
  float* q = nullptr;
  float* attn = nullptr;
};

// Sampling parameters of one row. temperature == 0 means greedy (argmax, lowest id on ties).
struct SamplingParams {
  float temperature = 1.0f;
  int32_t top_k = 0;    // 0: no top-k filter
  float top_p = 1.0f;   // 1: no nucleus filter
  float min_p = 0.0f;   // 0: no min-p filter
};

// What one row's logits go through before sampling (vLLM's order): its logit bias, its held-back
// tokens, its repetition penalties. counts is the row's generation's token counts, [vocab] int32
// in backend memory: the low bits count the times the token was generated (kGeneratedMask),
// kPromptTokenBit marks a token of the prompt, kHeldBackBit one that may not be sampled while
// hold_back is set (a request's stop tokens before its min_tokens). For token t with generated
// count c, logit l:
//   l += bias[t] (bias: [vocab] floats in backend memory, or null);
//   if hold_back and t is marked held back: l = -inf;
//   if c > 0 or t is in the prompt: l = l > 0 ? l / repetition : l * repetition;
//   l -= frequency * c + (c > 0 ? presence : 0).
// counts == nullptr: no penalties (and hold_back must be false); with bias also null the row is
// copied as it is.
struct PenaltyParams {
  static constexpr int32_t kPromptTokenBit = 1 << 30;
  static constexpr int32_t kHeldBackBit = 1 << 29;
  static constexpr int32_t kGeneratedMask = kHeldBackBit - 1;
  int32_t* counts = nullptr;
  float presence = 0.0f;    // 0: off
  float frequency = 0.0f;   // 0: off
  float repetition = 1.0f;  // 1: off; > 0
  const float* bias = nullptr;
  bool hold_back = false;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string_view name() const = 0;
  // True when backend memory is ordinary host memory (the CPU backend): callers may then read and
  // write it directly instead of Upload/Download.
  virtual bool host_accessible() const = 0;
  // The dtype the model converts weight matrices to when loading onto this backend.
  virtual DType weight_dtype() const = 0;

  // ---- Memory ----
  virtual absl::StatusOr<Buffer> Allocate(size_t bytes) = 0;
  virtual absl::Status Upload(void* dst, const void* host_src, size_t bytes) = 0;
  virtual absl::Status Download(void* host_dst, const void* src, size_t bytes) = 0;
  virtual absl::Status Copy(void* dst, const void* src, size_t bytes) = 0;
  virtual absl::Status Zero(void* dst, size_t bytes) = 0;
  // Asynchronous download, so a caller can queue more work before it needs a result:
  // BeginDownload queues a copy of `bytes` (at most kMaxAsyncDownloadBytes) from src behind the
  // work already queued and returns a ticket; FinishDownload waits for that copy and puts its
  // bytes at host_dst. Tickets finish in the order they began, at most kMaxAsyncDownloads at once.
  // This default copies at once (a backend whose ops run before they return).
  static constexpr size_t kMaxAsyncDownloadBytes = size_t{64} << 10;
  static constexpr int kMaxAsyncDownloads = 4;
  virtual absl::StatusOr<int64_t> BeginDownload(const void* src, size_t bytes);
  virtual absl::Status FinishDownload(int64_t ticket, void* host_dst);
  // Host memory that ops read in place, for data they read sparsely (older chunks' K/V), counted
  // by host_held_bytes(): a GPU backend's is pinned and mapped (read over PCIe); this default,
  // for backends whose memory is host memory, is Allocate's, counted apart.
  virtual absl::StatusOr<Buffer> AllocateHost(size_t bytes);
  // The same, holding a copy of `bytes` at host_src (a restored chunk's K/V). This default
  // uploads; a backend whose host memory the host can write writes it directly, without a copy
  // call per block.
  virtual absl::StatusOr<Buffer> AllocateHostCopy(const void* host_src, size_t bytes);
  // Bytes in Buffers this backend allocated and that are alive: weights, session states and
  // chunk memories, workspaces (not the CUDA backend's internal scratch and staging). Any thread.
  int64_t held_bytes() const { return held_bytes_.load(std::memory_order_relaxed); }
  // The same for AllocateHost's memory.
  int64_t host_held_bytes() const { return host_held_bytes_.load(std::memory_order_relaxed); }
  virtual absl::Status Synchronize() = 0;
  // A point in the queued work (not recorded into a graph); Wait, on any thread, returns once
  // the work queued before it has run. With DownloadSettled, another thread can read what that
  // work wrote without waiting for the work queued since. This default, for backends whose ops
  // run before they return, has passed.
  class Fence {
   public:
    virtual ~Fence() = default;
    virtual absl::Status Wait() { return absl::OkStatus(); }
  };
  virtual absl::StatusOr<std::unique_ptr<Fence>> RecordFence();
  // Download of memory that no queued or later work writes (its writers passed a Fence that was
  // waited for): unlike Download it does not wait for the queued work. Any thread. This default
  // is Download.
  virtual absl::Status DownloadSettled(void* host_dst, const void* src, size_t bytes);

  // ---- Ops ----
  // out[i, :] = table[tokens[i], :] (converted to f32). Token ids must be < table.rows.
  virtual absl::Status Embed(const int32_t* tokens, int64_t n, MatrixView table, float* out) = 0;

  // y[m, n] = x[m, k] * w^T (+ bias[n] when bias is non-null); with accumulate, y += that.
  // k = w.cols, n = w.rows.
  virtual absl::Status Matmul(const float* x, int64_t ldx, int64_t m, MatrixView w,
                              const float* bias, float* y, int64_t ldy, bool accumulate) = 0;

  // y[m, n] = RmsNorm(x; norm_weight, eps) * w^T, k = w.cols: the norm of the rows of x feeding a
  // projection (a layer's in_proj, the LM head). xn [m, k] with row stride ldx is scratch: the
  // default runs RmsNorm into it and then Matmul; a backend may fuse the two (same values) and
  // leave xn unwritten.
  virtual absl::Status RmsNormMatmul(const float* x, int64_t ldx, int64_t m,
                                     const float* norm_weight, float eps, float* xn, MatrixView w,
                                     float* y, int64_t ldy);

  // out[m, n] (+)= GatedRmsNorm(y, z; norm_weight, group_size, eps) * w^T, dim = w.cols: the
  // Mamba gated norm feeding out_proj. g [m, dim] (row stride dim) is scratch, as xn is for
  // RmsNormMatmul: the default runs GatedRmsNorm into it and then Matmul.
  virtual absl::Status GatedRmsNormMatmul(const float* y, int64_t ldy, const float* z,
                                          int64_t ldz, const float* norm_weight,
                                          int64_t group_size, float eps, int64_t m, float* g,
                                          MatrixView w, float* out, int64_t ldo, bool accumulate);

  // y = x * rsqrt(mean(x^2) + eps) * weight, per row of `dim` values. y may alias x.
  virtual absl::Status RmsNorm(const float* x, int64_t ldx, const float* weight, float* y,
                               int64_t ldy, int64_t rows, int64_t dim, float eps) = 0;

  // Mamba-2 gated norm, gate first: g = y * silu(z); out = g * rsqrt(mean_group(g^2) + eps) * weight,
  // the mean taken over consecutive groups of `group_size` channels (group_size == dim: one group).
  virtual absl::Status GatedRmsNorm(const float* y, int64_t ldy, const float* z, int64_t ldz,
                                    const float* weight, float* out, int64_t ldo, int64_t rows,
                                    int64_t dim, int64_t group_size, float eps) = 0;

  // y[i] += x[i] for i < n.
  virtual absl::Status Add(float* y, const float* x, int64_t n) = 0;

  // out[i] = silu(gate[i]) * up[i] for i < n. out may alias gate or up.
  virtual absl::Status SwiGlu(const float* gate, const float* up, float* out, int64_t n) = 0;

  // out[b, :] = mean over r < block_len of x[b * block_len + r, :], for b < num_blocks.
  virtual absl::Status BlockMean(const float* x, int64_t num_blocks, int64_t block_len,
                                 int64_t dim, float* out) = 0;

  // Depthwise causal conv1d + bias + SiLU over a ragged batch, continuing each sequence's state.
  // x: [rows, channels] (stride ldx); conv_states[s]: [kernel - 1, channels], oldest row first,
  // updated in place to the last kernel - 1 inputs; weight: [channels, kernel]; bias: [channels]
  // or null; y: [rows, channels] contiguous. host_seq_offsets, when given, is a host copy of
  // seq_offsets: device backends size their grids from it (the CUDA backend requires it).
  virtual absl::Status CausalConv1dSilu(const float* x, int64_t ldx, const int64_t* seq_offsets,
                                        int64_t num_seqs, float* const* conv_states,
                                        const float* weight, const float* bias, int64_t channels,
                                        int64_t kernel, float* y,
                                        const int64_t* host_seq_offsets = nullptr) = 0;

  // Mamba-2 SSM over a ragged batch, continuing each sequence's state. Per row and head h:
  //   dt = clamp(softplus(dt_raw[h] + dt_bias[h])), S = exp(dt * A) * S + dt * x (outer) B,
  //   y = S C + D * x.
  // xbc: [rows, nheads*headdim + 2*ngroups*d_state] laid out x | B | C (stride ldxbc);
  // dt_raw: [rows, nheads] (stride lddt); ssm_states[s]: [nheads, headdim, d_state], updated;
  // y: [rows, nheads*headdim] contiguous. Must equal the token-by-token recurrence.
  // host_seq_offsets: as for CausalConv1dSilu.
  virtual absl::Status SsmScan(const float* xbc, int64_t ldxbc, const float* dt_raw, int64_t lddt,
                               const int64_t* seq_offsets, int64_t num_seqs,
                               float* const* ssm_states, const SsmParams& p, float* y,
                               const int64_t* host_seq_offsets = nullptr) = 0;

  // CausalConv1dSilu on the xBC columns, SsmScan, then GatedRmsNorm with z, as one op so that
  // device backends can fuse the three for decode steps. The default runs the three ops (and
  // uses the xbc and y scratch); results equal theirs up to summation order in the norm.
  virtual absl::Status MambaMixer(const MambaMixerArgs& a);

  // Consecutive Mamba decoder blocks, in order (each reads the residual stream the one before it
  // wrote), as one op so that device backends can run a decode step's stack as one kernel. The
  // default runs RmsNormMatmul into each block's zxbcdt, then MambaMixer.
  virtual absl::Status MambaBlocks(const MambaBlockArgs* blocks, int64_t count);

  // One HSA decoder block (HsaBlockArgs), as one op so that device backends can fuse a decode
  // step's q_proj, sparse attention and o_proj. The default runs RmsNormMatmul into q,
  // SparseChunkAttention into attn, then Matmul accumulating into h.
  virtual absl::Status HsaBlock(const HsaBlockArgs& a);

  // Rotary embedding, rotate-half convention, in place on x [rows, heads * head_dim]; the position
  // of row r is r % period (positions restart at 0 in every chunk). inv_freq_i = theta^(-2i/head_dim).
  virtual absl::Status RopeInChunk(float* x, int64_t rows, int64_t heads, int64_t head_dim,
                                   int64_t period, float theta) = 0;

  // Bidirectional softmax attention inside independent blocks of block_len rows (one chunk plus
  // its CLS row each). q, out: [num_blocks * block_len, nh * hd]; k, v: [.., nkv * hd];
  // query head h reads kv head h / (nh / nkv); scale 1 / sqrt(hd).
  virtual absl::Status BlockAttention(const float* q, const float* k, const float* v, float* out,
                                      int64_t num_blocks, int64_t block_len, int64_t nh,
                                      int64_t nkv, int64_t hd) = 0;

  // Landmark retrieval for every row: r [rows, retrieval_dim] is split into `heads` equal parts,
  // as are the landmarks. Chunk c is eligible for a row at position t iff (c + 1) * chunk_size <= t
  // and c < num_chunks. Keeps the top min(top_k, eligible) chunks by score r.l / sqrt(dim / heads),
  // orders them by chunk index descending (most recent first), and computes stick-breaking
  // weights in fp32: w_j = sigmoid(s_j) * prod_{i<j} (1 - sigmoid(s_i)).
  // indices, weights: [rows, heads, top_k]; unused slots get index -1 and weight 0.
  virtual absl::Status RetrieveChunks(const float* r, int64_t rows, const ChunkMemoryBatch& mem,
                                      int64_t retrieval_dim, int64_t heads, int64_t top_k,
                                      int64_t chunk_size, int32_t* indices, float* weights) = 0;

  // Sparse chunk attention: for row r and query head h (kv head g = h / (nh / nkv), retrieval
  // head e = g * retrieval_heads / nkv):
  //   out[r, h] = sum_j weights[r, e, j] * softmax(q[r, h] . K_c / sqrt(hd)) V_c,
  //   c = indices[r, e, j], over the chunk's chunk_size keys; slots with index -1 add nothing.
  // q, out: [rows, nh * hd].
  virtual absl::Status SparseChunkAttention(const float* q, int64_t rows,
                                            const ChunkMemoryBatch& mem, const int32_t* indices,
                                            const float* weights, int64_t retrieval_heads,
                                            int64_t top_k, int64_t nh, int64_t nkv, int64_t hd,
                                            int64_t chunk_size, float* out) = 0;

  // Draws one token per row from logits [rows, vocab]: greedy when temperature == 0, otherwise
  // softmax(logits / temperature) restricted to the top_k most likely tokens, then to those whose
  // probability is at least min_p times the most likely one's, then to the smallest prefix (by
  // descending probability) whose mass reaches top_p, sampled by inverse CDF with uniforms[r] in
  // [0, 1). params and uniforms are host arrays of `rows` entries; out is backend memory.
  // Deterministic for equal inputs.
  virtual absl::Status Sample(const float* logits, int64_t rows, int64_t vocab,
                              const SamplingParams* params, const float* uniforms,
                              int32_t* out) = 0;

  // out[r] = logits[r] after params[r]'s bias, held-back tokens and penalties (a copy where the
  // row has none). params is a host array of `rows` entries; logits and out are backend memory and
  // may not overlap.
  virtual absl::Status ApplyPenalties(const float* logits, int64_t rows, int64_t vocab,
                                      const PenaltyParams* params, float* out) = 0;
  // params[r].counts[tokens[r]] += 1 for every row with counts (tokens: backend memory, as Sample
  // writes them), so a generation's counts follow its tokens on the backend, also while the
  // next step is launched before this one's tokens are back. Ids outside [0, vocab) are skipped.
  virtual absl::Status CountTokens(const PenaltyParams* params, int64_t rows, int64_t vocab,
                                   const int32_t* tokens) = 0;

  // out[r] = log softmax(logits[r])[tokens[r]] (the raw distribution: no temperature or cut),
  // NaN where tokens[r] is outside [0, vocab). tokens and out are backend memory, so a step's
  // sampled tokens get their logprobs without the logits leaving the device.
  virtual absl::Status TokenLogprobs(const float* logits, int64_t rows, int64_t vocab,
                                     const int32_t* tokens, float* out) = 0;

  // The n most likely tokens of each row with their logprobs under the raw distribution (as
  // TokenLogprobs'): ids[r * n + j], logprobs[r * n + j] for j < n, by descending logit, ties
  // lower id first (NaN logits rank as -inf). 1 <= n <= min(vocab, kMaxTopLogprobs); outputs are
  // backend memory.
  static constexpr int64_t kMaxTopLogprobs = 20;
  virtual absl::Status TopLogprobs(const float* logits, int64_t rows, int64_t vocab, int64_t n,
                                   int32_t* ids, float* logprobs) = 0;

  // dst[r][0, cols) = src[r * ld, r * ld + cols) for r < rows; dst is an array of `rows` row
  // pointers (batched decode appends each session's row to its own partial-chunk buffer).
  virtual absl::Status ScatterRows(const float* src, int64_t ld, float* const* dst, int64_t rows,
                                   int64_t cols) = 0;

  // For a decode batch (row r is sequence r), after RetrieveChunks: the chunks row r selected
  // (indices [rows, heads, top_k]) that lie in its host tier (index < host_chunks[r], an array in
  // backend memory; SessionState::host_chunks) are copied into out.blocks, once per step, so the
  // step's HSA layers read them from backend memory instead of each over PCIe; the others are
  // read where they are. Builds the view the attention then takes: the ChunkMemoryBatch with
  // chunk_kv = out.tables and num_chunks = out.num_chunks, and out.indices.
  // With out.cache, a row whose cache is set keeps its host-tier picks across steps, least
  // recently used out: each step advances the row's clock; a pick, in order, whose chunk is in a
  // slot reads it there (a hit: no copy) and marks the slot used now; a miss is copied into the
  // slot used longest ago (empty first, then the lowest stamp, ties by slot) among those not used
  // this step, or, when every slot was, into out.blocks for this step only. Chunks are immutable,
  // so a slot stays valid for as long as its session's chunk index does.
  // This default runs on host-accessible memory.
  virtual absl::Status StageHostChunks(const ChunkMemoryBatch& mem, const int64_t* host_chunks,
                                       const int32_t* indices, int64_t rows, int64_t heads,
                                       int64_t top_k, int64_t chunk_floats,
                                       const StagedChunks& out);

  // For any batch (prefill or mixed), after RetrieveChunks: each distinct host-tier chunk that a
  // row of the batch selected (indices [rows, per_row] of absolute chunk indices; row r belongs
  // to sequence mem.row_seq[r], whose host-tier chunks are [0, host_offsets[s + 1] -
  // host_offsets[s])) is copied once into out.blocks, so every HSA layer of the batch reads it
  // from backend memory, not over PCIe once per row and layer. When more are selected than
  // out.capacity holds, the most picked go first (picks counted up to kMaxCountedPicks, ties by
  // index) and the rest are read in place. Builds new chunk tables (out.tables, with
  // out.entries) pointing at the copies, for the attention's ChunkMemoryBatch::chunk_kv; the
  // indices stay as they are. *out.staged is the number copied. This default runs on
  // host-accessible memory.
  static constexpr int32_t kMaxCountedPicks = 64;
  virtual absl::Status StageSelectedHostChunks(const ChunkMemoryBatch& mem, const int32_t* indices,
                                               int64_t rows, int64_t per_row, int64_t chunk_floats,
                                               const StagedChunkTables& out);

  // ---- Graphs (optional) ----
  // Ops issued between BeginGraph and EndGraph are recorded, not run; LaunchGraph replays them
  // with one launch. Inputs are read through fixed addresses, so callers upload a step's arrays
  // before LaunchGraph and must not Upload, Allocate or grow scratch while recording. A graph
  // stays valid while scratch_generation() is unchanged (scratch reallocation moves addresses).
  virtual bool SupportsGraphs() const { return false; }
  virtual absl::Status BeginGraph() { return absl::UnimplementedError("graphs"); }
  virtual absl::StatusOr<int64_t> EndGraph() { return absl::UnimplementedError("graphs"); }
  virtual absl::Status LaunchGraph(int64_t graph) { return absl::UnimplementedError("graphs"); }
  virtual void DestroyGraph(int64_t graph) {}
  virtual uint64_t scratch_generation() const { return 0; }

 protected:
  friend class Buffer;
  virtual void Free(void* data, size_t bytes) = 0;
  virtual void FreeHost(void* data, size_t bytes) { Free(data, bytes); }
  // Ticket bookkeeping shared by the BeginDownload implementations: the slot and ticket the next
  // download takes (an error when kMaxAsyncDownloads are unfinished), counted as begun by
  // DownloadBegun once its copy is queued; the slot of the ticket to finish (an error when it is
  // not the oldest unfinished one).
  absl::StatusOr<int> NextDownloadSlot(size_t bytes, int64_t* ticket);
  void DownloadBegun() { ++downloads_begun_; }
  absl::StatusOr<int> FinishingDownloadSlot(int64_t ticket);
  size_t download_bytes_[kMaxAsyncDownloads] = {};

 private:
  std::atomic<int64_t> held_bytes_{0};
  std::atomic<int64_t> host_held_bytes_{0};
  int64_t downloads_begun_ = 0, downloads_finished_ = 0;
  std::vector<char> download_copies_[kMaxAsyncDownloads];  // the default implementation's
};

// CPU backend; threads <= 0 uses every core (OpenMP + OpenBLAS).
std::unique_ptr<Backend> CreateCpuBackend(int threads = 0);

// CUDA backend on device 0 whose weight matrices are `weight_dtype` (bf16 for serving; f32 lets
// tests compare the GPU with the CPU without weight rounding). Unimplemented without CUDA.
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(DType weight_dtype = DType::kBF16);

// True when this binary was built with the CUDA backend and a GPU is visible.
bool CudaAvailable();

// "cpu", "cuda" or "auto" (cuda when available, else cpu).
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(std::string_view device, int threads = 0);

}  // namespace ramba::kernels

#endif  // RAMBA_KERNELS_BACKEND_H_
