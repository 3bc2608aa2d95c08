// Small data-movement kernels that are not ops of one model layer.
#include <algorithm>
#include <climits>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
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

// One chunk (chunk_floats, a multiple of 4, 16-byte aligned) copied by one block; every load of
// a pass issued before any store, so reads over PCIe overlap.
__device__ void CopyChunk(const float* src, float* dst, int64_t chunk_floats) {
  const float4* s4 = reinterpret_cast<const float4*>(src);
  float4* d4 = reinterpret_cast<float4*>(dst);
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
      if (out.tier_counts != nullptr) {  // the row's counts, two atomics per row
        unsigned long long selected = 0, host = 0;
        for (int i = 0; i < per_row; ++i) {
          const int32_t ci = indices[static_cast<int64_t>(r) * per_row + i];
          selected += ci >= 0;
          host += ci >= 0 && ci < host_chunks[r];
        }
        auto* counts = reinterpret_cast<unsigned long long*>(out.tier_counts);
        atomicAdd(&counts[0], selected);
        atomicAdd(&counts[1], host);
      }
    }
    out.indices[slot] = c < 0 ? -1 : j;
    out.slots[slot] = copy ? out.blocks + slot * chunk_floats : src;
  }
  if (copy) CopyChunk(src, out.blocks + slot * chunk_floats, chunk_floats);
}

// With chunk caches (StagedChunks::cache): a warp per row decides, in pick order, each host-tier
// pick's place as Backend::StageHostChunks describes (the row's tags in shared memory; a pick's
// slot lookup and its victim choice are one ballot or one min-reduction over the slots), writes
// the step's tables and marks the picks to copy (out.copies) for CopyCachedChunksKernel.
__global__ void AssignCachedChunksKernel(ChunkMemoryBatch mem,
                                         const int64_t* __restrict__ host_chunks,
                                         const int32_t* __restrict__ indices, int per_row,
                                         int64_t chunk_floats, StagedChunks out) {
  AllowDependentGrids();
  WaitForPriorGrids();
  extern __shared__ int32_t s_tags[];  // [2 * slots]: tags, then stamps
  const int r = blockIdx.x, lane = threadIdx.x, S = static_cast<int>(out.cache.slots);
  float* cache = out.cache.blocks[r];
  int32_t* tags = cache != nullptr ? out.cache.tags[r] : nullptr;
  int32_t now = 0;
  if (tags != nullptr) {
    for (int i = lane; i < 2 * S; i += 32) s_tags[i] = tags[i];
    now = tags[2 * S] + 1;
  }
  __syncwarp();
  const int64_t hc = host_chunks[r];
  unsigned long long selected = 0, host = 0, hits = 0;
  for (int j = 0; j < per_row; ++j) {
    const int64_t slot = static_cast<int64_t>(r) * per_row + j;
    const int32_t c = indices[slot];
    const float* src = c >= 0 ? mem.chunk_kv[r][c] : nullptr;
    const float* place = src;
    int32_t copy = 0;
    if (c >= 0 && c < hc) {
      ++host;
      copy = 1;
      place = out.blocks + slot * chunk_floats;
      if (tags != nullptr) {
        // The slot holding c (at most one), else the lowest (stamp, slot) not used this step.
        int found = -1;
        int32_t best_stamp = INT_MAX;
        int best = -1;
        for (int i = lane; i < S; i += 32) {
          if (s_tags[i] == c + 1 && found < 0) found = i;
          const int32_t st = s_tags[S + i];
          if (st < now && st < best_stamp) best_stamp = st, best = i;
        }
        const unsigned ball = __ballot_sync(0xffffffffu, found >= 0);
        int at = -1;
        if (ball != 0) {
          at = __shfl_sync(0xffffffffu, found, __ffs(ball) - 1);
          copy = 0;
          ++hits;
        } else {
          for (int o = 16; o > 0; o /= 2) {
            const int32_t os = __shfl_xor_sync(0xffffffffu, best_stamp, o);
            const int ob = __shfl_xor_sync(0xffffffffu, best, o);
            if (ob >= 0 && (best < 0 || os < best_stamp || (os == best_stamp && ob < best))) {
              best_stamp = os, best = ob;
            }
          }
          at = best;
        }
        // Every lane's reads of the tags above are done before lane 0 rewrites one: the ballot
        // and shuffles order execution, not shared-memory accesses (racecheck's hazard).
        __syncwarp();
        if (at >= 0) {
          place = cache + static_cast<int64_t>(at) * chunk_floats;
          if (lane == 0) {
            s_tags[at] = c + 1;
            s_tags[S + at] = now;
          }
        }
        __syncwarp();
      }
    }
    selected += c >= 0;
    if (lane == 0) {
      out.indices[slot] = c < 0 ? -1 : j;
      out.slots[slot] = place;
      out.copies[slot] = copy;
    }
  }
  if (lane == 0) {
    out.tables[r] = out.slots + static_cast<int64_t>(r) * per_row;
    out.num_chunks[r] = per_row;
    if (tags != nullptr) tags[2 * S] = now;
    if (out.tier_counts != nullptr) {
      auto* counts = reinterpret_cast<unsigned long long*>(out.tier_counts);
      atomicAdd(&counts[0], selected);
      atomicAdd(&counts[1], host);
      atomicAdd(&counts[2], hits);
    }
  }
  if (tags != nullptr) {
    for (int i = lane; i < 2 * S; i += 32) tags[i] = s_tags[i];
  }
}

// One block per (row, pick) that AssignCachedChunksKernel marked: the chunk over PCIe into its
// place (a cache slot or the step's own block).
__global__ void CopyCachedChunksKernel(ChunkMemoryBatch mem, const int32_t* __restrict__ indices,
                                       int per_row, int64_t chunk_floats, StagedChunks out) {
  AllowDependentGrids();
  WaitForPriorGrids();
  const int r = blockIdx.y, j = blockIdx.x;
  const int64_t slot = static_cast<int64_t>(r) * per_row + j;
  if (out.copies[slot] == 0) return;
  CopyChunk(mem.chunk_kv[r][indices[slot]], const_cast<float*>(out.slots[slot]), chunk_floats);
}

// Picks per selected host-tier chunk (Backend::StageSelectedHostChunks); `picks` zeroed before.
// `tier_counts` (optional, StagedChunkTables::tier_counts) gets the selections and host picks.
__global__ void CountHostPicksKernel(const int32_t* __restrict__ row_seq,
                                     const int64_t* __restrict__ host_offsets,
                                     const int32_t* __restrict__ indices, int64_t slots,
                                     int per_row, int32_t* __restrict__ picks,
                                     uint64_t* tier_counts) {
  AllowDependentGrids();
  WaitForPriorGrids();
  unsigned long long selected = 0, host = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < slots;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t c = indices[i];
    if (c < 0) continue;
    ++selected;
    const int32_t s = row_seq[i / per_row];
    const int64_t base = host_offsets[s];
    if (c < host_offsets[s + 1] - base) {
      atomicAdd(&picks[base + c], 1);
      ++host;
    }
  }
  if (tier_counts == nullptr) return;
  for (int o = 16; o > 0; o >>= 1) {
    selected += __shfl_down_sync(0xffffffffu, selected, o);
    host += __shfl_down_sync(0xffffffffu, host, o);
  }
  if ((threadIdx.x & 31) == 0) {
    auto* counts = reinterpret_cast<unsigned long long*>(tier_counts);
    atomicAdd(&counts[0], selected);
    atomicAdd(&counts[1], host);
  }
}

constexpr int kAssignThreads = 1024;
constexpr int kMaxPicks = Backend::kMaxCountedPicks;

// Exclusive prefix sum of one int per thread over a block of kAssignThreads; *total gets the sum.
__device__ int BlockExclusiveSum(int v, int* warp_sums, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = warp_sums[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    warp_sums[lane] = w;  // inclusive
  }
  __syncthreads();
  const int before = (warp > 0 ? warp_sums[warp - 1] : 0) + x - v;
  *total = warp_sums[31];
  __syncthreads();  // warp_sums is reused by the next call
  return before;
}

// One block: chooses the chunks to stage (all picked ones when they fit, else the most picked:
// every chunk with >= t picks, then chunks with t - 1 in index order while room is left, as the
// host default does) and turns their picks into -(slot + 1).
__global__ void __launch_bounds__(kAssignThreads)
    AssignStagingKernel(int32_t* __restrict__ picks, int64_t total, int64_t capacity,
                        int32_t* __restrict__ staged_out) {
  AllowDependentGrids();
  WaitForPriorGrids();
  __shared__ int bins[kMaxPicks + 1];
  __shared__ int warp_sums[32];
  __shared__ int threshold;
  for (int i = threadIdx.x; i <= kMaxPicks; i += blockDim.x) bins[i] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    atomicAdd(&bins[min(picks[i], kMaxPicks)], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t fit = 0;
    int j = 1;
    for (; j <= kMaxPicks && fit + bins[kMaxPicks + 1 - j] <= capacity; ++j) {
      fit += bins[kMaxPicks + 1 - j];
    }
    threshold = kMaxPicks + 2 - j;
  }
  __syncthreads();
  const int t = threshold;
  int staged = 0;
  for (int pass = 0; pass < (t > 1 ? 2 : 1); ++pass) {
    for (int64_t base = 0; base < total && staged < capacity; base += kAssignThreads) {
      const int64_t i = base + threadIdx.x;
      const int32_t p = i < total ? min(picks[i], kMaxPicks) : 0;
      const bool take = pass == 0 ? p >= t : p == t - 1;
      int n;
      const int before = BlockExclusiveSum(take ? 1 : 0, warp_sums, &n);
      if (take && staged + before < capacity) picks[i] = -(staged + before + 1);
      staged = static_cast<int>(min(capacity, static_cast<int64_t>(staged) + n));
    }
  }
  if (threadIdx.x == 0) *staged_out = staged;
}

// Sequence blockIdx.y's new table: staged chunks at their copies (and their sources recorded
// for the copy), the others where they are.
__global__ void StagedTablesKernel(ChunkMemoryBatch mem, StagedChunkTables out,
                                   int64_t chunk_floats) {
  AllowDependentGrids();
  WaitForPriorGrids();
  const int s = blockIdx.y;
  const float** table = out.entries + out.table_offsets[s];
  if (blockIdx.x == 0 && threadIdx.x == 0) out.tables[s] = table;
  const int64_t host = out.host_offsets[s + 1] - out.host_offsets[s];
  const int64_t n = mem.num_chunks[s];
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < n;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float* src = mem.chunk_kv[s][c];
    const int32_t p = c < host ? out.picks[out.host_offsets[s] + c] : 0;
    if (p < 0) {
      out.sources[-p - 1] = src;
      table[c] = out.blocks + static_cast<int64_t>(-p - 1) * chunk_floats;
    } else {
      table[c] = src;
    }
  }
}

// Block p copies staged chunk p (if that many were staged).
__global__ void CopyStagedKernel(StagedChunkTables out, int64_t chunk_floats) {
  AllowDependentGrids();
  WaitForPriorGrids();
  const int64_t p = blockIdx.x;
  if (p >= *out.staged) return;
  CopyChunk(out.sources[p], out.blocks + p * chunk_floats, chunk_floats);
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
  const dim3 picks(static_cast<unsigned>(per_row), static_cast<unsigned>(rows));
  if (out.cache.slots > 0) {
    if (out.cache.slots > ChunkCacheRows::kMaxSlots) {
      return absl::InvalidArgumentError(
          absl::StrCat("StageHostChunks: at most ", ChunkCacheRows::kMaxSlots, " cache slots"));
    }
    const size_t smem = 2 * out.cache.slots * sizeof(int32_t);
    RETURN_IF_ERROR(Launch(ctx, AssignCachedChunksKernel, static_cast<unsigned>(rows), 32, smem,
                           mem, host_chunks, indices, static_cast<int>(per_row), chunk_floats, out));
    return Launch(ctx, CopyCachedChunksKernel, picks, 256, 0, mem, indices,
                  static_cast<int>(per_row), chunk_floats, out);
  }
  return Launch(ctx, StageHostChunksKernel, picks, 256, 0, mem, host_chunks, indices,
                static_cast<int>(per_row), chunk_floats, out);
}

absl::Status StageSelectedHostChunks(Context& ctx, const ChunkMemoryBatch& mem,
                                     const int32_t* indices, int64_t rows, int64_t per_row,
                                     int64_t chunk_floats, const StagedChunkTables& out) {
  if (mem.num_seqs > 65535 || out.capacity > INT32_MAX || out.total_host > INT32_MAX) {
    return absl::InvalidArgumentError(
        "StageSelectedHostChunks: more than 65535 sequences or 2^31 chunks");
  }
  if (chunk_floats % 4 != 0) {
    return absl::InvalidArgumentError(
        "StageSelectedHostChunks: chunk_floats must be a multiple of 4");
  }
  RAMBA_CUDA_RETURN_IF_ERROR(
      cudaMemsetAsync(out.picks, 0, out.total_host * sizeof(int32_t), ctx.stream));
  const int64_t slots = rows * per_row;
  if (slots > 0) {
    RETURN_IF_ERROR(Launch(ctx, CountHostPicksKernel,
                           static_cast<unsigned>(std::min<int64_t>((slots + 255) / 256, 1024)),
                           256, 0, mem.row_seq, out.host_offsets, indices, slots,
                           static_cast<int>(per_row), out.picks, out.tier_counts));
  }
  RETURN_IF_ERROR(Launch(ctx, AssignStagingKernel, 1, kAssignThreads, 0, out.picks,
                         out.total_host, out.capacity, out.staged));
  const unsigned table_blocks = static_cast<unsigned>(
      std::clamp<int64_t>((mem.max_num_chunks + 255) / 256, 1, 64));
  RETURN_IF_ERROR(Launch(ctx, StagedTablesKernel,
                         dim3(table_blocks, static_cast<unsigned>(mem.num_seqs)), 256, 0, mem, out,
                         chunk_floats));
  if (out.capacity == 0) return absl::OkStatus();
  return Launch(ctx, CopyStagedKernel, static_cast<unsigned>(out.capacity), 256, 0, out,
                chunk_floats);
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
