#include "model/weights.h"

#include <cmath>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"

namespace ramba {
namespace {

using kernels::Backend;
using kernels::DType;

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

int64_t Product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Canonical name -> tensor, built once so lookups ignore prefixes.
class TensorIndex {
 public:
  explicit TensorIndex(const TensorMap& tensors) {
    for (const auto& [name, t] : tensors) index_[CanonicalTensorName(name)] = &t;
  }
  const TensorData* Find(const std::string& name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : it->second;
  }
  absl::StatusOr<const TensorData*> Get(const std::string& name,
                                        const std::vector<int64_t>& shape) const {
    const TensorData* t = Find(name);
    if (t == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("checkpoint is missing tensor '", name, "' (expected shape ",
                       ShapeString(shape), ")"));
    }
    // Accept any shape with the same non-unit dimensions (e.g. conv1d [C, 1, K] vs [C, K],
    // cls_emb [1, 1, d] vs [d]).
    std::vector<int64_t> a, b;
    for (int64_t d : t->shape) if (d != 1) a.push_back(d);
    for (int64_t d : shape) if (d != 1) b.push_back(d);
    if (a != b) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "' has shape ", ShapeString(t->shape), ", expected ",
                       ShapeString(shape)));
    }
    return t;
  }

 private:
  std::map<std::string, const TensorData*> index_;
};

absl::StatusOr<Vector> UploadVector(const TensorData& t, Backend* backend) {
  std::vector<float> values = t.ToFloat();
  Vector v;
  v.size = static_cast<int64_t>(values.size());
  ASSIGN_OR_RETURN(v.buffer, backend->Allocate(std::max<size_t>(1, values.size()) * 4));
  RETURN_IF_ERROR(backend->Upload(v.buffer.data(), values.data(), values.size() * 4));
  return v;
}

absl::StatusOr<Matrix> UploadMatrix(const TensorData& t, int64_t rows, int64_t cols,
                                    Backend* backend) {
  Matrix m;
  const DType target = backend->weight_dtype();
  std::string converted;
  const std::string* bytes = &t.bytes;
  if (t.dtype != target) {
    std::vector<float> f = t.ToFloat();
    if (target == DType::kF32) {
      converted.assign(reinterpret_cast<const char*>(f.data()), f.size() * 4);
    } else {
      std::vector<uint16_t> h(f.size());
      for (size_t i = 0; i < f.size(); ++i) {
        h[i] = target == DType::kBF16 ? kernels::F32ToBf16(f[i]) : kernels::F32ToF16(f[i]);
      }
      converted.assign(reinterpret_cast<const char*>(h.data()), h.size() * 2);
    }
    bytes = &converted;
  }
  ASSIGN_OR_RETURN(m.buffer, backend->Allocate(bytes->size()));
  RETURN_IF_ERROR(backend->Upload(m.buffer.data(), bytes->data(), bytes->size()));
  m.view = kernels::MatrixView{m.buffer.data(), target, rows, cols};
  return m;
}

class Loader {
 public:
  Loader(const TensorMap& tensors, Backend* backend) : index_(tensors), backend_(backend) {}

  // A float32 vector of `shape` (flattened).
  absl::StatusOr<Vector> Vec(const std::string& name, std::vector<int64_t> shape) {
    ASSIGN_OR_RETURN(const TensorData* t, index_.Get(name, shape));
    return UploadVector(*t, backend_);
  }
  absl::StatusOr<Vector> Vec(const std::string& name, int64_t n) {
    return Vec(name, std::vector<int64_t>{n});
  }
  absl::StatusOr<Matrix> Mat(const std::string& name, int64_t rows, int64_t cols) {
    ASSIGN_OR_RETURN(const TensorData* t, index_.Get(name, {rows, cols}));
    return UploadMatrix(*t, rows, cols, backend_);
  }
  bool Has(const std::string& name) const { return index_.Find(name) != nullptr; }

 private:
  TensorIndex index_;
  Backend* backend_;
};

absl::StatusOr<MambaWeights> LoadMamba(Loader& l, const ModelConfig& c, int64_t i) {
  const std::string p = absl::StrCat("layers.", i, ".");
  const std::string m = p + "mixer.";
  MambaWeights w;
  ASSIGN_OR_RETURN(w.norm, l.Vec(p + "norm.weight", c.hidden_size));
  ASSIGN_OR_RETURN(w.in_proj, l.Mat(m + "in_proj.weight", c.in_proj_dim(), c.hidden_size));
  ASSIGN_OR_RETURN(w.conv_weight, l.Vec(m + "conv1d.weight", {c.conv_dim(), 1, c.conv_kernel}));
  if (c.use_conv_bias) {
    ASSIGN_OR_RETURN(w.conv_bias, l.Vec(m + "conv1d.bias", c.conv_dim()));
  }
  ASSIGN_OR_RETURN(w.dt_bias, l.Vec(m + "dt_bias", c.num_heads));
  ASSIGN_OR_RETURN(w.A_log, l.Vec(m + "A_log", c.num_heads));
  ASSIGN_OR_RETURN(w.D, l.Vec(m + "D", c.num_heads));
  ASSIGN_OR_RETURN(w.gated_norm, l.Vec(m + "norm.weight", c.d_inner()));
  ASSIGN_OR_RETURN(w.out_proj, l.Mat(m + "out_proj.weight", c.hidden_size, c.d_inner()));
  return w;
}

absl::StatusOr<EncoderLayerWeights> LoadEncoderLayer(Loader& l, const ModelConfig& c,
                                                     const std::string& p) {
  const int64_t d = c.hidden_size, hd = c.attn_head_dim();
  const int64_t q_dim = c.num_attention_heads * hd, kv_dim = c.num_key_value_heads * hd;
  const int64_t inter = c.encoder_intermediate_size();
  EncoderLayerWeights w;
  ASSIGN_OR_RETURN(w.input_norm, l.Vec(p + "input_layernorm.weight", d));
  ASSIGN_OR_RETURN(w.post_attention_norm, l.Vec(p + "post_attention_layernorm.weight", d));
  ASSIGN_OR_RETURN(w.q, l.Mat(p + "self_attn.q_proj.weight", q_dim, d));
  ASSIGN_OR_RETURN(w.k, l.Mat(p + "self_attn.k_proj.weight", kv_dim, d));
  ASSIGN_OR_RETURN(w.v, l.Mat(p + "self_attn.v_proj.weight", kv_dim, d));
  ASSIGN_OR_RETURN(w.o, l.Mat(p + "self_attn.o_proj.weight", d, q_dim));
  ASSIGN_OR_RETURN(w.q_bias, l.Vec(p + "self_attn.q_proj.bias", q_dim));
  ASSIGN_OR_RETURN(w.k_bias, l.Vec(p + "self_attn.k_proj.bias", kv_dim));
  ASSIGN_OR_RETURN(w.v_bias, l.Vec(p + "self_attn.v_proj.bias", kv_dim));
  ASSIGN_OR_RETURN(w.q_norm, l.Vec(p + "self_attn.q_norm.weight", hd));
  ASSIGN_OR_RETURN(w.k_norm, l.Vec(p + "self_attn.k_norm.weight", hd));
  ASSIGN_OR_RETURN(w.gate, l.Mat(p + "mlp.gate_proj.weight", inter, d));
  ASSIGN_OR_RETURN(w.up, l.Mat(p + "mlp.up_proj.weight", inter, d));
  ASSIGN_OR_RETURN(w.down, l.Mat(p + "mlp.down_proj.weight", d, inter));
  return w;
}

}  // namespace

std::string CanonicalTensorName(const std::string& name) {
  std::string n = name;
  for (const char* prefix : {"module.", "backbone.", "model."}) {
    if (absl::StartsWith(n, prefix)) n = n.substr(std::string(prefix).size());
  }
  if (absl::StartsWith(n, "embedding.")) n = "embeddings." + n.substr(10);
  return n;
}


absl::StatusOr<ModelWeights> LoadModelWeights(const TensorMap& tensors, ModelConfig* config,
                                              kernels::Backend* backend) {
  ModelConfig& c = *config;
  RETURN_IF_ERROR(c.Validate());
  Loader l(tensors, backend);
  ModelWeights w;
  const int64_t d = c.hidden_size;
  ASSIGN_OR_RETURN(w.embeddings, l.Mat("embeddings.weight", c.vocab_size, d));
  if (l.Has("lm_head.weight")) {
    ASSIGN_OR_RETURN(w.lm_head, l.Mat("lm_head.weight", c.vocab_size, d));
  } else if (c.tie_word_embeddings) {
    w.lm_head.view = w.embeddings.view;
  } else {
    return absl::InvalidArgumentError(
        "checkpoint is missing tensor 'lm_head.weight' and tie_word_embeddings is false");
  }
  ASSIGN_OR_RETURN(w.norm_f, l.Vec("norm_f.weight", d));
  for (int64_t i = 0; i < c.num_lower_layers; ++i) {
    ASSIGN_OR_RETURN(MambaWeights m, LoadMamba(l, c, i));
    w.mamba.push_back(std::move(m));
  }
  for (int64_t g = 0; g < c.num_hsa_layers(); ++g) {
    for (int64_t j = 0; j < c.num_mamba_per_gca; ++j) {
      ASSIGN_OR_RETURN(MambaWeights m, LoadMamba(l, c, c.upper_mamba_index(g, j)));
      w.mamba.push_back(std::move(m));
    }
  }

  const std::string cp = absl::StrCat("layers.", c.chunking_layer_index(), ".");
  ChunkingWeights& ch = w.chunking;
  if (c.encoder_layers > 0) {
    for (int64_t j = 0; j < c.encoder_layers; ++j) {
      ASSIGN_OR_RETURN(EncoderLayerWeights e,
                       LoadEncoderLayer(l, c, absl::StrCat(cp, "encoder.layers.", j, ".")));
      ch.layers.push_back(std::move(e));
    }
    ASSIGN_OR_RETURN(ch.final_norm, l.Vec(cp + "encoder.norm.weight", d));
  } else {
    ASSIGN_OR_RETURN(ch.final_norm, l.Vec(cp + "norm.weight", d));
  }
  c.has_cls = l.Has(cp + "cls_emb");
  if (c.has_cls) {
    if (c.encoder_layers == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", cp, "cls_emb' requires encoder_layers > 0"));
    }
    ASSIGN_OR_RETURN(ch.cls, l.Vec(cp + "cls_emb", {1, 1, d}));
  }
  ASSIGN_OR_RETURN(ch.proj_k, l.Mat(cp + "proj_k.weight", c.kv_dim(), d));
  ASSIGN_OR_RETURN(ch.proj_v, l.Mat(cp + "proj_v.weight", c.kv_dim(), d));
  ASSIGN_OR_RETURN(ch.lmk_ln, l.Mat(cp + "lmk_ln.weight", c.retrieval_dim, d));

  const std::string rp = absl::StrCat("layers.", c.retrieval_layer_index(), ".");
  ASSIGN_OR_RETURN(w.retrieval.pre_norm, l.Vec(rp + "pre_norm.weight", d));
  ASSIGN_OR_RETURN(w.retrieval.ln, l.Mat(rp + "ln.weight", c.retrieval_dim, d));

  for (int64_t g = 0; g < c.num_hsa_layers(); ++g) {
    const std::string hp = absl::StrCat("layers.", c.hsa_layer_index(g), ".");
    HsaWeights h;
    ASSIGN_OR_RETURN(h.pre_norm, l.Vec(hp + "pre_norm.weight", d));
    ASSIGN_OR_RETURN(h.q_proj, l.Mat(hp + "q_proj.weight", d, d));
    ASSIGN_OR_RETURN(h.o_proj, l.Mat(hp + "o_proj.weight", d, d));
    w.hsa.push_back(std::move(h));
  }
  return w;
}

namespace {

class RandomFiller {
 public:
  explicit RandomFiller(uint64_t seed) : rng_(seed) {}
  void Normal(TensorMap& m, const std::string& name, std::vector<int64_t> shape, float std) {
    std::normal_distribution<float> dist(0.0f, std);
    std::vector<float> v(Product(shape));
    for (float& x : v) x = dist(rng_);
    m[name] = MakeF32Tensor(std::move(shape), v);
  }
  void Uniform(TensorMap& m, const std::string& name, std::vector<int64_t> shape, float lo,
               float hi) {
    std::uniform_real_distribution<float> dist(lo, hi);
    std::vector<float> v(Product(shape));
    for (float& x : v) x = dist(rng_);
    m[name] = MakeF32Tensor(std::move(shape), v);
  }
  void Const(TensorMap& m, const std::string& name, std::vector<int64_t> shape, float value) {
    m[name] = MakeF32Tensor(shape, std::vector<float>(Product(shape), value));
  }
  std::mt19937_64& rng() { return rng_; }

 private:
  std::mt19937_64 rng_;
};

void RandomMamba(RandomFiller& r, TensorMap& m, const ModelConfig& c, int64_t i) {
  const std::string p = absl::StrCat("backbone.layers.", i, ".");
  const std::string x = p + "mixer.";
  const float std = 0.02f;
  r.Const(m, p + "norm.weight", {c.hidden_size}, 1.0f);
  r.Normal(m, x + "in_proj.weight", {c.in_proj_dim(), c.hidden_size}, std);
  const float bound = 1.0f / std::sqrt(static_cast<float>(c.conv_kernel));
  r.Uniform(m, x + "conv1d.weight", {c.conv_dim(), 1, c.conv_kernel}, -bound, bound);
  if (c.use_conv_bias) r.Uniform(m, x + "conv1d.bias", {c.conv_dim()}, -bound, bound);
  // dt in [1e-3, 1e-1] log-uniformly, stored as its inverse softplus (reference init).
  std::uniform_real_distribution<float> u(std::log(1e-3f), std::log(1e-1f));
  std::vector<float> dt_bias(c.num_heads), a_log(c.num_heads);
  std::uniform_real_distribution<float> a(1.0f, 16.0f);
  for (int64_t h = 0; h < c.num_heads; ++h) {
    const float dt = std::exp(u(r.rng()));
    dt_bias[h] = dt + std::log(-std::expm1(-dt));
    a_log[h] = std::log(a(r.rng()));
  }
  m[x + "dt_bias"] = MakeF32Tensor({c.num_heads}, dt_bias);
  m[x + "A_log"] = MakeF32Tensor({c.num_heads}, a_log);
  r.Const(m, x + "D", {c.num_heads}, 1.0f);
  r.Const(m, x + "norm.weight", {c.d_inner()}, 1.0f);
  r.Normal(m, x + "out_proj.weight", {c.hidden_size, c.d_inner()}, std);
}

}  // namespace

TensorMap RandomTensors(const ModelConfig& c, uint64_t seed, bool with_cls) {
  RandomFiller r(seed);
  TensorMap m;
  const int64_t d = c.hidden_size, hd = c.attn_head_dim();
  const float std = 0.02f;
  r.Normal(m, "backbone.embeddings.weight", {c.vocab_size, d}, std);
  r.Const(m, "backbone.norm_f.weight", {d}, 1.0f);
  if (!c.tie_word_embeddings) r.Normal(m, "lm_head.weight", {c.vocab_size, d}, std);
  for (int64_t i = 0; i < c.num_lower_layers; ++i) RandomMamba(r, m, c, i);
  for (int64_t g = 0; g < c.num_hsa_layers(); ++g) {
    for (int64_t j = 0; j < c.num_mamba_per_gca; ++j) RandomMamba(r, m, c, c.upper_mamba_index(g, j));
  }
  const std::string cp = absl::StrCat("backbone.layers.", c.chunking_layer_index(), ".");
  const int64_t q_dim = c.num_attention_heads * hd, kv_dim = c.num_key_value_heads * hd;
  const int64_t inter = c.encoder_intermediate_size();
  for (int64_t j = 0; j < c.encoder_layers; ++j) {
    const std::string p = absl::StrCat(cp, "encoder.layers.", j, ".");
    r.Const(m, p + "input_layernorm.weight", {d}, 1.0f);
    r.Const(m, p + "post_attention_layernorm.weight", {d}, 1.0f);
    r.Normal(m, p + "self_attn.q_proj.weight", {q_dim, d}, std);
    r.Normal(m, p + "self_attn.k_proj.weight", {kv_dim, d}, std);
    r.Normal(m, p + "self_attn.v_proj.weight", {kv_dim, d}, std);
    r.Normal(m, p + "self_attn.o_proj.weight", {d, q_dim}, std);
    r.Normal(m, p + "self_attn.q_proj.bias", {q_dim}, std);
    r.Normal(m, p + "self_attn.k_proj.bias", {kv_dim}, std);
    r.Normal(m, p + "self_attn.v_proj.bias", {kv_dim}, std);
    r.Const(m, p + "self_attn.q_norm.weight", {hd}, 1.0f);
    r.Const(m, p + "self_attn.k_norm.weight", {hd}, 1.0f);
    r.Normal(m, p + "mlp.gate_proj.weight", {inter, d}, std);
    r.Normal(m, p + "mlp.up_proj.weight", {inter, d}, std);
    r.Normal(m, p + "mlp.down_proj.weight", {d, inter}, std);
  }
  r.Const(m, cp + (c.encoder_layers > 0 ? "encoder.norm.weight" : "norm.weight"), {d}, 1.0f);
  if (with_cls && c.encoder_layers > 0) r.Normal(m, cp + "cls_emb", {1, 1, d}, std);
  r.Normal(m, cp + "proj_k.weight", {c.kv_dim(), d}, std);
  r.Normal(m, cp + "proj_v.weight", {c.kv_dim(), d}, std);
  // Retrieval projections get a larger scale so landmark scores spread out (distinct top-K).
  const float retrieval_std = 1.0f / std::sqrt(static_cast<float>(d));
  r.Normal(m, cp + "lmk_ln.weight", {c.retrieval_dim, d}, retrieval_std);
  const std::string rp = absl::StrCat("backbone.layers.", c.retrieval_layer_index(), ".");
  r.Const(m, rp + "pre_norm.weight", {d}, 1.0f);
  r.Normal(m, rp + "ln.weight", {c.retrieval_dim, d}, retrieval_std);
  for (int64_t g = 0; g < c.num_hsa_layers(); ++g) {
    const std::string hp = absl::StrCat("backbone.layers.", c.hsa_layer_index(g), ".");
    r.Const(m, hp + "pre_norm.weight", {d}, 1.0f);
    r.Normal(m, hp + "q_proj.weight", {d, d}, std);
    r.Normal(m, hp + "o_proj.weight", {d, d}, std);
  }
  return m;
}

}  // namespace ramba
