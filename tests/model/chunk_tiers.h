// Shared by the CPU and GPU model tests: with a device chunk window, chunks beyond it move to the
// backend's host memory (SessionState::KeepChunksOnDevice) and no result changes, since the same
// bytes are read from elsewhere: prefill in segments (later segments read moved chunks), decode
// across chunk completions, a serialise -> restore round trip straight into the tiers, a fork.
#ifndef RAMBA_TESTS_MODEL_CHUNK_TIERS_H_
#define RAMBA_TESTS_MODEL_CHUNK_TIERS_H_

#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/ramba_model.h"
#include "tests/testing/test_util.h"

namespace ramba::testing {

// Logits of decoding `tokens` one by one.
inline std::vector<float> DecodeTokens(RambaModel* model, SessionState* state,
                                       absl::Span<const int32_t> tokens) {
  std::vector<float> out;
  for (int32_t t : tokens) {
    SessionState* st[] = {state};
    const int32_t in[] = {t};
    std::vector<float> step;
    EXPECT_TRUE(model->Decode(st, in, &step).ok());
    out.insert(out.end(), step.begin(), step.end());
  }
  return out;
}

inline std::unique_ptr<SessionState> RoundTrip(const SessionState& from, const ModelConfig& config,
                                               kernels::Backend* be, int64_t window) {
  auto states = from.SerializeStates();
  EXPECT_TRUE(states.ok());
  std::vector<std::string> chunks;
  for (int64_t i = 0; i < from.num_chunks(); ++i) chunks.push_back(*from.SerializeChunk(i));
  const std::string lm = *from.SerializeLandmarks(0, from.num_chunks());
  std::vector<std::string_view> chunk_views(chunks.begin(), chunks.end());
  std::vector<std::string_view> lm_views = {lm};
  auto s = SessionState::Deserialize(config, be, *states, chunk_views, lm_views, window);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? std::move(*s) : nullptr;
}

// `tolerance`: max per-row relative difference allowed (0: bitwise). `staging_chunks` >= 0 bounds
// the chunks a prefill copies out of the host tier (RambaModel::set_host_chunk_staging_bytes; the
// rest are read in place); -1 keeps the model's default. `cache_slots`: each session's chunk
// cache for decode steps (RambaModel::set_device_chunk_cache; 1 is fewer than a step picks),
// which only backends with graphs run (elsewhere decode is a ragged batch).
inline void ExpectChunkTiersChangeNoResult(kernels::Backend* be, const std::string& dir,
                                           double tolerance, int64_t staging_chunks = -1,
                                           int64_t cache_slots = 0) {
  constexpr int64_t kWindow = 2;
  auto plain = RambaModel::Load(dir, be);
  auto tiered = RambaModel::Load(dir, be);
  ASSERT_TRUE(plain.ok() && tiered.ok());
  (*tiered)->set_device_chunk_window(kWindow);
  (*tiered)->set_device_chunk_cache(cache_slots);
  const ModelConfig& c = (*plain)->config();
  if (staging_chunks >= 0) {
    const int64_t chunk_bytes = c.chunk_kv_floats() * static_cast<int64_t>(sizeof(float));
    (*tiered)->set_host_chunk_staging_bytes(staging_chunks * chunk_bytes);
  }
  const int64_t V = c.vocab_size;
  auto same = [&](const std::vector<float>& got, const std::vector<float>& want) {
    if (tolerance == 0) {
      EXPECT_EQ(got, want);
    } else {
      EXPECT_LE(MaxRowRelError(got, want, V), tolerance);
    }
  };
  const auto tokens = RandomTokens(900, V, 21);
  const auto prompt = absl::MakeConstSpan(tokens).first(520);  // 8 chunks and 8 rows
  const auto more = absl::MakeConstSpan(tokens).subspan(520, 140);
  const auto after = absl::MakeConstSpan(tokens).subspan(660, 140);
  const auto turn = absl::MakeConstSpan(tokens).subspan(800);  // a prefilled turn, every row

  auto a = (*plain)->NewSession();
  auto b = (*tiered)->NewSession();
  ASSERT_TRUE(a.ok() && b.ok());
  const int64_t host_before = be->host_held_bytes();
  std::vector<float> la, lb;
  ASSERT_TRUE((*plain)->Prefill(a->get(), prompt, &la, 128).ok());
  ASSERT_TRUE((*tiered)->Prefill(b->get(), prompt, &lb, 128).ok());
  same(lb, la);
  EXPECT_EQ((*a)->host_chunks(), 0);
  EXPECT_EQ((*b)->host_chunks(), (*b)->num_chunks() - kWindow);
  same(DecodeTokens(tiered->get(), b->get(), more), DecodeTokens(plain->get(), a->get(), more));
  ASSERT_EQ((*b)->num_chunks(), 10);
  EXPECT_EQ((*b)->host_chunks(), 10 - kWindow);
  EXPECT_GE(be->host_held_bytes() - host_before,
            (10 - kWindow) * (*b)->chunk_floats() * static_cast<int64_t>(sizeof(float)));

  // Restored straight into the tiers, and a fork: both go on as the plain session does.
  auto restored = RoundTrip(**b, c, be, kWindow);
  ASSERT_NE(restored, nullptr);
  EXPECT_EQ(restored->host_chunks(), 10 - kWindow);
  auto fork = (*b)->Fork();
  ASSERT_TRUE(fork.ok());
  EXPECT_EQ((*fork)->host_chunks(), 10 - kWindow);
  const std::vector<float> want = DecodeTokens(plain->get(), a->get(), after);
  same(DecodeTokens(tiered->get(), restored.get(), after), want);
  same(DecodeTokens(tiered->get(), fork->get(), after), want);
  same(DecodeTokens(tiered->get(), b->get(), after), want);
  EXPECT_EQ((*b)->host_chunks(), (*b)->num_chunks() - kWindow);

  // A turn prefilled in one segment: all its rows read chunks of the host tier, beside a fork
  // (same chunks, another session) with a shorter turn in the same batch.
  auto fork_b = (*b)->Fork();
  auto fork_a = (*a)->Fork();
  ASSERT_TRUE(fork_b.ok() && fork_a.ok());
  const auto half = turn.first(37);
  auto run_turn = [&](RambaModel* m, SessionState* s1, SessionState* s2) {
    SessionState* st[] = {s1, s2};
    const absl::Span<const int32_t> in[] = {turn, half};
    std::vector<float> logits;
    EXPECT_TRUE(m->Forward(st, in, LogitsMode::kAll, &logits).ok());
    return logits;
  };
  same(run_turn(tiered->get(), b->get(), fork_b->get()),
       run_turn(plain->get(), a->get(), fork_a->get()));
  EXPECT_EQ((*b)->host_chunks(), (*b)->num_chunks() - kWindow);
}

// Chunk selections of steps with host-tier chunks are counted by tier
// (RambaModel::chunk_tier_counts) and come back with the sampled tokens, through
// ForwardAndSample and LaunchDecode / CollectDecode alike. With K + 1 chunks and a window of two,
// each (row, retrieval head) picks all chunks but one: K - 2 or K - 1 of them in the host tier
// (so counting every pick, or none, as host-tier fails). With a chunk cache of `cache_slots` >=
// K - 1, no host-tier chunk is copied twice: after the first decode step at most one more miss
// (the chunk it did not pick), every other host-tier pick a cache hit.
inline void ExpectTierSelectionsCounted(kernels::Backend* be, const std::string& dir,
                                        int64_t cache_slots = 0) {
  auto model = RambaModel::Load(dir, be);
  ASSERT_TRUE(model.ok()) << model.status();
  RambaModel& m = **model;
  const ModelConfig& c = m.config();
  const auto K = static_cast<uint64_t>(c.chunk_topk);
  const auto heads = static_cast<uint64_t>(c.retrieval_heads());
  m.set_device_chunk_window(2);
  m.set_device_chunk_cache(cache_slots);
  auto s = m.NewSession();
  ASSERT_TRUE(s.ok());
  const int64_t prompt = (c.chunk_topk + 1) * c.chunk_size + 10;
  const auto tokens = RandomTokens(prompt + 8, c.vocab_size, 7);
  std::vector<float> last;
  ASSERT_TRUE(m.Prefill(s->get(), absl::MakeConstSpan(tokens).first(prompt), &last, prompt).ok());
  ASSERT_EQ((*s)->host_chunks(), c.chunk_topk - 1);
  // Nothing comes back until a step samples: then the prefill's counts too (its later rows read
  // chunks that moved to the host tier during it).
  EXPECT_EQ(m.chunk_tier_counts().selected, 0u);

  SessionState* st[] = {s->get()};
  const std::vector<SamplingOptions> greedy(1);
  std::vector<int32_t> sampled;
  RambaModel::ChunkTierCounts base;
  auto expect_steps = [&](uint64_t steps) {
    const RambaModel::ChunkTierCounts n = m.chunk_tier_counts();
    EXPECT_EQ(n.selected - base.selected, steps * heads * K);
    EXPECT_GE(n.host - base.host, steps * heads * (K - 2));
    EXPECT_LE(n.host - base.host, steps * heads * (K - 1));
  };
  for (int64_t i = 0; i < 4; ++i) {
    const int32_t t = tokens[prompt + i];
    const absl::Span<const int32_t> in[] = {absl::MakeConstSpan(&t, 1)};
    ASSERT_TRUE(m.ForwardAndSample(st, in, greedy, &sampled).ok());
    if (i == 0) {
      base = m.chunk_tier_counts();
      EXPECT_GT(base.selected, heads * K);
      EXPECT_LE(base.host, base.selected);
      continue;
    }
    expect_steps(static_cast<uint64_t>(i));
  }
  for (int64_t i = 4; i < 8; ++i) {
    ASSERT_TRUE(m.LaunchDecode(st, {tokens[prompt + i]}, greedy).ok());
    ASSERT_TRUE(m.CollectDecode(&sampled).ok());
    expect_steps(static_cast<uint64_t>(i));
  }
  EXPECT_EQ((*s)->host_chunks(), c.chunk_topk - 1);  // no chunk completed on the way
  const RambaModel::ChunkTierCounts n = m.chunk_tier_counts();
  if (cache_slots == 0) {
    EXPECT_EQ(n.cached, 0u);
  } else {
    ASSERT_GE(cache_slots, c.chunk_topk - 1);
    EXPECT_LE(n.cached, n.host);
    EXPECT_GE(n.cached - base.cached, n.host - base.host - 1);  // steps 2-8: one miss at most
    EXPECT_EQ((*s)->chunk_cache_slots(), cache_slots);
  }
}

}  // namespace ramba::testing

#endif  // RAMBA_TESTS_MODEL_CHUNK_TIERS_H_
