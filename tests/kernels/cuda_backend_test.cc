// The CUDA backend's memory plumbing and device selection (label gpu; skipped without a GPU).
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/cuda_test_util.h"

namespace ramba::kernels::testing {
namespace {

using CudaBackendTest = CudaOpTest;

TEST_F(CudaBackendTest, AutoPicksCudaWhenAGpuIsVisible) {
  auto be = CreateBackend("auto");
  ASSERT_TRUE(be.ok()) << be.status();
  EXPECT_EQ((*be)->name(), "cuda");
  EXPECT_FALSE((*be)->host_accessible());
  EXPECT_EQ((*be)->weight_dtype(), DType::kBF16);
}

TEST_F(CudaBackendTest, UploadCopyZeroDownloadRoundTrip) {
  std::vector<float> host = RandomVec(100003, 7);
  float* a = ToGpu(host);
  float* b = Poisoned<float>(host.size());
  ASSERT_TRUE(gpu_->Copy(b, a, host.size() * sizeof(float)).ok());
  EXPECT_EQ(FromGpu(b, host.size()), host);
  ASSERT_TRUE(gpu_->Zero(b + 10, 5 * sizeof(float)).ok());
  std::vector<float> got = FromGpu(b, host.size());
  for (int i = 0; i < 20; ++i) EXPECT_EQ(got[i], (i >= 10 && i < 15) ? 0.0f : host[i]) << i;
}

TEST_F(CudaBackendTest, ZeroByteAllocationIsUsable) {
  auto buf = gpu_->Allocate(0);
  ASSERT_TRUE(buf.ok()) << buf.status();
  EXPECT_NE(buf->data(), nullptr);
  EXPECT_TRUE(gpu_->Synchronize().ok());
}

TEST_F(CudaBackendTest, HugeAllocationFailsWithResourceExhausted) {
  auto buf = gpu_->Allocate(size_t{1} << 50);  // 1 PiB
  ASSERT_FALSE(buf.ok());
  EXPECT_EQ(buf.status().code(), absl::StatusCode::kResourceExhausted) << buf.status();
  // The backend still works afterwards.
  std::vector<int32_t> v(1000);
  std::iota(v.begin(), v.end(), 0);
  EXPECT_EQ(FromGpu(ToGpu(v), v.size()), v);
}

TEST_F(CudaBackendTest, RaggedOpsWithoutHostOffsetsAreRejected) {
  std::vector<int64_t> offs = {0, 4};
  int64_t* d_offs = ToGpu(offs);
  float* x = ToGpu(RandomVec(64, 1));
  SsmParams p;
  p.nheads = p.headdim = p.d_state = p.ngroups = 1;
  p.A_log = p.D = p.dt_bias = x;
  float* states[] = {x};
  float** d_states = ToGpu(std::vector<float*>(states, states + 1));
  EXPECT_EQ(gpu_->SsmScan(x, 4, x, 1, d_offs, 1, d_states, p, x).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(gpu_->CausalConv1dSilu(x, 4, d_offs, 1, d_states, x, nullptr, 4, 2, x).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ramba::kernels::testing
