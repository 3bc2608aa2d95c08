// RAMba weights resident on a backend, named and shaped as in spec section 7.
#ifndef RAMBA_MODEL_WEIGHTS_H_
#define RAMBA_MODEL_WEIGHTS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "model/config.h"
#include "model/safetensors.h"

namespace ramba {

// A weight matrix [out, in] in the backend's weight dtype.
struct Matrix {
  kernels::Buffer buffer;
  kernels::MatrixView view;
};

// A float32 vector (norm weights, biases, per-head parameters).
struct Vector {
  kernels::Buffer buffer;
  int64_t size = 0;
  const float* data() const { return buffer.as<const float>(); }
};

struct MambaWeights {
  Vector norm;         // block pre-norm [hidden]
  Matrix in_proj;      // [in_proj_dim, hidden]
  Vector conv_weight;  // [conv_dim, conv_kernel]
  Vector conv_bias;    // [conv_dim] (empty when use_conv_bias is false)
  Vector dt_bias, A_log, D;  // [num_heads]
  Vector gated_norm;   // [d_inner]
  Matrix out_proj;     // [hidden, d_inner]
};

struct EncoderLayerWeights {
  Vector input_norm, post_attention_norm;  // [hidden]
  Matrix q, k, v, o;                       // q: [nh*hd, hidden], k/v: [nkv*hd, hidden], o: [hidden, nh*hd]
  Vector q_bias, k_bias, v_bias;
  Vector q_norm, k_norm;                   // [hd]
  Matrix gate, up, down;                   // SwiGLU
};

struct ChunkingWeights {
  std::vector<EncoderLayerWeights> layers;
  Vector final_norm;  // encoder.norm when encoder_layers > 0, else the chunking layer's norm
  Vector cls;         // [hidden], empty when the checkpoint has no cls_emb
  Matrix proj_k, proj_v;  // [kv_dim, hidden]
  Matrix lmk_ln;          // [retrieval_dim, hidden]
};

struct RetrievalWeights {
  Vector pre_norm;
  Matrix ln;  // [retrieval_dim, hidden]
};

struct HsaWeights {
  Vector pre_norm;
  Matrix q_proj, o_proj;  // [hidden, hidden]
};

struct ModelWeights {
  Matrix embeddings;       // [vocab, hidden]
  Matrix lm_head;          // view aliases embeddings when tied (buffer then empty)
  Vector norm_f;
  std::vector<MambaWeights> mamba;  // lower blocks, then upper blocks in order
  ChunkingWeights chunking;
  RetrievalWeights retrieval;
  std::vector<HsaWeights> hsa;
};

// Canonical checkpoint name of a tensor: strips "module." and "backbone." prefixes and maps the
// older "embedding." to "embeddings.". "lm_head.weight" stays as is.
std::string CanonicalTensorName(const std::string& name);

// Uploads `tensors` to `backend` as ModelWeights for `config`. Sets config->has_cls from the
// presence of the chunking layer's cls_emb. Every missing or mis-shaped tensor is an
// InvalidArgument naming it and the expected shape; unused tensors are ignored.
absl::StatusOr<ModelWeights> LoadModelWeights(const TensorMap& tensors, ModelConfig* config,
                                              kernels::Backend* backend);

// Random weights for `config` (normal with the reference's init scales), for tests and
// benchmarks of configurations without a checkpoint. Deterministic in `seed`.
TensorMap RandomTensors(const ModelConfig& config, uint64_t seed, bool with_cls = true);

}  // namespace ramba

#endif  // RAMBA_MODEL_WEIGHTS_H_
