// Helpers shared by the kernel tests: seeded random data and error metrics against double
// references written in each test.
#ifndef RAMBA_TESTS_KERNELS_KERNEL_TEST_UTIL_H_
#define RAMBA_TESTS_KERNELS_KERNEL_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "kernels/backend.h"

namespace ramba::kernels::testing {

inline std::vector<float> RandomVec(int64_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = dist(gen);
  return v;
}

// max |a - b| / max(max |b|, tiny): relative to the reference's scale, so values near zero do not
// inflate it.
inline double RelError(const std::vector<float>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return INFINITY;
  double diff = 0, scale = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return diff / scale;
}

inline double Sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double SiluD(double x) { return x * Sigmoid(x); }
inline double SoftplusD(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }

inline std::unique_ptr<Backend> Cpu(int threads = 0) { return CreateCpuBackend(threads); }

}  // namespace ramba::kernels::testing

#endif  // RAMBA_TESTS_KERNELS_KERNEL_TEST_UTIL_H_
