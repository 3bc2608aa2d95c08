// Small data-movement kernels that are not ops of one model layer.
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/ops.h"

namespace ramba::kernels::cuda {
namespace {

__global__ void ScatterRowsKernel(const float* __restrict__ src, int64_t ld,
                                  float* const* __restrict__ dst, int64_t cols) {
  AllowDependentGrids();
  WaitForPriorGrids();
  const int64_t r = blockIdx.y;
  float* d = dst[r];
  const float* s = src + r * ld;
  for (int64_t c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
    d[c] = s[c];
  }
}

// One block per (row, slot): a host-tier chunk is copied (over PCIe) into its staging block.
__global__ void StageHostChunksKernel(ChunkMemoryBatch mem, const int64_t* __restrict__ host_chunks,
                                      const int32_t* __restrict__ indices, int per_row,
                                      int64_t chunk_floats, StagedChunks out) {
  AllowDependentGrids();
  WaitForPriorGrids();
  const int r = blockIdx.y, j = blockIdx.x;
  const int64_t slot = static_cast<int64_t>(r) * per_row + j;
  const int32_t c = indices[slot];
  const bool copy = c >= 0 && c < host_chunks[r];
  const float* src = c >= 0 ? mem.chunk_kv[r][c] : nullptr;
  if (threadIdx.x == 0) {
    if (j == 0) {
      out.tables[r] = out.slots + static_cast<int64_t>(r) * per_row;
      out.num_chunks[r] = per_row;
    }
    out.indices[slot] = c < 0 ? -1 : j;
    out.slots[slot] = copy ? out.blocks + slot * chunk_floats : src;
  }
  if (!copy) return;
  // Every load issued before any store, so the PCIe reads overlap (chunk blocks are 16-byte
  // aligned and a multiple of 4 floats).
  const float4* s4 = reinterpret_cast<const float4*>(src);
  float4* d4 = reinterpret_cast<float4*>(out.blocks + slot * chunk_floats);
  const int64_t n4 = chunk_floats / 4;
  constexpr int kUnroll = 8;
  for (int64_t base = 0; base < n4; base += static_cast<int64_t>(blockDim.x) * kUnroll) {
    float4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * blockDim.x + threadIdx.x;
      if (i < n4) v[u] = s4[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * blockDim.x + threadIdx.x;
      if (i < n4) d4[i] = v[u];
    }
  }
}

}  // namespace

absl::Status StageHostChunks(Context& ctx, const ChunkMemoryBatch& mem, const int64_t* host_chunks,
                             const int32_t* indices, int64_t rows, int64_t per_row,
                             int64_t chunk_floats, const StagedChunks& out) {
  if (rows > 65535 || per_row > 65535) {
    return absl::InvalidArgumentError("StageHostChunks: more than 65535 rows or slots per row");
  }
  if (chunk_floats % 4 != 0) {
    return absl::InvalidArgumentError("StageHostChunks: chunk_floats must be a multiple of 4");
  }
  return Launch(ctx, StageHostChunksKernel,
                dim3(static_cast<unsigned>(per_row), static_cast<unsigned>(rows)), 256, 0, mem,
                host_chunks, indices, static_cast<int>(per_row), chunk_floats, out);
}

absl::Status ScatterRows(Context& ctx, const float* src, int64_t ld, float* const* dst,
                         int64_t rows, int64_t cols) {
  if (rows > 65535) return absl::InvalidArgumentError("ScatterRows: more than 65535 rows");
  constexpr int kThreads = 256;
  const unsigned blocks_x =
      static_cast<unsigned>(std::min<int64_t>((cols + kThreads - 1) / kThreads, 64));
  return Launch(ctx, ScatterRowsKernel, dim3(blocks_x, static_cast<unsigned>(rows)), kThreads, 0,
                src, ld, dst, cols);
}

}  // namespace ramba::kernels::cuda
