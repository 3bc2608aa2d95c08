#include "model/ramba_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace ramba {

using kernels::Backend;

// Scratch memory reused across forward calls: one growable backend buffer per slot.
struct RambaModel::Workspace {
  // clang-format off
  enum Slot {
    kTokens, kSeqOffsets, kRowSeq, kRowPos, kConvPtrs, kSsmPtrs,
    kH, kNorm, kInProj, kXbc, kY, kG,
    kX, kXn, kQ, kK, kV, kAttn, kGate, kUp, kKfull, kVfull, kMean, kLmk,
    kR, kIdx, kW, kLandmarkPtrs, kNumChunks, kChunkTablePtrs,
    kHsaQ, kHsaO, kLastRows, kLogits, kBufferRows, kSampled,
    // Launched steps' tokens in turn (launch_parity_), read by the next launch's carried rows: no
    // other call writes them.
    kLaunchSampled, kLaunchSampledOther,
    kHostChunks, kStagedBlocks, kStagedSlots, kStagedTables, kStagedNumChunks, kStagedIdx,
    kStageHostOffsets, kStageTableOffsets, kStageBlocks, kStagePicks, kStageSources, kStageCount,
    kStageEntries, kStageTables, kCacheBlocks, kCacheTags, kStagedCopies,
    kNumSlots
  };
  // clang-format on
  explicit Workspace(Backend* b) : backend(b), buffers(kNumSlots) {}
  // The launched-step token slot of a launch parity (RambaModel::launch_parity_).
  static Slot LaunchSampled(int parity) {
    return parity == 0 ? kLaunchSampled : kLaunchSampledOther;
  }

  template <class T>
  absl::StatusOr<T*> Get(Slot slot, int64_t count) {
    kernels::Buffer& buf = buffers[slot];
    RETURN_IF_ERROR(Reserve(buf, std::max<int64_t>(count, 1) * sizeof(T)));
    return buf.as<T>();
  }
  // Grows buf to at least `bytes` (with a quarter more), which moves it.
  absl::Status Reserve(kernels::Buffer& buf, size_t bytes) {
    if (buf.size() >= bytes) return absl::OkStatus();
    if (recording) {
      return absl::FailedPreconditionError("workspace must not grow while a graph is recorded");
    }
    buf.Reset();
    ASSIGN_OR_RETURN(buf, backend->Allocate(bytes + bytes / 4));
    ++generation;  // recorded graphs hold the old address
    return absl::OkStatus();
  }
  // Copies a host array to the backend and sets *out to its address: into the slot's buffer at
  // once, or, between BeginStaging() and FlushStaged(), packed with the other staged arrays into
  // one buffer that a single copy uploads (*out set by the flush). A decode step's ten small
  // arrays took ten copies, each a few us on the stream ahead of the step's kernels.
  template <class T, class P>
  absl::Status Put(Slot slot, const std::vector<T>& host, P* out) {
    const size_t bytes = host.size() * sizeof(T);
    if (staging) {
      const size_t offset = staged.size();
      staged.resize(offset + (std::max<size_t>(bytes, 1) + 15) / 16 * 16);
      if (bytes > 0) std::memcpy(staged.data() + offset, host.data(), bytes);
      staged_outs.push_back(
          [out, offset](char* base) { *out = reinterpret_cast<T*>(base + offset); });
      return absl::OkStatus();
    }
    ASSIGN_OR_RETURN(T * p, Get<T>(slot, host.size()));
    if (bytes > 0) RETURN_IF_ERROR(backend->Upload(p, host.data(), bytes));
    *out = p;
    return absl::OkStatus();
  }
  void BeginStaging() {
    staging = true;
    staged.clear();
    staged_outs.clear();
  }
  // One upload of everything staged since BeginStaging(); then sets the staged outputs. The
  // layout depends only on the staged arrays' sizes, so a step of the same shape gets the same
  // addresses (as recorded graphs need); growing the buffer moves them (generation).
  absl::Status FlushStaged() {
    staging = false;
    RETURN_IF_ERROR(Reserve(staged_buffer, staged.size()));
    if (!staged.empty()) {
      RETURN_IF_ERROR(backend->Upload(staged_buffer.data(), staged.data(), staged.size()));
    }
    for (const auto& set : staged_outs) set(staged_buffer.as<char>());
    staged_outs.clear();
    return absl::OkStatus();
  }

  Backend* backend;
  std::vector<kernels::Buffer> buffers;
  uint64_t generation = 0;
  bool recording = false;
  bool staging = false;
  std::vector<char> staged;                             // host copies, 16-byte aligned offsets
  std::vector<std::function<void(char*)>> staged_outs;  // set each Put's *out from the base
  kernels::Buffer staged_buffer;
};

RambaModel::RambaModel(ModelConfig config, ModelWeights weights, Backend* backend)
    : config_(std::move(config)), weights_(std::move(weights)), backend_(backend),
      workspace_(std::make_unique<Workspace>(backend)) {}

RambaModel::~RambaModel() {
  for (auto& [key, graph] : graphs_) backend_->DestroyGraph(graph.id);
}

absl::StatusOr<std::unique_ptr<RambaModel>> RambaModel::Create(ModelConfig config,
                                                               const TensorMap& tensors,
                                                               Backend* backend) {
  ASSIGN_OR_RETURN(ModelWeights weights, LoadModelWeights(tensors, &config, backend));
  return std::unique_ptr<RambaModel>(
      new RambaModel(std::move(config), std::move(weights), backend));
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
  Output output;
  output.logits = logits;
  return ForwardLocked(states, tokens, mode, output, CarriedTokens());
}

namespace {

// Valid options, and the generation scratch each one uses.
absl::Status CheckSampling(absl::Span<SessionState* const> states,
                           absl::Span<const SamplingOptions> options) {
  for (size_t s = 0; s < options.size(); ++s) {
    RETURN_IF_ERROR(ValidateSamplingOptions(options[s]));
    if (options[s].needs_token_counts() && states[s]->token_counts() == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          "sequence ", s,
          " samples with penalties or held-back tokens, but its session's token counts were never "
          "reset for the generation (SessionState::ResetTokenCounts)"));
    }
    if (options[s].logit_bias && states[s]->logit_bias() == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("sequence ", s,
                       " samples with a logit bias, but its session has none "
                       "(SessionState::SetLogitBias)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status RambaModel::ForwardAndSample(absl::Span<SessionState* const> states,
                                          absl::Span<const absl::Span<const int32_t>> tokens,
                                          absl::Span<const SamplingOptions> options,
                                          std::vector<int32_t>* sampled,
                                          absl::Span<const bool> logprob_rows,
                                          std::vector<float>* logprobs, int top_logprobs,
                                          std::vector<TopLogprob>* top) {
  if (sampled == nullptr) return absl::InvalidArgumentError("ForwardAndSample: null output");
  if (options.size() != states.size()) {
    return absl::InvalidArgumentError(absl::StrCat("ForwardAndSample got ", states.size(),
                                                   " states and ", options.size(),
                                                   " sampling options"));
  }
  if (logprobs != nullptr && logprob_rows.size() != states.size()) {
    return absl::InvalidArgumentError(absl::StrCat("ForwardAndSample got ", states.size(),
                                                   " states and ", logprob_rows.size(),
                                                   " logprob flags"));
  }
  RETURN_IF_ERROR(CheckSampling(states, options));
  RETURN_IF_ERROR(ValidateTopLogprobs(top_logprobs, config_.vocab_size));
  if (top_logprobs > 0 && (logprobs == nullptr || top == nullptr)) {
    return absl::InvalidArgumentError("ForwardAndSample: top_logprobs without logprobs and top");
  }
  absl::MutexLock lock(&mu_);
  Output output;
  output.options = options;
  output.sampled = sampled;
  output.logprob_rows = logprob_rows;
  output.logprobs = logprobs;
  output.top_n = top_logprobs;
  output.top = top;
  return ForwardLocked(states, tokens, LogitsMode::kLast, output, CarriedTokens());
}

namespace {

// One single-token sequence per token (a decode batch as Forward takes it).
std::vector<absl::Span<const int32_t>> OneTokenEach(absl::Span<const int32_t> tokens) {
  std::vector<absl::Span<const int32_t>> spans;
  spans.reserve(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) spans.push_back(tokens.subspan(i, 1));
  return spans;
}

}  // namespace

absl::Status RambaModel::LaunchDecode(absl::Span<SessionState* const> states,
                                      absl::Span<const int32_t> tokens,
                                      absl::Span<const SamplingOptions> options, bool logprobs,
                                      int top_logprobs) {
  if (tokens.empty()) {
    std::vector<int32_t> carried(states.size());
    for (size_t s = 0; s < carried.size(); ++s) carried[s] = static_cast<int32_t>(s);
    const std::vector<absl::Span<const int32_t>> none(states.size());
    return LaunchStep(states, none, options, carried, /*chained=*/true, logprobs, top_logprobs);
  }
  if (tokens.size() != states.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchDecode got ", states.size(), " states and ", tokens.size(), " tokens"));
  }
  return LaunchStep(states, OneTokenEach(tokens), options, {}, /*chained=*/false, logprobs,
                    top_logprobs);
}

absl::Status RambaModel::LaunchForward(absl::Span<SessionState* const> states,
                                       absl::Span<const absl::Span<const int32_t>> tokens,
                                       absl::Span<const SamplingOptions> options, bool logprobs,
                                       absl::Span<const int32_t> carried, int top_logprobs) {
  if (tokens.size() != states.size()) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchForward got ", states.size(),
                                                   " states and ", tokens.size(), " token lists"));
  }
  if (!carried.empty() && carried.size() != states.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LaunchForward got ", states.size(), " states and ", carried.size(), " carried entries"));
  }
  return LaunchStep(states, tokens, options, carried, /*chained=*/false, logprobs, top_logprobs);
}

absl::Status RambaModel::Feed(absl::Span<SessionState* const> states,
                              absl::Span<const absl::Span<const int32_t>> tokens) {
  absl::MutexLock lock(&mu_);
  Output output;
  output.queue_only = true;
  return ForwardLocked(states, tokens, LogitsMode::kNone, output, CarriedTokens());
}

absl::Status RambaModel::LaunchStep(absl::Span<SessionState* const> states,
                                    absl::Span<const absl::Span<const int32_t>> tokens,
                                    absl::Span<const SamplingOptions> options,
                                    absl::Span<const int32_t> carried, bool chained, bool logprobs,
                                    int top_logprobs) {
  const int64_t B = static_cast<int64_t>(states.size());
  if (B == 0) return absl::InvalidArgumentError("LaunchDecode: no sessions");
  if (static_cast<int64_t>(options.size()) != B) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchDecode got ", B, " states and ", options.size(), " sampling options"));
  }
  RETURN_IF_ERROR(CheckSampling(states, options));
  RETURN_IF_ERROR(ValidateTopLogprobs(top_logprobs, config_.vocab_size));
  absl::MutexLock lock(&mu_);
  if (static_cast<int>(decodes_in_flight_.size()) >= kMaxDecodesInFlight) {
    return absl::FailedPreconditionError(absl::StrCat(
        "LaunchDecode: ", kMaxDecodesInFlight, " steps are already launched and not collected"));
  }
  constexpr absl::string_view kNotChained =
      "LaunchDecode without tokens must follow a launch of the same sessions in the same order, "
      "none of them fed since";
  if (chained && states.size() != chain_.size()) {
    return absl::FailedPreconditionError(kNotChained);
  }
  // Carried rows feed a placeholder id here; CopyCarried puts the real token in its place.
  static const int32_t kPlaceholder = 0;
  std::vector<absl::Span<const int32_t>> spans(tokens.begin(), tokens.end());
  CarriedTokens carry;
  for (int64_t s = 0; s < static_cast<int64_t>(carried.size()); ++s) {
    const int64_t from = carried[s];
    if (from < 0) continue;
    if (from >= static_cast<int64_t>(chain_.size()) || chain_[from].first != states[s] ||
        chain_[from].second != states[s]->position()) {
      return absl::FailedPreconditionError(
          chained ? std::string(kNotChained)
                  : absl::StrCat("LaunchForward: session ", s, " carries row ", from,
                                 " of the last launch, which is not that session as the launch "
                                 "left it"));
    }
    if (!tokens[s].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("LaunchForward: session ", s, " is carried and has tokens as well"));
    }
    spans[s] = absl::MakeConstSpan(&kPlaceholder, 1);
    carry.rows.emplace_back(s, from);
  }
  if (!carry.rows.empty()) {
    ASSIGN_OR_RETURN(carry.from,
                     workspace_->Get<int32_t>(Workspace::LaunchSampled(launch_parity_ ^ 1),
                                              static_cast<int64_t>(chain_.size())));
  }
  Output output;
  output.options = options;
  std::vector<int32_t> unused;  // the tokens arrive through the download ticket
  output.sampled = &unused;
  LaunchedStep launched;
  launched.rows = B;
  launched.logprobs = logprobs || top_logprobs > 0;
  launched.top_n = top_logprobs;
  output.launched = &launched;
  const absl::Status st = ForwardLocked(states, spans, LogitsMode::kLast, output, carry);
  chain_.clear();
  RETURN_IF_ERROR(st);
  launch_parity_ ^= 1;
  decodes_in_flight_.push_back(launched);
  for (SessionState* state : states) chain_.emplace_back(state, state->position());
  return absl::OkStatus();
}

absl::Status RambaModel::CollectDecode(std::vector<int32_t>* sampled, std::vector<float>* logprobs,
                                       std::vector<TopLogprob>* top) {
  if (sampled == nullptr) return absl::InvalidArgumentError("CollectDecode: null output");
  absl::MutexLock lock(&mu_);
  if (decodes_in_flight_.empty()) {
    return absl::FailedPreconditionError("CollectDecode: no launched step to collect");
  }
  const LaunchedStep step = decodes_in_flight_.front();
  decodes_in_flight_.pop_front();
  std::vector<int32_t> words(static_cast<size_t>(step.words()));
  RETURN_IF_ERROR(backend_->FinishDownload(step.ticket, words.data()));
  sampled->assign(words.begin(), words.begin() + step.rows);
  if (step.tier_counts) TakeTierCounts(words.data() + step.tier_offset());
  if (logprobs != nullptr) {
    logprobs->assign(step.rows, std::numeric_limits<float>::quiet_NaN());
    if (step.logprobs) std::memcpy(logprobs->data(), words.data() + step.rows, step.rows * 4);
  }
  if (top != nullptr) TakeTopLogprobs(step, words.data(), top);
  return absl::OkStatus();
}

int RambaModel::decodes_in_flight() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(decodes_in_flight_.size());
}

absl::StatusOr<uint64_t*> RambaModel::TierCountsLocked() {
  if (tier_counts_buffer_.empty()) {
    ASSIGN_OR_RETURN(tier_counts_buffer_, backend_->Allocate(kTierWords * sizeof(int32_t)));
    RETURN_IF_ERROR(backend_->Zero(tier_counts_buffer_.data(), kTierWords * sizeof(int32_t)));
  }
  tier_counts_dirty_ = true;
  return tier_counts_buffer_.as<uint64_t>();
}

void RambaModel::TakeTopLogprobs(const LaunchedStep& layout, const int32_t* words,
                                 std::vector<TopLogprob>* top) {
  const int64_t n = layout.rows * layout.top_n;
  top->resize(static_cast<size_t>(n));
  const int32_t* ids = words + layout.top_offset();
  for (int64_t i = 0; i < n; ++i) {
    (*top)[i].id = ids[i];
    std::memcpy(&(*top)[i].logprob, ids + n + i, sizeof(float));
  }
}

void RambaModel::TakeTierCounts(const int32_t* words) {
  uint64_t v[kernels::StagedChunks::kTierCounts];
  static_assert(sizeof(v) == kTierWords * sizeof(int32_t));
  std::memcpy(v, words, sizeof(v));
  chunk_tier_counts_ = ChunkTierCounts{v[0], v[1], v[2]};
}

absl::Status RambaModel::Deliver(absl::Span<SessionState* const> states, const float* out,
                                 int64_t rows, const Output& output) {
  Backend* be = backend_;
  const int64_t vocab = config_.vocab_size;
  if (output.sampled != nullptr) {
    // The position each sampled token takes: right after this pass's tokens.
    std::vector<int64_t> positions(rows);
    for (int64_t r = 0; r < rows; ++r) positions[r] = states[r]->position();
    std::vector<kernels::SamplingParams> params;
    std::vector<float> uniforms;
    SamplingInputs(output.options, positions, &params, &uniforms);
    // The tokens, then their logprobs (4-byte words both), then the top logprobs, then after
    // steps that counted chunk tiers the counts (kTierWords): one download brings them back
    // (LaunchedStep's layout). Sized for the most top logprobs, so that asking for them never
    // grows the workspace (which would record every graph again).
    LaunchedStep* launched = output.launched;
    ASSIGN_OR_RETURN(
        int32_t * dev,
        workspace_->Get<int32_t>(
            launched != nullptr ? Workspace::LaunchSampled(launch_parity_) : Workspace::kSampled,
            2 * rows + 2 * rows * kernels::Backend::kMaxTopLogprobs + kTierWords));
    float* dev_logprobs = reinterpret_cast<float*>(dev + rows);
    // Bias, held-back tokens and penalties go into a copy: logprobs stay those of the raw
    // distribution.
    std::vector<kernels::PenaltyParams> penalties;  // empty: no row adjusts its logits
    bool counted = false;                           // some row counts its tokens
    if (std::any_of(output.options.begin(), output.options.end(),
                    [](const SamplingOptions& o) { return o.adjusts_logits(); })) {
      penalties.resize(rows);
      for (int64_t r = 0; r < rows; ++r) {
        const SamplingOptions& o = output.options[r];
        kernels::PenaltyParams& p = penalties[r];
        if (o.needs_token_counts()) {
          p = {states[r]->token_counts(), o.presence_penalty, o.frequency_penalty,
               o.repetition_penalty};
          p.hold_back = o.hold_back;
          counted = true;
        }
        if (o.logit_bias) p.bias = states[r]->logit_bias();
      }
    }
    const float* to_sample = out;
    if (!penalties.empty()) {
      // Not in the workspace: growing it would make every recorded graph record again.
      const size_t bytes = static_cast<size_t>(rows * vocab) * sizeof(float);
      if (penalized_logits_.size() < bytes) {
        penalized_logits_.Reset();
        ASSIGN_OR_RETURN(penalized_logits_, be->Allocate(bytes + bytes / 4));
      }
      RETURN_IF_ERROR(
          be->ApplyPenalties(out, rows, vocab, penalties.data(), penalized_logits_.as<float>()));
      to_sample = penalized_logits_.as<float>();
    }
    RETURN_IF_ERROR(be->Sample(to_sample, rows, vocab, params.data(), uniforms.data(), dev));
    if (counted) RETURN_IF_ERROR(be->CountTokens(penalties.data(), rows, vocab, dev));
    const bool logprobs = launched != nullptr ? launched->logprobs : output.logprobs != nullptr;
    const int64_t top_n = launched != nullptr ? launched->top_n : output.top_n;
    const bool counts = tier_counts_dirty_;
    const LaunchedStep layout{-1, rows, logprobs, top_n, counts};
    if (logprobs) RETURN_IF_ERROR(be->TokenLogprobs(out, rows, vocab, dev, dev_logprobs));
    if (top_n > 0) {
      int32_t* top_ids = dev + layout.top_offset();
      RETURN_IF_ERROR(be->TopLogprobs(out, rows, vocab, top_n, top_ids,
                                      reinterpret_cast<float*>(top_ids + rows * top_n)));
    }
    if (counts) {
      RETURN_IF_ERROR(be->Copy(dev + layout.tier_offset(), tier_counts_buffer_.data(),
                               kTierWords * sizeof(int32_t)));
      tier_counts_dirty_ = false;
    }
    const size_t bytes = layout.words() * sizeof(int32_t);
    if (launched != nullptr) {
      launched->tier_counts = counts;
      ASSIGN_OR_RETURN(launched->ticket, be->BeginDownload(dev, bytes));
      return absl::OkStatus();
    }
    std::vector<int32_t> words(bytes / sizeof(int32_t));
    RETURN_IF_ERROR(be->Download(words.data(), dev, bytes));
    if (counts) TakeTierCounts(words.data() + layout.tier_offset());
    output.sampled->assign(words.begin(), words.begin() + rows);
    if (logprobs) {
      output.logprobs->assign(rows, std::numeric_limits<float>::quiet_NaN());
      for (int64_t r = 0; r < rows; ++r) {
        if (output.logprob_rows[r]) std::memcpy(&(*output.logprobs)[r], &words[rows + r], 4);
      }
    }
    if (top_n > 0) TakeTopLogprobs(layout, words.data(), output.top);
  }
  if (output.logits != nullptr) {
    output.logits->resize(rows * vocab);
    RETURN_IF_ERROR(
        be->Download(output.logits->data(), out, output.logits->size() * sizeof(float)));
  }
  return absl::OkStatus();
}

// Device addresses of one batch's per-row and per-sequence arrays.
struct RambaModel::Batch {
  int64_t rows = 0;
  int64_t num_seqs = 0;
  const int32_t* tokens = nullptr;
  const int64_t* offsets = nullptr;          // backend memory
  const int64_t* host_offsets = nullptr;     // host copy (grid sizing)
  float* const* conv_ptrs = nullptr;         // [mamba layers][num_seqs]
  float* const* ssm_ptrs = nullptr;
  kernels::ChunkMemoryBatch mem;
  // Decode only: each sequence's host-tier chunk count (backend memory), when any sequence has
  // chunks there: UpperLayers then stages the selected ones once for the step's HSA layers.
  const int64_t* host_chunks = nullptr;
  // With host_chunks and a device chunk cache: each row's session cache (unset rows: none).
  kernels::ChunkCacheRows cache;
  // Other batches (prefill, mixed) whose sequences have host-tier chunks: prefix sums over the
  // sequences of their host-tier and stored chunk counts (host copies; empty when none has any):
  // UpperLayers then stages the distinct selected ones once for all rows.
  std::vector<int64_t> host_offsets_of_seqs, table_offsets_of_seqs;
};

// Puts a batch's token ids, offsets and per-layer state pointer arrays into the workspace
// (Workspace::Put: staged while staging). b->host_offsets points into `offsets`, which must
// outlive the batch.
absl::Status RambaModel::PrepareBatch(absl::Span<SessionState* const> states,
                                      const std::vector<int32_t>& tokens,
                                      const std::vector<int64_t>& offsets, Batch* b) {
  Workspace& ws = *workspace_;
  using W = Workspace;
  const int64_t num_seqs = static_cast<int64_t>(states.size());
  b->rows = static_cast<int64_t>(tokens.size());
  b->num_seqs = num_seqs;
  b->host_offsets = offsets.data();
  std::vector<float*> conv_ptrs, ssm_ptrs;
  for (int64_t l = 0; l < config_.num_mamba_layers(); ++l) {
    for (int64_t s = 0; s < num_seqs; ++s) {
      conv_ptrs.push_back(states[s]->conv_state(l));
      ssm_ptrs.push_back(states[s]->ssm_state(l));
    }
  }
  RETURN_IF_ERROR(ws.Put(W::kTokens, tokens, &b->tokens));
  RETURN_IF_ERROR(ws.Put(W::kSeqOffsets, offsets, &b->offsets));
  RETURN_IF_ERROR(ws.Put(W::kConvPtrs, conv_ptrs, &b->conv_ptrs));
  return ws.Put(W::kSsmPtrs, ssm_ptrs, &b->ssm_ptrs);
}

// Embedding and the lower Mamba decoder: h = the chunking layer's input.
absl::Status RambaModel::LowerLayers(const Batch& b) {
  Workspace& ws = *workspace_;
  using W = Workspace;
  ASSIGN_OR_RETURN(float* h, ws.Get<float>(W::kH, b.rows * config_.hidden_size));
  RETURN_IF_ERROR(backend_->Embed(b.tokens, b.rows, weights_.embeddings.view, h));
  return MambaBlocks(b, 0, config_.num_lower_layers);
}

// Mamba layers [first, first + count) on h, through one Backend::MambaBlocks call (a device
// backend may run a decode step's whole run of blocks as one kernel).
absl::Status RambaModel::MambaBlocks(const Batch& b, int64_t first, int64_t count) {
  const ModelConfig& c = config_;
  Workspace& ws = *workspace_;
  using W = Workspace;
  const int64_t rows = b.rows, d = c.hidden_size, P = c.in_proj_dim();
  const int64_t d_inner = c.d_inner(), conv_dim = c.conv_dim();
  ASSIGN_OR_RETURN(float* h, ws.Get<float>(W::kH, rows * d));
  ASSIGN_OR_RETURN(float* xn, ws.Get<float>(W::kNorm, rows * d));
  ASSIGN_OR_RETURN(float* zxbcdt, ws.Get<float>(W::kInProj, rows * P));
  ASSIGN_OR_RETURN(float* xbc, ws.Get<float>(W::kXbc, rows * conv_dim));
  ASSIGN_OR_RETURN(float* y, ws.Get<float>(W::kY, rows * d_inner));
  ASSIGN_OR_RETURN(float* g, ws.Get<float>(W::kG, rows * d_inner));
  std::vector<kernels::MambaBlockArgs> blocks(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    const int64_t layer = first + i;
    const MambaWeights& mw = weights_.mamba[layer];
    kernels::MambaBlockArgs& blk = blocks[static_cast<size_t>(i)];
    blk.norm_weight = mw.norm.data();
    blk.eps = c.layer_norm_epsilon;
    blk.in_proj = mw.in_proj.view;
    blk.xn = xn;
    kernels::MambaMixerArgs& m = blk.mixer;
    m.zxbcdt = zxbcdt;
    m.ld = P;
    m.seq_offsets = b.offsets;
    m.host_seq_offsets = b.host_offsets;
    m.num_seqs = b.num_seqs;
    m.conv_states = b.conv_ptrs + layer * b.num_seqs;
    m.conv_weight = mw.conv_weight.data();
    m.conv_bias = c.use_conv_bias ? mw.conv_bias.data() : nullptr;
    m.conv_kernel = c.conv_kernel;
    m.ssm_states = b.ssm_ptrs + layer * b.num_seqs;
    m.ssm.nheads = c.num_heads;
    m.ssm.headdim = c.head_dim;
    m.ssm.d_state = c.state_size;
    m.ssm.ngroups = c.n_groups;
    m.ssm.dt_min = c.time_step_min_limit;
    m.ssm.dt_max = c.time_step_max_limit;
    m.ssm.A_log = mw.A_log.data();
    m.ssm.D = mw.D.data();
    m.ssm.dt_bias = mw.dt_bias.data();
    m.norm_weight = mw.gated_norm.data();
    m.norm_group_size = d_inner / c.n_groups;
    m.eps = c.layer_norm_epsilon;
    m.xbc = xbc;
    m.y = y;
    m.g = g;
    m.out_proj = mw.out_proj.view;  // h += out_proj(g): the residual add
    m.out = h;
    m.ld_out = d;
  }
  return backend_->MambaBlocks(blocks.data(), count);
}

absl::Status RambaModel::GatherChunkBlock(float* dst, const float* buffer, int64_t buffered,
                                          const float* rows) {
  Backend* be = backend_;
  const int64_t S = config_.chunk_size, d = config_.hidden_size;
  if (buffered > 0) RETURN_IF_ERROR(be->Copy(dst, buffer, buffered * d * sizeof(float)));
  if (buffered < S) {
    RETURN_IF_ERROR(be->Copy(dst + buffered * d, rows, (S - buffered) * d * sizeof(float)));
  }
  if (config_.has_cls) {
    RETURN_IF_ERROR(be->Copy(dst + S * d, weights_.chunking.cls.data(), d * sizeof(float)));
  }
  return absl::OkStatus();
}

// Encodes `new_chunks` blocks already gathered in X (block_len rows each, CLS row last when the
// model has one) and appends block i to owners[i].
absl::Status RambaModel::EncodeChunks(float* X, int64_t new_chunks,
                                      absl::Span<SessionState* const> owners) {
  ASSIGN_OR_RETURN(const GraphOutputs encoded, EncodeChunkOps(X, new_chunks));
  return AppendEncoded(encoded, owners);
}

// Backend ops only (so that a decode step's completions can be recorded): {K, V, landmarks}.
absl::StatusOr<RambaModel::GraphOutputs> RambaModel::EncodeChunkOps(float* X, int64_t new_chunks) {
  const ModelConfig& c = config_;
  Workspace& ws = *workspace_;
  Backend* be = backend_;
  using W = Workspace;
  const int64_t d = c.hidden_size, S = c.chunk_size;
  const int64_t block_len = c.encoder_block_len();
  const int64_t enc_rows = new_chunks * block_len;
  if (c.encoder_layers > 0) {
    const int64_t hd = c.attn_head_dim(), nh = c.num_attention_heads, nkv = c.num_key_value_heads;
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
      RETURN_IF_ERROR(
          be->Matmul(exn, d, enc_rows, lw.k.view, lw.k_bias.data(), k, nkv * hd, false));
      RETURN_IF_ERROR(
          be->Matmul(exn, d, enc_rows, lw.v.view, lw.v_bias.data(), v, nkv * hd, false));
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
  float* E = X;
  RETURN_IF_ERROR(be->RmsNorm(X, d, weights_.chunking.final_norm.data(), E, d, enc_rows, d,
                              c.encoder_rms_norm_eps));
  const int64_t kv_dim = c.kv_dim();
  ASSIGN_OR_RETURN(float* kfull, ws.Get<float>(W::kKfull, enc_rows * kv_dim));
  ASSIGN_OR_RETURN(float* vfull, ws.Get<float>(W::kVfull, enc_rows * kv_dim));
  RETURN_IF_ERROR(be->Matmul(E, d, enc_rows, weights_.chunking.proj_k.view, nullptr, kfull, kv_dim,
                             false));
  RETURN_IF_ERROR(be->Matmul(E, d, enc_rows, weights_.chunking.proj_v.view, nullptr, vfull, kv_dim,
                             false));
  ASSIGN_OR_RETURN(float* landmarks_new, ws.Get<float>(W::kLmk, new_chunks * c.retrieval_dim));
  if (c.has_cls) {
    RETURN_IF_ERROR(be->Matmul(E + S * d, block_len * d, new_chunks, weights_.chunking.lmk_ln.view,
                               nullptr, landmarks_new, c.retrieval_dim, false));
  } else {
    ASSIGN_OR_RETURN(float* mean, ws.Get<float>(W::kMean, new_chunks * d));
    RETURN_IF_ERROR(be->BlockMean(E, new_chunks, S, d, mean));
    RETURN_IF_ERROR(be->Matmul(mean, d, new_chunks, weights_.chunking.lmk_ln.view, nullptr,
                               landmarks_new, c.retrieval_dim, false));
  }
  return GraphOutputs{kfull, vfull, landmarks_new};
}

absl::Status RambaModel::AppendEncoded(const GraphOutputs& encoded,
                                       absl::Span<SessionState* const> owners) {
  const ModelConfig& c = config_;
  Backend* be = backend_;
  const auto [kfull, vfull, landmarks] = encoded;
  const int64_t S = c.chunk_size, kv_dim = c.kv_dim();
  const int64_t block_len = c.encoder_block_len();
  const size_t half = S * kv_dim * sizeof(float);
  for (size_t i = 0; i < owners.size(); ++i) {
    auto chunk = std::make_shared<ChunkKV>();
    ASSIGN_OR_RETURN(chunk->kv, be->Allocate(2 * half));
    RETURN_IF_ERROR(be->Copy(chunk->kv.as<char>(), kfull + i * block_len * kv_dim, half));
    RETURN_IF_ERROR(be->Copy(chunk->kv.as<char>() + half, vfull + i * block_len * kv_dim, half));
    RETURN_IF_ERROR(owners[i]->AppendChunk(std::move(chunk), landmarks + i * c.retrieval_dim));
  }
  if (device_chunk_window_ > 0) {
    for (SessionState* owner : owners) {
      RETURN_IF_ERROR(owner->KeepChunksOnDevice(device_chunk_window_));
    }
  }
  return absl::OkStatus();
}

// For a batch with host-tier chunks that is not a decode step: the distinct host-tier chunks its
// rows selected (idx) are copied into the workspace once, up to host_chunk_staging_bytes_, and
// *mem's chunk tables are replaced by ones pointing at the copies.
absl::Status RambaModel::StageSelectedHostChunks(const Batch& b, const int32_t* idx,
                                                 kernels::ChunkMemoryBatch* mem) {
  const ModelConfig& c = config_;
  Workspace& ws = *workspace_;
  using W = Workspace;
  const int64_t per_row = c.retrieval_heads() * c.chunk_topk;
  const int64_t chunk_floats = c.chunk_kv_floats();
  const int64_t num_seqs = b.num_seqs;
  kernels::StagedChunkTables t;
  t.total_host = b.host_offsets_of_seqs[num_seqs];
  t.capacity = std::min({t.total_host, b.rows * per_row,
                         host_chunk_staging_bytes_ / (chunk_floats * int64_t{sizeof(float)})});
  if (t.capacity == 0) return absl::OkStatus();  // all read in place
  RETURN_IF_ERROR(ws.Put(W::kStageHostOffsets, b.host_offsets_of_seqs, &t.host_offsets));
  RETURN_IF_ERROR(ws.Put(W::kStageTableOffsets, b.table_offsets_of_seqs, &t.table_offsets));
  ASSIGN_OR_RETURN(t.blocks, ws.Get<float>(W::kStageBlocks, t.capacity * chunk_floats));
  ASSIGN_OR_RETURN(t.picks, ws.Get<int32_t>(W::kStagePicks, t.total_host));
  ASSIGN_OR_RETURN(t.sources, ws.Get<const float*>(W::kStageSources, t.capacity));
  ASSIGN_OR_RETURN(t.staged, ws.Get<int32_t>(W::kStageCount, 1));
  ASSIGN_OR_RETURN(t.entries,
                   ws.Get<const float*>(W::kStageEntries, b.table_offsets_of_seqs[num_seqs]));
  ASSIGN_OR_RETURN(t.tables, ws.Get<const float* const*>(W::kStageTables, num_seqs));
  ASSIGN_OR_RETURN(t.tier_counts, TierCountsLocked());
  RETURN_IF_ERROR(backend_->StageSelectedHostChunks(b.mem, idx, b.rows, per_row, chunk_floats, t));
  mem->chunk_kv = t.tables;
  return absl::OkStatus();
}

// Retrieval and the upper decoder ([HSA, Mamba x G] per group) on h, in place.
absl::Status RambaModel::UpperLayers(const Batch& b) {
  const ModelConfig& c = config_;
  Workspace& ws = *workspace_;
  Backend* be = backend_;
  using W = Workspace;
  const int64_t rows = b.rows, d = c.hidden_size, S = c.chunk_size;
  const int64_t heads = c.retrieval_heads(), K = c.chunk_topk;
  ASSIGN_OR_RETURN(float* h, ws.Get<float>(W::kH, rows * d));
  ASSIGN_OR_RETURN(float* xn, ws.Get<float>(W::kNorm, rows * d));
  ASSIGN_OR_RETURN(float* r, ws.Get<float>(W::kR, rows * c.retrieval_dim));
  RETURN_IF_ERROR(be->RmsNormMatmul(h, d, rows, weights_.retrieval.pre_norm.data(),
                                    c.hsa_norm_eps, xn, weights_.retrieval.ln.view, r,
                                    c.retrieval_dim));
  ASSIGN_OR_RETURN(int32_t * idx, ws.Get<int32_t>(W::kIdx, rows * heads * K));
  ASSIGN_OR_RETURN(float* wts, ws.Get<float>(W::kW, rows * heads * K));
  RETURN_IF_ERROR(be->RetrieveChunks(r, rows, b.mem, c.retrieval_dim, heads, K, S, idx, wts));
  kernels::ChunkMemoryBatch mem = b.mem;
  const int32_t* hsa_idx = idx;
  if (!b.host_offsets_of_seqs.empty()) {
    RETURN_IF_ERROR(StageSelectedHostChunks(b, idx, &mem));
  } else if (b.host_chunks != nullptr) {
    const int64_t slots = rows * heads * K, chunk_floats = c.chunk_kv_floats();
    kernels::StagedChunks staged;
    ASSIGN_OR_RETURN(staged.tier_counts, TierCountsLocked());
    ASSIGN_OR_RETURN(staged.blocks, ws.Get<float>(W::kStagedBlocks, slots * chunk_floats));
    ASSIGN_OR_RETURN(staged.slots, ws.Get<const float*>(W::kStagedSlots, slots));
    ASSIGN_OR_RETURN(staged.tables, ws.Get<const float* const*>(W::kStagedTables, rows));
    ASSIGN_OR_RETURN(staged.num_chunks, ws.Get<int64_t>(W::kStagedNumChunks, rows));
    ASSIGN_OR_RETURN(staged.indices, ws.Get<int32_t>(W::kStagedIdx, slots));
    if (b.cache.slots > 0) {
      staged.cache = b.cache;
      ASSIGN_OR_RETURN(staged.copies, ws.Get<int32_t>(W::kStagedCopies, slots));
    }
    RETURN_IF_ERROR(
        be->StageHostChunks(b.mem, b.host_chunks, idx, rows, heads, K, chunk_floats, staged));
    mem.chunk_kv = staged.tables;
    mem.num_chunks = staged.num_chunks;
    mem.max_num_chunks = heads * K;
    hsa_idx = staged.indices;
  }
  ASSIGN_OR_RETURN(float* hq, ws.Get<float>(W::kHsaQ, rows * d));
  ASSIGN_OR_RETURN(float* ho, ws.Get<float>(W::kHsaO, rows * d));
  int64_t mamba_layer = c.num_lower_layers;
  kernels::HsaBlockArgs hsa;
  hsa.h = h;
  hsa.ldh = d;
  hsa.rows = rows;
  hsa.eps = c.hsa_norm_eps;
  hsa.mem = mem;
  hsa.indices = hsa_idx;
  hsa.weights = wts;
  hsa.retrieval_heads = heads;
  hsa.top_k = K;
  hsa.nh = c.num_attention_heads;
  hsa.nkv = c.num_kv_heads;
  hsa.hd = c.attn_head_dim();
  hsa.chunk_size = S;
  hsa.xn = xn;
  hsa.q = hq;
  hsa.attn = ho;
  for (const HsaWeights& hw : weights_.hsa) {
    hsa.norm_weight = hw.pre_norm.data();
    hsa.q_proj = hw.q_proj.view;
    hsa.o_proj = hw.o_proj.view;
    RETURN_IF_ERROR(be->HsaBlock(hsa));
    RETURN_IF_ERROR(MambaBlocks(b, mamba_layer, c.num_mamba_per_gca));
    mamba_layer += c.num_mamba_per_gca;
  }
  return absl::OkStatus();
}

// Final norm and LM head over `rows` rows at src; returns the logits' backend address.
absl::StatusOr<float*> RambaModel::Head(const float* src, int64_t rows) {
  const ModelConfig& c = config_;
  Workspace& ws = *workspace_;
  using W = Workspace;
  const int64_t d = c.hidden_size;
  ASSIGN_OR_RETURN(float* normed, ws.Get<float>(W::kNorm, rows * d));
  ASSIGN_OR_RETURN(float* out, ws.Get<float>(W::kLogits, rows * c.vocab_size));
  RETURN_IF_ERROR(backend_->RmsNormMatmul(src, d, rows, weights_.norm_f.data(),
                                          c.layer_norm_epsilon, normed, weights_.lm_head.view,
                                          out, c.vocab_size));
  return out;
}

absl::Status RambaModel::CopyCarried(const CarriedTokens& carried, const int64_t* seq_offsets,
                                     const int32_t* tokens) {
  int32_t* dst = const_cast<int32_t*>(tokens);  // the batch's own token array
  const auto& rows = carried.rows;
  for (size_t i = 0; i < rows.size();) {
    size_t n = 1;  // a run: consecutive sequences (one token each) from consecutive rows
    while (i + n < rows.size() && rows[i + n].first == rows[i].first + static_cast<int64_t>(n) &&
           rows[i + n].second == rows[i].second + static_cast<int64_t>(n)) {
      ++n;
    }
    RETURN_IF_ERROR(backend_->Copy(dst + seq_offsets[rows[i].first], carried.from + rows[i].second,
                                   n * sizeof(int32_t)));
    i += n;
  }
  return absl::OkStatus();
}

absl::Status RambaModel::ForwardLocked(absl::Span<SessionState* const> states,
                                       absl::Span<const absl::Span<const int32_t>> tokens,
                                       LogitsMode mode, const Output& output,
                                       const CarriedTokens& carried) {
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
  const bool wants_output = output.logits != nullptr || output.sampled != nullptr;
  if (output.logits != nullptr) output.logits->clear();
  if (output.sampled != nullptr) output.sampled->clear();
  if (rows == 0) return absl::OkStatus();
  if (mode == LogitsMode::kLast) {
    for (int64_t s = 0; s < num_seqs; ++s) {
      if (seq_offsets[s + 1] == seq_offsets[s]) {
        return absl::InvalidArgumentError(
            absl::StrCat("sequence ", s, " has no tokens, so it has no last-token logits"));
      }
    }
  }
  if (be->SupportsGraphs() && rows == num_seqs && mode == LogitsMode::kLast && wants_output) {
    return DecodeStepLocked(states, all_tokens, output, carried);
  }

  const int64_t d = c.hidden_size, S = c.chunk_size;
  using W = Workspace;

  Batch b;
  RETURN_IF_ERROR(PrepareBatch(states, all_tokens, seq_offsets, &b));
  RETURN_IF_ERROR(CopyCarried(carried, seq_offsets.data(), b.tokens));
  RETURN_IF_ERROR(LowerLayers(b));
  ASSIGN_OR_RETURN(float* h, ws.Get<float>(W::kH, rows * d));

  // ---- Chunking layer: encode every chunk completed by this batch ----
  // Gather chunk inputs (buffered rows + this batch's rows) into X, then refill every sequence's
  // partial-chunk buffer with its leftover rows (also when no chunk completes).
  const int64_t block_len = c.encoder_block_len();
  std::vector<SessionState*> owners;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t p0 = states[s]->position();
    const int64_t n = (p0 + static_cast<int64_t>(tokens[s].size())) / S - p0 / S;
    for (int64_t j = 0; j < n; ++j) owners.push_back(states[s]);
  }
  const int64_t new_chunks = static_cast<int64_t>(owners.size());
  float* X = nullptr;
  if (new_chunks > 0) {
    ASSIGN_OR_RETURN(X, ws.Get<float>(W::kX, new_chunks * block_len * d));
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
        RETURN_IF_ERROR(GatherChunkBlock(X + block * block_len * d, st->chunk_buffer(), buffered,
                                         u + consumed * d));
        consumed += S - buffered;
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
  // New chunks are appended before retrieval: later rows of a prefill may select them.
  if (new_chunks > 0) RETURN_IF_ERROR(EncodeChunks(X, new_chunks, owners));

  // ---- Retrieval and upper decoder ----
  RETURN_IF_ERROR(MemoryBatch(states, row_seq, row_pos, /*bucket=*/false, &b.mem));
  if (std::any_of(states.begin(), states.end(),
                  [](const SessionState* st) { return st->host_chunks() > 0; })) {
    b.host_offsets_of_seqs = {0};
    b.table_offsets_of_seqs = {0};
    for (const SessionState* st : states) {
      b.host_offsets_of_seqs.push_back(b.host_offsets_of_seqs.back() + st->host_chunks());
      b.table_offsets_of_seqs.push_back(b.table_offsets_of_seqs.back() + st->num_chunks());
    }
  }
  RETURN_IF_ERROR(UpperLayers(b));
  for (int64_t s = 0; s < num_seqs; ++s) {
    states[s]->AdvancePosition(static_cast<int64_t>(tokens[s].size()));
  }

  // ---- Final norm and LM head on the rows that need logits ----
  if (mode == LogitsMode::kNone || !wants_output) {
    return output.queue_only ? absl::OkStatus() : be->Synchronize();
  }
  const float* src = h;
  int64_t out_rows = rows;
  if (mode == LogitsMode::kLast) {
    out_rows = num_seqs;
    ASSIGN_OR_RETURN(float* last, ws.Get<float>(W::kLastRows, num_seqs * d));
    for (int64_t s = 0; s < num_seqs; ++s) {
      RETURN_IF_ERROR(be->Copy(last + s * d, h + (seq_offsets[s + 1] - 1) * d, d * sizeof(float)));
    }
    src = last;
  }
  ASSIGN_OR_RETURN(float* out, Head(src, out_rows));
  return Deliver(states, out, out_rows, output);
}

// The batch's chunk memories (landmark and chunk-table pointers, chunk counts) and its rows'
// sequences and positions, put into the workspace (Workspace::Put: staged while staging). With
// `bucket`, max_num_chunks is rounded up to its graph bucket.
absl::Status RambaModel::MemoryBatch(absl::Span<SessionState* const> states,
                                     const std::vector<int32_t>& row_seq,
                                     const std::vector<int64_t>& row_pos, bool bucket,
                                     kernels::ChunkMemoryBatch* mem) {
  Workspace& ws = *workspace_;
  using W = Workspace;
  std::vector<const float*> landmark_ptrs;
  std::vector<int64_t> num_chunks;
  std::vector<const float* const*> table_ptrs;
  int64_t max_chunks = 0;
  for (SessionState* st : states) {
    landmark_ptrs.push_back(st->landmarks());
    num_chunks.push_back(st->num_chunks());
    table_ptrs.push_back(st->chunk_table());
    max_chunks = std::max(max_chunks, st->num_chunks());
  }
  mem->max_num_chunks = bucket ? ChunkBucket(max_chunks) : max_chunks;
  mem->num_seqs = static_cast<int64_t>(states.size());
  RETURN_IF_ERROR(ws.Put(W::kRowSeq, row_seq, &mem->row_seq));
  RETURN_IF_ERROR(ws.Put(W::kRowPos, row_pos, &mem->row_position));
  RETURN_IF_ERROR(ws.Put(W::kLandmarkPtrs, landmark_ptrs, &mem->landmarks));
  RETURN_IF_ERROR(ws.Put(W::kNumChunks, num_chunks, &mem->num_chunks));
  return ws.Put(W::kChunkTablePtrs, table_ptrs, &mem->chunk_kv);
}

// Graphs are keyed by the chunk-count bucket too, since retrieval sizes its grid from it.
int64_t RambaModel::ChunkBucket(int64_t max_chunks) {
  int64_t b = 64;
  while (b < max_chunks) b *= 2;
  return b;
}

absl::StatusOr<RambaModel::GraphOutputs> RambaModel::RunGraphed(
    GraphKey key, absl::FunctionRef<absl::StatusOr<GraphOutputs>()> ops) {
  Workspace& ws = *workspace_;
  Backend* be = backend_;
  const uint64_t generation = ws.generation + (be->scratch_generation() << 32);
  auto it = graphs_.find(key);
  if (it != graphs_.end() && it->second.generation != generation) {
    be->DestroyGraph(it->second.id);
    graphs_.erase(it);
    it = graphs_.end();
  }
  if (it != graphs_.end()) {
    RETURN_IF_ERROR(be->LaunchGraph(it->second.id));
    return it->second.outputs;
  }
  if (seen_shapes_.insert(key).second) return ops();  // first time: eagerly, sizing buffers
  RETURN_IF_ERROR(be->BeginGraph());
  ws.recording = true;
  absl::StatusOr<GraphOutputs> recorded = ops();
  ws.recording = false;
  absl::StatusOr<int64_t> id = be->EndGraph();
  if (recorded.ok() && id.ok()) {
    graphs_[key] = Graph{*id, generation, *recorded};
    RETURN_IF_ERROR(be->LaunchGraph(*id));
    return *recorded;
  }
  // Recording failed (e.g. a buffer had to grow): nothing ran, so run eagerly.
  if (id.ok()) be->DestroyGraph(*id);
  return ops();
}

// One token per session on a backend with graphs. The step's ops (embedding, lower decoder, the
// append of each row to its partial-chunk buffer, retrieval, upper decoder, head) read every
// per-step address through arrays uploaded first (in one copy: Workspace staging), so after one
// eager run of a (batch, chunk bucket) shape they are recorded once and replayed with one launch.
// Chunks completed by this step are encoded afterwards, by a graph of their own keyed by their
// count: a decode row never retrieves the chunk it completes ((c + 1) * chunk_size > its
// position), so the order does not change the result.
absl::Status RambaModel::DecodeStepLocked(absl::Span<SessionState* const> states,
                                          const std::vector<int32_t>& tokens, const Output& output,
                                          const CarriedTokens& carried) {
  const ModelConfig& c = config_;
  Workspace& ws = *workspace_;
  Backend* be = backend_;
  using W = Workspace;
  const int64_t B = static_cast<int64_t>(states.size());
  const int64_t d = c.hidden_size, S = c.chunk_size;

  std::vector<int64_t> offsets(B + 1);
  std::vector<int32_t> row_seq(B);
  std::vector<int64_t> row_pos(B);
  std::vector<float*> buffer_rows(B);
  for (int64_t s = 0; s < B; ++s) {
    offsets[s + 1] = s + 1;
    row_seq[s] = static_cast<int32_t>(s);
    row_pos[s] = states[s]->position();
    buffer_rows[s] = states[s]->chunk_buffer() + states[s]->buffered_rows() * d;
  }
  Batch b;
  float** rows_dev = nullptr;
  ws.BeginStaging();
  absl::Cleanup end_staging = [&ws] { ws.staging = false; };  // on errors before the flush
  RETURN_IF_ERROR(PrepareBatch(states, tokens, offsets, &b));
  RETURN_IF_ERROR(ws.Put(W::kBufferRows, buffer_rows, &rows_dev));
  RETURN_IF_ERROR(MemoryBatch(states, row_seq, row_pos, /*bucket=*/true, &b.mem));
  std::vector<int64_t> host_chunks;
  for (SessionState* st : states) host_chunks.push_back(st->host_chunks());
  const bool stage = *std::max_element(host_chunks.begin(), host_chunks.end()) > 0;
  if (stage) RETURN_IF_ERROR(ws.Put(W::kHostChunks, host_chunks, &b.host_chunks));
  if (stage && device_chunk_cache_ > 0) {
    // Sessions with host-tier chunks get their cache (made on first use); the others none.
    std::vector<float*> cache_blocks(B, nullptr);
    std::vector<int32_t*> cache_tags(B, nullptr);
    for (int64_t s = 0; s < B; ++s) {
      if (host_chunks[s] == 0) continue;
      RETURN_IF_ERROR(states[s]->EnsureChunkCache(device_chunk_cache_));
      cache_blocks[s] = states[s]->chunk_cache_blocks();
      cache_tags[s] = states[s]->chunk_cache_tags();
    }
    b.cache.slots = device_chunk_cache_;  // the arrays' addresses come with the flush below
    RETURN_IF_ERROR(ws.Put(W::kCacheBlocks, cache_blocks, &b.cache.blocks));
    RETURN_IF_ERROR(ws.Put(W::kCacheTags, cache_tags, &b.cache.tags));
  }
  RETURN_IF_ERROR(ws.FlushStaged());
  RETURN_IF_ERROR(CopyCarried(carried, offsets.data(), b.tokens));

  auto ops = [&]() -> absl::StatusOr<GraphOutputs> {
    RETURN_IF_ERROR(LowerLayers(b));
    ASSIGN_OR_RETURN(float* h, ws.Get<float>(W::kH, B * d));
    RETURN_IF_ERROR(be->ScatterRows(h, d, rows_dev, B, d));
    RETURN_IF_ERROR(UpperLayers(b));
    ASSIGN_OR_RETURN(float* logits, Head(h, B));
    return GraphOutputs{logits, nullptr, nullptr};
  };
  ASSIGN_OR_RETURN(const GraphOutputs step, RunGraphed({B, b.mem.max_num_chunks, stage}, ops));
  float* out = step[0];
  if (stage) tier_counts_dirty_ = true;  // a replayed graph counted too, without UpperLayers

  // Chunks completed by this step: the partial-chunk buffer now holds all chunk_size rows.
  std::vector<SessionState*> owners;
  for (int64_t s = 0; s < B; ++s) {
    if (states[s]->buffered_rows() == S - 1) owners.push_back(states[s]);
  }
  if (!owners.empty()) {
    const int64_t block_len = c.encoder_block_len();
    const int64_t n = static_cast<int64_t>(owners.size());
    ASSIGN_OR_RETURN(float* X, ws.Get<float>(W::kX, n * block_len * d));
    for (int64_t i = 0; i < n; ++i) {
      RETURN_IF_ERROR(
          GatherChunkBlock(X + i * block_len * d, owners[i]->chunk_buffer(), S, nullptr));
    }
    // The encoder's ~50 small ops as one graph launch (the gather above and the appends below
    // stay eager): ramba-tiny's completion steps were launch-bound (its ITL p99 0.44-1.47 ->
    // 0.26-0.27 ms on an H100); the 370M's are GPU-bound (~0.23 ms more than other steps).
    ASSIGN_OR_RETURN(const GraphOutputs encoded,
                     RunGraphed({0, n, false}, [&] { return EncodeChunkOps(X, n); }));
    RETURN_IF_ERROR(AppendEncoded(encoded, owners));
  }
  for (SessionState* st : states) st->AdvancePosition(1);
  return Deliver(states, out, B, output);
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

absl::Status RambaModel::Warmup() {
  ASSIGN_OR_RETURN(std::unique_ptr<SessionState> session, NewSession());
  const int64_t S = config_.chunk_size;
  std::vector<int32_t> prompt(static_cast<size_t>(S + S / 2));
  for (size_t i = 0; i < prompt.size(); ++i) {
    prompt[i] = static_cast<int32_t>(i % static_cast<size_t>(config_.vocab_size));
  }
  RETURN_IF_ERROR(Prefill(session.get(), prompt, nullptr, static_cast<int64_t>(prompt.size())));
  SessionState* one[] = {session.get()};
  const SamplingOptions greedy[1] = {};
  int32_t token = prompt.back();
  std::vector<int32_t> sampled;
  while (session->num_chunks() < 2) {
    const absl::Span<const int32_t> in[] = {absl::MakeConstSpan(&token, 1)};
    RETURN_IF_ERROR(ForwardAndSample(one, in, greedy, &sampled));
    token = sampled[0];
  }
  return absl::OkStatus();
}

absl::Status RambaModel::Decode(absl::Span<SessionState* const> states,
                                absl::Span<const int32_t> tokens, std::vector<float>* logits) {
  if (states.size() != tokens.size()) {
    return absl::InvalidArgumentError(absl::StrCat("Decode got ", states.size(), " states and ",
                                                   tokens.size(), " tokens"));
  }
  return Forward(states, OneTokenEach(tokens), LogitsMode::kLast, logits);
}

}  // namespace ramba
