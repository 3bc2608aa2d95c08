// The CPU backend: host memory, ops from kernels/cpu/ops.h after argument checks. Weights are kept
// in f32 (sgemm needs no conversion on the hot path; 16-bit weights are still accepted).
// Not thread-safe, like every Backend: one thread drives it. The thread count set at creation is
// re-applied (omp_set_num_threads) at the start of every op, so it holds for whichever thread
// drives the backend.
#ifndef RAMBA_KERNELS_CPU_CPU_BACKEND_H_
#define RAMBA_KERNELS_CPU_CPU_BACKEND_H_

#include "kernels/backend.h"

namespace ramba::kernels {

class CpuBackend : public Backend {
 public:
  // threads <= 0: OpenMP's default (OMP_NUM_THREADS, else every core).
  explicit CpuBackend(int threads);

  std::string_view name() const override { return "cpu"; }
  bool host_accessible() const override { return true; }
  DType weight_dtype() const override { return DType::kF32; }
  int threads() const { return threads_; }

  absl::StatusOr<Buffer> Allocate(size_t bytes) override;
  absl::Status Upload(void* dst, const void* host_src, size_t bytes) override;
  absl::Status Download(void* host_dst, const void* src, size_t bytes) override;
  absl::Status Copy(void* dst, const void* src, size_t bytes) override;
  absl::Status Zero(void* dst, size_t bytes) override;
  absl::Status Synchronize() override { return absl::OkStatus(); }

  absl::Status Embed(const int32_t* tokens, int64_t n, MatrixView table, float* out) override;
  absl::Status Matmul(const float* x, int64_t ldx, int64_t m, MatrixView w, const float* bias,
                      float* y, int64_t ldy, bool accumulate) override;
  absl::Status RmsNorm(const float* x, int64_t ldx, const float* weight, float* y, int64_t ldy,
                       int64_t rows, int64_t dim, float eps) override;
  absl::Status GatedRmsNorm(const float* y, int64_t ldy, const float* z, int64_t ldz,
                            const float* weight, float* out, int64_t ldo, int64_t rows,
                            int64_t dim, int64_t group_size, float eps) override;
  absl::Status Add(float* y, const float* x, int64_t n) override;
  absl::Status SwiGlu(const float* gate, const float* up, float* out, int64_t n) override;
  absl::Status BlockMean(const float* x, int64_t num_blocks, int64_t block_len, int64_t dim,
                         float* out) override;
  absl::Status CausalConv1dSilu(const float* x, int64_t ldx, const int64_t* seq_offsets,
                                int64_t num_seqs, float* const* conv_states, const float* weight,
                                const float* bias, int64_t channels, int64_t kernel, float* y,
                                const int64_t* host_seq_offsets = nullptr) override;
  absl::Status SsmScan(const float* xbc, int64_t ldxbc, const float* dt_raw, int64_t lddt,
                       const int64_t* seq_offsets, int64_t num_seqs, float* const* ssm_states,
                       const SsmParams& p, float* y,
                       const int64_t* host_seq_offsets = nullptr) override;
  absl::Status RopeInChunk(float* x, int64_t rows, int64_t heads, int64_t head_dim,
                           int64_t period, float theta) override;
  absl::Status BlockAttention(const float* q, const float* k, const float* v, float* out,
                              int64_t num_blocks, int64_t block_len, int64_t nh, int64_t nkv,
                              int64_t hd) override;
  absl::Status RetrieveChunks(const float* r, int64_t rows, const ChunkMemoryBatch& mem,
                              int64_t retrieval_dim, int64_t heads, int64_t top_k,
                              int64_t chunk_size, int32_t* indices, float* weights) override;
  absl::Status SparseChunkAttention(const float* q, int64_t rows, const ChunkMemoryBatch& mem,
                                    const int32_t* indices, const float* weights,
                                    int64_t retrieval_heads, int64_t top_k, int64_t nh,
                                    int64_t nkv, int64_t hd, int64_t chunk_size,
                                    float* out) override;
  absl::Status ApplyPenalties(const float* logits, int64_t rows, int64_t vocab,
                              const PenaltyParams* params, float* out) override;
  absl::Status CountTokens(const PenaltyParams* params, int64_t rows, int64_t vocab,
                           const int32_t* tokens) override;
  absl::Status TokenLogprobs(const float* logits, int64_t rows, int64_t vocab,
                             const int32_t* tokens, float* out) override;
  absl::Status TopLogprobs(const float* logits, int64_t rows, int64_t vocab, int64_t n,
                           int32_t* ids, float* logprobs) override;
  absl::Status Sample(const float* logits, int64_t rows, int64_t vocab,
                      const SamplingParams* params, const float* uniforms,
                      int32_t* out) override;
  absl::Status ScatterRows(const float* src, int64_t ld, float* const* dst, int64_t rows,
                           int64_t cols) override;

 protected:
  void Free(void* data, size_t bytes) override;

 private:
  void ApplyThreads() const;

  int threads_;
};

}  // namespace ramba::kernels

#endif  // RAMBA_KERNELS_CPU_CPU_BACKEND_H_
