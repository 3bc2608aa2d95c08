// Matmul on OpenBLAS. F32 weights go straight to sgemm/sgemv. 16-bit weights: for small m
// (decode) each weight row is converted into a per-thread scratch row and dotted with the m
// inputs, so the 16-bit matrix is read once; for larger m, blocks of weight rows are converted to
// f32 (in parallel) and multiplied with sgemm, which amortises the conversion over m rows.
#include <cblas.h>

#include <algorithm>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/vec.h"

namespace ramba::kernels::cpu {
namespace {

// Largest m that takes the convert-and-dot path for 16-bit weights.
constexpr int64_t kSmallM = 4;
// Largest m for which f32 weights are dotted row by row instead of going to sgemm: sgemm packs
// the whole weight matrix on every call, which for a handful of rows (batched decode) costs
// more than the product itself; row-by-row dots read each weight once.
constexpr int64_t kSmallMF32 = 16;
// f32 elements of one converted weight block on the sgemm path (16 MiB): large blocks keep
// sgemm's own packing and threading efficient.
constexpr int64_t kBlockElems = 1 << 22;

void ConvertRow(const uint16_t* src, DType t, int64_t n, float* dst) {
  if (t == DType::kBF16) {
    Bf16RowToF32(src, n, dst);
  } else {
    F16RowToF32(src, n, dst);
  }
}

void AddBias(const float* bias, int64_t m, int64_t n, float* y, int64_t ldy) {
  if (bias == nullptr) return;
#pragma omp parallel for schedule(static) if (m * n > kMinParallelWork)
  for (int64_t i = 0; i < m; ++i) {
    float* __restrict row = y + i * ldy;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] += bias[j];
  }
}

void ZeroRows(int64_t m, int64_t n, float* y, int64_t ldy) {
  for (int64_t i = 0; i < m; ++i) std::fill(y + i * ldy, y + i * ldy + n, 0.0f);
}

// y[i, j] (+)= x[i, :] . W[j, :] for the m (<= kSmallMF32) rows of x and the weight rows
// [j0, j1). Inputs are taken four at a time so every weight element loaded from memory feeds four
// multiply-adds. Cloned per ISA because the build targets baseline x86-64 (no -march), and
// OpenBLAS, which dispatches at run time, is not used on this path.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void SmallMRows(const float* x, int64_t ldx, int64_t m, const float* W, int64_t k, int64_t j0,
                int64_t j1, float* y, int64_t ldy, bool accumulate) {
  for (int64_t j = j0; j < j1; ++j) {
    const float* __restrict w = W + j * k;
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
      const float* __restrict x0 = x + i * ldx;
      const float* __restrict x1 = x0 + ldx;
      const float* __restrict x2 = x1 + ldx;
      const float* __restrict x3 = x2 + ldx;
      float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t t = 0; t < k; ++t) {
        const float wv = w[t];
        a0 += x0[t] * wv;
        a1 += x1[t] * wv;
        a2 += x2[t] * wv;
        a3 += x3[t] * wv;
      }
      const float a[4] = {a0, a1, a2, a3};
      for (int r = 0; r < 4; ++r) {
        float& out = y[(i + r) * ldy + j];
        out = accumulate ? out + a[r] : a[r];
      }
    }
    for (; i < m; ++i) {
      const float* __restrict xi = x + i * ldx;
      float a = 0;
#pragma omp simd reduction(+ : a)
      for (int64_t t = 0; t < k; ++t) a += xi[t] * w[t];
      float& out = y[i * ldy + j];
      out = accumulate ? out + a : a;
    }
  }
}

}  // namespace

void Matmul(const float* x, int64_t ldx, int64_t m, const MatrixView& w, const float* bias,
            float* y, int64_t ldy, bool accumulate) {
  const int64_t n = w.rows, k = w.cols;
  if (m <= 0 || n <= 0) return;
  if (k == 0) {
    if (!accumulate) ZeroRows(m, n, y, ldy);
    AddBias(bias, m, n, y, ldy);
    return;
  }
  if (w.dtype == DType::kF32) {
    const float* W = static_cast<const float*>(w.data);
    if (m > 1 && m <= kSmallMF32) {
      constexpr int64_t kRowsPerTask = 16;
      const int64_t tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel for schedule(static) if (n * k > kMinParallelWork)
      for (int64_t b = 0; b < tasks; ++b) {
        SmallMRows(x, ldx, m, W, k, b * kRowsPerTask, std::min(n, (b + 1) * kRowsPerTask), y, ldy,
                   accumulate);
      }
    } else if (m == 1) {
      // sgemv with beta 0 may still read y (0 * NaN); zero it and accumulate instead.
      if (!accumulate) ZeroRows(1, n, y, ldy);
      cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(n), static_cast<int>(k), 1.0f, W,
                  static_cast<int>(k), x, 1, 1.0f, y, 1);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m),
                  static_cast<int>(n), static_cast<int>(k), 1.0f, x, static_cast<int>(ldx), W,
                  static_cast<int>(k), accumulate ? 1.0f : 0.0f, y, static_cast<int>(ldy));
    }
    AddBias(bias, m, n, y, ldy);
    return;
  }

  const uint16_t* W16 = static_cast<const uint16_t*>(w.data);
  if (m <= kSmallM) {
#pragma omp parallel if (n * k > kMinParallelWork)
    {
      std::vector<float> row(k);
#pragma omp for schedule(static)
      for (int64_t j = 0; j < n; ++j) {
        ConvertRow(W16 + j * k, w.dtype, k, row.data());
        for (int64_t i = 0; i < m; ++i) {
          const float d = Dot(x + i * ldx, row.data(), k);
          float& out = y[i * ldy + j];
          float v = accumulate ? out + d : d;
          if (bias != nullptr) v += bias[j];
          out = v;
        }
      }
    }
    return;
  }

  const int64_t block_rows = std::min<int64_t>(n, std::max<int64_t>(16, kBlockElems / k));
  std::vector<float> block(static_cast<size_t>(block_rows * k));
  for (int64_t j0 = 0; j0 < n; j0 += block_rows) {
    const int64_t nb = std::min(block_rows, n - j0);
#pragma omp parallel for schedule(static) if (nb * k > kMinParallelWork)
    for (int64_t j = 0; j < nb; ++j) {
      ConvertRow(W16 + (j0 + j) * k, w.dtype, k, block.data() + j * k);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m),
                static_cast<int>(nb), static_cast<int>(k), 1.0f, x, static_cast<int>(ldx),
                block.data(), static_cast<int>(k), accumulate ? 1.0f : 0.0f, y + j0,
                static_cast<int>(ldy));
  }
  AddBias(bias, m, n, y, ldy);
}

}  // namespace ramba::kernels::cpu
