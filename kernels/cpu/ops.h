// The CPU implementations of the ops in kernels/backend.h, as free functions on raw host pointers.
// CpuBackend validates arguments and then calls these; they are also the plain C++ reference the
// CUDA tests compare against. Every function here assumes valid, in-range arguments (sizes >= 0,
// pointers non-null where data is read or written); see backend.h for the exact semantics of each.
//
// Threading: each function parallelises with OpenMP over independent work items (rows, heads,
// sequences) using the calling thread's OpenMP thread count, and never splits one reduction across
// threads, so equal inputs give bitwise-equal outputs for any thread count (Matmul excepted: it
// calls OpenBLAS, which is deterministic for a fixed thread count). Functions are safe to call
// concurrently from different threads on disjoint outputs.
#ifndef RAMBA_KERNELS_CPU_OPS_H_
#define RAMBA_KERNELS_CPU_OPS_H_

#include <cstdint>
#include <limits>

#include "kernels/backend.h"

namespace ramba::kernels::cpu {

// Numerics shared with the CUDA backend.
// PyTorch's softplus with threshold: x > threshold -> x, else log1p(exp(x)).
float Softplus(float x, float threshold);
// x * sigmoid(x).
float Silu(float x);

// Row r of `out` = row tokens[r] of `table` in f32. Tokens must be in [0, table.rows).
void Embed(const int32_t* tokens, int64_t n, const MatrixView& table, float* out);

// y[m, n] (+)= x[m, k] * w^T (+ bias). k = w.cols, n = w.rows. F32 weights go straight to
// OpenBLAS; BF16/F16 weights are converted to f32 in blocks of rows (or, for m <= 4, dotted
// row by row while converting, so decode reads the 16-bit weights once).
void Matmul(const float* x, int64_t ldx, int64_t m, const MatrixView& w, const float* bias,
            float* y, int64_t ldy, bool accumulate);

void RmsNorm(const float* x, int64_t ldx, const float* weight, float* y, int64_t ldy,
             int64_t rows, int64_t dim, float eps);
void GatedRmsNorm(const float* y, int64_t ldy, const float* z, int64_t ldz, const float* weight,
                  float* out, int64_t ldo, int64_t rows, int64_t dim, int64_t group_size,
                  float eps);
void Add(float* y, const float* x, int64_t n);
void SwiGlu(const float* gate, const float* up, float* out, int64_t n);
void BlockMean(const float* x, int64_t num_blocks, int64_t block_len, int64_t dim, float* out);

// seq_offsets: host array of num_seqs + 1 non-decreasing offsets.
void CausalConv1dSilu(const float* x, int64_t ldx, const int64_t* seq_offsets, int64_t num_seqs,
                      float* const* conv_states, const float* weight, const float* bias,
                      int64_t channels, int64_t kernel, float* y);

void SsmScan(const float* xbc, int64_t ldxbc, const float* dt_raw, int64_t lddt,
             const int64_t* seq_offsets, int64_t num_seqs, float* const* ssm_states,
             const SsmParams& p, float* y);

// head_dim must be even.
void RopeInChunk(float* x, int64_t rows, int64_t heads, int64_t head_dim, int64_t period,
                 float theta);
void BlockAttention(const float* q, const float* k, const float* v, float* out,
                    int64_t num_blocks, int64_t block_len, int64_t nh, int64_t nkv, int64_t hd);

void RetrieveChunks(const float* r, int64_t rows, const ChunkMemoryBatch& mem,
                    int64_t retrieval_dim, int64_t heads, int64_t top_k, int64_t chunk_size,
                    int32_t* indices, float* weights);
// The stick-breaking weights of `n` scores already in slot order, in fp32 as the reference computes
// them: w_j = exp(s_j - sum_{i<=j} softplus(s_i)), softplus threshold 15.
void StickBreaking(const float* scores, int64_t n, float* weights);

// Indices must be -1 or in [0, num_chunks[seq]).
void SparseChunkAttention(const float* q, int64_t rows, const ChunkMemoryBatch& mem,
                          const int32_t* indices, const float* weights, int64_t retrieval_heads,
                          int64_t top_k, int64_t nh, int64_t nkv, int64_t hd, int64_t chunk_size,
                          float* out);

// One row. Greedy when temperature <= 0. The inverse CDF runs over the kept tokens in descending
// probability order (ties: lower id first); probabilities are exp((l - max) / T) in f32, summed in
// double. NaN logits count as -inf.
int32_t SampleRow(const float* logits, int64_t vocab, const SamplingParams& params, float uniform);
void TokenLogprobs(const float* logits, int64_t rows, int64_t vocab, const int32_t* tokens,
                   float* out);
void Sample(const float* logits, int64_t rows, int64_t vocab, const SamplingParams* params,
            const float* uniforms, int32_t* out);
void TopLogprobs(const float* logits, int64_t rows, int64_t vocab, int64_t n, int32_t* ids,
                 float* logprobs);
// One logit under PenaltyParams' rule; `count` is the token's counts entry (0 without counts),
// `bias` its bias (0 without). The CUDA kernel rounds each operation the same way (no
// contraction into an FMA), so both backends agree to the bit.
inline float AdjustedLogit(float l, int32_t count, float bias, const PenaltyParams& p) {
  l += bias;
  if (p.hold_back && (count & PenaltyParams::kHeldBackBit) != 0) {
    return -std::numeric_limits<float>::infinity();
  }
  const int32_t c = count & PenaltyParams::kGeneratedMask;
  if (c > 0 || (count & PenaltyParams::kPromptTokenBit) != 0) {
    l = l > 0.0f ? l / p.repetition : l * p.repetition;
  }
  if (c > 0) {
    const volatile float scaled = p.frequency * static_cast<float>(c);  // no FMA
    l -= scaled + p.presence;
  }
  return l;
}
void ApplyPenalties(const float* logits, int64_t rows, int64_t vocab, const PenaltyParams* params,
                    float* out);
void CountTokens(const PenaltyParams* params, int64_t rows, int64_t vocab, const int32_t* tokens);

}  // namespace ramba::kernels::cpu

#endif  // RAMBA_KERNELS_CPU_OPS_H_
