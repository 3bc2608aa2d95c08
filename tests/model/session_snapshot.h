// Shared by the CPU and GPU model tests: SessionState::Snapshot holds the parts as they stood
// when it was taken, whatever the session does before SessionSnapshot::Finish reads them (the
// server's engine thread takes one when a request ends and a commit thread finishes it).
#ifndef RAMBA_TESTS_MODEL_SESSION_SNAPSHOT_H_
#define RAMBA_TESTS_MODEL_SESSION_SNAPSHOT_H_

#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "model/ramba_model.h"
#include "tests/testing/test_util.h"

namespace ramba::testing {

inline void ExpectSnapshotHoldsThePast(RambaModel* model) {
  const int64_t S = model->config().chunk_size;
  auto s = model->NewSession();
  ASSERT_TRUE(s.ok());
  const auto tokens = RandomTokens(4 * S, model->config().vocab_size, 31);
  std::vector<float> logits;
  // Two chunks and some buffered rows.
  ASSERT_TRUE(
      model->Prefill(s->get(), absl::MakeConstSpan(tokens).first(2 * S + 22), &logits).ok());
  SessionState* st = s->get();
  ASSERT_EQ(st->num_chunks(), 2);
  const std::string states = *st->SerializeStates();
  const std::string chunk1 = *st->SerializeChunk(1);
  const std::string landmarks = *st->SerializeLandmarks(1, 2);
  auto snap = st->Snapshot(1);
  ASSERT_TRUE(snap.ok()) << snap.status();
  auto none = st->Snapshot(2);  // no chunk since
  ASSERT_TRUE(none.ok()) << none.status();
  // The session goes on (the buffer refills, a chunk completes, the states move) before either
  // snapshot is read.
  for (int64_t i = 2 * S + 22; i < 3 * S + 5; ++i) {
    SessionState* one[] = {st};
    const int32_t in[] = {tokens[i]};
    ASSERT_TRUE(model->Decode(one, in, &logits).ok());
  }
  ASSERT_EQ(st->num_chunks(), 3);
  ASSERT_NE(*st->SerializeStates(), states);
  auto parts = (*snap)->Finish();
  ASSERT_TRUE(parts.ok()) << parts.status();
  EXPECT_EQ(parts->states, states);
  ASSERT_EQ(parts->chunks.size(), 1u);
  EXPECT_EQ(parts->chunks[0].first, 1);
  EXPECT_EQ(parts->chunks[0].second, chunk1);
  EXPECT_EQ(parts->landmarks, landmarks);
  EXPECT_EQ((*snap)->Finish().status().code(), absl::StatusCode::kFailedPrecondition);
  auto none_parts = (*none)->Finish();
  ASSERT_TRUE(none_parts.ok()) << none_parts.status();
  EXPECT_EQ(none_parts->states, states);
  EXPECT_TRUE(none_parts->chunks.empty());
  EXPECT_TRUE(none_parts->landmarks.empty());
  EXPECT_EQ(st->Snapshot(-1).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(st->Snapshot(4).status().code(), absl::StatusCode::kOutOfRange);
}

}  // namespace ramba::testing

#endif  // RAMBA_TESTS_MODEL_SESSION_SNAPSHOT_H_
