// RetrieveChunks (eligibility, top-K, ordering, stick-breaking) and SparseChunkAttention against
// brute-force double references.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/kernel_test_util.h"

namespace ramba::kernels {
namespace {

using testing::RandomVec;
using testing::RelError;

constexpr int64_t kChunk = 64;

// Chunk memory of several sequences plus the per-row views.
struct Memory {
  int64_t dim;
  std::vector<std::vector<float>> landmarks;
  std::vector<const float*> landmark_ptrs;
  std::vector<int64_t> num_chunks;
  std::vector<int32_t> row_seq;
  std::vector<int64_t> row_pos;
  ChunkMemoryBatch view() const {
    ChunkMemoryBatch m;
    m.row_seq = row_seq.data();
    m.row_position = row_pos.data();
    m.landmarks = landmark_ptrs.data();
    m.num_chunks = num_chunks.data();
    return m;
  }
  void AddSeq(const std::vector<float>& l) {
    landmarks.push_back(l);
    num_chunks.push_back(static_cast<int64_t>(l.size()) / dim);
  }
  void Finish() {
    landmark_ptrs.clear();
    for (auto& l : landmarks) landmark_ptrs.push_back(l.empty() ? nullptr : l.data());
  }
};

struct Ref {
  std::vector<int32_t> idx;
  std::vector<double> w;
};

Ref RetrieveRef(const std::vector<float>& r, const Memory& m, int64_t heads, int64_t K) {
  const int64_t rows = m.row_seq.size(), dh = m.dim / heads;
  Ref out{std::vector<int32_t>(rows * heads * K, -1), std::vector<double>(rows * heads * K, 0.0)};
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t s = m.row_seq[i];
    for (int64_t e = 0; e < heads; ++e) {
      std::vector<std::pair<double, int32_t>> cand;
      for (int64_t c = 0; c < m.num_chunks[s]; ++c) {
        if ((c + 1) * kChunk > m.row_pos[i]) continue;
        double d = 0;
        for (int64_t t = 0; t < dh; ++t) {
          d += double(r[i * m.dim + e * dh + t]) * m.landmarks[s][c * m.dim + e * dh + t];
        }
        cand.push_back({d / std::sqrt(double(dh)), static_cast<int32_t>(c)});
      }
      std::sort(cand.begin(), cand.end(), [](auto& a, auto& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      });
      cand.resize(std::min<size_t>(cand.size(), K));
      std::sort(cand.begin(), cand.end(), [](auto& a, auto& b) { return a.second > b.second; });
      double keep = 1.0;
      for (size_t j = 0; j < cand.size(); ++j) {
        const double sg = testing::Sigmoid(cand[j].first);
        out.idx[(i * heads + e) * K + j] = cand[j].second;
        out.w[(i * heads + e) * K + j] = sg * keep;
        keep *= 1.0 - sg;
      }
    }
  }
  return out;
}

Memory MakeMemory(int64_t dim, const std::vector<int64_t>& chunks_per_seq, uint32_t seed) {
  Memory m;
  m.dim = dim;
  for (size_t s = 0; s < chunks_per_seq.size(); ++s) {
    m.AddSeq(RandomVec(chunks_per_seq[s] * dim, seed + s, -1.5f, 1.5f));
  }
  m.Finish();
  return m;
}

void RunAndCompare(Backend* be, const Memory& m, int64_t heads, int64_t K, uint32_t seed,
                   std::vector<int32_t>* idx_out = nullptr, std::vector<float>* w_out = nullptr) {
  const int64_t rows = m.row_seq.size();
  const auto r = RandomVec(rows * m.dim, seed, -1.5f, 1.5f);
  std::vector<int32_t> idx(rows * heads * K, 77);
  std::vector<float> w(rows * heads * K, 77.0f);
  ASSERT_TRUE(be->RetrieveChunks(r.data(), rows, m.view(), m.dim, heads, K, kChunk, idx.data(),
                                 w.data())
                  .ok());
  const Ref ref = RetrieveRef(r, m, heads, K);
  EXPECT_EQ(idx, ref.idx);
  EXPECT_LT(RelError(w, ref.w), 1e-5);
  for (int64_t rh = 0; rh < rows * heads; ++rh) {
    double sum = 0;
    for (int64_t j = 0; j < K; ++j) {
      const int32_t c = idx[rh * K + j];
      sum += w[rh * K + j];
      if (c < 0) {
        EXPECT_EQ(w[rh * K + j], 0.0f);
      } else {
        EXPECT_GT(w[rh * K + j], 0.0f);
        EXPECT_LE((c + 1) * kChunk, m.row_pos[rh / heads]);  // never its own or a later chunk
        if (j > 0) EXPECT_LT(c, idx[rh * K + j - 1]);        // most recent first
      }
    }
    EXPECT_LE(sum, 1.0 + 1e-6);
  }
  if (idx_out) *idx_out = idx;
  if (w_out) *w_out = w;
}

TEST(RetrieveChunksTest, EligibilityOrderingAndWeights) {
  auto be = testing::Cpu();
  for (int64_t heads : {1, 2, 3}) {
    Memory m = MakeMemory(24, {10, 0, 3}, 5);
    const int64_t positions[] = {0, 1, 63, 64, 65, 127, 128, 300, 640, 700, 5000};
    for (int32_t s = 0; s < 3; ++s) {
      for (int64_t p : positions) {
        m.row_seq.push_back(s);
        m.row_pos.push_back(p);
      }
    }
    std::vector<int32_t> idx;
    RunAndCompare(be.get(), m, heads, 4, 100 + heads, &idx);
    // Tokens 0..63 of every sequence retrieve nothing.
    for (int64_t i = 0; i < static_cast<int64_t>(m.row_seq.size()); ++i) {
      if (m.row_pos[i] < kChunk) {
        for (int64_t j = 0; j < heads * 4; ++j) EXPECT_EQ(idx[i * heads * 4 + j], -1);
      }
    }
    // Position 64 and 127 see exactly chunk 0 (not their own chunk 1).
    EXPECT_EQ(idx[3 * heads * 4], 0);
    EXPECT_EQ(idx[3 * heads * 4 + 1], -1);
    EXPECT_EQ(idx[5 * heads * 4], 0);
    EXPECT_EQ(idx[5 * heads * 4 + 1], -1);
  }
}

TEST(RetrieveChunksTest, TiesKeepLowerChunkIndex) {
  auto be = testing::Cpu();
  Memory m;
  m.dim = 8;
  const auto l = RandomVec(8, 1);
  std::vector<float> lm;
  for (int c = 0; c < 6; ++c) lm.insert(lm.end(), l.begin(), l.end());
  m.AddSeq(lm);
  m.Finish();
  m.row_seq = {0};
  m.row_pos = {10000};
  const auto r = RandomVec(8, 2);
  std::vector<int32_t> idx(3);
  std::vector<float> w(3);
  ASSERT_TRUE(be->RetrieveChunks(r.data(), 1, m.view(), 8, 1, 3, kChunk, idx.data(), w.data()).ok());
  EXPECT_EQ(idx, (std::vector<int32_t>{2, 1, 0}));
}

TEST(RetrieveChunksTest, SplitScanOfLongMemoryMatchesBatchedRows) {
  // One row over many chunks takes the split-range path; the same row inside a large batch is
  // scanned whole. Both must agree with the reference and bitwise with each other.
  auto be = testing::Cpu();
  Memory one = MakeMemory(16, {5000}, 9);
  one.row_seq = {0};
  one.row_pos = {5000 * kChunk + 3};
  std::vector<int32_t> idx1;
  std::vector<float> w1;
  RunAndCompare(be.get(), one, 1, 8, 42, &idx1, &w1);

  Memory many = MakeMemory(16, {5000}, 9);
  many.row_seq.assign(8, 0);
  many.row_pos.assign(8, 5000 * kChunk + 3);
  const auto r1 = RandomVec(16, 42, -1.5f, 1.5f);
  std::vector<float> r;
  for (int i = 0; i < 8; ++i) r.insert(r.end(), r1.begin(), r1.end());
  std::vector<int32_t> idx(8 * 8);
  std::vector<float> w(8 * 8);
  ASSERT_TRUE(
      be->RetrieveChunks(r.data(), 8, many.view(), 16, 1, 8, kChunk, idx.data(), w.data()).ok());
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(std::vector<int32_t>(idx.begin() + i * 8, idx.begin() + i * 8 + 8), idx1);
    EXPECT_EQ(std::vector<float>(w.begin() + i * 8, w.begin() + i * 8 + 8), w1);
  }
}

TEST(RetrieveChunksTest, StickBreakingOfLargeScores) {
  // sigmoid saturates: the first slot takes (almost) everything, later slots get ~0.
  auto be = testing::Cpu();
  Memory m;
  m.dim = 1;
  m.AddSeq({30.0f, 40.0f, 50.0f});
  m.Finish();
  m.row_seq = {0};
  m.row_pos = {3 * kChunk};
  const float r = 1.0f;
  std::vector<int32_t> idx(4);
  std::vector<float> w(4);
  ASSERT_TRUE(be->RetrieveChunks(&r, 1, m.view(), 1, 1, 4, kChunk, idx.data(), w.data()).ok());
  EXPECT_EQ(idx, (std::vector<int32_t>{2, 1, 0, -1}));
  EXPECT_NEAR(w[0], 1.0f, 1e-6);
  EXPECT_LT(w[1], 1e-18f);
  EXPECT_EQ(w[3], 0.0f);
}

// ---------------- SparseChunkAttention ----------------

struct KvMemory {
  std::vector<std::vector<float>> chunks;          // per chunk: K then V
  std::vector<std::vector<const float*>> tables;   // per sequence
  std::vector<const float* const*> table_ptrs;
};

void CheckSparse(int64_t nh, int64_t nkv, int64_t rheads, int64_t hd, int64_t cs, uint32_t seed) {
  SCOPED_TRACE(::testing::Message() << "nh=" << nh << " nkv=" << nkv << " rheads=" << rheads
                                    << " hd=" << hd << " cs=" << cs);
  auto be = testing::Cpu();
  const int64_t K = 3;
  const std::vector<int64_t> nchunks = {5, 2};
  KvMemory kv;
  kv.chunks.reserve(7);
  for (size_t s = 0; s < nchunks.size(); ++s) {
    kv.tables.emplace_back();
    for (int64_t c = 0; c < nchunks[s]; ++c) {
      kv.chunks.push_back(RandomVec(2 * cs * nkv * hd, seed++, -2, 2));
      kv.tables.back().push_back(kv.chunks.back().data());
    }
  }
  for (auto& t : kv.tables) kv.table_ptrs.push_back(t.data());
  const std::vector<int32_t> row_seq = {0, 0, 1, 0};
  const std::vector<int64_t> row_pos = {1000, 1001, 500, 10};
  const int64_t rows = row_seq.size();
  ChunkMemoryBatch mem;
  mem.row_seq = row_seq.data();
  mem.row_position = row_pos.data();
  mem.num_chunks = nchunks.data();
  mem.chunk_kv = kv.table_ptrs.data();
  // Hand-made selections with unused slots; the last row selects nothing.
  std::vector<int32_t> idx;
  std::vector<float> w;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t e = 0; e < rheads; ++e) {
      for (int64_t j = 0; j < K; ++j) {
        int32_t c = -1;
        if (r == 0) c = static_cast<int32_t>(std::max<int64_t>(4 - j - e, -1));
        if (r == 1 && j < 2) c = static_cast<int32_t>(3 - 2 * j);
        if (r == 2 && j == 0) c = static_cast<int32_t>(1 - e % 2);
        idx.push_back(c);
        w.push_back(c < 0 ? 0.0f : 0.2f + 0.1f * j + 0.05f * e);
      }
    }
  }
  const auto q = RandomVec(rows * nh * hd, seed, -2, 2);
  std::vector<float> out(rows * nh * hd, 99.0f);
  ASSERT_TRUE(be->SparseChunkAttention(q.data(), rows, mem, idx.data(), w.data(), rheads, K, nh, nkv,
                                       hd, cs, out.data())
                  .ok());
  std::vector<double> want(out.size(), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < nh; ++h) {
      const int64_t g = h / (nh / nkv), e = g * rheads / nkv;
      for (int64_t j = 0; j < K; ++j) {
        const int32_t c = idx[(r * rheads + e) * K + j];
        if (c < 0) continue;
        const float* Kc = kv.tables[row_seq[r]][c];
        const float* Vc = Kc + cs * nkv * hd;
        std::vector<double> s(cs);
        double mx = -INFINITY, sum = 0;
        for (int64_t i = 0; i < cs; ++i) {
          double d = 0;
          for (int64_t t = 0; t < hd; ++t) d += double(q[(r * nh + h) * hd + t]) * Kc[(i * nkv + g) * hd + t];
          s[i] = d / std::sqrt(double(hd));
          mx = std::max(mx, s[i]);
        }
        for (auto& x : s) sum += (x = std::exp(x - mx));
        for (int64_t t = 0; t < hd; ++t) {
          double acc = 0;
          for (int64_t i = 0; i < cs; ++i) acc += s[i] / sum * Vc[(i * nkv + g) * hd + t];
          want[(r * nh + h) * hd + t] += w[(r * rheads + e) * K + j] * acc;
        }
      }
    }
  }
  EXPECT_LT(RelError(out, want), 1e-5);
  for (int64_t i = 3 * nh * hd; i < 4 * nh * hd; ++i) EXPECT_EQ(out[i], 0.0f);  // nothing selected

  // An index beyond the sequence's chunks is an error, not a read out of bounds.
  idx[0] = 5;
  EXPECT_EQ(be->SparseChunkAttention(q.data(), rows, mem, idx.data(), w.data(), rheads, K, nh, nkv,
                                     hd, cs, out.data())
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SparseChunkAttentionTest, GqaWithOneRetrievalHead) { CheckSparse(6, 2, 1, 8, 64, 1); }
TEST(SparseChunkAttentionTest, GqaWithRetrievalHeadPerKvHead) { CheckSparse(6, 2, 2, 8, 64, 50); }
TEST(SparseChunkAttentionTest, OddSizes) { CheckSparse(5, 5, 5, 7, 9, 100); }
TEST(SparseChunkAttentionTest, Mqa) { CheckSparse(4, 1, 1, 16, 13, 150); }

}  // namespace
}  // namespace ramba::kernels
