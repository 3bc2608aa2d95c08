#include "kernels/cpu/cpu_backend.h"

#include <cblas.h>
#include <omp.h>

#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/ops.h"
#include "base/status_macros.h"
#include "kernels/arg_checks.h"

namespace ramba::kernels {
namespace {

constexpr size_t kAlignment = 64;



absl::Status CheckOffsets(std::string_view op, const int64_t* seq_offsets, int64_t num_seqs) {
  RAMBA_CHECK_ARG(op, num_seqs >= 0, "num_seqs must be >= 0");
  if (num_seqs == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG(op, seq_offsets != nullptr, "seq_offsets is null");
  RAMBA_CHECK_ARG(op, seq_offsets[0] >= 0, "seq_offsets[0] must be >= 0");
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (seq_offsets[s + 1] < seq_offsets[s]) {
      return InvalidOpArgument(op, absl::StrCat("seq_offsets decrease at sequence ", s));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckChunkMemory(std::string_view op, const ChunkMemoryBatch& mem, int64_t rows) {
  if (rows == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG(op, mem.row_seq != nullptr && mem.row_position != nullptr &&
                          mem.num_chunks != nullptr,
                  "chunk memory row_seq, row_position and num_chunks must be set");
  for (int64_t r = 0; r < rows; ++r) {
    if (mem.row_seq[r] < 0)
      return InvalidOpArgument(op, absl::StrCat("row ", r, " has a negative sequence"));
    if (mem.num_chunks[mem.row_seq[r]] < 0) {
      return InvalidOpArgument(
          op, absl::StrCat("sequence ", mem.row_seq[r], " has a negative chunk count"));
    }
  }
  return absl::OkStatus();
}

bool FitsInt(int64_t v) { return v >= 0 && v <= INT_MAX; }

}  // namespace

CpuBackend::CpuBackend(int threads) : threads_(threads) {
  if (threads_ > 0) {
    omp_set_num_threads(threads_);
    openblas_set_num_threads(threads_);
  }
}

void CpuBackend::ApplyThreads() const {
  // omp_set_num_threads only affects the calling thread, which may not be the creating one.
  if (threads_ > 0 && omp_get_max_threads() != threads_) omp_set_num_threads(threads_);
}

absl::StatusOr<Buffer> CpuBackend::Allocate(size_t bytes) {
  // Round up to the alignment (aligned_alloc requires a multiple) and never hand out null, so a
  // zero-byte buffer is still a valid pointer for ops of size 0.
  const size_t rounded =
      bytes == 0 ? kAlignment : (bytes + kAlignment - 1) / kAlignment * kAlignment;
  if (rounded < bytes) return absl::ResourceExhaustedError("Allocate: size overflows");
  void* p = std::aligned_alloc(kAlignment, rounded);
  if (p == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat("Allocate: out of host memory for ", bytes,
                                                     " bytes"));
  }
  return Buffer(this, p, bytes);
}

void CpuBackend::Free(void* data, size_t bytes) { std::free(data); }

absl::Status CpuBackend::Upload(void* dst, const void* host_src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("Upload", dst != nullptr && host_src != nullptr, "null pointer");
  std::memcpy(dst, host_src, bytes);
  return absl::OkStatus();
}

absl::Status CpuBackend::Download(void* host_dst, const void* src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("Download", host_dst != nullptr && src != nullptr, "null pointer");
  std::memcpy(host_dst, src, bytes);
  return absl::OkStatus();
}

absl::Status CpuBackend::Copy(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("Copy", dst != nullptr && src != nullptr, "null pointer");
  std::memmove(dst, src, bytes);
  return absl::OkStatus();
}

absl::Status CpuBackend::Zero(void* dst, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("Zero", dst != nullptr, "null pointer");
  std::memset(dst, 0, bytes);
  return absl::OkStatus();
}

absl::Status CpuBackend::Embed(const int32_t* tokens, int64_t n, MatrixView table, float* out) {
  RAMBA_CHECK_ARG("Embed", n >= 0 && table.rows >= 0 && table.cols >= 0, "negative size");
  if (n == 0 || table.cols == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("Embed", tokens != nullptr && out != nullptr && table.data != nullptr,
                  "null pointer");
  RAMBA_CHECK_ARG("Embed", DTypeSize(table.dtype) != 0, "unknown dtype");
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= table.rows) {
      return InvalidOpArgument("Embed", absl::StrCat("token ", tokens[i], " at row ", i,
                                           " is outside the table of ", table.rows, " rows"));
    }
  }
  ApplyThreads();
  cpu::Embed(tokens, n, table, out);
  return absl::OkStatus();
}

absl::Status CpuBackend::Matmul(const float* x, int64_t ldx, int64_t m, MatrixView w,
                                const float* bias, float* y, int64_t ldy, bool accumulate) {
  const int64_t n = w.rows, k = w.cols;
  RAMBA_CHECK_ARG("Matmul", m >= 0 && n >= 0 && k >= 0, "negative size");
  if (m == 0 || n == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("Matmul", y != nullptr, "y is null");
  RAMBA_CHECK_ARG("Matmul", k == 0 || (x != nullptr && w.data != nullptr), "x or w is null");
  RAMBA_CHECK_ARG("Matmul", DTypeSize(w.dtype) != 0, "unknown weight dtype");
  RAMBA_CHECK_ARG("Matmul", ldx >= k && ldy >= n,
                  absl::StrCat("strides ldx=", ldx, " ldy=", ldy, " are below k=", k, " n=", n));
  RAMBA_CHECK_ARG("Matmul", FitsInt(m) && FitsInt(n) && FitsInt(k) && FitsInt(ldx) && FitsInt(ldy),
                  "sizes exceed the BLAS integer range");
  ApplyThreads();
  cpu::Matmul(x, ldx, m, w, bias, y, ldy, accumulate);
  return absl::OkStatus();
}

absl::Status CpuBackend::RmsNorm(const float* x, int64_t ldx, const float* weight, float* y,
                                 int64_t ldy, int64_t rows, int64_t dim, float eps) {
  RAMBA_CHECK_ARG("RmsNorm", rows >= 0 && dim >= 0, "negative size");
  if (rows == 0 || dim == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("RmsNorm", x != nullptr && weight != nullptr && y != nullptr, "null pointer");
  RAMBA_CHECK_ARG("RmsNorm", ldx >= dim && ldy >= dim, "row stride below dim");
  ApplyThreads();
  cpu::RmsNorm(x, ldx, weight, y, ldy, rows, dim, eps);
  return absl::OkStatus();
}

absl::Status CpuBackend::GatedRmsNorm(const float* y, int64_t ldy, const float* z, int64_t ldz,
                                      const float* weight, float* out, int64_t ldo, int64_t rows,
                                      int64_t dim, int64_t group_size, float eps) {
  RAMBA_CHECK_ARG("GatedRmsNorm", rows >= 0 && dim >= 0, "negative size");
  if (rows == 0 || dim == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("GatedRmsNorm", y != nullptr && z != nullptr && weight != nullptr &&
                                      out != nullptr, "null pointer");
  RAMBA_CHECK_ARG("GatedRmsNorm", group_size > 0 && dim % group_size == 0,
                  absl::StrCat("group_size ", group_size, " does not divide dim ", dim));
  RAMBA_CHECK_ARG("GatedRmsNorm", ldy >= dim && ldz >= dim && ldo >= dim, "row stride below dim");
  ApplyThreads();
  cpu::GatedRmsNorm(y, ldy, z, ldz, weight, out, ldo, rows, dim, group_size, eps);
  return absl::OkStatus();
}

absl::Status CpuBackend::Add(float* y, const float* x, int64_t n) {
  RAMBA_CHECK_ARG("Add", n >= 0, "negative size");
  if (n == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("Add", x != nullptr && y != nullptr, "null pointer");
  ApplyThreads();
  cpu::Add(y, x, n);
  return absl::OkStatus();
}

absl::Status CpuBackend::SwiGlu(const float* gate, const float* up, float* out, int64_t n) {
  RAMBA_CHECK_ARG("SwiGlu", n >= 0, "negative size");
  if (n == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("SwiGlu", gate != nullptr && up != nullptr && out != nullptr, "null pointer");
  ApplyThreads();
  cpu::SwiGlu(gate, up, out, n);
  return absl::OkStatus();
}

absl::Status CpuBackend::BlockMean(const float* x, int64_t num_blocks, int64_t block_len,
                                   int64_t dim, float* out) {
  RAMBA_CHECK_ARG("BlockMean", num_blocks >= 0 && dim >= 0, "negative size");
  RAMBA_CHECK_ARG("BlockMean", block_len > 0, "block_len must be positive");
  if (num_blocks == 0 || dim == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("BlockMean", x != nullptr && out != nullptr, "null pointer");
  ApplyThreads();
  cpu::BlockMean(x, num_blocks, block_len, dim, out);
  return absl::OkStatus();
}

absl::Status CpuBackend::CausalConv1dSilu(const float* x, int64_t ldx, const int64_t* seq_offsets,
                                          int64_t num_seqs, float* const* conv_states,
                                          const float* weight, const float* bias,
                                          int64_t channels, int64_t kernel, float* y,
                                          const int64_t* /*host_seq_offsets*/) {
  constexpr std::string_view kOp = "CausalConv1dSilu";
  RAMBA_CHECK_ARG(kOp, channels >= 0, "negative size");
  RAMBA_CHECK_ARG(kOp, kernel >= 1, "kernel must be >= 1");
  if (auto st = CheckOffsets(kOp, seq_offsets, num_seqs); !st.ok()) return st;
  if (num_seqs == 0 || channels == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG(kOp, weight != nullptr, "weight is null");
  RAMBA_CHECK_ARG(kOp, ldx >= channels, "ldx below channels");
  if (seq_offsets[num_seqs] > seq_offsets[0]) {
    RAMBA_CHECK_ARG(kOp, x != nullptr && y != nullptr, "x or y is null");
  }
  if (kernel > 1) {
    RAMBA_CHECK_ARG(kOp, conv_states != nullptr, "conv_states is null");
    for (int64_t s = 0; s < num_seqs; ++s) {
      if (conv_states[s] == nullptr)
        return InvalidOpArgument(kOp, absl::StrCat("conv state ", s, " is null"));
    }
  }
  ApplyThreads();
  cpu::CausalConv1dSilu(x, ldx, seq_offsets, num_seqs, conv_states, weight, bias, channels, kernel,
                        y);
  return absl::OkStatus();
}

absl::Status CpuBackend::SsmScan(const float* xbc, int64_t ldxbc, const float* dt_raw,
                                 int64_t lddt, const int64_t* seq_offsets, int64_t num_seqs,
                                 float* const* ssm_states, const SsmParams& p, float* y,
                                 const int64_t* /*host_seq_offsets*/) {
  constexpr std::string_view kOp = "SsmScan";
  RETURN_IF_ERROR(CheckSsmParams(kOp, p));
  if (auto st = CheckOffsets(kOp, seq_offsets, num_seqs); !st.ok()) return st;
  if (num_seqs == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG(kOp, ldxbc >= p.nheads * p.headdim + 2 * p.ngroups * p.d_state,
                  "ldxbc below nheads*headdim + 2*ngroups*d_state");
  RAMBA_CHECK_ARG(kOp, lddt >= p.nheads, "lddt below nheads");
  RAMBA_CHECK_ARG(kOp, ssm_states != nullptr, "ssm_states is null");
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (ssm_states[s] == nullptr)
      return InvalidOpArgument(kOp, absl::StrCat("ssm state ", s, " is null"));
  }
  if (seq_offsets[num_seqs] > seq_offsets[0]) {
    RAMBA_CHECK_ARG(kOp, xbc != nullptr && dt_raw != nullptr && y != nullptr, "null pointer");
  }
  ApplyThreads();
  cpu::SsmScan(xbc, ldxbc, dt_raw, lddt, seq_offsets, num_seqs, ssm_states, p, y);
  return absl::OkStatus();
}

absl::Status CpuBackend::RopeInChunk(float* x, int64_t rows, int64_t heads, int64_t head_dim,
                                     int64_t period, float theta) {
  RAMBA_CHECK_ARG("RopeInChunk", rows >= 0 && heads >= 0, "negative size");
  RAMBA_CHECK_ARG("RopeInChunk", head_dim > 0 && head_dim % 2 == 0,
                  "head_dim must be positive and even");
  RAMBA_CHECK_ARG("RopeInChunk", period > 0, "period must be positive");
  RAMBA_CHECK_ARG("RopeInChunk", theta > 0.0f, "theta must be positive");
  if (rows == 0 || heads == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("RopeInChunk", x != nullptr, "x is null");
  ApplyThreads();
  cpu::RopeInChunk(x, rows, heads, head_dim, period, theta);
  return absl::OkStatus();
}

absl::Status CpuBackend::BlockAttention(const float* q, const float* k, const float* v,
                                        float* out, int64_t num_blocks, int64_t block_len,
                                        int64_t nh, int64_t nkv, int64_t hd) {
  constexpr std::string_view kOp = "BlockAttention";
  RAMBA_CHECK_ARG(kOp, num_blocks >= 0 && block_len >= 0, "negative size");
  RETURN_IF_ERROR(CheckAttentionHeads(kOp, nh, nkv, hd));
  if (num_blocks == 0 || block_len == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG(kOp, q != nullptr && k != nullptr && v != nullptr && out != nullptr,
                  "null pointer");
  ApplyThreads();
  cpu::BlockAttention(q, k, v, out, num_blocks, block_len, nh, nkv, hd);
  return absl::OkStatus();
}

absl::Status CpuBackend::RetrieveChunks(const float* r, int64_t rows, const ChunkMemoryBatch& mem,
                                        int64_t retrieval_dim, int64_t heads, int64_t top_k,
                                        int64_t chunk_size, int32_t* indices, float* weights) {
  constexpr std::string_view kOp = "RetrieveChunks";
  RAMBA_CHECK_ARG(kOp, rows >= 0 && top_k >= 0, "negative size");
  RAMBA_CHECK_ARG(kOp, heads > 0 && retrieval_dim > 0 && retrieval_dim % heads == 0,
                  "heads must be positive and divide retrieval_dim");
  RAMBA_CHECK_ARG(kOp, chunk_size > 0, "chunk_size must be positive");
  RAMBA_CHECK_ARG(kOp, top_k <= INT32_MAX, "top_k too large");
  if (rows == 0 || top_k == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG(kOp, r != nullptr && indices != nullptr && weights != nullptr, "null pointer");
  if (auto st = CheckChunkMemory(kOp, mem, rows); !st.ok()) return st;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t s = mem.row_seq[i];
    if (mem.num_chunks[s] > 0 && mem.row_position[i] >= chunk_size &&
        (mem.landmarks == nullptr || mem.landmarks[s] == nullptr)) {
      return InvalidOpArgument(kOp, absl::StrCat("sequence ", s, " has chunks but no landmarks"));
    }
  }
  ApplyThreads();
  cpu::RetrieveChunks(r, rows, mem, retrieval_dim, heads, top_k, chunk_size, indices, weights);
  return absl::OkStatus();
}

absl::Status CpuBackend::SparseChunkAttention(const float* q, int64_t rows,
                                              const ChunkMemoryBatch& mem, const int32_t* indices,
                                              const float* weights, int64_t retrieval_heads,
                                              int64_t top_k, int64_t nh, int64_t nkv, int64_t hd,
                                              int64_t chunk_size, float* out) {
  constexpr std::string_view kOp = "SparseChunkAttention";
  RAMBA_CHECK_ARG(kOp, rows >= 0 && top_k >= 0 && chunk_size >= 0, "negative size");
  RETURN_IF_ERROR(CheckAttentionHeads(kOp, nh, nkv, hd));
  RAMBA_CHECK_ARG(kOp, retrieval_heads > 0 && nkv % retrieval_heads == 0,
                  "retrieval_heads must be positive and divide nkv");
  if (rows == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG(kOp, q != nullptr && out != nullptr, "null pointer");
  if (top_k == 0 || chunk_size == 0) {
    std::memset(out, 0, rows * nh * hd * sizeof(float));
    return absl::OkStatus();
  }
  RAMBA_CHECK_ARG(kOp, indices != nullptr && weights != nullptr, "null pointer");
  if (auto st = CheckChunkMemory(kOp, mem, rows); !st.ok()) return st;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t s = mem.row_seq[i];
    for (int64_t j = 0; j < retrieval_heads * top_k; ++j) {
      const int32_t c = indices[i * retrieval_heads * top_k + j];
      if (c == -1) continue;
      if (c < -1 || c >= mem.num_chunks[s]) {
        return InvalidOpArgument(
            kOp, absl::StrCat("row ", i, " selects chunk ", c, " of sequence ", s, ", which has ",
                              mem.num_chunks[s], " chunks"));
      }
      if (mem.chunk_kv == nullptr || mem.chunk_kv[s] == nullptr || mem.chunk_kv[s][c] == nullptr) {
        return InvalidOpArgument(kOp, absl::StrCat("chunk ", c, " of sequence ", s, " has no K/V"));
      }
    }
  }
  ApplyThreads();
  cpu::SparseChunkAttention(q, rows, mem, indices, weights, retrieval_heads, top_k, nh, nkv, hd,
                            chunk_size, out);
  return absl::OkStatus();
}

absl::Status CpuBackend::ApplyPenalties(const float* logits, int64_t rows, int64_t vocab,
                                        const PenaltyParams* params, float* out) {
  RAMBA_CHECK_ARG("ApplyPenalties", rows >= 0 && vocab > 0, "bad sizes");
  if (rows == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("ApplyPenalties", logits != nullptr && params != nullptr && out != nullptr,
                  "null pointer");
  RAMBA_CHECK_ARG("ApplyPenalties", logits + rows * vocab <= out || out + rows * vocab <= logits,
                  "logits and out overlap");
  RETURN_IF_ERROR(CheckPenaltyParams("ApplyPenalties", params, rows));
  cpu::ApplyPenalties(logits, rows, vocab, params, out);
  return absl::OkStatus();
}

absl::Status CpuBackend::CountTokens(const PenaltyParams* params, int64_t rows, int64_t vocab,
                                     const int32_t* tokens) {
  RAMBA_CHECK_ARG("CountTokens", rows >= 0 && vocab > 0, "bad sizes");
  if (rows == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("CountTokens", params != nullptr && tokens != nullptr, "null pointer");
  cpu::CountTokens(params, rows, vocab, tokens);
  return absl::OkStatus();
}

absl::Status CpuBackend::TokenLogprobs(const float* logits, int64_t rows, int64_t vocab,
                                       const int32_t* tokens, float* out) {
  RAMBA_CHECK_ARG("TokenLogprobs", rows >= 0 && vocab > 0, "bad sizes");
  if (rows == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("TokenLogprobs", logits != nullptr && tokens != nullptr && out != nullptr,
                  "null pointer");
  cpu::TokenLogprobs(logits, rows, vocab, tokens, out);
  return absl::OkStatus();
}

absl::Status CpuBackend::TopLogprobs(const float* logits, int64_t rows, int64_t vocab, int64_t n,
                                     int32_t* ids, float* logprobs) {
  RETURN_IF_ERROR(CheckTopLogprobsArgs(logits, rows, vocab, n, ids, logprobs));
  if (rows == 0) return absl::OkStatus();
  ApplyThreads();
  cpu::TopLogprobs(logits, rows, vocab, n, ids, logprobs);
  return absl::OkStatus();
}

absl::Status CpuBackend::Sample(const float* logits, int64_t rows, int64_t vocab,
                                const SamplingParams* params, const float* uniforms,
                                int32_t* out) {
  RAMBA_CHECK_ARG("Sample", rows >= 0, "negative size");
  RAMBA_CHECK_ARG("Sample", vocab > 0 && vocab <= INT32_MAX, "vocab must be in [1, 2^31)");
  if (rows == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("Sample", logits != nullptr && params != nullptr && uniforms != nullptr &&
                                out != nullptr, "null pointer");
  RETURN_IF_ERROR(CheckSamplingParams("Sample", params, rows));
  ApplyThreads();
  cpu::Sample(logits, rows, vocab, params, uniforms, out);
  return absl::OkStatus();
}

std::unique_ptr<Backend> CreateCpuBackend(int threads) {
  return std::make_unique<CpuBackend>(threads);
}

absl::Status CpuBackend::ScatterRows(const float* src, int64_t ld, float* const* dst, int64_t rows,
                                     int64_t cols) {
  RAMBA_CHECK_ARG("ScatterRows", rows >= 0 && cols >= 0, "negative size");
  if (rows == 0 || cols == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("ScatterRows", src != nullptr && dst != nullptr && ld >= cols,
                  "null pointer or ld below cols");
  for (int64_t r = 0; r < rows; ++r) {
    if (dst[r] == nullptr)
      return InvalidOpArgument("ScatterRows", absl::StrCat("row ", r, " is null"));
    std::memcpy(dst[r], src + r * ld, cols * sizeof(float));
  }
  return absl::OkStatus();
}

}  // namespace ramba::kernels
