#include "model/ramba_model.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace ramba {

using kernels::Backend;

// Scratch memory reused across forward calls: one growable backend buffer per slot.
struct RambaModel::Workspace {
  enum Slot {
    kTokens, kSeqOffsets, kRowSeq, kRowPos, kConvPtrs, kSsmPtrs,
    kH, kNorm, kInProj, kXbc, kY, kG,
    kX, kXn, kQ, kK, kV, kAttn, kGate, kUp, kKfull, kVfull, kMean, kLmk,
    kR, kIdx, kW, kLandmarkPtrs, kNumChunks, kChunkTablePtrs,
    kHsaQ, kHsaO, kLastRows, kLogits, kNumSlots
  };
  explicit Workspace(Backend* b) : backend(b), buffers(kNumSlots) {}

  template <class T>
  absl::StatusOr<T*> Get(Slot slot, int64_t count) {
    const size_t bytes = std::max<int64_t>(count, 1) * sizeof(T);
    kernels::Buffer& buf = buffers[slot];
    if (buf.size() < bytes) {
      buf.Reset();
      ASSIGN_OR_RETURN(buf, backend->Allocate(bytes + bytes / 4));
    }
    return buf.as<T>();
  }
  // Copies a host array into the slot and returns its backend address.
  template <class T>
  absl::StatusOr<T*> Put(Slot slot, const std::vector<T>& host) {
    ASSIGN_OR_RETURN(T * p, Get<T>(slot, host.size()));
    if (!host.empty()) RETURN_IF_ERROR(backend->Upload(p, host.data(), host.size() * sizeof(T)));
    return p;
  }

  Backend* backend;
  std::vector<kernels::Buffer> buffers;
};

RambaModel::RambaModel(ModelConfig config, ModelWeights weights, Backend* backend)
    : config_(std::move(config)), weights_(std::move(weights)), backend_(backend),
      workspace_(std::make_unique<Workspace>(backend)) {}

RambaModel::~RambaModel() = default;

absl::StatusOr<std::unique_ptr<RambaModel>> RambaModel::Create(ModelConfig config,
                                                               const TensorMap& tensors,
                                                               Backend* backend) {
  ASSIGN_OR_RETURN(ModelWeights weights, LoadModelWeights(tensors, &config, backend));
  return std::unique_ptr<RambaModel>(new RambaModel(std::move(config), std::move(weights), backend));
}

absl::StatusOr<std::unique_ptr<RambaModel>> RambaModel::Load(const std::string& model_dir,
                                                             Backend* backend) {
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir + "/config.json"));
  ASSIGN_OR_RETURN(TensorMap tensors, ReadSafetensors(model_dir + "/model.safetensors"));
  return Create(std::move(config), tensors, backend);
}

absl::StatusOr<std::unique_ptr<SessionState>> RambaModel::NewSession() const {
  return SessionState::Create(config_, backend_);
}

absl::Status RambaModel::Forward(absl::Span<SessionState* const> states,
                                 absl::Span<const absl::Span<const int32_t>> tokens,
                                 LogitsMode mode, std::vector<float>* logits) {
  absl::MutexLock lock(&mu_);
  return ForwardLocked(states, tokens, mode, logits);
}

absl::Status RambaModel::ForwardLocked(absl::Span<SessionState* const> states,
                                       absl::Span<const absl::Span<const int32_t>> tokens,
                                       LogitsMode mode, std::vector<float>* logits) {
  const ModelConfig& c = config_;
  Workspace& ws = *workspace_;
  Backend* be = backend_;
  if (states.size() != tokens.size()) {
    return absl::InvalidArgumentError(absl::StrCat("Forward got ", states.size(), " states and ",
                                                   tokens.size(), " token lists"));
  }
  // Validate everything before touching any state.
  const int64_t num_seqs = static_cast<int64_t>(states.size());
  std::vector<int32_t> all_tokens;
  std::vector<int64_t> seq_offsets = {0};
  std::vector<int32_t> row_seq;
  std::vector<int64_t> row_pos;
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (states[s] == nullptr) return absl::InvalidArgumentError("null session state");
    if (states[s]->backend() != be) {
      return absl::InvalidArgumentError("session state lives on another backend");
    }
    for (int64_t other = 0; other < s; ++other) {
      if (states[other] == states[s]) {
        return absl::InvalidArgumentError("the same session appears twice in one batch");
      }
    }
    for (size_t i = 0; i < tokens[s].size(); ++i) {
      const int32_t t = tokens[s][i];
      if (t < 0 || t >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("token id ", t, " at index ", i,
                                                       " is outside the vocabulary [0, ",
                                                       c.vocab_size, ")"));
      }
      all_tokens.push_back(t);
      row_seq.push_back(static_cast<int32_t>(s));
      row_pos.push_back(states[s]->position() + static_cast<int64_t>(i));
    }
    seq_offsets.push_back(static_cast<int64_t>(all_tokens.size()));
  }
  const int64_t rows = static_cast<int64_t>(all_tokens.size());
  if (logits != nullptr) logits->clear();
  if (rows == 0) return absl::OkStatus();

  const int64_t d = c.hidden_size, S = c.chunk_size, P = c.in_proj_dim();
  const int64_t d_inner = c.d_inner(), conv_dim = c.conv_dim();
  using W = Workspace;

  // ---- Embedding and per-batch index arrays ----
  ASSIGN_OR_RETURN(int32_t * tok_dev, ws.Put(W::kTokens, all_tokens));
  ASSIGN_OR_RETURN(int64_t * offsets_dev, ws.Put(W::kSeqOffsets, seq_offsets));
  ASSIGN_OR_RETURN(int32_t * row_seq_dev, ws.Put(W::kRowSeq, row_seq));
  ASSIGN_OR_RETURN(int64_t * row_pos_dev, ws.Put(W::kRowPos, row_pos));
  std::vector<float*> conv_ptrs, ssm_ptrs;
  for (int64_t l = 0; l < c.num_mamba_layers(); ++l) {
    for (int64_t s = 0; s < num_seqs; ++s) {
      conv_ptrs.push_back(states[s]->conv_state(l));
      ssm_ptrs.push_back(states[s]->ssm_state(l));
    }
  }
  ASSIGN_OR_RETURN(float** conv_ptrs_dev, ws.Put(W::kConvPtrs, conv_ptrs));
  ASSIGN_OR_RETURN(float** ssm_ptrs_dev, ws.Put(W::kSsmPtrs, ssm_ptrs));

  ASSIGN_OR_RETURN(float* h, ws.Get<float>(W::kH, rows * d));
  RETURN_IF_ERROR(be->Embed(tok_dev, rows, weights_.embeddings.view, h));

  ASSIGN_OR_RETURN(float* xn, ws.Get<float>(W::kNorm, rows * d));
  ASSIGN_OR_RETURN(float* zxbcdt, ws.Get<float>(W::kInProj, rows * P));
  ASSIGN_OR_RETURN(float* xbc, ws.Get<float>(W::kXbc, rows * conv_dim));
  ASSIGN_OR_RETURN(float* y, ws.Get<float>(W::kY, rows * d_inner));
  ASSIGN_OR_RETURN(float* g, ws.Get<float>(W::kG, rows * d_inner));

  kernels::SsmParams ssm;
  ssm.nheads = c.num_heads;
  ssm.headdim = c.head_dim;
  ssm.d_state = c.state_size;
  ssm.ngroups = c.n_groups;
  ssm.dt_min = c.time_step_min_limit;
  ssm.dt_max = c.time_step_max_limit;

  auto mamba_block = [&](int64_t layer) -> absl::Status {
    const MambaWeights& mw = weights_.mamba[layer];
    RETURN_IF_ERROR(be->RmsNorm(h, d, mw.norm.data(), xn, d, rows, d, c.layer_norm_epsilon));
    RETURN_IF_ERROR(be->Matmul(xn, d, rows, mw.in_proj.view, nullptr, zxbcdt, P, false));
    RETURN_IF_ERROR(be->CausalConv1dSilu(zxbcdt + d_inner, P, offsets_dev, num_seqs,
                                         conv_ptrs_dev + layer * num_seqs, mw.conv_weight.data(),
                                         c.use_conv_bias ? mw.conv_bias.data() : nullptr,
                                         conv_dim, c.conv_kernel, xbc, seq_offsets.data()));
    kernels::SsmParams p = ssm;
    p.A_log = mw.A_log.data();
    p.D = mw.D.data();
    p.dt_bias = mw.dt_bias.data();
    RETURN_IF_ERROR(be->SsmScan(xbc, conv_dim, zxbcdt + d_inner + conv_dim, P, offsets_dev,
                                num_seqs, ssm_ptrs_dev + layer * num_seqs, p, y,
                                seq_offsets.data()));
    RETURN_IF_ERROR(be->GatedRmsNorm(y, d_inner, zxbcdt, P, mw.gated_norm.data(), g, d_inner,
                                     rows, d_inner, d_inner / c.n_groups, c.layer_norm_epsilon));
    return be->Matmul(g, d_inner, rows, mw.out_proj.view, nullptr, h, d, true);
  };

  // ---- Lower decoder ----
  for (int64_t l = 0; l < c.num_lower_layers; ++l) RETURN_IF_ERROR(mamba_block(l));

  // ---- Chunking layer: encode every chunk completed by this batch ----
  const int64_t block_len = S + (c.has_cls ? 1 : 0);
  int64_t new_chunks = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t p0 = states[s]->position();
    new_chunks += (p0 + static_cast<int64_t>(tokens[s].size())) / S - p0 / S;
  }
  std::vector<std::shared_ptr<const ChunkKV>> encoded;
  float* landmarks_new = nullptr;
  // Gather chunk inputs (buffered rows + this batch's rows) into X, then refill every sequence's
  // partial-chunk buffer with its leftover rows (also when no chunk completes).
  const int64_t enc_rows = new_chunks * block_len;
  float* X = nullptr;
  if (new_chunks > 0) {
    ASSIGN_OR_RETURN(X, ws.Get<float>(W::kX, enc_rows * d));
  }
  {
    int64_t block = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
      SessionState* st = states[s];
      const int64_t T = static_cast<int64_t>(tokens[s].size());
      const float* u = h + seq_offsets[s] * d;
      int64_t buffered = st->buffered_rows();
      int64_t consumed = 0;  // rows of u used so far
      while (buffered + (T - consumed) >= S) {
        float* dst = X + block * block_len * d;
        if (buffered > 0) {
          RETURN_IF_ERROR(be->Copy(dst, st->chunk_buffer(), buffered * d * sizeof(float)));
        }
        const int64_t take = S - buffered;
        RETURN_IF_ERROR(be->Copy(dst + buffered * d, u + consumed * d, take * d * sizeof(float)));
        if (c.has_cls) {
          RETURN_IF_ERROR(be->Copy(dst + S * d, weights_.chunking.cls.data(), d * sizeof(float)));
        }
        consumed += take;
        buffered = 0;
        ++block;
      }
      const int64_t rest = T - consumed;
      if (rest > 0) {
        RETURN_IF_ERROR(be->Copy(st->chunk_buffer() + buffered * d, u + consumed * d,
                                 rest * d * sizeof(float)));
      }
    }
  }
  if (new_chunks > 0) {
    // Encoder.
    float* E = X;
    if (c.encoder_layers > 0) {
      const int64_t hd = c.attn_head_dim(), nh = c.num_attention_heads,
                    nkv = c.num_key_value_heads;
      const int64_t inter = c.encoder_intermediate_size();
      ASSIGN_OR_RETURN(float* exn, ws.Get<float>(W::kXn, enc_rows * d));
      ASSIGN_OR_RETURN(float* q, ws.Get<float>(W::kQ, enc_rows * nh * hd));
      ASSIGN_OR_RETURN(float* k, ws.Get<float>(W::kK, enc_rows * nkv * hd));
      ASSIGN_OR_RETURN(float* v, ws.Get<float>(W::kV, enc_rows * nkv * hd));
      ASSIGN_OR_RETURN(float* attn, ws.Get<float>(W::kAttn, enc_rows * nh * hd));
      ASSIGN_OR_RETURN(float* gate, ws.Get<float>(W::kGate, enc_rows * inter));
      ASSIGN_OR_RETURN(float* up, ws.Get<float>(W::kUp, enc_rows * inter));
      const float eps = c.encoder_rms_norm_eps;
      for (const EncoderLayerWeights& lw : weights_.chunking.layers) {
        RETURN_IF_ERROR(be->RmsNorm(X, d, lw.input_norm.data(), exn, d, enc_rows, d, eps));
        RETURN_IF_ERROR(be->Matmul(exn, d, enc_rows, lw.q.view, lw.q_bias.data(), q, nh * hd, false));
        RETURN_IF_ERROR(be->Matmul(exn, d, enc_rows, lw.k.view, lw.k_bias.data(), k, nkv * hd, false));
        RETURN_IF_ERROR(be->Matmul(exn, d, enc_rows, lw.v.view, lw.v_bias.data(), v, nkv * hd, false));
        RETURN_IF_ERROR(be->RmsNorm(q, hd, lw.q_norm.data(), q, hd, enc_rows * nh, hd, eps));
        RETURN_IF_ERROR(be->RmsNorm(k, hd, lw.k_norm.data(), k, hd, enc_rows * nkv, hd, eps));
        RETURN_IF_ERROR(be->RopeInChunk(q, enc_rows, nh, hd, block_len, c.encoder_rope_theta));
        RETURN_IF_ERROR(be->RopeInChunk(k, enc_rows, nkv, hd, block_len, c.encoder_rope_theta));
        RETURN_IF_ERROR(be->BlockAttention(q, k, v, attn, new_chunks, block_len, nh, nkv, hd));
        RETURN_IF_ERROR(be->Matmul(attn, nh * hd, enc_rows, lw.o.view, nullptr, X, d, true));
        RETURN_IF_ERROR(be->RmsNorm(X, d, lw.post_attention_norm.data(), exn, d, enc_rows, d, eps));
        RETURN_IF_ERROR(be->Matmul(exn, d, enc_rows, lw.gate.view, nullptr, gate, inter, false));
        RETURN_IF_ERROR(be->Matmul(exn, d, enc_rows, lw.up.view, nullptr, up, inter, false));
        RETURN_IF_ERROR(be->SwiGlu(gate, up, gate, enc_rows * inter));
        RETURN_IF_ERROR(be->Matmul(gate, inter, enc_rows, lw.down.view, nullptr, X, d, true));
      }
    }
    // Final norm (encoder.norm, or the chunking layer's own norm without an encoder), in place.
    RETURN_IF_ERROR(be->RmsNorm(X, d, weights_.chunking.final_norm.data(), E, d, enc_rows, d,
                                c.encoder_rms_norm_eps));
    const int64_t kv_dim = c.kv_dim();
    ASSIGN_OR_RETURN(float* kfull, ws.Get<float>(W::kKfull, enc_rows * kv_dim));
    ASSIGN_OR_RETURN(float* vfull, ws.Get<float>(W::kVfull, enc_rows * kv_dim));
    RETURN_IF_ERROR(be->Matmul(E, d, enc_rows, weights_.chunking.proj_k.view, nullptr, kfull,
                               kv_dim, false));
    RETURN_IF_ERROR(be->Matmul(E, d, enc_rows, weights_.chunking.proj_v.view, nullptr, vfull,
                               kv_dim, false));
    ASSIGN_OR_RETURN(landmarks_new, ws.Get<float>(W::kLmk, new_chunks * c.retrieval_dim));
    if (c.has_cls) {
      RETURN_IF_ERROR(be->Matmul(E + S * d, block_len * d, new_chunks,
                                 weights_.chunking.lmk_ln.view, nullptr, landmarks_new,
                                 c.retrieval_dim, false));
    } else {
      ASSIGN_OR_RETURN(float* mean, ws.Get<float>(W::kMean, new_chunks * d));
      RETURN_IF_ERROR(be->BlockMean(E, new_chunks, S, d, mean));
      RETURN_IF_ERROR(be->Matmul(mean, d, new_chunks, weights_.chunking.lmk_ln.view, nullptr,
                                 landmarks_new, c.retrieval_dim, false));
    }
    const size_t half = S * kv_dim * sizeof(float);
    for (int64_t b = 0; b < new_chunks; ++b) {
      auto chunk = std::make_shared<ChunkKV>();
      ASSIGN_OR_RETURN(chunk->kv, be->Allocate(2 * half));
      RETURN_IF_ERROR(be->Copy(chunk->kv.as<char>(), kfull + b * block_len * kv_dim, half));
      RETURN_IF_ERROR(be->Copy(chunk->kv.as<char>() + half, vfull + b * block_len * kv_dim, half));
      encoded.push_back(std::move(chunk));
    }
  }
  // Append the new chunks in sequence order (blocks were laid out that way).
  {
    int64_t b = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
      const int64_t p0 = states[s]->position();
      const int64_t n = (p0 + static_cast<int64_t>(tokens[s].size())) / S - p0 / S;
      for (int64_t j = 0; j < n; ++j, ++b) {
        RETURN_IF_ERROR(states[s]->AppendChunk(encoded[b], landmarks_new + b * c.retrieval_dim));
      }
    }
  }

  // ---- Retrieval layer: top-K chunks and stick-breaking weights per token ----
  const int64_t heads = c.retrieval_heads(), K = c.chunk_topk;
  ASSIGN_OR_RETURN(float* r, ws.Get<float>(W::kR, rows * c.retrieval_dim));
  RETURN_IF_ERROR(be->RmsNorm(h, d, weights_.retrieval.pre_norm.data(), xn, d, rows, d,
                              c.hsa_norm_eps));
  RETURN_IF_ERROR(be->Matmul(xn, d, rows, weights_.retrieval.ln.view, nullptr, r,
                             c.retrieval_dim, false));
  std::vector<const float*> landmark_ptrs;
  std::vector<int64_t> num_chunks;
  std::vector<const float* const*> table_ptrs;
  for (int64_t s = 0; s < num_seqs; ++s) {
    landmark_ptrs.push_back(states[s]->landmarks());
    num_chunks.push_back(states[s]->num_chunks());
    table_ptrs.push_back(states[s]->chunk_table());
  }
  kernels::ChunkMemoryBatch mem;
  mem.max_num_chunks = *std::max_element(num_chunks.begin(), num_chunks.end());
  mem.row_seq = row_seq_dev;
  mem.row_position = row_pos_dev;
  ASSIGN_OR_RETURN(mem.landmarks, ws.Put(W::kLandmarkPtrs, landmark_ptrs));
  ASSIGN_OR_RETURN(mem.num_chunks, ws.Put(W::kNumChunks, num_chunks));
  ASSIGN_OR_RETURN(mem.chunk_kv, ws.Put(W::kChunkTablePtrs, table_ptrs));
  ASSIGN_OR_RETURN(int32_t * idx, ws.Get<int32_t>(W::kIdx, rows * heads * K));
  ASSIGN_OR_RETURN(float* wts, ws.Get<float>(W::kW, rows * heads * K));
  RETURN_IF_ERROR(be->RetrieveChunks(r, rows, mem, c.retrieval_dim, heads, K, S, idx, wts));

  // ---- Upper decoder: [HSA, Mamba x G] per group ----
  ASSIGN_OR_RETURN(float* hq, ws.Get<float>(W::kHsaQ, rows * d));
  ASSIGN_OR_RETURN(float* ho, ws.Get<float>(W::kHsaO, rows * d));
  int64_t mamba_layer = c.num_lower_layers;
  for (const HsaWeights& hw : weights_.hsa) {
    RETURN_IF_ERROR(be->RmsNorm(h, d, hw.pre_norm.data(), xn, d, rows, d, c.hsa_norm_eps));
    RETURN_IF_ERROR(be->Matmul(xn, d, rows, hw.q_proj.view, nullptr, hq, d, false));
    RETURN_IF_ERROR(be->SparseChunkAttention(hq, rows, mem, idx, wts, heads, K,
                                             c.num_attention_heads, c.num_kv_heads,
                                             c.attn_head_dim(), S, ho));
    RETURN_IF_ERROR(be->Matmul(ho, d, rows, hw.o_proj.view, nullptr, h, d, true));
    for (int64_t j = 0; j < c.num_mamba_per_gca; ++j) RETURN_IF_ERROR(mamba_block(mamba_layer++));
  }

  for (int64_t s = 0; s < num_seqs; ++s) {
    states[s]->AdvancePosition(static_cast<int64_t>(tokens[s].size()));
  }

  // ---- Final norm and LM head on the rows that need logits ----
  if (mode == LogitsMode::kNone || logits == nullptr) return be->Synchronize();
  const float* src = h;
  int64_t out_rows = rows;
  if (mode == LogitsMode::kLast) {
    out_rows = 0;
    ASSIGN_OR_RETURN(float* last, ws.Get<float>(W::kLastRows, num_seqs * d));
    for (int64_t s = 0; s < num_seqs; ++s) {
      if (seq_offsets[s + 1] == seq_offsets[s]) {
        return absl::InvalidArgumentError(
            absl::StrCat("sequence ", s, " has no tokens, so it has no last-token logits"));
      }
      RETURN_IF_ERROR(be->Copy(last + out_rows * d, h + (seq_offsets[s + 1] - 1) * d,
                               d * sizeof(float)));
      ++out_rows;
    }
    src = last;
  }
  ASSIGN_OR_RETURN(float* normed, ws.Get<float>(W::kNorm, out_rows * d));
  RETURN_IF_ERROR(be->RmsNorm(src, d, weights_.norm_f.data(), normed, d, out_rows, d,
                              c.layer_norm_epsilon));
  ASSIGN_OR_RETURN(float* out, ws.Get<float>(W::kLogits, out_rows * c.vocab_size));
  RETURN_IF_ERROR(be->Matmul(normed, d, out_rows, weights_.lm_head.view, nullptr, out,
                             c.vocab_size, false));
  logits->resize(out_rows * c.vocab_size);
  return be->Download(logits->data(), out, logits->size() * sizeof(float));
}

absl::Status RambaModel::Prefill(SessionState* state, absl::Span<const int32_t> tokens,
                                 std::vector<float>* last_logits, int64_t segment_tokens) {
  if (segment_tokens <= 0) {
    return absl::InvalidArgumentError("segment_tokens must be positive");
  }
  // Validate all ids first so a bad id in a late segment does not leave a half-fed state.
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", tokens[i], " at index ", i,
                                                     " is outside the vocabulary [0, ",
                                                     config_.vocab_size, ")"));
    }
  }
  SessionState* one[] = {state};
  for (size_t begin = 0; begin < tokens.size(); begin += segment_tokens) {
    const size_t n = std::min<size_t>(segment_tokens, tokens.size() - begin);
    const bool last = begin + n == tokens.size();
    absl::Span<const int32_t> seg[] = {tokens.subspan(begin, n)};
    RETURN_IF_ERROR(Forward(one, seg, last && last_logits ? LogitsMode::kLast : LogitsMode::kNone,
                            last ? last_logits : nullptr));
  }
  return absl::OkStatus();
}

absl::Status RambaModel::Decode(absl::Span<SessionState* const> states,
                                absl::Span<const int32_t> tokens, std::vector<float>* logits) {
  if (states.size() != tokens.size()) {
    return absl::InvalidArgumentError(absl::StrCat("Decode got ", states.size(), " states and ",
                                                   tokens.size(), " tokens"));
  }
  std::vector<absl::Span<const int32_t>> per_seq;
  per_seq.reserve(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) per_seq.push_back(tokens.subspan(i, 1));
  return Forward(states, per_seq, LogitsMode::kLast, logits);
}

}  // namespace ramba
