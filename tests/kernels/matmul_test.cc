// Matmul (f32 / bf16 / f16 weights, strides, bias, accumulate) and Embed against double loops.
#include <gtest/gtest.h>

#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/kernel_test_util.h"

namespace ramba::kernels {
namespace {

using testing::RandomVec;
using testing::RelError;

struct Weights {
  std::vector<float> f32;       // the values the op must use (already rounded for 16-bit)
  std::vector<uint16_t> half;   // 16-bit storage
  MatrixView view;
};

Weights MakeWeights(int64_t n, int64_t k, DType dtype, uint32_t seed) {
  Weights w;
  w.f32 = RandomVec(n * k, seed);
  if (dtype != DType::kF32) {
    w.half.resize(w.f32.size());
    for (size_t i = 0; i < w.f32.size(); ++i) {
      w.half[i] = dtype == DType::kBF16 ? F32ToBf16(w.f32[i]) : F32ToF16(w.f32[i]);
      w.f32[i] = dtype == DType::kBF16 ? Bf16ToF32(w.half[i]) : F16ToF32(w.half[i]);
    }
    w.view = MatrixView{w.half.data(), dtype, n, k};
  } else {
    w.view = MatrixView{w.f32.data(), dtype, n, k};
  }
  return w;
}

struct Case {
  int64_t m, n, k, ldx_pad, ldy_pad;
  bool bias, accumulate;
};

void RunCase(DType dtype, const Case& c, uint32_t seed) {
  SCOPED_TRACE(::testing::Message() << "dtype " << DTypeName(dtype) << " m=" << c.m << " n=" << c.n
                                    << " k=" << c.k << " ldx+" << c.ldx_pad << " ldy+" << c.ldy_pad
                                    << " bias=" << c.bias << " acc=" << c.accumulate);
  auto be = testing::Cpu();
  const int64_t ldx = c.k + c.ldx_pad, ldy = c.n + c.ldy_pad;
  const std::vector<float> x = RandomVec(c.m * ldx, seed + 1);
  const Weights w = MakeWeights(c.n, c.k, dtype, seed + 2);
  const std::vector<float> bias = RandomVec(c.n, seed + 3);
  std::vector<float> y = RandomVec(c.m * ldy, seed + 4);
  std::vector<double> want(y.begin(), y.end());
  for (int64_t i = 0; i < c.m; ++i) {
    for (int64_t j = 0; j < c.n; ++j) {
      double acc = 0;
      for (int64_t t = 0; t < c.k; ++t) acc += double(x[i * ldx + t]) * w.f32[j * c.k + t];
      if (c.bias) acc += bias[j];
      if (c.accumulate) acc += want[i * ldy + j];
      want[i * ldy + j] = acc;  // padding columns keep their values
    }
  }
  ASSERT_TRUE(be->Matmul(x.data(), ldx, c.m, w.view, c.bias ? bias.data() : nullptr, y.data(), ldy,
                         c.accumulate)
                  .ok());
  EXPECT_LT(RelError(y, want), 2e-5);
  for (int64_t i = 0; i < c.m; ++i) {
    for (int64_t j = c.n; j < ldy; ++j) EXPECT_EQ(double(y[i * ldy + j]), want[i * ldy + j]);
  }
}

const Case kCases[] = {
    {1, 33, 17, 0, 0, false, false},  {1, 70, 129, 3, 5, true, true},
    {3, 45, 31, 2, 1, true, false},   {4, 19, 65, 0, 0, false, true},
    {5, 37, 23, 0, 0, false, false},  {37, 61, 99, 7, 3, true, true},
    {24, 4500, 1000, 1, 2, true, false},  // 16-bit path converts two weight blocks
};

TEST(MatmulTest, F32) {
  uint32_t seed = 10;
  for (const Case& c : kCases) RunCase(DType::kF32, c, seed += 10);
}

TEST(MatmulTest, Bf16Weights) {
  uint32_t seed = 100;
  for (const Case& c : kCases) RunCase(DType::kBF16, c, seed += 10);
}

TEST(MatmulTest, F16Weights) {
  uint32_t seed = 200;
  for (const Case& c : kCases) RunCase(DType::kF16, c, seed += 10);
}

TEST(MatmulTest, NanInOutputIsOverwrittenWithoutAccumulate) {
  auto be = testing::Cpu();
  const Weights w = MakeWeights(9, 5, DType::kF32, 1);
  const std::vector<float> x = RandomVec(5, 2);
  std::vector<float> y(9, NAN);
  ASSERT_TRUE(be->Matmul(x.data(), 5, 1, w.view, nullptr, y.data(), 9, false).ok());
  for (float v : y) EXPECT_TRUE(std::isfinite(v));
}

TEST(MatmulTest, ZeroInnerDimensionGivesBias) {
  auto be = testing::Cpu();
  const std::vector<float> bias = {1, 2, 3};
  std::vector<float> y(6, 5.0f);
  MatrixView w{nullptr, DType::kF32, 3, 0};
  ASSERT_TRUE(be->Matmul(nullptr, 0, 2, w, bias.data(), y.data(), 3, false).ok());
  EXPECT_EQ(y, (std::vector<float>{1, 2, 3, 1, 2, 3}));
}

TEST(MatmulTest, DeterministicForEqualInputs) {
  auto be = testing::Cpu();
  const Weights w = MakeWeights(300, 257, DType::kBF16, 5);
  const std::vector<float> x = RandomVec(40 * 257, 6);
  std::vector<float> y1(40 * 300), y2(40 * 300);
  ASSERT_TRUE(be->Matmul(x.data(), 257, 40, w.view, nullptr, y1.data(), 300, false).ok());
  ASSERT_TRUE(be->Matmul(x.data(), 257, 40, w.view, nullptr, y2.data(), 300, false).ok());
  EXPECT_EQ(y1, y2);
}

TEST(EmbedTest, AllDtypes) {
  auto be = testing::Cpu();
  const int64_t vocab = 11, dim = 37;
  const std::vector<int32_t> tokens = {3, 0, 10, 3, 7};
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    const Weights t = MakeWeights(vocab, dim, dt, 9);
    std::vector<float> out(tokens.size() * dim);
    ASSERT_TRUE(be->Embed(tokens.data(), tokens.size(), t.view, out.data()).ok());
    for (size_t i = 0; i < tokens.size(); ++i) {
      for (int64_t j = 0; j < dim; ++j) {
        ASSERT_EQ(out[i * dim + j], t.f32[tokens[i] * dim + j]) << DTypeName(dt);
      }
    }
    const int32_t bad[] = {1, 11};
    EXPECT_EQ(be->Embed(bad, 2, t.view, out.data()).code(), absl::StatusCode::kInvalidArgument);
    const int32_t neg = -1;
    EXPECT_EQ(be->Embed(&neg, 1, t.view, out.data()).code(), absl::StatusCode::kInvalidArgument);
  }
}

}  // namespace
}  // namespace ramba::kernels
