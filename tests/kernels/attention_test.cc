// RopeInChunk and BlockAttention (chunk encoder) against double loops.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/kernel_test_util.h"

namespace ramba::kernels {
namespace {

using testing::RandomVec;
using testing::RelError;

TEST(RopeTest, RotateHalfWithHfAngles) {
  auto be = testing::Cpu();
  const int64_t period = 65, rows = 2 * period + 7, heads = 3, hd = 18;
  const float theta = 10000.0f;
  auto x = RandomVec(rows * heads * hd, 1);
  const auto orig = x;
  std::vector<double> want(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = r % period;
    for (int64_t h = 0; h < heads; ++h) {
      const float* in = orig.data() + (r * heads + h) * hd;
      double* out = want.data() + (r * heads + h) * hd;
      for (int64_t i = 0; i < hd / 2; ++i) {
        // HF: inv_freq = 1 / theta^(arange(0, hd, 2) / hd) in float32, angle = pos * inv_freq.
        const float inv_freq = 1.0f / std::pow(theta, float(2 * i) / float(hd));
        const double a = double(float(pos) * inv_freq);
        const double x1 = in[i], x2 = in[i + hd / 2];
        out[i] = x1 * std::cos(a) - x2 * std::sin(a);
        out[i + hd / 2] = x2 * std::cos(a) + x1 * std::sin(a);
      }
    }
  }
  ASSERT_TRUE(be->RopeInChunk(x.data(), rows, heads, hd, period, theta).ok());
  EXPECT_LT(RelError(x, want), 1e-5);
  // Position 0 of every chunk is the identity.
  for (int64_t i = 0; i < heads * hd; ++i) {
    EXPECT_EQ(x[i], orig[i]);
    EXPECT_EQ(x[period * heads * hd + i], orig[period * heads * hd + i]);
  }
}

TEST(RopeTest, PositionsRestartEveryPeriod) {
  auto be = testing::Cpu();
  const int64_t period = 5, heads = 2, hd = 8;
  const auto row = RandomVec(heads * hd, 2);
  std::vector<float> x;
  for (int i = 0; i < 3 * period; ++i) x.insert(x.end(), row.begin(), row.end());
  ASSERT_TRUE(be->RopeInChunk(x.data(), 3 * period, heads, hd, period, 10000.0f).ok());
  for (int64_t r = 0; r < period; ++r) {
    for (int64_t i = 0; i < heads * hd; ++i) {
      EXPECT_EQ(x[r * heads * hd + i], x[(r + period) * heads * hd + i]);
      EXPECT_EQ(x[r * heads * hd + i], x[(r + 2 * period) * heads * hd + i]);
    }
  }
}

void CheckBlockAttention(int64_t blocks, int64_t len, int64_t nh, int64_t nkv, int64_t hd,
                         uint32_t seed) {
  SCOPED_TRACE(::testing::Message() << blocks << "x" << len << " nh=" << nh << " nkv=" << nkv
                                    << " hd=" << hd);
  auto be = testing::Cpu();
  const int64_t rows = blocks * len;
  const auto q = RandomVec(rows * nh * hd, seed, -2, 2);
  const auto k = RandomVec(rows * nkv * hd, seed + 1, -2, 2);
  const auto v = RandomVec(rows * nkv * hd, seed + 2);
  std::vector<float> out(rows * nh * hd);
  ASSERT_TRUE(be->BlockAttention(q.data(), k.data(), v.data(), out.data(), blocks, len, nh, nkv, hd)
                  .ok());
  std::vector<double> want(out.size());
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t h = 0; h < nh; ++h) {
      const int64_t g = h / (nh / nkv);
      for (int64_t i = 0; i < len; ++i) {
        std::vector<double> s(len);
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j < len; ++j) {
          double d = 0;
          for (int64_t t = 0; t < hd; ++t) {
            d += double(q[((b * len + i) * nh + h) * hd + t]) * k[((b * len + j) * nkv + g) * hd + t];
          }
          s[j] = d / std::sqrt(double(hd));
          mx = std::max(mx, s[j]);
        }
        for (auto& e : s) sum += (e = std::exp(e - mx));
        for (int64_t t = 0; t < hd; ++t) {
          double acc = 0;
          for (int64_t j = 0; j < len; ++j) acc += s[j] / sum * v[((b * len + j) * nkv + g) * hd + t];
          want[((b * len + i) * nh + h) * hd + t] = acc;
        }
      }
    }
  }
  EXPECT_LT(RelError(out, want), 1e-5);
}

TEST(BlockAttentionTest, MatchesReference) {
  CheckBlockAttention(3, 65, 6, 2, 12, 10);  // GQA, CLS-sized blocks
  CheckBlockAttention(2, 64, 4, 4, 16, 20);  // MHA, no CLS
  CheckBlockAttention(1, 7, 3, 1, 5, 30);    // MQA, odd sizes
}

TEST(BlockAttentionTest, BlocksAreIndependent) {
  auto be = testing::Cpu();
  const int64_t len = 9, nh = 2, hd = 4;
  const auto q = RandomVec(2 * len * nh * hd, 1), k = RandomVec(2 * len * nh * hd, 2),
             v = RandomVec(2 * len * nh * hd, 3);
  std::vector<float> both(q.size()), first(q.size() / 2);
  ASSERT_TRUE(be->BlockAttention(q.data(), k.data(), v.data(), both.data(), 2, len, nh, nh, hd).ok());
  ASSERT_TRUE(be->BlockAttention(q.data(), k.data(), v.data(), first.data(), 1, len, nh, nh, hd).ok());
  EXPECT_EQ(std::vector<float>(both.begin(), both.begin() + first.size()), first);
}

}  // namespace
}  // namespace ramba::kernels
