// Placeholder until the elementwise kernels land.
#include "kernels/cuda/ops.h"
namespace ramba::kernels::cuda {
absl::Status Embed(Context&, const int32_t*, int64_t, MatrixView, float*) { return absl::UnimplementedError("cuda Embed"); }
absl::Status RmsNorm(Context&, const float*, int64_t, const float*, float*, int64_t, int64_t, int64_t, float) { return absl::UnimplementedError("cuda RmsNorm"); }
absl::Status GatedRmsNorm(Context&, const float*, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t, int64_t, int64_t, float) { return absl::UnimplementedError("cuda GatedRmsNorm"); }
absl::Status Add(Context&, float*, const float*, int64_t) { return absl::UnimplementedError("cuda Add"); }
absl::Status SwiGlu(Context&, const float*, const float*, float*, int64_t) { return absl::UnimplementedError("cuda SwiGlu"); }
absl::Status BlockMean(Context&, const float*, int64_t, int64_t, int64_t, float*) { return absl::UnimplementedError("cuda BlockMean"); }
absl::Status RopeInChunk(Context&, float*, int64_t, int64_t, int64_t, int64_t, float) { return absl::UnimplementedError("cuda RopeInChunk"); }
}  // namespace ramba::kernels::cuda
