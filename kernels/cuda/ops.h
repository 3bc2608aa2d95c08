// The CUDA implementations of the Backend ops (kernels/backend.h documents each op's contract).
// CudaBackend checks host-side arguments and forwards here; each function enqueues its work on
// ctx.stream and returns without synchronising. Pointers are device memory unless a comment says
// otherwise. One .cu file per op family: matmul.cu, elementwise.cu, mamba.cu (+ mamba_decode.cu),
// retrieval.cu, attention.cu, sparse_attention.cu, hsa_block.cu, sampling.cu, copy.cu. Kernels
// launch through launch.cuh.
#ifndef RAMBA_KERNELS_CUDA_OPS_H_
#define RAMBA_KERNELS_CUDA_OPS_H_

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/backend.h"

namespace ramba::kernels::cuda {

// False when the environment variable `name` is "0": the switches that turn a fast path off, to
// measure without it or to test the path it replaces (read at each call unless a caller caches it).
inline bool EnvSwitchOn(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || std::string_view(v) != "0";
}

// Scratch slots: each op family owns its slots, so one op's scratch never aliases another's
// while both are queued on the stream.
enum class ScratchSlot : int {
  kMatmulInput = 0,  // activations converted to bf16 for cuBLASLt (GemmInput)
  kMatmulWeights,    // weights stacked twice along k for the one-GEMM hi + lo product
  kCublasWorkspace,  // cuBLASLt workspace
  kSsm,              // chunked-scan intermediates
  kMixer,            // fused decode mixer: per-block partial sums of squares
  kRetrieval,        // landmark scores / partial top-K lists
  kAttention,        // attention partials
  kSparseKv,         // selected chunks' K/V in bf16 for the tensor-core sparse attention
  kSampling,         // per-row parameters, uniforms and candidate lists
  kSamplingAux,
  kPenalties,      // per-row penalty parameters: ApplyPenalties'
  kPenaltyCounts,  // and CountTokens'
  kNumSlots
};

// What every launcher needs: the stream, library handles, device facts and scratch memory.
// Owned by CudaBackend; not thread-safe (one thread drives a backend).
class Context {
 public:
  virtual ~Context() = default;
  cudaStream_t stream = nullptr;
  cublasLtHandle_t cublaslt = nullptr;
  int device = 0;
  int num_sms = 0;
  size_t max_shared_per_block = 0;  // opt-in limit (cudaDevAttrMaxSharedMemoryPerBlockOptin)
  bool pdl = false;                 // launch with programmatic dependent launch (launch.cuh)

  // Zeroed device counters for "last block finishes the work" kernels (the fused decode mixer,
  // the decode retrieval and sparse attention): a kernel counts arriving blocks in its slot's
  // counters and the last block resets them to 0, so they are zero between kernels.
  // kCountersPerSlot per slot.
  // kHsa: the fused HSA block's heads done per range of h (hsa_block.cu). kSampling: the greedy
  // kernel's pieces done per row, then its per-row 64-bit maxima (sampling.cu).
  // kMambaBlocks: the persistent Mamba kernel's launch epoch and exit count; kMambaExchange: its
  // tagged exchange buffers (mamba_blocks.cu), which must start zeroed (tag 0 is never valid);
  // kMambaReduce: its one-row variant's fixed-point out_proj sums, zero between launches.
  enum class CounterSlot : int {
    kMamba = 0,
    kRetrieval,
    kAttention,
    kMambaBlocks,
    kMambaExchange,
    kMambaReduce,
    kHsa,
    kSampling,
    kNumSlots
  };
  static constexpr int64_t kCountersPerSlot = int64_t{1} << 18;
  unsigned* counters = nullptr;
  unsigned* Counters(CounterSlot slot) const {
    return counters + static_cast<int64_t>(slot) * kCountersPerSlot;
  }

  // Device scratch of at least `bytes`, valid until the next Scratch call on the same slot.
  // Growing is stream-ordered (cudaFreeAsync / cudaMallocAsync), so work already queued that
  // reads the old block stays valid.
  virtual absl::StatusOr<void*> Scratch(ScratchSlot slot, size_t bytes) = 0;
  // Copies `bytes` of host memory into device scratch on the stream (for small per-call arrays
  // that the Backend interface passes on the host, e.g. sampling parameters).
  virtual absl::StatusOr<void*> UploadScratch(ScratchSlot slot, const void* host, size_t bytes) = 0;
};

// ---- matmul.cu ----
absl::Status Matmul(Context& ctx, const float* x, int64_t ldx, int64_t m, MatrixView w,
                    const float* bias, float* y, int64_t ldy, bool accumulate);
// Backend::RmsNormMatmul: the small-m kernel normalises x as it stages it and, with many rows,
// the norm writes the GEMM input directly (xn untouched either way); otherwise RmsNorm into xn,
// then Matmul.
absl::Status RmsNormMatmul(Context& ctx, const float* x, int64_t ldx, int64_t m,
                           const float* norm_weight, float eps, float* xn, MatrixView w, float* y,
                           int64_t ldy, bool accumulate = false);
// Backend::GatedRmsNormMatmul: with many rows the norm writes the GEMM input directly (g
// untouched); otherwise GatedRmsNorm into g, then Matmul.
absl::Status GatedRmsNormMatmul(Context& ctx, const float* y, int64_t ldy, const float* z,
                                int64_t ldz, const float* norm_weight, int64_t group_size,
                                float eps, int64_t m, float* g, MatrixView w, float* out,
                                int64_t ldo, bool accumulate);

// The input of the cuBLASLt path: activations rounded to the weights' 16-bit type, row i holding
// hi[0, ldh) and then, when split, the rounding residue lo[0, ldh) (hi + lo carries ~16 mantissa
// bits; columns k..ldh are zero). Keeping a row's hi and lo adjacent lets the two products run
// as one GEMM over k = 2 ldh against the weights stacked twice. Produced by the GEMM's own
// conversion (matmul.cu) or by a norm that feeds a projection (elementwise.cu).
struct GemmInput {
  uint16_t* data = nullptr;
  int ldh = 0;        // k rounded up to a multiple of 8 (16-byte rows)
  bool split = true;  // lo present (RAMBA_CUDA_BF16_ACTIVATIONS=1: hi only)
  bool bf16 = true;   // bf16, else f16 (the weights' type)
#ifdef __CUDACC__
  __host__ __device__
#endif
  int ld() const { return split ? 2 * ldh : ldh; }
};

// ---- elementwise.cu ----
absl::Status Embed(Context& ctx, const int32_t* tokens, int64_t n, MatrixView table, float* out);
absl::Status RmsNorm(Context& ctx, const float* x, int64_t ldx, const float* weight, float* y,
                     int64_t ldy, int64_t rows, int64_t dim, float eps);
// True when the norms run a block per row (few rows, decode); otherwise a warp per row, which
// the ...ToGemmInput variants below also use.
bool NormRowsUseBlocks(const Context& ctx, int64_t items, int64_t width);
// RmsNorm / GatedRmsNorm writing their output as a GemmInput (in.ldh >= dim) instead of f32:
// same values, rounded as the GEMM's own conversion would.
absl::Status RmsNormToGemmInput(Context& ctx, const float* x, int64_t ldx, const float* weight,
                                int64_t rows, int64_t dim, float eps, const GemmInput& in);
absl::Status GatedRmsNormToGemmInput(Context& ctx, const float* y, int64_t ldy, const float* z,
                                     int64_t ldz, const float* weight, int64_t rows, int64_t dim,
                                     int64_t group_size, float eps, const GemmInput& in);
absl::Status GatedRmsNorm(Context& ctx, const float* y, int64_t ldy, const float* z, int64_t ldz,
                          const float* weight, float* out, int64_t ldo, int64_t rows, int64_t dim,
                          int64_t group_size, float eps);
absl::Status Add(Context& ctx, float* y, const float* x, int64_t n);
absl::Status SwiGlu(Context& ctx, const float* gate, const float* up, float* out, int64_t n);
absl::Status BlockMean(Context& ctx, const float* x, int64_t num_blocks, int64_t block_len,
                       int64_t dim, float* out);
absl::Status RopeInChunk(Context& ctx, float* x, int64_t rows, int64_t heads, int64_t head_dim,
                         int64_t period, float theta);

// ---- mamba.cu ----
// host_seq_offsets: host copy of seq_offsets (never null here), for grid sizing.
absl::Status CausalConv1dSilu(Context& ctx, const float* x, int64_t ldx, const int64_t* seq_offsets,
                              int64_t num_seqs, float* const* conv_states, const float* weight,
                              const float* bias, int64_t channels, int64_t kernel, float* y,
                              const int64_t* host_seq_offsets);
absl::Status SsmScan(Context& ctx, const float* xbc, int64_t ldxbc, const float* dt_raw,
                     int64_t lddt, const int64_t* seq_offsets, int64_t num_seqs,
                     float* const* ssm_states, const SsmParams& p, float* y,
                     const int64_t* host_seq_offsets);
// Whether SsmScan takes this batch with its decode kernel (at most kDecodeMaxRows rows per
// sequence, d_state <= 256, not forced onto the simple scan).
bool SsmDecodeTakes(const SsmParams& p, int64_t num_seqs, const int64_t* host_seq_offsets);
// That decode kernel writing g = y * silu(z) (z: [rows, ldz], the gate of the mixer's gated
// norm) instead of y; only for batches SsmDecodeTakes.
absl::Status SsmDecodeGated(Context& ctx, const float* xbc, int64_t ldxbc, const float* dt_raw,
                            int64_t lddt, const int64_t* seq_offsets, int64_t num_seqs,
                            float* const* ssm_states, const SsmParams& p, const float* z,
                            int64_t ldz, float* g);

// ---- mamba_decode.cu ----
// The fused decode mixer (Backend::MambaMixer) for batches of <= kDecodeMaxRows rows per
// sequence; returns false, launching nothing, for shapes it does not cover (the caller then
// runs the three ops). The norm and the B/C conv state are finished by each sequence's last
// block, or with finish_kernel by a second small kernel.
absl::StatusOr<bool> FusedMambaMixer(Context& ctx, const MambaMixerArgs& a, int64_t num_seqs,
                                     const int64_t* host_seq_offsets, bool finish_kernel);

// ---- mamba_blocks.cu ----
// Backend::MambaBlocks as one persistent kernel per run of up to 24 blocks, for decode batches of
// 1-4 one-token sequences and the shapes it covers (bf16 weights, conv width 4, headdim a
// multiple of 16, d_state <= 128); returns false, launching nothing, otherwise. CudaBackend
// uses it for 1 row by default (RAMBA_CUDA_PERSISTENT_MAMBA=0|1|2 changes that).
// With `trace` (device memory, count <= 24), thread 0 of each block records clock64() at
// kMambaBlocksTracePoints phase boundaries per layer (the grid-wide kernel uses the first 13):
// trace[(layer * points + point) * grid + block], grid = ctx.num_sms (bench-mamba-blocks
// --trace prints where the time goes).
constexpr int kMambaBlocksTracePoints = 16;
absl::StatusOr<bool> PersistentMambaBlocks(Context& ctx, const MambaBlockArgs* blocks,
                                           int64_t count, long long* trace = nullptr);
// The same with thread-block clusters: one grid-wide exchange per layer, the other handoffs
// inside clusters (1-2 rows at the 370M shape; returns false for what it does not cover).
// CudaBackend uses it for 2 rows. `trace` as above, with its own phases.
absl::StatusOr<bool> ClusterMambaBlocks(Context& ctx, const MambaBlockArgs* blocks, int64_t count,
                                        long long* trace = nullptr);
// One persistent-kernel GEMV phase (one row, ncols x k bf16 tile in shared memory, all 16 warps)
// alone on every SM, in clock64 cycles: {warp 0's own time, to the block barrier} for the
// kernels' GEMV, a two-chain variant, the loads alone, and k split into 2 / 4 parts over the
// warps (bench-mamba-blocks --gemv_probe).
absl::StatusOr<std::vector<double>> ProbeMambaGemv(Context& ctx, int ncols, int k);

// ---- attention.cu ----
absl::Status BlockAttention(Context& ctx, const float* q, const float* k, const float* v,
                            float* out, int64_t num_blocks, int64_t block_len, int64_t nh,
                            int64_t nkv, int64_t hd);

// ---- retrieval.cu ----
// mem.max_num_chunks >= 0 here (host-side bound, for grid sizing).
absl::Status RetrieveChunks(Context& ctx, const float* r, int64_t rows, const ChunkMemoryBatch& mem,
                            int64_t retrieval_dim, int64_t heads,
                            int64_t top_k, int64_t chunk_size, int32_t* indices, float* weights);

// ---- sparse_attention.cu ----
absl::Status SparseChunkAttention(Context& ctx, const float* q, int64_t rows,
                                  const ChunkMemoryBatch& mem, const int32_t* indices,
                                  const float* weights, int64_t retrieval_heads, int64_t top_k,
                                  int64_t nh, int64_t nkv, int64_t hd, int64_t chunk_size,
                                  float* out);

// ---- hsa_block.cu ----
// Backend::HsaBlock as one kernel for decode-shaped calls (up to 4 rows, head dim 64, 64-key
// chunks, top-K <= 16, bf16 or f32 weights, d a multiple of 256 up to 2048); false (nothing
// launched) when the call does not fit, or with RAMBA_CUDA_FUSED_HSA=0. Arguments as checked by
// CudaBackend::HsaBlock (rows >= 1, heads, shapes, pointers).
absl::StatusOr<bool> FusedHsaBlock(Context& ctx, const HsaBlockArgs& a);

// ---- copy.cu ----
absl::Status ScatterRows(Context& ctx, const float* src, int64_t ld, float* const* dst,
                         int64_t rows, int64_t cols);
// Backend::StageHostChunks; per_row = heads * top_k.
absl::Status StageHostChunks(Context& ctx, const ChunkMemoryBatch& mem, const int64_t* host_chunks,
                             const int32_t* indices, int64_t rows, int64_t per_row,
                             int64_t chunk_floats, const StagedChunks& out);
// Backend::StageSelectedHostChunks; mem.num_seqs and mem.max_num_chunks must be set.
absl::Status StageSelectedHostChunks(Context& ctx, const ChunkMemoryBatch& mem,
                                     const int32_t* indices, int64_t rows, int64_t per_row,
                                     int64_t chunk_floats, const StagedChunkTables& out);

// ---- sampling.cu ----
// Backend::ApplyPenalties and CountTokens; params is a host array of `rows` entries.
absl::Status ApplyPenalties(Context& ctx, const float* logits, int64_t rows, int64_t vocab,
                            const PenaltyParams* params, float* out);
absl::Status CountTokens(Context& ctx, const PenaltyParams* params, int64_t rows, int64_t vocab,
                         const int32_t* tokens);
absl::Status TokenLogprobs(Context& ctx, const float* logits, int64_t rows, int64_t vocab,
                           const int32_t* tokens, float* out);
absl::Status TopLogprobs(Context& ctx, const float* logits, int64_t rows, int64_t vocab, int64_t n,
                         int32_t* ids, float* logprobs);
// params and uniforms are host arrays of `rows` entries.
absl::Status Sample(Context& ctx, const float* logits, int64_t rows, int64_t vocab,
                    const SamplingParams* params, const float* uniforms, int32_t* out);

}  // namespace ramba::kernels::cuda

#endif  // RAMBA_KERNELS_CUDA_OPS_H_
