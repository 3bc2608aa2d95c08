// bench-model: prefill and decode throughput of a RAMba configuration with random weights, each
// figure next to its bytes floor (measured copy bandwidth of the backend).
//
//   bench-model --config 370m --device cuda --prefill_tokens 65536 --batches 1,16,64,256
// One session is prefilled with --prefill_tokens pseudo-random tokens (timed: prefill tok/s), then
// forked into each decode batch size (forks share chunk K/V and copy states and landmarks, so
// every session of a batch reads its own landmarks and recurrent state) and decode steps are timed.
// Prints one line per measurement; figures belong in docs/benchmarks.md with the command.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "base/status_macros.h"
#include "kernels/backend.h"
#include "model/ramba_model.h"
#include "model/weights.h"
#include "tools/bench_util.h"

ABSL_FLAG(std::string, config, "tiny", "tiny | 370m | path to a config.json");
ABSL_FLAG(std::string, device, "cpu", "cpu, cuda or auto");
ABSL_FLAG(int32_t, threads, 0, "CPU threads (0 = all cores)");
ABSL_FLAG(int32_t, prefill_tokens, 2048, "Prompt length for the prefill measurement");
ABSL_FLAG(int32_t, segment, 1024, "Prefill segment length");
ABSL_FLAG(int32_t, decode_tokens, 64, "Decode steps to time");
ABSL_FLAG(std::string, batches, "1", "Comma-separated decode batch sizes");
ABSL_FLAG(int32_t, sustained_chunks, 0,
          "Also time this many chunks' worth of decode steps (chunk_size each) after the "
          "steady-state ones, so each session completes and encodes that many chunks inside the "
          "timing (the steady-state steps, like most short runs, complete none)");
ABSL_FLAG(int64_t, device_chunk_window, 0,
          "After the prefill, keep only this many of the session's newest chunks in backend "
          "memory (the rest in the host tier: decode steps copy the chunks they select, prefill "
          "reads them in place) and go on so while decoding; 0: all stay");
ABSL_FLAG(bool, window_from_start, false,
          "Apply --device_chunk_window from the start of the prefill (a long document ingested "
          "into a windowed session: later segments read earlier chunks from the host tier)");
ABSL_FLAG(int64_t, host_chunk_staging_mb, -1,
          "Bound on the backend memory a prefill uses to copy the host-tier chunks it selects "
          "once (RambaModel::set_host_chunk_staging_bytes; 0: read all in place; -1: default)");
ABSL_FLAG(int32_t, append_tokens, 0,
          "Also time prefilling this many more tokens into a fork of the prefilled session (a "
          "conversation's next turn, reading its older chunks where the window put them), "
          "three times");
ABSL_FLAG(bool, logprobs, false,
          "Decode steps also compute every sampled token's logprob on the device and download it "
          "with the tokens (what a server does for requests with output.include_logprobs)");
ABSL_FLAG(int32_t, top_logprobs, 0,
          "Also compute each row's N most likely tokens and their logprobs on the device "
          "(output.top_logprobs; implies --logprobs)");
ABSL_FLAG(bool, penalties, false,
          "Decode with presence / frequency / repetition penalties (0.5 / 0.5 / 1.1): every "
          "step then also penalises a copy of the logits and counts its tokens on the device");
ABSL_FLAG(bool, logit_bias, false,
          "Decode with a logit bias (100 tokens) and held-back stop tokens, as a request with "
          "logit_bias and min_tokens: every step then also adjusts a copy of the logits");
ABSL_FLAG(bool, download_logits, false,
          "Decode steps download every row's logits (Decode) instead of sampling greedily on "
          "the device and downloading the tokens (ForwardAndSample, what the server does)");
ABSL_FLAG(double, bandwidth_gbs, 0,
          "Memory bandwidth for the floors in GB/s (0: measure a large backend copy)");

namespace {

ramba::ModelConfig TinyConfig() {
  ramba::ModelConfig c;
  c.hidden_size = 256;
  c.vocab_size = 256;
  c.num_lower_layers = 4;
  c.num_upper_layers = 4;
  c.num_mamba_per_gca = 2;
  c.state_size = 64;
  c.head_dim = 64;
  c.expand = 2;
  c.num_heads = 8;
  c.retrieval_dim = 256;
  c.encoder_layers = 1;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 4;
  c.num_kv_heads = 1;
  c.time_step_max_limit = INFINITY;
  return c;
}

using ramba::bench::Now;

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "bench-model: %s\n", s.ToString().c_str());
  return 1;
}

// Bytes of weight matrices one decode step reads (the chunk encoder runs once per 64 tokens and
// is left out).
double DecodeWeightBytes(const ramba::ModelConfig& c, size_t dtype_bytes) {
  const double d = c.hidden_size;
  double elems = c.num_mamba_layers() * (d * c.in_proj_dim() + c.d_inner() * d);
  elems += c.num_hsa_layers() * 2 * d * d;
  elems += d * c.retrieval_dim + c.vocab_size * d;
  return elems * dtype_bytes;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string name = absl::GetFlag(FLAGS_config);
  ramba::ModelConfig config;
  if (name == "tiny") {
    config = TinyConfig();
  } else if (name == "370m") {
    config = ramba::Reference370MConfig();
  } else {
    auto c = ramba::LoadModelConfig(name);
    if (!c.ok()) return Fail(c.status());
    config = *c;
  }
  std::vector<int32_t> batches;
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_batches), ',')) {
    int32_t b = 0;
    if (!absl::SimpleAtoi(part, &b) || b < 1)
      return Fail(absl::InvalidArgumentError("bad --batches"));
    batches.push_back(b);
  }
  auto backend =
      ramba::kernels::CreateBackend(absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_threads));
  if (!backend.ok()) return Fail(backend.status());
  ramba::kernels::Backend* be = backend->get();
  double bw = absl::GetFlag(FLAGS_bandwidth_gbs);
  if (bw <= 0) bw = ramba::bench::MeasureCopyBandwidth(be);
  absl::StatusOr<std::unique_ptr<ramba::RambaModel>> model;
  {
    const ramba::TensorMap tensors = ramba::RandomTensors(config, 1);
    model = ramba::RambaModel::Create(config, tensors, be);
  }
  if (!model.ok()) return Fail(model.status());
  const std::string dev(be->name());
  std::printf("config=%s device=%s copy bandwidth %.0f GB/s (read+write)\n", name.c_str(),
              dev.c_str(), bw);

  const int32_t n = absl::GetFlag(FLAGS_prefill_tokens);
  uint64_t x = 88172645463325252ull;  // xorshift: the prompt, then --append_tokens' turn
  auto random_tokens = [&](int32_t count) {
    std::vector<int32_t> tokens(count);
    for (int32_t& t : tokens) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      t = static_cast<int32_t>(x % config.vocab_size);
    }
    return tokens;
  };
  const std::vector<int32_t> prompt = random_tokens(n);
  auto base = (*model)->NewSession();
  if (!base.ok()) return Fail(base.status());
  {
    // Warm-up on a throwaway session so one-time costs (workspace growth, library handles) stay
    // out of the prefill figure.
    auto warm = (*model)->NewSession();
    if (!warm.ok()) return Fail(warm.status());
    const int32_t w = std::min<int32_t>(n, absl::GetFlag(FLAGS_segment));
    if (auto st = (*model)->Prefill(warm->get(), absl::MakeConstSpan(prompt).first(w), nullptr,
                                    absl::GetFlag(FLAGS_segment)); !st.ok()) {
      return Fail(st);
    }
  }
  if (const int64_t mb = absl::GetFlag(FLAGS_host_chunk_staging_mb); mb >= 0) {
    (*model)->set_host_chunk_staging_bytes(mb << 20);
  }
  const int64_t window = absl::GetFlag(FLAGS_device_chunk_window);
  if (absl::GetFlag(FLAGS_window_from_start)) (*model)->set_device_chunk_window(window);
  const double t0 = Now();
  if (auto st = (*model)->Prefill(base->get(), prompt, nullptr, absl::GetFlag(FLAGS_segment));
      !st.ok()) {
    return Fail(st);
  }
  const double prefill_s = Now() - t0;
  std::printf("prefill %d tokens: %.3f s = %.0f tok/s (segment %d)\n", n, prefill_s,
              n / prefill_s, absl::GetFlag(FLAGS_segment));
  if (window > 0) {
    const int64_t held = be->held_bytes();
    if (auto st = (*base)->KeepChunksOnDevice(window); !st.ok()) return Fail(st);
    (*model)->set_device_chunk_window(window);
    if (auto st = be->Synchronize(); !st.ok()) return Fail(st);
    std::printf("device chunk window %lld: %lld of %lld chunks in the host tier (%.1f MB host "
                "memory; backend memory %.1f -> %.1f MB)\n",
                static_cast<long long>(window), static_cast<long long>((*base)->host_chunks()),
                static_cast<long long>((*base)->num_chunks()), be->host_held_bytes() / 1e6,
                held / 1e6, be->held_bytes() / 1e6);
  }

  if (const int32_t turn = absl::GetFlag(FLAGS_append_tokens); turn > 0) {
    const std::vector<int32_t> more = random_tokens(turn);
    std::vector<double> ms;
    for (int rep = 0; rep < 3; ++rep) {
      auto fork = (*base)->Fork();
      if (!fork.ok()) return Fail(fork.status());
      const double t = Now();
      std::vector<float> last;
      if (auto st = (*model)->Prefill(fork->get(), more, &last, absl::GetFlag(FLAGS_segment));
          !st.ok()) {
        return Fail(st);
      }
      ms.push_back(1e3 * (Now() - t));
    }
    std::printf(
        "append %d tokens to the %d-token session (prefill, last logits back): %.2f / "
        "%.2f / %.2f ms\n",
        turn, n, ms[0], ms[1], ms[2]);
  }

  const size_t wbytes = ramba::kernels::DTypeSize(be->weight_dtype());
  const double weight_bytes = DecodeWeightBytes(config, wbytes);
  const double state_bytes =
      4.0 * config.num_mamba_layers() *
      ((config.conv_kernel - 1) * config.conv_dim() +
       config.num_heads * config.head_dim * config.state_size);
  const double landmark_bytes = 4.0 * (n / config.chunk_size) * config.retrieval_dim;
  // Each retrieval head selects top-K chunks for its share of the kv heads; every HSA layer
  // reads the same selected K/V, counted once.
  const double chunk_bytes = 4.0 * config.chunk_topk * config.chunk_kv_floats();
  const int32_t steps = absl::GetFlag(FLAGS_decode_tokens);
  for (int32_t batch : batches) {
    std::vector<std::unique_ptr<ramba::SessionState>> states;
    for (int32_t b = 0; b < batch; ++b) {
      auto s = (*base)->Fork();
      if (!s.ok()) return Fail(s.status());
      states.push_back(std::move(*s));
    }
    std::vector<ramba::SessionState*> ptrs;
    for (auto& s : states) ptrs.push_back(s.get());
    std::vector<int32_t> tokens(batch);
    std::vector<float> logits;
    std::vector<int32_t> sampled;
    for (int32_t b = 0; b < batch; ++b) tokens[b] = (b * 7919 + 13) % config.vocab_size;
    std::vector<absl::Span<const int32_t>> spans;
    for (int32_t b = 0; b < batch; ++b) spans.push_back(absl::MakeConstSpan(&tokens[b], 1));
    std::vector<ramba::SamplingOptions> greedy(batch);
    const bool penalties = absl::GetFlag(FLAGS_penalties);
    if (penalties) {
      for (ramba::SamplingOptions& o : greedy) {
        o.presence_penalty = o.frequency_penalty = 0.5f;
        o.repetition_penalty = 1.1f;
      }
    }
    const bool bias = absl::GetFlag(FLAGS_logit_bias);
    std::vector<ramba::LogitBias> bias_entries;
    const int32_t held_back[] = {static_cast<int32_t>(config.eos_token_id)};
    if (bias) {
      for (int32_t i = 0; i < 100; ++i) {
        bias_entries.push_back({static_cast<int32_t>((i * 503 + 7) % config.vocab_size), -2.0f});
      }
      std::sort(bias_entries.begin(), bias_entries.end(),
                [](const ramba::LogitBias& a, const ramba::LogitBias& b) { return a.id < b.id; });
      bias_entries.erase(std::unique(bias_entries.begin(), bias_entries.end(),
                                     [](const ramba::LogitBias& a, const ramba::LogitBias& b) {
                                       return a.id == b.id;
                                     }),
                         bias_entries.end());
      for (ramba::SamplingOptions& o : greedy) o.logit_bias = o.hold_back = true;
    }
    // Each session's generation counts from its first input token.
    auto reset_counts = [&]() -> absl::Status {
      for (int32_t b = 0; b < batch; ++b) {
        if (penalties || bias) {
          RETURN_IF_ERROR(ptrs[b]->ResetTokenCounts(
              absl::MakeConstSpan(&tokens[b], 1),
              bias ? absl::MakeConstSpan(held_back) : absl::Span<const int32_t>()));
        }
        if (bias) RETURN_IF_ERROR(ptrs[b]->SetLogitBias(bias_entries));
      }
      return absl::OkStatus();
    };
    if (auto st = reset_counts(); !st.ok()) return Fail(st);
    const bool download = absl::GetFlag(FLAGS_download_logits);
    const int32_t top_n = absl::GetFlag(FLAGS_top_logprobs);
    const bool logprobs = absl::GetFlag(FLAGS_logprobs) || top_n > 0;
    std::vector<ramba::TopLogprob> top;
    const std::unique_ptr<bool[]> all_rows(new bool[batch]);
    std::fill(all_rows.get(), all_rows.get() + batch, true);
    std::vector<float> row_logprobs;
    auto step = [&]() {
      if (download) return (*model)->Decode(ptrs, tokens, &logits);
      if (!logprobs) return (*model)->ForwardAndSample(ptrs, spans, greedy, &sampled);
      return (*model)->ForwardAndSample(ptrs, spans, greedy, &sampled,
                                        absl::MakeConstSpan(all_rows.get(), batch), &row_logprobs,
                                        top_n, &top);
    };
    // Two warm-up steps, then the timed ones.
    for (int i = 0; i < 2; ++i) {
      if (auto st = step(); !st.ok()) return Fail(st);
    }
    const double t1 = Now();
    for (int32_t i = 0; i < steps; ++i) {
      if (auto st = step(); !st.ok()) return Fail(st);
    }
    const double step_s = (Now() - t1) / steps;
    double sustained_s = 0, completion_s = 0, other_s = 0;  // the last two: sums
    const int32_t sustained_chunks = absl::GetFlag(FLAGS_sustained_chunks);
    if (sustained_chunks > 0) {
      // Untimed: the steps through the next chunk completion (the encoder's first shapes) and
      // two more (the eager run and the recording of a new graph when the new chunk moved the
      // chunk-count bucket). Timed: whole chunks' worth of steps, which complete one chunk per
      // session each.
      const int64_t S = config.chunk_size;
      const int64_t p = ptrs[0]->position();
      for (int64_t i = 0; i < (S - 1 - p % S + S) % S + 3; ++i) {
        if (auto st = step(); !st.ok()) return Fail(st);
      }
      const int64_t n_steps = sustained_chunks * S;
      const double t2 = Now();
      for (int64_t i = 0; i < n_steps; ++i) {
        const bool completes = ptrs[0]->position() % S == S - 1;
        const double t = Now();
        if (auto st = step(); !st.ok()) return Fail(st);
        (completes ? completion_s : other_s) += Now() - t;
      }
      sustained_s = (Now() - t2) / n_steps;
    }
    // The steady steps again, pipelined (RambaModel::LaunchDecode: each launched before the
    // previous one's tokens are collected, fed the tokens it sampled on the device), on fresh
    // forks so that they start where the first timed steps did and complete no chunk either.
    double pipelined_s = 0;
    if (!download) {
      states.clear();
      ptrs.clear();
      for (int32_t b = 0; b < batch; ++b) {
        auto s = (*base)->Fork();
        if (!s.ok()) return Fail(s.status());
        ptrs.push_back(s->get());
        states.push_back(std::move(*s));
      }
      if (auto st = reset_counts(); !st.ok()) return Fail(st);
      auto launch = [&](absl::Span<const int32_t> input) {
        return (*model)->LaunchDecode(ptrs, input, greedy, logprobs, top_n);
      };
      auto collect = [&]() { return (*model)->CollectDecode(&sampled, &row_logprobs, &top); };
      if (auto st = launch(tokens); !st.ok()) return Fail(st);
      for (int i = 0; i < 2; ++i) {  // warm-up, as above
        if (auto st = launch({}); !st.ok()) return Fail(st);
        if (auto st = collect(); !st.ok()) return Fail(st);
      }
      const double t = Now();
      for (int32_t i = 0; i < steps; ++i) {
        if (auto st = launch({}); !st.ok()) return Fail(st);
        if (auto st = collect(); !st.ok()) return Fail(st);
      }
      pipelined_s = (Now() - t) / steps;
      if (auto st = collect(); !st.ok()) return Fail(st);
    }
    // Floor: weights once, every session's recurrent state read and written, its landmarks and
    // its top-K chunks read once.
    const double floor_bytes =
        weight_bytes + batch * (2 * state_bytes + landmark_bytes + chunk_bytes);
    const double floor_s = floor_bytes / (bw * 1e9);
    // Issue 5 states the batch-1 target against the weights alone (bf16 weights / bandwidth):
    // printed beside the full floor so neither is mistaken for the other.
    const double weights_s = weight_bytes / (bw * 1e9);
    std::printf(
        "decode batch %4d context %8d: %8.3f ms/step %9.0f tok/s | floor %.3f ms "
        "(%.1f MB) ratio %.2fx | weights alone %.3f ms (%.1f MB) ratio %.2fx\n",
        batch, n, 1e3 * step_s, batch / step_s, 1e3 * floor_s, floor_bytes / 1e6, step_s / floor_s,
        1e3 * weights_s, weight_bytes / 1e6, step_s / weights_s);
    if (pipelined_s > 0) {
      std::printf(
          "  pipelined (each step launched before the previous one's tokens are back): "
          "%8.3f ms/step, ratio %.2fx, %.2fx the weights alone (%.2fx the step above)\n",
          1e3 * pipelined_s, pipelined_s / floor_s, pipelined_s / weights_s, pipelined_s / step_s);
    }
    if (sustained_s > 0) {
      const int64_t S = config.chunk_size;
      std::printf(
          "  sustained over %d chunk(s) per session, encoder included: %8.3f ms/step "
          "(%.2fx the steady step, ratio %.2fx); steps completing a chunk %.3f ms, others %.3f\n",
          sustained_chunks, 1e3 * sustained_s, sustained_s / step_s, sustained_s / floor_s,
          1e3 * completion_s / sustained_chunks, 1e3 * other_s / (sustained_chunks * (S - 1)));
    }
  }
  return 0;
}
