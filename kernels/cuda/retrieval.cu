// Placeholder until the retrieval kernels land.
#include "kernels/cuda/ops.h"
namespace ramba::kernels::cuda {
absl::Status RetrieveChunks(Context&, const float*, int64_t, const ChunkMemoryBatch&, int64_t, int64_t, int64_t, int64_t, int32_t*, float*) { return absl::UnimplementedError("cuda RetrieveChunks"); }
absl::Status SparseChunkAttention(Context&, const float*, int64_t, const ChunkMemoryBatch&, const int32_t*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float*) { return absl::UnimplementedError("cuda SparseChunkAttention"); }
}  // namespace ramba::kernels::cuda
