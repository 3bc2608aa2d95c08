// RAMba model configuration: the HF-style config.json of the reference implementation.
#ifndef RAMBA_MODEL_CONFIG_H_
#define RAMBA_MODEL_CONFIG_H_

#include <cstdint>
#include <limits>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace ramba {

// Field names follow config.json. Derived sizes are member functions. A config that the engine
// cannot run (unknown feature switched on, inconsistent sizes) is rejected by Validate().
struct ModelConfig {
  int64_t hidden_size = 0;          // d_model
  int64_t vocab_size = 0;
  int64_t num_lower_layers = 0;     // Mamba blocks below the chunking layer
  int64_t num_upper_layers = 0;     // Mamba blocks above it, in HSA groups
  int64_t num_upper_groups = 1;     // only 1 is supported
  int64_t num_mamba_per_gca = 1;    // Mamba blocks after each HSA layer
  // Mamba-2 mixer.
  int64_t state_size = 128;         // d_state
  int64_t head_dim = 64;            // Mamba head dim (not the attention head dim)
  int64_t num_heads = 0;            // Mamba heads; must equal expand * hidden_size / head_dim
  int64_t expand = 2;
  int64_t n_groups = 1;
  int64_t conv_kernel = 4;
  int64_t mamba_chunk_size = 256;   // SSD block length (prefill implementation detail)
  bool use_conv_bias = true;
  bool use_bias = false;            // in_proj/out_proj bias: only false is supported
  float time_step_min_limit = 0.0f; // time_step_limit[0]
  float time_step_max_limit =       // time_step_limit[1]; +inf (JSON Infinity) means no clamp
      std::numeric_limits<float>::infinity();
  float layer_norm_epsilon = 1e-5f;
  // Chunk memory and HSA.
  int64_t chunk_size = 64;
  int64_t chunk_topk = 8;
  int64_t retrieval_dim = 0;
  int64_t encoder_layers = 1;
  int64_t num_attention_heads = 0;  // HSA and encoder query heads
  int64_t num_key_value_heads = 0;  // encoder kv heads
  int64_t num_kv_heads = 1;         // HSA chunk-memory kv heads (proj_k / proj_v)
  bool singlehead_retrieval = false;// one retrieval head shared by all kv heads
  // The next three are fixed in the reference (its LlamaConfig / RMSNorm defaults); config.json
  // may override them with these ramba-only keys.
  float encoder_rms_norm_eps = 1e-6f;
  float encoder_rope_theta = 10000.0f;
  float hsa_norm_eps = 1e-6f;       // pre_norm of retrieval and HSA layers, chunking norm
  bool tie_word_embeddings = true;
  int64_t bos_token_id = 0;
  int64_t eos_token_id = 0;
  int64_t pad_token_id = 0;
  // Set by the weight loader (checkpoint has layers.N.cls_emb). ParseModelConfig only presets it
  // from the informational key enable_enc_cls (default: encoder_layers > 0).
  bool has_cls = true;

  int64_t d_inner() const { return expand * hidden_size; }
  int64_t conv_dim() const { return d_inner() + 2 * n_groups * state_size; }
  int64_t in_proj_dim() const { return 2 * d_inner() + 2 * n_groups * state_size + num_heads; }
  int64_t attn_head_dim() const { return hidden_size / num_attention_heads; }
  int64_t kv_dim() const { return num_kv_heads * attn_head_dim(); }
  // One chunk's K and V (chunk_size rows of kv_dim each): what a chunk memory block holds.
  int64_t chunk_kv_floats() const { return 2 * chunk_size * kv_dim(); }
  int64_t encoder_intermediate_size() const { return (hidden_size * 8 / 3) / 64 * 64; }
  // Rows the chunk encoder takes per chunk: its tokens, then the CLS row when there is one.
  int64_t encoder_block_len() const { return chunk_size + (has_cls ? 1 : 0); }
  int64_t retrieval_heads() const { return singlehead_retrieval ? 1 : num_kv_heads; }
  int64_t num_hsa_layers() const { return num_upper_layers / num_mamba_per_gca; }
  int64_t num_mamba_layers() const { return num_lower_layers + num_upper_layers; }
  // ModuleList indices of the reference layout (spec section 7).
  int64_t chunking_layer_index() const { return num_lower_layers; }
  int64_t retrieval_layer_index() const { return num_lower_layers + 1; }
  // Index of HSA layer g (0-based) and of Mamba block j after it.
  int64_t hsa_layer_index(int64_t g) const {
    return num_lower_layers + 2 + g * (1 + num_mamba_per_gca);
  }
  int64_t upper_mamba_index(int64_t g, int64_t j) const { return hsa_layer_index(g) + 1 + j; }

  // Checks every value the engine relies on; the message names the offending field.
  absl::Status Validate() const;
};

// Parses config.json text. Accepts the reference's non-standard literals Infinity, -Infinity and
// NaN. Missing optional keys (and keys whose value is null) take the defaults above; unknown keys
// are ignored; keys that switch on features the engine does not implement (e.g. enable_softmax,
// enable_qk_norm, hsa_only=false) are rejected. Required: hidden_size (or d_model), vocab_size,
// num_lower_layers, num_upper_layers, num_attention_heads, retrieval_dim. num_heads defaults to
// expand * hidden_size / head_dim, num_key_value_heads to num_attention_heads. The result has
// passed Validate(). Every error is InvalidArgument naming the key (or the parse position).
absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text);
// Reads and parses a config.json file: NotFound when it does not exist.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path);

// Serialises to config.json text in the same key names (used by tests and tools). Infinite and NaN
// values are written as the reference's literals Infinity / -Infinity / NaN, which
// ParseModelConfig and Python's json module read back.
std::string ModelConfigToJson(const ModelConfig& config);

// The shape of the reference's 370M model (configs/ramba-370M/config_enc1_4096.json of the
// authors' repository): for tests and benchmarks with random weights.
ModelConfig Reference370MConfig();

}  // namespace ramba

#endif  // RAMBA_MODEL_CONFIG_H_
