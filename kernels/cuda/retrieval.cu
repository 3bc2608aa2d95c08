// Landmark retrieval and sparse chunk attention (the HSA query side) on the GPU.
//
// RetrieveChunks runs two kernels. A scan kernel scores (rows, chunk range) work items and writes
// one partial top-K list per (row, head, range) to scratch; a merge kernel combines a row's
// partial lists, orders the winners by chunk index (most recent first) and computes the
// stick-breaking weights. Decode-shaped calls (few rows, many chunks) use a block per
// (row, range) with a warp per chunk, so one row's scan spreads over many SMs; prefill-shaped calls
// (many rows) score 64-row x 64-chunk tiles staged in shared memory, so a landmark is read once per
// 64 rows. The kept set is defined by the CPU's total order (score descending, then chunk index
// ascending), so the result does not depend on how the chunk range was split.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/ops.h"

namespace ramba::kernels::cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kStickBreakingSoftplusThreshold = 15.0f;  // as kernels/cpu/retrieval.cc
// Dynamic shared memory a kernel may use without cudaFuncSetAttribute.
constexpr size_t kDefaultSmem = 48 * 1024;

// A top-K candidate. Lists are kept full: empty slots hold kNoChunk with score -inf, which loses
// to every real candidate (a real -inf score wins the tie on chunk index), so inserting never
// needs a count.
constexpr int32_t kNoChunk = INT32_MAX;
struct Cand {
  float score;
  int32_t chunk;
};

__device__ __forceinline__ Cand NoCand() { return Cand{-INFINITY, kNoChunk}; }

// The CPU's total order: score descending, then chunk index ascending.
__device__ __forceinline__ bool Better(Cand a, Cand b) {
  return a.score > b.score || (a.score == b.score && a.chunk < b.chunk);
}

__device__ __forceinline__ int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t Max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Butterfly reductions: a + b == b + a, so every lane ends with the bitwise-same value.
__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int m = kWarp / 2; m > 0; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}

// Single-thread insertion into a full sorted list of k entries (best first).
__device__ void InsertOne(Cand* list, int k, Cand x) {
  if (!Better(x, list[k - 1])) return;
  int pos = k - 1;
  while (pos > 0 && Better(x, list[pos - 1])) {
    list[pos] = list[pos - 1];
    --pos;
  }
  list[pos] = x;
}

// One candidate per lane (NoCand() where a lane has none) into a shared-memory list owned by the
// warp. Lane 0 inserts the qualifying candidates one at a time; insertion order does not matter
// because the order is total. Returns whether any candidate beat the list's last entry. Callers
// must have synchronised the warp since the list was last written.
__device__ bool WarpInsert(Cand* list, int k, Cand x, int lane) {
  unsigned mask = __ballot_sync(kFullMask, Better(x, list[k - 1]));
  const bool any = mask != 0;
  while (mask != 0) {
    const int src = __ffs(mask) - 1;
    mask &= mask - 1;
    Cand y;
    y.score = __shfl_sync(kFullMask, x.score, src);
    y.chunk = __shfl_sync(kFullMask, x.chunk, src);
    if (lane == 0) InsertOne(list, k, y);
    __syncwarp();
  }
  return any;
}

// Merges the sorted list `src` into the sorted list `dst` (both k entries, warp-shared).
__device__ void WarpMergeSorted(Cand* dst, const Cand* src, int k, int lane) {
  for (int j0 = 0; j0 < k; j0 += kWarp) {
    const int j = j0 + lane;
    // src is best first: once a group of 32 has nothing that qualifies, nothing later does.
    if (!WarpInsert(dst, k, j < k ? src[j] : NoCand(), lane)) break;
  }
}

// ---- Merging many sorted lists: a tournament of list heads ----
// Each round takes the best head among the lists and advances that list; k rounds give the k
// best, best first, whatever the number of lists, with no serial insertion. Heads are compared by
// the total order, then by list (only empty slots can be equal), so every lane of a butterfly
// ends with the same winner and the result does not depend on timing.

__device__ __forceinline__ void TakeBetter(Cand& best, int& src, Cand other, int other_src) {
  if (Better(other, best) || (!Better(best, other) && other_src < src)) {
    best = other;
    src = other_src;
  }
}

__device__ __forceinline__ void WarpBest(Cand& best, int& src) {
#pragma unroll
  for (int m = kWarp / 2; m > 0; m >>= 1) {
    Cand other;
    other.score = __shfl_xor_sync(kFullMask, best.score, m);
    other.chunk = __shfl_xor_sync(kFullMask, best.chunk, m);
    TakeBetter(best, src, other, __shfl_xor_sync(kFullMask, src, m));
  }
}

// Shared memory of BlockTournament besides the list heads: a round's per-warp and overall winners.
struct TournamentSmem {
  Cand warp_best[kWarp];
  int warp_src[kWarp];
  Cand winner;
  int winner_src;
};

// The k best of n sorted lists (list l at lists + l * k), best first, into out (not aliasing the
// lists), by the whole block; heads holds n ints. Thread t holds the best head of lists t,
// t + blockDim.x, ...; only the owner of the winning list recomputes its best.
__device__ __forceinline__ void BlockTournament(const Cand* lists, int n, int k, Cand* out,
                                                int* heads, TournamentSmem& ts) {
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int warps = blockDim.x / kWarp;
  for (int i = tid; i < n; i += blockDim.x) heads[i] = 0;
  __syncthreads();
  auto own_best = [&](Cand& best, int& src) {
    best = NoCand();
    src = n + tid;  // no list: after every real list
    for (int i = tid; i < n; i += blockDim.x) {
      TakeBetter(best, src, heads[i] < k ? lists[i * k + heads[i]] : NoCand(), i);
    }
  };
  Cand mine;
  int mine_src;
  own_best(mine, mine_src);
  for (int j = 0; j < k; ++j) {
    Cand best = mine;
    int src = mine_src;
    WarpBest(best, src);
    if (lane == 0) {
      ts.warp_best[warp] = best;
      ts.warp_src[warp] = src;
    }
    __syncthreads();
    if (warp == 0) {
      best = lane < warps ? ts.warp_best[lane] : NoCand();
      src = lane < warps ? ts.warp_src[lane] : INT_MAX;
      WarpBest(best, src);
      if (lane == 0) {
        out[j] = best;
        ts.winner = best;
        ts.winner_src = src;
      }
    }
    __syncthreads();
    const int win = ts.winner_src;
    if (ts.winner.chunk == kNoChunk) {  // every list is exhausted (block-uniform)
      for (int jj = j + 1 + tid; jj < k; jj += blockDim.x) out[jj] = NoCand();
      break;
    }
    if (win < n && win % static_cast<int>(blockDim.x) == tid) {
      ++heads[win];
      own_best(mine, mine_src);
    }
  }
  __syncthreads();
}

__device__ __forceinline__ int64_t EligibleChunks(const ChunkMemoryBatch& mem, int64_t row,
                                                  int64_t chunk_size) {
  const int64_t t = mem.row_position[row];
  if (t < 0) return 0;
  return Min64(mem.num_chunks[mem.row_seq[row]], t / chunk_size);
}

__device__ __forceinline__ float CleanScore(float s) { return isnan(s) ? -INFINITY : s; }

// ---- Decode-shaped scan: a block per (row, chunk range), a warp per chunk ----

constexpr int kScanWarps = 8;
constexpr int kScanThreads = kScanWarps * kWarp;
// Fewest chunks per range: below this a block's fixed costs dominate.
constexpr int64_t kMinChunksPerPart = 64;

size_t ScanSmemBytes(int dim, int heads, int k) {
  return static_cast<size_t>((dim + 3) / 4 * 4) * sizeof(float) +
         static_cast<size_t>(kScanWarps) * heads * k * sizeof(Cand);
}

// Scores of one landmark row against the query, per head: lane l accumulates the head's elements
// 4g..4g+3 for g = l, l + 32, ... in that order, then the warp sums the lanes. The vector path
// reads the same elements in the same order, so both give bitwise-equal scores.
__global__ void __launch_bounds__(kScanThreads)
    ScanRowsKernel(const float* __restrict__ r, ChunkMemoryBatch mem, int dim, int heads, int dh,
                   int k, int64_t chunk_size, float inv_sqrt, int64_t part_len, int parts,
                   Cand* __restrict__ partials) {
  AllowDependentGrids();
  WaitForPriorGrids();
  extern __shared__ float4 smem4[];
  float* rs = reinterpret_cast<float*>(smem4);                    // [dim] this row's query
  Cand* lists = reinterpret_cast<Cand*>(rs + (dim + 3) / 4 * 4);  // [warps][heads][k]
  const int64_t row = blockIdx.x / parts;
  const int part = static_cast<int>(blockIdx.x % parts);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;

  for (int i = threadIdx.x; i < dim; i += kScanThreads) rs[i] = r[row * dim + i];
  for (int i = threadIdx.x; i < kScanWarps * heads * k; i += kScanThreads) lists[i] = NoCand();
  const int64_t c0 = part * part_len;
  const int64_t c1 = Min64(c0 + part_len, EligibleChunks(mem, row, chunk_size));
  const float* lm = c1 > c0 ? mem.landmarks[mem.row_seq[row]] : nullptr;
  const bool vec = dh % 4 == 0 && reinterpret_cast<uintptr_t>(lm) % 16 == 0;
  const int groups = (dh + 3) / 4;
  __syncthreads();

  for (int64_t c = c0 + warp; c < c1; c += kScanWarps) {
    const float* lc = lm + c * dim;
    for (int e = 0; e < heads; ++e) {
      const float* le = lc + e * dh;
      const float* re = rs + e * dh;
      float acc = 0.0f;
      if (vec) {
        for (int g = lane; g < groups; g += kWarp) {
          const float4 x = __ldg(reinterpret_cast<const float4*>(le) + g);
          const float4 y = reinterpret_cast<const float4*>(re)[g];
          acc = fmaf(x.x, y.x, acc);
          acc = fmaf(x.y, y.y, acc);
          acc = fmaf(x.z, y.z, acc);
          acc = fmaf(x.w, y.w, acc);
        }
      } else {
        for (int g = lane; g < groups; g += kWarp) {
          for (int t = 4 * g; t < 4 * g + 4 && t < dh; ++t) acc = fmaf(__ldg(le + t), re[t], acc);
        }
      }
      const Cand x{CleanScore(WarpSum(acc) * inv_sqrt), static_cast<int32_t>(c)};
      Cand* list = lists + (warp * heads + e) * k;
      // Every lane holds the same x, so the branch is warp-uniform; the ballot also orders every
      // lane's read of list[k - 1] before lane 0 rewrites it.
      if (__ballot_sync(kFullMask, Better(x, list[k - 1])) != 0) {
        if (lane == 0) InsertOne(list, k, x);
        __syncwarp();
      }
    }
  }
  __syncthreads();

  // Fold the warps' lists into warp 0's, one head per warp, and write this range's list.
  for (int e = warp; e < heads; e += kScanWarps) {
    Cand* dst = lists + e * k;
    for (int w = 1; w < kScanWarps; ++w) WarpMergeSorted(dst, lists + (w * heads + e) * k, k, lane);
    Cand* out = partials + ((row * heads + e) * parts + part) * k;
    for (int j = lane; j < k; j += kWarp) out[j] = dst[j];
  }
}

// ---- Prefill-shaped scan: a block per (64-row tile, chunk range, head) ----

constexpr int kTileRows = 64;
constexpr int kTileChunks = 64;
constexpr int kTileDepth = 32;  // dims per shared-memory stage
constexpr int kTileThreads = 256;
constexpr int kTilePad = 4;  // keeps float4 rows aligned; staging stores are at most 4-way
constexpr int kTileWarps = kTileThreads / kWarp;
// Each thread computes a 4 x 4 block of scores.
static_assert(kTileRows * kTileChunks == kTileThreads * 16, "4x4 scores per thread");
static_assert(kTileRows % kTileWarps == 0 && kTileChunks == 2 * kWarp, "list update mapping");
static_assert(kTileRows == kTileChunks, "staging loads a row and a chunk per index");

struct TileSmem {
  float rs[kTileDepth][kTileRows + kTilePad];    // query tile, dim-major
  float ls[kTileDepth][kTileChunks + kTilePad];  // landmark tile, dim-major
  float scores[kTileRows][kTileChunks + 1];
  int64_t eligible[kTileRows];
  int32_t seq[kTileRows];
  int32_t pending[kTileRows];  // rows not yet scanned by a pass
  // followed by Cand lists[kTileRows][k]
};

size_t TileSmemBytes(int k) {
  return (sizeof(TileSmem) + 15) / 16 * 16 + static_cast<size_t>(kTileRows) * k * sizeof(Cand);
}

// Scores are plain sequential fma sums over the head's dims, the same for every (row, chunk).
// Rows of a tile may belong to different sequences: each pass takes the sequence of the first
// pending row and scans that sequence's landmarks for those of the tile's rows that use it.
__global__ void __launch_bounds__(kTileThreads)
    ScanTilesKernel(const float* __restrict__ r, int64_t rows, ChunkMemoryBatch mem, int dim,
                    int heads, int dh, int k, int64_t chunk_size, float inv_sqrt, int64_t part_len,
                    int parts, Cand* __restrict__ partials) {
  AllowDependentGrids();
  WaitForPriorGrids();
  extern __shared__ float4 smem4[];
  TileSmem& sm = *reinterpret_cast<TileSmem*>(smem4);
  Cand* lists =
      reinterpret_cast<Cand*>(reinterpret_cast<char*>(smem4) + (sizeof(TileSmem) + 15) / 16 * 16);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int part = blockIdx.y;
  const int e = blockIdx.z;
  const int tid = threadIdx.x;
  const int warp = tid / kWarp, lane = tid % kWarp;
  const int ty = tid / (kTileChunks / 4), tx = tid % (kTileChunks / 4);

  if (tid < kTileRows) {
    const int64_t row = r0 + tid;
    const bool valid = row < rows;
    sm.seq[tid] = valid ? mem.row_seq[row] : -1;
    sm.eligible[tid] = valid ? EligibleChunks(mem, row, chunk_size) : 0;
    sm.pending[tid] = valid ? 1 : 0;
  }
  for (int i = tid; i < kTileRows * k; i += kTileThreads) lists[i] = NoCand();
  __syncthreads();

  const int64_t p0 = static_cast<int64_t>(part) * part_len;
  while (true) {
    // Every thread reads the same shared values, so the pass structure is block-uniform.
    int32_t seq = -1;
    for (int i = 0; i < kTileRows; ++i) {
      if (sm.pending[i]) {
        seq = sm.seq[i];
        break;
      }
    }
    if (seq < 0) break;
    int64_t cmax = 0;
    for (int i = 0; i < kTileRows; ++i) {
      if (sm.pending[i] && sm.seq[i] == seq) cmax = Max64(cmax, sm.eligible[i]);
    }
    const int64_t c_end = Min64(p0 + part_len, cmax);
    const float* lm = c_end > p0 ? mem.landmarks[seq] : nullptr;

    for (int64_t cb = p0; cb < c_end; cb += kTileChunks) {
      float acc[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
      }
      for (int d0 = 0; d0 < dh; d0 += kTileDepth) {
        __syncthreads();  // the previous stage (and the previous tile's list update) is done
        for (int i = tid; i < kTileRows * kTileDepth; i += kTileThreads) {
          const int rr = i / kTileDepth, kk = i % kTileDepth;
          const int d = d0 + kk;
          float rv = 0.0f, lv = 0.0f;
          if (d < dh) {
            const int64_t row = r0 + rr;
            const int64_t c = cb + rr;
            if (row < rows) rv = r[row * dim + e * dh + d];
            if (c < c_end) lv = __ldg(lm + c * dim + e * dh + d);
          }
          sm.rs[kk][rr] = rv;
          sm.ls[kk][rr] = lv;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < kTileDepth; ++kk) {
          const float4 a = *reinterpret_cast<const float4*>(&sm.rs[kk][ty * 4]);
          const float4 b = *reinterpret_cast<const float4*>(&sm.ls[kk][tx * 4]);
          const float av[4] = {a.x, a.y, a.z, a.w};
          const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          sm.scores[ty * 4 + i][tx * 4 + j] = CleanScore(acc[i][j] * inv_sqrt);
        }
      }
      __syncthreads();
      // A warp per 8 rows: each lane offers chunks cb + lane and cb + lane + 32.
      for (int q = 0; q < kTileRows / kTileWarps; ++q) {
        const int i = warp * (kTileRows / kTileWarps) + q;
        if (!sm.pending[i] || sm.seq[i] != seq) continue;  // warp-uniform
        const int64_t lim = Min64(sm.eligible[i], c_end);
        Cand* list = lists + i * k;
        for (int half = 0; half < 2; ++half) {
          const int jj = lane + half * kWarp;
          const int64_t c = cb + jj;
          WarpInsert(list, k, c < lim ? Cand{sm.scores[i][jj], static_cast<int32_t>(c)} : NoCand(),
                     lane);
        }
      }
    }
    __syncthreads();  // every thread has finished reading `pending` for this pass
    if (tid < kTileRows && sm.pending[tid] && sm.seq[tid] == seq) sm.pending[tid] = 0;
    __syncthreads();
  }

  for (int i = tid; i < kTileRows * k; i += kTileThreads) {
    const int64_t row = r0 + i / k;
    if (row < rows) partials[((row * heads + e) * parts + part) * k + i % k] = lists[i];
  }
}

// ---- Merge: a block per (row, head) ----

constexpr int kMergeWarps = 8;
constexpr int kMergeThreads = kMergeWarps * kWarp;

// Staged partial lists [parts][k], per-warp lists [warps][k] (the first is the merged list), the
// sorted [k] list, a head per part, and the tournament's per-round state.
size_t MergeSmemBytes(int64_t parts, int k) {
  return static_cast<size_t>(parts + kMergeWarps + 1) * k * sizeof(Cand) +
         static_cast<size_t>(parts) * sizeof(int) + sizeof(TournamentSmem) + 16;
}

// The merge of a (row, head)'s partial lists: by list-head tournament (kTournament, the default),
// or by warps inserting lists one after another (RAMBA_CUDA_RETRIEVAL_MERGE=insert). Measured on
// the H100 at 1M tokens of decode (256 lists), retrieval + sparse attention per step in a CUDA
// graph: 0.066 vs 0.077 ms (docs/benchmarks.md).
template <bool kTournament>
__global__ void __launch_bounds__(kMergeThreads)
    MergeKernel(const Cand* __restrict__ partials, int parts, int k, int32_t* __restrict__ indices,
                float* __restrict__ weights) {
  AllowDependentGrids();
  WaitForPriorGrids();
  extern __shared__ float4 smem4[];
  TournamentSmem& ts = *reinterpret_cast<TournamentSmem*>(smem4);
  Cand* cands = reinterpret_cast<Cand*>(smem4 + (sizeof(TournamentSmem) + 15) / 16);  // [parts][k]
  Cand* lists = cands + parts * k;                                                    // [warps][k]
  Cand* sorted = lists + kMergeWarps * k;                                             // [k]
  int* heads = reinterpret_cast<int*>(sorted + k);                                    // [parts]
  const int64_t rh = blockIdx.x;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const Cand* src = partials + rh * parts * k;
  for (int i = threadIdx.x; i < parts * k; i += kMergeThreads) cands[i] = src[i];
  if constexpr (kTournament) {
    __syncthreads();
    BlockTournament(cands, parts, k, lists, heads, ts);
    if (warp != 0) return;
  } else {
    for (int i = threadIdx.x; i < kMergeWarps * k; i += kMergeThreads) lists[i] = NoCand();
    __syncthreads();
    for (int p = warp; p < parts; p += kMergeWarps) {
      WarpMergeSorted(lists + warp * k, cands + p * k, k, lane);
    }
    __syncthreads();
    if (warp != 0) return;
    for (int w = 1; w < kMergeWarps; ++w) WarpMergeSorted(lists, lists + w * k, k, lane);
  }

  // lists[0, n) are the kept chunks, best first; order them most recent first. Chunk indices are
  // distinct, so ranks are too.
  int n = 0;
  while (n < k && lists[n].chunk != kNoChunk) ++n;
  for (int j = lane; j < n; j += kWarp) {
    const int32_t c = lists[j].chunk;
    int rank = 0;
    for (int i = 0; i < n; ++i) rank += lists[i].chunk > c ? 1 : 0;
    sorted[rank] = lists[j];
  }
  __syncwarp();
  int32_t* idx = indices + rh * k;
  float* wt = weights + rh * k;
  if (lane == 0) {
    // Stick-breaking exactly as StickBreaking() in kernels/cpu/retrieval.cc.
    float cum = 0.0f;
    for (int j = 0; j < n; ++j) {
      const float s = sorted[j].score;
      cum += s > kStickBreakingSoftplusThreshold ? s : log1pf(expf(s));
      wt[j] = expf(s - cum);
      idx[j] = sorted[j].chunk;
    }
  }
  for (int j = n + lane; j < k; j += kWarp) {
    idx[j] = -1;
    wt[j] = 0.0f;
  }
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Above this many rows a call is taken for a prefill (rows of few sequences) and scanned in tiles;
// decode batches (one row per sequence) stay below it.
constexpr int64_t kTiledMinRows = 257;
// Partial lists per (row, head) are capped so the merge stages them in default shared memory.
constexpr size_t kMergeSmemTarget = kDefaultSmem;

}  // namespace

absl::Status RetrieveChunks(Context& ctx, const float* r, int64_t rows, const ChunkMemoryBatch& mem,
                            int64_t retrieval_dim, int64_t heads, int64_t top_k, int64_t chunk_size,
                            int32_t* indices, float* weights) {
  if (rows == 0) return absl::OkStatus();
  if (retrieval_dim > (1 << 20) || top_k > (1 << 16) || mem.max_num_chunks >= INT32_MAX) {
    return absl::UnimplementedError("RetrieveChunks: sizes beyond the CUDA kernels' limits");
  }
  const int dim = static_cast<int>(retrieval_dim);
  const int nheads = static_cast<int>(heads);
  const int dh = dim / nheads;
  const int k = static_cast<int>(top_k);
  // Same float steps as the CPU, so equal dot products give equal scores.
  const float inv_sqrt = 1.0f / std::sqrt(static_cast<float>(dh));
  const int64_t max_chunks = mem.max_num_chunks;
  const int64_t sms = std::max(ctx.num_sms, 1);

  if (MergeSmemBytes(1, k) > ctx.max_shared_per_block) {
    return absl::UnimplementedError(absl::StrCat("RetrieveChunks: top_k ", k, " is too large"));
  }
  const int64_t merge_cap = std::max<int64_t>(
      1, (static_cast<int64_t>(kMergeSmemTarget) - static_cast<int64_t>(MergeSmemBytes(0, k))) /
             static_cast<int64_t>(k * sizeof(Cand) + sizeof(int)));

  const size_t tile_smem = TileSmemBytes(k);
  const bool tiled = rows >= kTiledMinRows && tile_smem <= ctx.max_shared_per_block;
  int64_t parts = 1, part_len = 1;
  if (tiled) {
    // Enough blocks for a few waves; ranges are whole 64-chunk tiles.
    const int64_t tiles = std::max<int64_t>(1, CeilDiv(max_chunks, kTileChunks));
    const int64_t row_tiles = CeilDiv(rows, kTileRows);
    parts = std::clamp<int64_t>(CeilDiv(4 * sms, row_tiles * nheads), 1, tiles);
    parts = std::min<int64_t>({parts, merge_cap, 65535});
    part_len = CeilDiv(tiles, parts) * kTileChunks;
    parts = std::max<int64_t>(1, CeilDiv(max_chunks, part_len));
    if (row_tiles > INT32_MAX || nheads > 65535) {
      return absl::UnimplementedError("RetrieveChunks: grid too large");
    }
  } else {
    // Spread each row's chunks over enough (row, range) blocks to fill the GPU several times.
    const int64_t max_parts = std::max<int64_t>(1, CeilDiv(max_chunks, kMinChunksPerPart));
    parts = std::clamp<int64_t>(CeilDiv(8 * sms, rows), 1, max_parts);
    parts = std::min(parts, merge_cap);
    part_len = std::max<int64_t>(1, CeilDiv(max_chunks, parts));
    parts = std::max<int64_t>(1, CeilDiv(max_chunks, part_len));
    if (rows * parts > INT32_MAX) return absl::UnimplementedError("RetrieveChunks: grid too large");
  }

  const size_t partial_bytes = static_cast<size_t>(rows * nheads * parts * k) * sizeof(Cand);
  ASSIGN_OR_RETURN(void* scratch, ctx.Scratch(ScratchSlot::kRetrieval, partial_bytes));
  Cand* partials = static_cast<Cand*>(scratch);

  if (tiled) {
    RETURN_IF_ERROR(PrepareSmem(ctx, ScanTilesKernel, tile_smem, "RetrieveChunks"));
    const dim3 grid(static_cast<unsigned>(CeilDiv(rows, kTileRows)), static_cast<unsigned>(parts),
                    static_cast<unsigned>(nheads));
    RETURN_IF_ERROR(Launch(ctx, ScanTilesKernel, grid, kTileThreads, tile_smem, r, rows, mem, dim,
                           nheads, dh, k, chunk_size, inv_sqrt, part_len, static_cast<int>(parts),
                           partials));
  } else {
    const size_t smem = ScanSmemBytes(dim, nheads, k);
    RETURN_IF_ERROR(PrepareSmem(ctx, ScanRowsKernel, smem, "RetrieveChunks"));
    RETURN_IF_ERROR(Launch(ctx, ScanRowsKernel, static_cast<unsigned>(rows * parts), kScanThreads,
                           smem, r, mem, dim, nheads, dh, k, chunk_size, inv_sqrt, part_len,
                           static_cast<int>(parts), partials));
  }

  const size_t merge_smem = MergeSmemBytes(parts, k);
  const char* merge_env = std::getenv("RAMBA_CUDA_RETRIEVAL_MERGE");
  const auto merge = merge_env != nullptr && std::strcmp(merge_env, "insert") == 0
                         ? MergeKernel<false>
                         : MergeKernel<true>;
  RETURN_IF_ERROR(PrepareSmem(ctx, merge, merge_smem, "RetrieveChunks"));
  return Launch(ctx, merge, static_cast<unsigned>(rows * nheads), kMergeThreads, merge_smem,
                partials, static_cast<int>(parts), k, indices, weights);
}

}  // namespace ramba::kernels::cuda
