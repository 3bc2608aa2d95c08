// The CUDA dense ops (Matmul, Embed, RmsNorm, GatedRmsNorm, Add, SwiGlu, BlockMean, RopeInChunk)
// against the CPU backend on the same inputs (label gpu; skipped without a GPU). Outputs start
// poisoned (NaN bits) so an element a kernel forgets to write fails, and padding columns of
// strided outputs must come back bit-for-bit untouched.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/cuda_test_util.h"

namespace ramba::kernels::testing {
namespace {

uint32_t Bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}

float PoisonFloat() {
  float f;
  std::memset(&f, 0xFF, sizeof(f));
  return f;
}

// rows x cols block of a strided matrix.
std::vector<float> Region(const std::vector<float>& a, int64_t rows, int64_t cols, int64_t ld) {
  std::vector<float> out(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = a[r * ld + c];
  }
  return out;
}

// Columns [cols, ld) of every row must be bitwise equal in got and want.
void ExpectPaddingUntouched(const std::vector<float>& got, const std::vector<float>& want,
                            int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = cols; c < ld; ++c) {
      ASSERT_EQ(Bits(got[r * ld + c]), Bits(want[r * ld + c]))
          << "padding row " << r << " col " << c;
    }
  }
}

void ExpectBitwiseEqual(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(Bits(got[i]), Bits(want[i]))
        << "element " << i << ": " << got[i] << " vs " << want[i];
  }
}

float RoundTo(DType t, float v) {
  switch (t) {
    case DType::kBF16:
      return Bf16ToF32(F32ToBf16(v));
    case DType::kF16:
      return F16ToF32(F32ToF16(v));
    default:
      return v;
  }
}

struct MatmulCase {
  int64_t m, n, k, ldx_pad, ldy_pad;
  bool bias, accumulate;
};

// Element offsets of the GPU operands (to defeat 16-byte alignment).
struct Offsets {
  int64_t w = 0, x = 0, y = 0;
};

class CudaDenseOpsTest : public CudaOpTest {
 protected:
  // A device copy of host data starting `offset` elements into its allocation.
  template <class T>
  T* ToGpuAt(const std::vector<T>& host, int64_t offset) {
    std::vector<T> padded(static_cast<size_t>(offset), T{});
    padded.insert(padded.end(), host.begin(), host.end());
    return ToGpu(padded) + offset;
  }

  // A weight matrix on the GPU in `dtype` and the (rounded) f32 values the op must use.
  struct Mat {
    MatrixView gpu;
    std::vector<float> values;
    MatrixView cpu() const {
      return MatrixView{values.data(), DType::kF32, gpu.rows, gpu.cols};
    }
  };
  Mat MakeMatrix(int64_t rows, int64_t cols, DType dtype, uint32_t seed, int64_t offset = 0) {
    Mat w;
    w.values = RandomVec(rows * cols, seed);
    const void* data;
    if (dtype == DType::kF32) {
      data = ToGpuAt(w.values, offset);
    } else {
      std::vector<uint16_t> h(w.values.size());
      for (size_t i = 0; i < h.size(); ++i) {
        h[i] = dtype == DType::kBF16 ? F32ToBf16(w.values[i]) : F32ToF16(w.values[i]);
        w.values[i] = dtype == DType::kBF16 ? Bf16ToF32(h[i]) : F16ToF32(h[i]);
      }
      data = ToGpuAt(h, offset);
    }
    w.gpu = MatrixView{data, dtype, rows, cols};
    return w;
  }

  // Products of up to tight_m rows must match the CPU to 1e-5 (f32-grade: x in f32 or split
  // into hi + lo); larger ones may take cuBLASLt with x rounded once.
  void CheckMatmul(DType dtype, const MatmulCase& c, uint32_t seed, Offsets off = {},
                   int64_t tight_m = 16) {
    SCOPED_TRACE(::testing::Message()
                 << DTypeName(dtype) << " m=" << c.m << " n=" << c.n << " k=" << c.k << " ldx+"
                 << c.ldx_pad << " ldy+" << c.ldy_pad << " bias=" << c.bias
                 << " acc=" << c.accumulate << " offsets w" << off.w << " x" << off.x << " y"
                 << off.y);
    const int64_t ldx = c.k + c.ldx_pad, ldy = c.n + c.ldy_pad;
    const std::vector<float> x = RandomVec(c.m * ldx, seed + 1);
    const Mat w = MakeMatrix(c.n, c.k, dtype, seed + 2, off.w);
    const std::vector<float> bias = RandomVec(c.n, seed + 3);
    // Accumulate starts from random values; otherwise from poison, which must be overwritten.
    const std::vector<float> y0 = c.accumulate ? RandomVec(c.m * ldy, seed + 4)
                                               : std::vector<float>(c.m * ldy, PoisonFloat());

    const float* gx = ToGpuAt(x, off.x);
    const float* gbias = c.bias ? ToGpu(bias) : nullptr;
    float* gy = ToGpuAt(y0, off.y);
    ASSERT_TRUE(gpu_->Matmul(gx, ldx, c.m, w.gpu, gbias, gy, ldy, c.accumulate).ok());
    const std::vector<float> got = FromGpu(gy, c.m * ldy);

    std::vector<float> want = y0;
    ASSERT_TRUE(cpu_->Matmul(x.data(), ldx, c.m, w.cpu(), c.bias ? bias.data() : nullptr,
                             want.data(), ldy, c.accumulate)
                    .ok());
    ExpectPaddingUntouched(got, y0, c.m, c.n, ldy);
    const std::vector<float> got_r = Region(got, c.m, c.n, ldy);
    const double err = NormRelError(got_r, Region(want, c.m, c.n, ldy));
    if (dtype == DType::kF32 || c.m <= tight_m) {
      EXPECT_LE(err, 1e-5);
      return;
    }
    // cuBLASLt path: x is rounded to the weights' 16-bit type. Compare against the CPU on the same
    // rounded x (tight) and on the original x (loose). The small-m slab fallback (no cuBLASLt
    // algorithm) keeps x in f32 and must then match the original x tightly instead.
    std::vector<float> xr = x;
    for (float& v : xr) v = RoundTo(dtype, v);
    std::vector<float> want_r = y0;
    ASSERT_TRUE(cpu_->Matmul(xr.data(), ldx, c.m, w.cpu(), c.bias ? bias.data() : nullptr,
                             want_r.data(), ldy, c.accumulate)
                    .ok());
    const double err_r = NormRelError(got_r, Region(want_r, c.m, c.n, ldy));
    EXPECT_LE(err, 1e-2);
    EXPECT_TRUE(err_r <= 1e-4 || err <= 1e-5) << "vs rounded x " << err_r << ", vs x " << err;
  }
};

const MatmulCase kMatmulCases[] = {
    {1, 1, 77, 0, 0, false, false},      {1, 33, 1024, 3, 5, true, false},
    {2, 4384, 1024, 0, 0, false, true},  {3, 33, 1031, 1, 2, true, true},
    {5, 257, 77, 4, 1, false, false},    {16, 4384, 1031, 5, 3, true, true},
    {16, 1, 1024, 0, 0, true, false},    {17, 33, 1024, 0, 7, true, false},
    {64, 4384, 1024, 8, 0, false, true}, {300, 257, 1031, 1, 1, true, true},
    {300, 1, 77, 0, 0, false, false},    {64, 100, 8, 0, 0, true, false},
};

TEST_F(CudaDenseOpsTest, MatmulF32Weights) {
  uint32_t seed = 1000;
  for (const MatmulCase& c : kMatmulCases) CheckMatmul(DType::kF32, c, seed += 10);
}

TEST_F(CudaDenseOpsTest, MatmulBf16Weights) {
  uint32_t seed = 2000;
  for (const MatmulCase& c : kMatmulCases) CheckMatmul(DType::kBF16, c, seed += 10);
}

TEST_F(CudaDenseOpsTest, MatmulF16Weights) {
  uint32_t seed = 3000;
  for (const MatmulCase& c : kMatmulCases) CheckMatmul(DType::kF16, c, seed += 10);
}

// Every row count of the small-m kernel (one instantiation each), vector (k % 8 == 0) and scalar
// weight loads.
TEST_F(CudaDenseOpsTest, MatmulEverySmallRowCount) {
  uint32_t seed = 4000;
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    for (int64_t m = 1; m <= 16; ++m) {
      CheckMatmul(dtype, {m, 70, 136, 0, 0, m % 2 == 0, m % 3 == 0}, seed += 10);
      CheckMatmul(dtype, {m, 37, 135, 3, 2, m % 2 == 1, m % 3 != 0}, seed += 10);
    }
  }
}

// The tensor-core small-m kernel (bf16, k a multiple of 256, aligned x) from 1 to 32 rows, forced
// on (RAMBA_CUDA_TENSOR_SMALL_M=1), and 33 / 64 rows handed on to cuBLASLt: both m-tile counts,
// 1, 2 and 4 n8 tiles per block (n past 4, 2 and 1 tiles per SM), n not a multiple of 8, padded
// strides, bias and accumulate; f32-grade against the CPU (MatmulDeterministic: bitwise
// repeatable).
TEST_F(CudaDenseOpsTest, MatmulTensorSmallM) {
  const ScopedEnv env("RAMBA_CUDA_TENSOR_SMALL_M", "1");
  uint32_t seed = 4500;
  for (int64_t m : {1, 2, 3, 5, 8, 15, 16, 17, 31, 32, 33, 64}) {
    CheckMatmul(DType::kBF16, {m, 1001, 256, 4, 3, m % 2 == 0, m % 3 == 0}, seed += 10, {}, 32);
    CheckMatmul(DType::kBF16, {m, 4384, 1024, 0, 0, m % 2 == 1, false}, seed += 10, {}, 32);
    CheckMatmul(DType::kBF16, {m, 37, 2048, 8, 1, false, true}, seed += 10, {}, 32);
    if (HasFatalFailure()) return;
  }
  CheckMatmul(DType::kBF16, {16, 9000, 768, 0, 5, true, true}, seed += 10, {}, 32);
  CheckMatmul(DType::kBF16, {32, 2100, 512, 0, 0, true, false}, seed += 10, {}, 32);
}

// Small n with long k: the small-m kernel splits k and reduces the partial sums.
TEST_F(CudaDenseOpsTest, MatmulSplitK) {
  uint32_t seed = 5000;
  for (int64_t m : {1, 7, 16}) {
    CheckMatmul(DType::kBF16, {m, 33, 8200, 0, 1, true, true}, seed += 10);
    CheckMatmul(DType::kF16, {m, 5, 4099, 2, 0, false, false}, seed += 10);
  }
}

// Operands off 16-byte alignment take the scalar paths (and constrain cuBLASLt's choice).
TEST_F(CudaDenseOpsTest, MatmulUnalignedOperands) {
  uint32_t seed = 6000;
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int64_t m : {1, 4, 16, 40}) {
      CheckMatmul(dtype, {m, 65, 1024, 0, 0, true, false}, seed += 10, Offsets{1, 1, 1});
      CheckMatmul(dtype, {m, 65, 1024, 4, 0, false, true}, seed += 10, Offsets{8, 0, 1});
      CheckMatmul(dtype, {m, 65, 1024, 0, 4, true, true}, seed += 10, Offsets{0, 1, 0});
    }
  }
}

TEST_F(CudaDenseOpsTest, MatmulZeroInnerDimension) {
  const std::vector<float> bias = RandomVec(5, 1);
  const std::vector<float> x(8, 1.0f);
  for (bool acc : {false, true}) {
    for (bool with_bias : {false, true}) {
      const std::vector<float> y0 =
          acc ? RandomVec(3 * 6, 2) : std::vector<float>(3 * 6, PoisonFloat());
      float* gy = ToGpu(y0);
      const MatrixView gw{ToGpu(std::vector<uint16_t>(1)), DType::kBF16, 5, 0};
      ASSERT_TRUE(gpu_->Matmul(ToGpu(x), 1, 3, gw, with_bias ? ToGpu(bias) : nullptr, gy, 6, acc)
                      .ok());
      std::vector<float> want = y0;
      const MatrixView cw{x.data(), DType::kF32, 5, 0};
      ASSERT_TRUE(cpu_->Matmul(x.data(), 1, 3, cw, with_bias ? bias.data() : nullptr, want.data(),
                               6, acc)
                      .ok());
      ExpectBitwiseEqual(FromGpu(gy, 3 * 6), want);
    }
  }
}

TEST_F(CudaDenseOpsTest, MatmulDeterministic) {
  const Mat w = MakeMatrix(1024, 2048, DType::kBF16, 7);
  for (int64_t m : {3, 16, 32, 100}) {  // CUDA-core, tensor-core (one and two m tiles), cuBLASLt
    const float* x = ToGpu(RandomVec(m * 2048, 8));
    float* y1 = Poisoned<float>(m * 1024);
    float* y2 = Poisoned<float>(m * 1024);
    ASSERT_TRUE(gpu_->Matmul(x, 2048, m, w.gpu, nullptr, y1, 1024, false).ok());
    ASSERT_TRUE(gpu_->Matmul(x, 2048, m, w.gpu, nullptr, y2, 1024, false).ok());
    ExpectBitwiseEqual(FromGpu(y1, m * 1024), FromGpu(y2, m * 1024));
  }
}

// RmsNormMatmul: the small-m kernel's RMSNorm prologue (m <= 4, 16-bit weights) must match
// RmsNorm followed by Matmul on the GPU (to 1e-6: the row's sum of squares is reduced in another
// order) and the CPU, and so must the tensor-core kernel's (bf16, 5-16 rows, k % 256 == 0; to
// 1e-5: it scales the products' sums, not x); other m and f32 weights run the two ops (bit for
// bit), and so must the
// norm writing the GEMM input with many rows. Both with the fusions (default) and without
// (RAMBA_CUDA_FUSED_NORM=0). Odd k (scalar sums), split k, strided and misaligned x.
TEST_F(CudaDenseOpsTest, RmsNormMatmulMatchesNormThenMatmul) {
  struct Case {
    int64_t m, n, k, ldx_pad, x_off;
    DType dtype;
  };
  for (const char* level : {"0", "1"}) {
    SCOPED_TRACE(::testing::Message() << "RAMBA_CUDA_FUSED_NORM=" << level);
    const ScopedEnv env("RAMBA_CUDA_FUSED_NORM", level);
    uint32_t seed = 8000;
    for (const Case& c :
         {Case{1, 4384, 1024, 0, 0, DType::kBF16}, Case{5, 70, 136, 3, 0, DType::kF16},
          Case{4, 33, 8200, 0, 0, DType::kBF16}, Case{3, 65, 135, 2, 1, DType::kBF16},
          Case{16, 33, 8200, 0, 0, DType::kBF16}, Case{2, 300, 1024, 0, 1, DType::kBF16},
          Case{40, 65, 1024, 0, 0, DType::kBF16}, Case{3, 65, 256, 0, 0, DType::kF32},
          Case{8, 4384, 1024, 0, 0, DType::kBF16}, Case{16, 1001, 2048, 4, 0, DType::kBF16},
          Case{12, 65, 512, 0, 1, DType::kBF16},
          // Many rows: the norm writes the GEMM input (vector and scalar rows, one
          // stacked GEMM at m >= k, two products below).
          Case{300, 65, 136, 0, 0, DType::kBF16}, Case{300, 70, 135, 3, 1, DType::kF16},
          Case{300, 257, 1031, 1, 0, DType::kBF16}}) {
      SCOPED_TRACE(::testing::Message() << "m=" << c.m << " n=" << c.n << " k=" << c.k
                                        << " ldx_pad=" << c.ldx_pad << " x_off=" << c.x_off);
      const int64_t ldx = c.k + c.ldx_pad;
      const Mat w = MakeMatrix(c.n, c.k, c.dtype, seed++);
      const std::vector<float> x = RandomVec(c.m * ldx + c.x_off, seed++, -3.0f, 3.0f);
      const std::vector<float> nw = RandomVec(c.k, seed++, 0.5f, 1.5f);
      const float eps = 1e-5f;
      const float* gx = ToGpu(x) + c.x_off;
      const float* gnw = ToGpu(nw);
      float* gxn = Poisoned<float>(c.m * ldx);
      float* gy = Poisoned<float>(c.m * c.n);
      ASSERT_TRUE(gpu_->RmsNormMatmul(gx, ldx, c.m, gnw, eps, gxn, w.gpu, gy, c.n).ok());
      const std::vector<float> fused = FromGpu(gy, c.m * c.n);
      float* gy2 = Poisoned<float>(c.m * c.n);
      ASSERT_TRUE(gpu_->RmsNorm(gx, ldx, gnw, gxn, ldx, c.m, c.k, eps).ok());
      ASSERT_TRUE(gpu_->Matmul(gxn, ldx, c.m, w.gpu, nullptr, gy2, c.n, false).ok());
      const std::vector<float> unfused = FromGpu(gy2, c.m * c.n);
      const bool tensor = level[0] == '1' && c.dtype == DType::kBF16 && c.m >= 5 && c.m <= 16 &&
                          c.k % 256 == 0 && ldx % 4 == 0 && c.x_off % 4 == 0;
      if (tensor) {
        EXPECT_LE(NormRelError(fused, unfused), 1e-5);
      } else if (c.m > 4 || c.dtype == DType::kF32) {
        // The many-row norm sums and rounds as RmsNorm and the GEMM's conversion do.
        ExpectBitwiseEqual(fused, unfused);
      } else {
        EXPECT_LE(NormRelError(fused, unfused), 1e-6);
      }

      std::vector<float> xn(c.m * ldx), want(c.m * c.n);
      ASSERT_TRUE(cpu_->RmsNormMatmul(x.data() + c.x_off, ldx, c.m, nw.data(), eps, xn.data(),
                                      w.cpu(), want.data(), c.n)
                      .ok());
      // As in CheckMatmul: the cuBLASLt path (m > 16, 16-bit weights) rounds x to 16 bits.
      EXPECT_LE(NormRelError(fused, want), c.m <= 16 || c.dtype == DType::kF32 ? 1e-5 : 1e-2);
    }
  }
}

// The one-GEMM hi + lo product (weights stacked twice along k) against the two-product form and
// the CPU: forced on and off, odd k (zero padding between the halves), bias, accumulate,
// misaligned operands.
TEST_F(CudaDenseOpsTest, MatmulStackedProductMatchesTwoProducts) {
  uint32_t seed = 8500;
  const MatmulCase cases[] = {{300, 257, 1031, 1, 1, true, true},
                              {17, 33, 77, 0, 0, false, false},
                              {1100, 65, 1024, 0, 3, true, false},
                              {64, 100, 8, 0, 0, true, true}};
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    for (const MatmulCase& c : cases) {
      for (const char* stacked : {"1", "0"}) {
        SCOPED_TRACE(::testing::Message() << "RAMBA_CUDA_STACKED_GEMM=" << stacked);
        const ScopedEnv env("RAMBA_CUDA_STACKED_GEMM", stacked);
        CheckMatmul(dtype, c, seed, Offsets{0, c.m % 2, 0});
        CheckMatmul(dtype, c, seed + 5, Offsets{1, 1, 1});
      }
      seed += 10;
      // Same inputs both ways: the sums differ only in order.
      const Mat w = MakeMatrix(c.n, c.k, dtype, seed);
      const float* x = ToGpu(RandomVec(c.m * c.k, seed + 1));
      std::vector<float> got[2];
      for (int stacked : {0, 1}) {
        const ScopedEnv env("RAMBA_CUDA_STACKED_GEMM", stacked ? "1" : "0");
        float* y = Poisoned<float>(c.m * c.n);
        ASSERT_TRUE(gpu_->Matmul(x, c.k, c.m, w.gpu, nullptr, y, c.n, false).ok());
        got[stacked] = FromGpu(y, c.m * c.n);
      }
      // fp32 sums of up to 2k products in another order: ~sqrt(2k) * 2^-24 relative.
      EXPECT_LE(NormRelError(got[1], got[0]), 1e-5);
    }
  }
}

// GatedRmsNormMatmul (the Mamba gated norm feeding out_proj). With many rows the norm writes the
// GEMM input itself (unless RAMBA_CUDA_FUSED_NORM=0), which must equal GatedRmsNorm then Matmul
// on the GPU bit for bit; everything else runs the two ops. All against the CPU to the split GEMM's
// precision. One or several norm groups, odd dims (scalar paths), misaligned and strided y / z,
// accumulate into a residual.
TEST_F(CudaDenseOpsTest, GatedRmsNormMatmulMatchesNormThenMatmul) {
  struct Case {
    int64_t m, dim, group_size, n, ld_pad, offset;
    DType dtype;
    bool accumulate;
  };
  const char* bf16_act = std::getenv("RAMBA_CUDA_BF16_ACTIVATIONS");
  const bool split = bf16_act == nullptr || bf16_act[0] != '1';
  for (const char* level : {"0", "1"}) {
    SCOPED_TRACE(::testing::Message() << "RAMBA_CUDA_FUSED_NORM=" << level);
    const ScopedEnv env("RAMBA_CUDA_FUSED_NORM", level);
    uint32_t seed = 8700;
    for (const Case& c : {Case{300, 2048, 2048, 1024, 0, 0, DType::kBF16, true},
                          // Few rows: the two ops, the small-m GEMM (vector and scalar loads,
                          // one and several groups, split k).
                          Case{1, 2048, 2048, 1024, 0, 0, DType::kBF16, true},
                          Case{3, 256, 64, 40, 0, 0, DType::kF16, false},
                          Case{2, 77, 77, 33, 1, 1, DType::kBF16, true},
                          Case{4, 96, 8, 20, 0, 0, DType::kBF16, true},
                          Case{300, 4096, 4096, 20, 0, 0, DType::kBF16, true},
                          Case{300, 77, 77, 33, 1, 1, DType::kBF16, false},
                          Case{40, 96, 8, 65, 4, 0, DType::kF16, true},
                          Case{270, 1024, 256, 100, 0, 1, DType::kBF16, true},
                          Case{20, 2048, 2048, 64, 0, 0, DType::kBF16, true},
                          Case{7, 256, 128, 40, 0, 0, DType::kBF16, false},
                          Case{300, 64, 32, 20, 0, 0, DType::kF32, true}}) {
      SCOPED_TRACE(::testing::Message()
                   << "m=" << c.m << " dim=" << c.dim << " group=" << c.group_size << " n=" << c.n
                   << " offset=" << c.offset << " " << DTypeName(c.dtype));
      // z | y side by side, as in the in_proj output.
      const int64_t ld = 2 * c.dim + c.ld_pad;
      const std::vector<float> zy = RandomVec(c.m * ld, seed++, -4, 4);
      const std::vector<float> nw = RandomVec(c.dim, seed++, 0.5f, 1.5f);
      const Mat w = MakeMatrix(c.n, c.dim, c.dtype, seed++);
      const std::vector<float> out0 = c.accumulate ? RandomVec(c.m * c.n, seed++)
                                                   : std::vector<float>(c.m * c.n, PoisonFloat());
      const float* gzy = ToGpuAt(zy, c.offset);
      const float* gnw = ToGpu(nw);
      float* gg = Poisoned<float>(c.m * c.dim);
      float* gout = ToGpu(out0);
      ASSERT_TRUE(gpu_->GatedRmsNormMatmul(gzy + c.dim, ld, gzy, ld, gnw, c.group_size, 1e-5f, c.m,
                                           gg, w.gpu, gout, c.n, c.accumulate)
                      .ok());
      const std::vector<float> fused = FromGpu(gout, c.m * c.n);
      float* gout2 = ToGpu(out0);
      ASSERT_TRUE(gpu_->GatedRmsNorm(gzy + c.dim, ld, gzy, ld, gnw, gg, c.dim, c.m, c.dim,
                                     c.group_size, 1e-5f)
                      .ok());
      ASSERT_TRUE(gpu_->Matmul(gg, c.dim, c.m, w.gpu, nullptr, gout2, c.n, c.accumulate).ok());
      const std::vector<float> unfused = FromGpu(gout2, c.m * c.n);
      ExpectBitwiseEqual(fused, unfused);

      std::vector<float> g(c.m * c.dim), want = out0;
      ASSERT_TRUE(cpu_->GatedRmsNormMatmul(zy.data() + c.dim, ld, zy.data(), ld, nw.data(),
                                           c.group_size, 1e-5f, c.m, g.data(), w.cpu(), want.data(),
                                           c.n, c.accumulate)
                      .ok());
      EXPECT_LE(NormRelError(fused, want),
                c.m <= 16 || c.dtype == DType::kF32 || split ? 1e-5 : 1e-2);
    }
  }
}

// Bad arguments come back as errors naming the op.
TEST_F(CudaDenseOpsTest, GatedRmsNormMatmulRejectsBadArguments) {
  const Mat w = MakeMatrix(8, 64, DType::kBF16, 1);
  float* buf = Poisoned<float>(64 * 64);
  absl::Status s =
      gpu_->GatedRmsNormMatmul(buf, 64, buf, 64, buf, 48, 1e-5f, 4, buf, w.gpu, buf, 8, false);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("GatedRmsNormMatmul"), std::string::npos) << s;
  s = gpu_->GatedRmsNormMatmul(buf, 32, buf, 64, buf, 64, 1e-5f, 4, buf, w.gpu, buf, 8, false);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  s = gpu_->GatedRmsNormMatmul(nullptr, 64, buf, 64, buf, 64, 1e-5f, 4, buf, w.gpu, buf, 8, false);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
}

// The RAMba-370M decode projections (in_proj, out_proj, lm_head), then a rough timing (printed,
// not asserted; includes launch overhead).
TEST_F(CudaDenseOpsTest, Matmul370MDecodeShapes) {
  struct Shape {
    int64_t k, n;
    bool accumulate;
  };
  const Shape shapes[] = {{1024, 4384, false}, {2048, 1024, true}, {1024, 50280, false}};
  uint32_t seed = 7000;
  for (const Shape& s : shapes) {
    for (int64_t m : {1, 4, 8, 16}) {
      CheckMatmul(DType::kBF16, {m, s.n, s.k, 0, 0, false, s.accumulate}, seed += 10);
      if (HasFatalFailure()) return;
    }
  }
  for (const Shape& s : shapes) {
    const Mat w = MakeMatrix(s.n, s.k, DType::kBF16, 9);
    for (int64_t m : {1, 4, 8, 16, 32}) {
      const float* x = ToGpu(RandomVec(m * s.k, 10));
      float* y = Poisoned<float>(m * s.n);
      constexpr int kIters = 50;
      ASSERT_TRUE(gpu_->Matmul(x, s.k, m, w.gpu, nullptr, y, s.n, false).ok());
      ASSERT_TRUE(gpu_->Synchronize().ok());
      const auto t0 = std::chrono::steady_clock::now();
      for (int it = 0; it < kIters; ++it) {
        ASSERT_TRUE(gpu_->Matmul(x, s.k, m, w.gpu, nullptr, y, s.n, false).ok());
      }
      ASSERT_TRUE(gpu_->Synchronize().ok());
      const double us =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0)
              .count() /
          kIters;
      const double gbps = static_cast<double>(s.n * s.k * 2) / (us * 1e3);
      std::printf("[ timing ] matmul bf16 m=%lld k=%lld n=%lld: %.2f us/call, %.0f GB/s weights\n",
                  static_cast<long long>(m), static_cast<long long>(s.k),
                  static_cast<long long>(s.n), us, gbps);
    }
  }
}

TEST_F(CudaDenseOpsTest, Embed) {
  const int64_t vocab = 1000;
  uint32_t seed = 100;
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int64_t cols : {1024, 77, 4}) {
      for (int64_t offset : {0, 1}) {
        const Mat table = MakeMatrix(vocab, cols, dtype, ++seed, offset);
        for (int64_t n : {1, 5, 300}) {
          SCOPED_TRACE(::testing::Message() << DTypeName(dtype) << " cols=" << cols << " n=" << n
                                            << " offset=" << offset);
          std::mt19937 gen(++seed);
          std::uniform_int_distribution<int32_t> dist(0, static_cast<int32_t>(vocab - 1));
          std::vector<int32_t> tokens(n);
          for (int32_t& t : tokens) t = dist(gen);
          tokens[0] = static_cast<int32_t>(vocab - 1);
          float* out = Poisoned<float>(n * cols);
          ASSERT_TRUE(gpu_->Embed(ToGpu(tokens), n, table.gpu, out).ok());
          std::vector<float> want(n * cols);
          ASSERT_TRUE(cpu_->Embed(tokens.data(), n, table.cpu(), want.data()).ok());
          ExpectBitwiseEqual(FromGpu(out, n * cols), want);
        }
      }
    }
  }
}

TEST_F(CudaDenseOpsTest, RmsNorm) {
  struct Case {
    int64_t rows, dim, ldx_pad, ldy_pad;
    bool in_place;
    int64_t offset;
    float eps;
  };
  const Case cases[] = {
      {1, 1024, 0, 0, false, 0, 1e-5f},  {3, 77, 5, 2, false, 0, 1e-5f},
      {300, 2048, 4, 8, false, 0, 1e-6f}, {5, 64, 0, 0, true, 0, 1e-6f},
      {300, 1024, 0, 0, true, 0, 1e-5f}, {7, 1, 0, 3, false, 0, 1e-5f},
      {16, 4096, 0, 0, false, 0, 1e-5f}, {9, 1024, 0, 0, false, 1, 1e-5f},
      {4800, 64, 0, 0, true, 1, 1e-6f},  {2, 8, 1, 1, true, 0, 1e-5f},
      {2, 1024, 0, 0, true, 0, 1e-5f},   {3, 2051, 1, 0, true, 1, 1e-5f},
      // Warp per row, rows wider than the 2048 values a warp keeps in registers.
      {300, 4100, 0, 4, false, 0, 1e-5f}, {270, 3000, 0, 0, true, 0, 1e-5f},
  };
  uint32_t seed = 200;
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "rows=" << c.rows << " dim=" << c.dim << " ldx+"
                                      << c.ldx_pad << " ldy+" << c.ldy_pad
                                      << " in_place=" << c.in_place << " offset=" << c.offset);
    const int64_t ldx = c.dim + c.ldx_pad;
    const int64_t ldy = c.in_place ? ldx : c.dim + c.ldy_pad;
    const std::vector<float> x = RandomVec(c.rows * ldx, ++seed, -3, 3);
    const std::vector<float> w = RandomVec(c.dim, ++seed);
    float* gx = ToGpuAt(x, c.offset);
    const std::vector<float> y0 =
        c.in_place ? x : std::vector<float>(c.rows * ldy, PoisonFloat());
    float* gy = c.in_place ? gx : ToGpuAt(y0, c.offset);
    ASSERT_TRUE(gpu_->RmsNorm(gx, ldx, ToGpu(w), gy, ldy, c.rows, c.dim, c.eps).ok());
    const std::vector<float> got = FromGpu(gy, c.rows * ldy);
    std::vector<float> want = y0;
    std::vector<float> xin = x;
    ASSERT_TRUE(cpu_->RmsNorm(c.in_place ? want.data() : xin.data(), ldx, w.data(), want.data(),
                              ldy, c.rows, c.dim, c.eps)
                    .ok());
    ExpectPaddingUntouched(got, y0, c.rows, c.dim, ldy);
    EXPECT_LE(NormRelError(Region(got, c.rows, c.dim, ldy), Region(want, c.rows, c.dim, ldy)),
              1e-5);
  }
}

TEST_F(CudaDenseOpsTest, GatedRmsNorm) {
  struct Case {
    int64_t rows, dim, group_size, ld_pad, ldo_pad, offset;
  };
  const Case cases[] = {
      {1, 2048, 2048, 0, 0, 0}, {5, 2048, 256, 4, 0, 0}, {3, 77, 77, 1, 3, 0},
      {64, 96, 8, 0, 2, 0},     {16, 1024, 1024, 0, 0, 1}, {300, 64, 16, 8, 4, 0},
      {2, 6, 3, 0, 0, 0},       {3, 2048, 1024, 4, 2, 1}, {2, 1031, 1031, 1, 0, 1},
      // Warp per group, groups wider than the 2048 values a warp keeps in registers.
      {300, 4096, 4096, 0, 0, 0}, {270, 6144, 3072, 4, 4, 0},
  };
  uint32_t seed = 300;
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "rows=" << c.rows << " dim=" << c.dim
                                      << " group=" << c.group_size << " offset=" << c.offset);
    // y and z are column slices of one wide matrix (as in the in_proj output): z | y.
    const int64_t ld = 2 * c.dim + c.ld_pad, ldo = c.dim + c.ldo_pad;
    std::vector<float> zy = RandomVec(c.rows * ld, ++seed, -4, 4);
    const std::vector<float> w = RandomVec(c.dim, ++seed);
    const float* gzy = ToGpuAt(zy, c.offset);
    const std::vector<float> out0(c.rows * ldo, PoisonFloat());
    float* gout = ToGpuAt(out0, c.offset);
    ASSERT_TRUE(gpu_->GatedRmsNorm(gzy + c.dim, ld, gzy, ld, ToGpu(w), gout, ldo, c.rows, c.dim,
                                   c.group_size, 1e-5f)
                    .ok());
    const std::vector<float> got = FromGpu(gout, c.rows * ldo);
    std::vector<float> want = out0;
    ASSERT_TRUE(cpu_->GatedRmsNorm(zy.data() + c.dim, ld, zy.data(), ld, w.data(), want.data(),
                                   ldo, c.rows, c.dim, c.group_size, 1e-5f)
                    .ok());
    ExpectPaddingUntouched(got, out0, c.rows, c.dim, ldo);
    EXPECT_LE(NormRelError(Region(got, c.rows, c.dim, ldo), Region(want, c.rows, c.dim, ldo)),
              1e-5);
  }
}

TEST_F(CudaDenseOpsTest, Add) {
  uint32_t seed = 400;
  for (int64_t n : {1, 3, 4, 1000003}) {
    for (int64_t offset : {0, 1}) {
      SCOPED_TRACE(::testing::Message() << "n=" << n << " offset=" << offset);
      const std::vector<float> y = RandomVec(n, ++seed);
      const std::vector<float> x = RandomVec(n, ++seed);
      float* gy = ToGpuAt(y, offset);
      ASSERT_TRUE(gpu_->Add(gy, ToGpu(x), n).ok());
      std::vector<float> want = y;
      ASSERT_TRUE(cpu_->Add(want.data(), x.data(), n).ok());
      ExpectBitwiseEqual(FromGpu(gy, n), want);
    }
  }
}

TEST_F(CudaDenseOpsTest, SwiGlu) {
  uint32_t seed = 500;
  enum Alias { kNone, kGate, kUp };
  for (int64_t n : {1, 7, 1000003}) {
    for (Alias alias : {kNone, kGate, kUp}) {
      for (int64_t offset : {0, 1}) {
        SCOPED_TRACE(::testing::Message() << "n=" << n << " alias=" << alias
                                          << " offset=" << offset);
        const std::vector<float> gate = RandomVec(n, ++seed, -8, 8);
        const std::vector<float> up = RandomVec(n, ++seed, -2, 2);
        float* ggate = ToGpuAt(gate, offset);
        float* gup = ToGpu(up);
        float* gout = alias == kGate ? ggate : alias == kUp ? gup : Poisoned<float>(n);
        ASSERT_TRUE(gpu_->SwiGlu(ggate, gup, gout, n).ok());
        std::vector<float> g = gate, u = up, o(n);
        float* out = alias == kGate ? g.data() : alias == kUp ? u.data() : o.data();
        ASSERT_TRUE(cpu_->SwiGlu(g.data(), u.data(), out, n).ok());
        EXPECT_LE(NormRelError(FromGpu(gout, n), std::vector<float>(out, out + n)), 1e-5);
      }
    }
  }
}

TEST_F(CudaDenseOpsTest, BlockMean) {
  struct Case {
    int64_t num_blocks, block_len, dim;
  };
  uint32_t seed = 600;
  for (const Case& c : {Case{1, 1, 1}, Case{7, 65, 77}, Case{3, 64, 1024}, Case{100, 2, 33}}) {
    SCOPED_TRACE(::testing::Message() << c.num_blocks << "x" << c.block_len << "x" << c.dim);
    const std::vector<float> x = RandomVec(c.num_blocks * c.block_len * c.dim, ++seed);
    float* out = Poisoned<float>(c.num_blocks * c.dim);
    ASSERT_TRUE(gpu_->BlockMean(ToGpu(x), c.num_blocks, c.block_len, c.dim, out).ok());
    std::vector<float> want(c.num_blocks * c.dim);
    ASSERT_TRUE(cpu_->BlockMean(x.data(), c.num_blocks, c.block_len, c.dim, want.data()).ok());
    ExpectBitwiseEqual(FromGpu(out, c.num_blocks * c.dim), want);
  }
}

TEST_F(CudaDenseOpsTest, RopeInChunk) {
  struct Case {
    int64_t rows, heads, head_dim, period;
    float theta;
  };
  const Case cases[] = {
      {1, 1, 2, 1, 10000.0f},       {70, 3, 64, 64, 10000.0f}, {300, 16, 128, 65, 500000.0f},
      {130, 2, 32, 1000, 10000.0f}, {10, 2, 1024, 7, 10000.0f},  // head_dim / 2 > 256
      {513, 4, 64, 513, 1e6f},
  };
  uint32_t seed = 700;
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "rows=" << c.rows << " heads=" << c.heads
                                      << " head_dim=" << c.head_dim << " period=" << c.period);
    const int64_t n = c.rows * c.heads * c.head_dim;
    const std::vector<float> x = RandomVec(n, ++seed);
    float* gx = ToGpu(x);
    ASSERT_TRUE(gpu_->RopeInChunk(gx, c.rows, c.heads, c.head_dim, c.period, c.theta).ok());
    std::vector<float> want = x;
    ASSERT_TRUE(
        cpu_->RopeInChunk(want.data(), c.rows, c.heads, c.head_dim, c.period, c.theta).ok());
    const std::vector<float> got = FromGpu(gx, n);
    EXPECT_LE(NormRelError(got, want), 1e-5);
    double max_diff = 0;
    for (int64_t i = 0; i < n; ++i) {
      max_diff = std::max(max_diff, std::abs(static_cast<double>(got[i]) - want[i]));
    }
    EXPECT_LE(max_diff, 1e-5);
  }
}

}  // namespace
}  // namespace ramba::kernels::testing
