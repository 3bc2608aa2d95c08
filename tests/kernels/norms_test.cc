// RmsNorm, GatedRmsNorm (alone and feeding a projection) and the element-wise ops against double
// loops.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/kernel_test_util.h"

namespace ramba::kernels {
namespace {

using testing::RandomVec;
using testing::RelError;

std::vector<double> RmsNormRef(const std::vector<float>& x, int64_t ldx, const std::vector<float>& w,
                               int64_t rows, int64_t dim, double eps) {
  std::vector<double> y(rows * dim);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += double(x[r * ldx + i]) * x[r * ldx + i];
    const double s = 1.0 / std::sqrt(ss / dim + eps);
    for (int64_t i = 0; i < dim; ++i) y[r * dim + i] = x[r * ldx + i] * s * w[i];
  }
  return y;
}

TEST(RmsNormTest, StridedMatchesReference) {
  auto be = testing::Cpu();
  for (int64_t dim : {1, 7, 64, 1031}) {
    const int64_t rows = 13, ldx = dim + 3;
    const auto x = RandomVec(rows * ldx, dim, -3, 3);
    const auto w = RandomVec(dim, dim + 1);
    std::vector<float> y(rows * dim);
    ASSERT_TRUE(be->RmsNorm(x.data(), ldx, w.data(), y.data(), dim, rows, dim, 1e-5f).ok());
    EXPECT_LT(RelError(y, RmsNormRef(x, ldx, w, rows, dim, 1e-5)), 1e-5) << dim;
  }
}

TEST(RmsNormTest, InPlace) {
  auto be = testing::Cpu();
  const int64_t rows = 301, dim = 16;  // per-head q-norm shape: rows * heads rows of head_dim
  auto x = RandomVec(rows * dim, 3);
  const auto w = RandomVec(dim, 4);
  const auto want = RmsNormRef(x, dim, w, rows, dim, 1e-6);
  ASSERT_TRUE(be->RmsNorm(x.data(), dim, w.data(), x.data(), dim, rows, dim, 1e-6f).ok());
  EXPECT_LT(RelError(x, want), 1e-5);
}

TEST(GatedRmsNormTest, GroupsMatchReference) {
  auto be = testing::Cpu();
  for (int64_t groups : {1, 2, 4}) {
    const int64_t rows = 9, dim = 96, gs = dim / groups, ld = 3 * dim + 5;
    const auto y = RandomVec(rows * ld, 10 + groups, -2, 2);
    const auto z = RandomVec(rows * ld, 20 + groups, -4, 4);
    const auto w = RandomVec(dim, 30 + groups);
    std::vector<float> out(rows * (dim + 1), 123.0f);
    ASSERT_TRUE(be->GatedRmsNorm(y.data() + 1, ld, z.data() + dim, ld, w.data(), out.data(), dim + 1,
                                 rows, dim, gs, 1e-5f)
                    .ok());
    std::vector<float> got;
    std::vector<double> want;
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<double> g(dim);
      for (int64_t i = 0; i < dim; ++i) {
        g[i] = double(y[r * ld + 1 + i]) * testing::SiluD(z[r * ld + dim + i]);
      }
      for (int64_t g0 = 0; g0 < dim; g0 += gs) {
        double ss = 0;
        for (int64_t i = g0; i < g0 + gs; ++i) ss += g[i] * g[i];
        const double s = 1.0 / std::sqrt(ss / gs + 1e-5);
        for (int64_t i = g0; i < g0 + gs; ++i) want.push_back(g[i] * s * w[i]);
      }
      for (int64_t i = 0; i < dim; ++i) got.push_back(out[r * (dim + 1) + i]);
      EXPECT_EQ(out[r * (dim + 1) + dim], 123.0f);  // stride padding untouched
    }
    EXPECT_LT(RelError(got, want), 1e-5) << groups;
  }
}

// The gated norm feeding a projection (Mamba's out_proj): out (+)= GatedRmsNorm(y, z) * w^T.
TEST(GatedRmsNormMatmulTest, MatchesReference) {
  auto be = testing::Cpu();
  for (bool accumulate : {false, true}) {
    const int64_t rows = 7, dim = 48, gs = 16, n = 5, ld = 2 * dim + 3, ldo = n + 2;
    const auto zy = RandomVec(rows * ld, 40 + accumulate, -3, 3);
    const auto nw = RandomVec(dim, 41, 0.5f, 1.5f);
    const auto w = RandomVec(n * dim, 42);
    const auto out0 = RandomVec(rows * ldo, 43);
    std::vector<float> out = out0, g(rows * dim);
    ASSERT_TRUE(be->GatedRmsNormMatmul(zy.data() + dim, ld, zy.data(), ld, nw.data(), gs, 1e-5f,
                                       rows, g.data(), MatrixView{w.data(), DType::kF32, n, dim},
                                       out.data(), ldo, accumulate)
                    .ok());
    std::vector<float> got;
    std::vector<double> want;
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<double> gn(dim);
      for (int64_t i = 0; i < dim; ++i) {
        gn[i] = double(zy[r * ld + dim + i]) * testing::SiluD(zy[r * ld + i]);
      }
      for (int64_t g0 = 0; g0 < dim; g0 += gs) {
        double ss = 0;
        for (int64_t i = g0; i < g0 + gs; ++i) ss += gn[i] * gn[i];
        const double sc = 1.0 / std::sqrt(ss / gs + 1e-5);
        for (int64_t i = g0; i < g0 + gs; ++i) gn[i] *= sc * nw[i];
      }
      for (int64_t j = 0; j < ldo; ++j) {
        if (j >= n) {
          EXPECT_EQ(out[r * ldo + j], out0[r * ldo + j]);  // stride padding untouched
          continue;
        }
        double acc = accumulate ? out0[r * ldo + j] : 0.0;
        for (int64_t i = 0; i < dim; ++i) acc += gn[i] * w[j * dim + i];
        want.push_back(acc);
        got.push_back(out[r * ldo + j]);
      }
    }
    EXPECT_LT(RelError(got, want), 1e-5) << accumulate;
  }
}

TEST(ElementwiseTest, AddAndSwiGlu) {
  auto be = testing::Cpu();
  for (int64_t n : {1, 5, 100003}) {
    auto y = RandomVec(n, 1);
    const auto x = RandomVec(n, 2);
    std::vector<double> want(n);
    for (int64_t i = 0; i < n; ++i) want[i] = double(y[i]) + x[i];
    ASSERT_TRUE(be->Add(y.data(), x.data(), n).ok());
    EXPECT_LT(RelError(y, want), 1e-6);

    auto gate = RandomVec(n, 3, -8, 8);
    const auto up = RandomVec(n, 4);
    for (int64_t i = 0; i < n; ++i) want[i] = testing::SiluD(gate[i]) * up[i];
    ASSERT_TRUE(be->SwiGlu(gate.data(), up.data(), gate.data(), n).ok());  // out aliases gate
    EXPECT_LT(RelError(gate, want), 1e-6);
  }
}

TEST(ElementwiseTest, BlockMean) {
  auto be = testing::Cpu();
  const int64_t blocks = 5, len = 64, dim = 33;
  const auto x = RandomVec(blocks * len * dim, 7);
  std::vector<float> out(blocks * dim);
  ASSERT_TRUE(be->BlockMean(x.data(), blocks, len, dim, out.data()).ok());
  std::vector<double> want(blocks * dim, 0.0);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t r = 0; r < len; ++r) {
      for (int64_t i = 0; i < dim; ++i) want[b * dim + i] += x[(b * len + r) * dim + i] / double(len);
    }
  }
  EXPECT_LT(RelError(out, want), 1e-5);
}

}  // namespace
}  // namespace ramba::kernels
