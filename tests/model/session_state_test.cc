// Session state: serialise -> deserialise -> continue equals an uninterrupted run (bitwise on the
// CPU), forks are independent and share chunks, batched decode equals decoding alone, and
// corrupted or foreign parts are rejected; RambaModel::Warmup leaves no trace.
#include "model/session_state.h"

#include <cstring>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "model/ramba_model.h"
#include "model/weights.h"
#include "tests/model/session_snapshot.h"
#include "tests/testing/test_util.h"

namespace ramba {
namespace {

using testing::MaxRowRelError;
using testing::RandomTokens;

class SessionStateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    backend_ = kernels::CreateCpuBackend();
    config_ = testing::SmallConfig();
    auto model = RambaModel::Create(config_, RandomTensors(config_, 7), backend_.get());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
  }

  std::unique_ptr<SessionState> NewState() {
    auto s = model_->NewSession();
    EXPECT_TRUE(s.ok());
    return std::move(*s);
  }

  // Greedy continuation of `n` tokens; returns the tokens and every step's logits.
  std::vector<float> Continue(SessionState* s, int32_t first, int n, std::vector<int32_t>* out) {
    std::vector<float> all;
    int32_t tok = first;
    for (int i = 0; i < n; ++i) {
      SessionState* st[] = {s};
      const int32_t in[] = {tok};
      std::vector<float> logits;
      EXPECT_TRUE(model_->Decode(st, in, &logits).ok());
      all.insert(all.end(), logits.begin(), logits.end());
      tok = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
      if (out) out->push_back(tok);
    }
    return all;
  }

  struct Parts {
    std::string states;
    std::vector<std::string> chunks, landmarks;
  };
  Parts Save(const SessionState& s) {
    Parts p;
    auto st = s.SerializeStates();
    EXPECT_TRUE(st.ok());
    p.states = *st;
    for (int64_t i = 0; i < s.num_chunks(); ++i) p.chunks.push_back(*s.SerializeChunk(i));
    // Landmarks in two ranges, as a store appending per commit would write them.
    const int64_t mid = s.num_chunks() / 2;
    p.landmarks.push_back(*s.SerializeLandmarks(0, mid));
    p.landmarks.push_back(*s.SerializeLandmarks(mid, s.num_chunks()));
    return p;
  }
  absl::StatusOr<std::unique_ptr<SessionState>> Restore(const Parts& p) {
    std::vector<std::string_view> chunks(p.chunks.begin(), p.chunks.end());
    std::vector<std::string_view> landmarks(p.landmarks.begin(), p.landmarks.end());
    return SessionState::Deserialize(model_->config(), backend_.get(), p.states, chunks,
                                     landmarks);
  }

  std::unique_ptr<kernels::Backend> backend_;
  ModelConfig config_;
  std::unique_ptr<RambaModel> model_;
};

TEST_F(SessionStateTest, SaveRestoreContinueIsBitwiseIdentical) {
  const auto prompt = RandomTokens(333, config_.vocab_size, 1);  // 5 chunks + 13 buffered rows
  auto a = NewState();
  ASSERT_TRUE(model_->Prefill(a.get(), prompt, nullptr, 100).ok());
  ASSERT_EQ(a->num_chunks(), 5);
  ASSERT_EQ(a->buffered_rows(), 333 - 5 * 64);

  Parts parts = Save(*a);
  auto b = Restore(parts);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ((*b)->position(), a->position());
  EXPECT_EQ((*b)->num_chunks(), a->num_chunks());

  // 100 more tokens cross a chunk boundary after the restore.
  std::vector<int32_t> ta, tb;
  const auto la = Continue(a.get(), 5, 100, &ta);
  const auto lb = Continue(b->get(), 5, 100, &tb);
  EXPECT_EQ(ta, tb);
  ASSERT_EQ(la.size(), lb.size());
  EXPECT_EQ(0, std::memcmp(la.data(), lb.data(), la.size() * sizeof(float)));
  // And the re-serialised states match byte for byte.
  EXPECT_TRUE(*a->SerializeStates() == *(*b)->SerializeStates());
}

TEST_F(SessionStateTest, SnapshotHoldsThePartsAsTheyWereWhenTaken) {
  testing::ExpectSnapshotHoldsThePast(model_.get());
}

TEST_F(SessionStateTest, EmptyStateRoundTrips) {
  auto a = NewState();
  auto b = Restore(Save(*a));
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ((*b)->position(), 0);
}

TEST_F(SessionStateTest, ForkIsIndependentAndSharesChunks) {
  const auto prompt = RandomTokens(200, config_.vocab_size, 2);
  auto parent = NewState();
  ASSERT_TRUE(model_->Prefill(parent.get(), prompt, nullptr).ok());
  auto child = parent->Fork();
  ASSERT_TRUE(child.ok());
  EXPECT_EQ((*child)->chunk_pointers(), parent->chunk_pointers());  // shared, not copied

  auto reference = NewState();
  ASSERT_TRUE(model_->Prefill(reference.get(), prompt, nullptr).ok());

  // Feed the parent something else; the child must continue like an untouched copy.
  Continue(parent.get(), 17, 90, nullptr);
  std::vector<int32_t> tc, tr;
  const auto lc = Continue(child->get(), 3, 70, &tc);
  const auto lr = Continue(reference.get(), 3, 70, &tr);
  EXPECT_EQ(tc, tr);
  EXPECT_EQ(0, std::memcmp(lc.data(), lr.data(), lc.size() * sizeof(float)));
  parent.reset();  // dropping the parent keeps the child's shared chunks alive
  std::vector<int32_t> more;
  Continue(child->get(), 4, 5, &more);
  EXPECT_EQ(more.size(), 5u);
}

TEST_F(SessionStateTest, BatchedDecodeEqualsDecodingAlone) {
  // Three sessions at different positions (one before its first chunk, two after).
  std::vector<std::unique_ptr<SessionState>> batch, alone;
  const int lengths[] = {10, 130, 257};
  for (int i = 0; i < 3; ++i) {
    const auto prompt = RandomTokens(lengths[i], config_.vocab_size, 10 + i);
    batch.push_back(NewState());
    alone.push_back(NewState());
    ASSERT_TRUE(model_->Prefill(batch.back().get(), prompt, nullptr).ok());
    ASSERT_TRUE(model_->Prefill(alone.back().get(), prompt, nullptr).ok());
  }
  const int64_t V = config_.vocab_size;
  for (int step = 0; step < 70; ++step) {
    const int32_t in[] = {step % 50, (step * 7) % 300, 299 - step};
    SessionState* st[] = {batch[0].get(), batch[1].get(), batch[2].get()};
    std::vector<float> logits;
    ASSERT_TRUE(model_->Decode(st, in, &logits).ok());
    ASSERT_EQ(static_cast<int64_t>(logits.size()), 3 * V);
    for (int i = 0; i < 3; ++i) {
      SessionState* one[] = {alone[i].get()};
      const int32_t tok[] = {in[i]};
      std::vector<float> single;
      ASSERT_TRUE(model_->Decode(one, tok, &single).ok());
      std::vector<float> row(logits.begin() + i * V, logits.begin() + (i + 1) * V);
      EXPECT_LE(MaxRowRelError(row, single, V), 1e-5) << "session " << i << " step " << step;
    }
  }
}

TEST_F(SessionStateTest, WarmupLeavesOtherSessionsAndLaterRunsUnchanged) {
  // A session in flight across the warm-up, and a fresh one after it, against the same runs on
  // a model that never warmed up (CPU: bitwise).
  auto cold_backend = kernels::CreateCpuBackend();
  auto cold = RambaModel::Create(config_, RandomTensors(config_, 7), cold_backend.get());
  ASSERT_TRUE(cold.ok()) << cold.status();
  const auto prompt = RandomTokens(100, config_.vocab_size, 3);
  auto warm_s = NewState();
  auto cold_s = (*cold)->NewSession();
  ASSERT_TRUE(cold_s.ok());
  ASSERT_TRUE(model_->Prefill(warm_s.get(), prompt, nullptr).ok());
  ASSERT_TRUE((*cold)->Prefill(cold_s->get(), prompt, nullptr).ok());

  ASSERT_TRUE(model_->Warmup().ok());

  auto fresh = NewState();
  auto cold_fresh = (*cold)->NewSession();
  ASSERT_TRUE(cold_fresh.ok());
  ASSERT_TRUE(model_->Prefill(fresh.get(), prompt, nullptr).ok());
  ASSERT_TRUE((*cold)->Prefill(cold_fresh->get(), prompt, nullptr).ok());
  for (int step = 0; step < 40; ++step) {  // through a chunk completion (position 128)
    const int32_t in[] = {static_cast<int32_t>((step * 13) % config_.vocab_size)};
    std::vector<float> a, b, c, d;
    SessionState* w[] = {warm_s.get()};
    SessionState* cw[] = {cold_s->get()};
    SessionState* f[] = {fresh.get()};
    SessionState* cf[] = {cold_fresh->get()};
    ASSERT_TRUE(model_->Decode(w, in, &a).ok());
    ASSERT_TRUE((*cold)->Decode(cw, in, &b).ok());
    ASSERT_TRUE(model_->Decode(f, in, &c).ok());
    ASSERT_TRUE((*cold)->Decode(cf, in, &d).ok());
    ASSERT_EQ(a, b) << "step " << step;
    ASSERT_EQ(c, d) << "step " << step;
  }
  EXPECT_EQ(fresh->num_chunks(), 2);
}

TEST_F(SessionStateTest, BadTokenLeavesStateUntouched) {
  auto s = NewState();
  ASSERT_TRUE(model_->Prefill(s.get(), RandomTokens(70, config_.vocab_size, 3), nullptr).ok());
  const std::string before = *s->SerializeStates();
  std::vector<int32_t> bad = RandomTokens(300, config_.vocab_size, 4);
  bad[250] = static_cast<int32_t>(config_.vocab_size);  // in a later segment
  const absl::Status st = model_->Prefill(s.get(), bad, nullptr, 64);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("index 250"), std::string::npos) << st;
  EXPECT_EQ(s->position(), 70);
  EXPECT_TRUE(*s->SerializeStates() == before);

  SessionState* one[] = {s.get()};
  const int32_t neg[] = {-1};
  EXPECT_EQ(model_->Decode(one, neg, nullptr).code(), absl::StatusCode::kInvalidArgument);
  SessionState* twice[] = {s.get(), s.get()};
  const int32_t two[] = {1, 2};
  EXPECT_EQ(model_->Decode(twice, two, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(SessionStateTest, RejectsCorruptedAndForeignParts) {
  auto s = NewState();
  ASSERT_TRUE(model_->Prefill(s.get(), RandomTokens(150, config_.vocab_size, 5), nullptr).ok());
  Parts good = Save(*s);

  Parts flipped = good;
  flipped.states[40] ^= 1;
  auto r1 = Restore(flipped);
  EXPECT_EQ(r1.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(r1.status().message().find("checksum"), std::string::npos) << r1.status();

  Parts truncated = good;
  truncated.chunks[1].resize(truncated.chunks[1].size() / 2);
  EXPECT_FALSE(Restore(truncated).ok());

  Parts missing = good;
  missing.chunks.pop_back();
  auto r3 = Restore(missing);
  EXPECT_EQ(r3.status().code(), absl::StatusCode::kInvalidArgument);

  Parts swapped = good;
  std::swap(swapped.chunks[0], swapped.chunks[1]);
  auto r4 = Restore(swapped);
  EXPECT_FALSE(r4.ok());
  EXPECT_NE(r4.status().message().find("chunk index"), std::string::npos) << r4.status();

  Parts wrong_kind = good;
  wrong_kind.states = good.chunks[0];
  EXPECT_FALSE(Restore(wrong_kind).ok());

  // A state of another model shape.
  ModelConfig other = config_;
  other.state_size = 32;
  std::vector<std::string_view> chunks(good.chunks.begin(), good.chunks.end());
  std::vector<std::string_view> lms(good.landmarks.begin(), good.landmarks.end());
  auto r5 = SessionState::Deserialize(other, backend_.get(), good.states, chunks, lms);
  EXPECT_FALSE(r5.ok());
  EXPECT_NE(r5.status().message().find("but the model has"), std::string::npos) << r5.status();

  EXPECT_FALSE(s->SerializeChunk(99).ok());
  EXPECT_FALSE(s->SerializeLandmarks(1, 0).ok());
}

}  // namespace
}  // namespace ramba
