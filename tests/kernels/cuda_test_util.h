// Helpers for the CUDA-vs-CPU op tests (ctest label `gpu`). Every test fixture derives from
// CudaOpTest, which skips the test when this binary has no CUDA backend or no GPU is visible, so
// the same binaries pass (skipped) in CI and run for real on the GPU host.
#ifndef RAMBA_TESTS_KERNELS_CUDA_TEST_UTIL_H_
#define RAMBA_TESTS_KERNELS_CUDA_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/kernel_test_util.h"

namespace ramba::kernels::testing {

// Sets an environment switch (the CUDA backend reads some per call) for a scope and restores
// its previous value, also when an assertion leaves the scope early.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (old_) {
      setenv(name_.c_str(), old_->c_str(), 1);
    } else {
      unsetenv(name_.c_str());
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  std::optional<std::string> old_;
};

class CudaOpTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!CudaAvailable()) GTEST_SKIP() << "no CUDA GPU (or built without CUDA)";
    auto gpu = CreateBackend("cuda");
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    gpu_ = *std::move(gpu);
    cpu_ = CreateCpuBackend(0);
  }
  void TearDown() override {
    // Release device buffers before the backend that owns them.
    owned_.clear();
    gpu_.reset();
  }

  // A device copy of host data; freed at TearDown.
  template <class T>
  T* ToGpu(const std::vector<T>& host) {
    auto buf = gpu_->Allocate(std::max<size_t>(1, host.size()) * sizeof(T));
    EXPECT_TRUE(buf.ok()) << buf.status();
    if (!host.empty()) EXPECT_TRUE(gpu_->Upload(buf->data(), host.data(), host.size() * sizeof(T)).ok());
    T* p = buf->template as<T>();
    owned_.push_back(*std::move(buf));
    return p;
  }
  // A device array of n elements filled with a NaN-like poison byte pattern (0xFF), so any
  // element a kernel forgets to write shows up as NaN / -1.
  template <class T>
  T* Poisoned(int64_t n) {
    std::vector<T> host(static_cast<size_t>(std::max<int64_t>(n, 1)));
    std::memset(host.data(), 0xFF, host.size() * sizeof(T));
    return ToGpu(host);
  }
  template <class T>
  std::vector<T> FromGpu(const T* p, int64_t n) {
    std::vector<T> host(static_cast<size_t>(n));
    if (n > 0) EXPECT_TRUE(gpu_->Download(host.data(), p, n * sizeof(T)).ok());
    return host;
  }
  // A bf16 weight matrix on the GPU and the same (rounded) values as f32 for the CPU reference.
  struct Weights {
    MatrixView gpu;
    MatrixView cpu;
    std::vector<float> rounded;
  };
  Weights RandomWeights(int64_t rows, int64_t cols, uint32_t seed, float scale = 1.0f) {
    Weights w;
    std::vector<float> f = RandomVec(rows * cols, seed, -scale, scale);
    std::vector<uint16_t> h(f.size());
    for (size_t i = 0; i < f.size(); ++i) {
      h[i] = F32ToBf16(f[i]);
      f[i] = Bf16ToF32(h[i]);
    }
    w.rounded = std::move(f);
    w.gpu = MatrixView{ToGpu(h), DType::kBF16, rows, cols};
    w.cpu = MatrixView{w.rounded.data(), DType::kF32, rows, cols};
    return w;
  }

  std::unique_ptr<Backend> cpu_;
  std::unique_ptr<Backend> gpu_;
  std::vector<Buffer> owned_;
};

// ||a - b|| / ||b|| over all elements (the METHOD.md metric); infinite on any non-finite value.
inline double NormRelError(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double num = 0, den = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

}  // namespace ramba::kernels::testing

#endif  // RAMBA_TESTS_KERNELS_CUDA_TEST_UTIL_H_
