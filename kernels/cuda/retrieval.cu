// Landmark retrieval and sparse chunk attention (the HSA query side) on the GPU.
//
// Decode-shaped calls (few rows, many chunks) run one kernel: a block per (row, chunk range)
// scores its range with a warp per chunk and keeps the range's top-K; the row's last block merges
// the ranges' lists, orders the winners by chunk index (most recent first) and computes the
// stick-breaking weights. Prefill-shaped calls (many rows) score 64-row x 64-chunk tiles staged in
// shared memory, so a landmark is read once per 64 rows, and a merge kernel combines a row's
// partial lists. The kept set is defined by the CPU's total order (score descending, then chunk
// index ascending), so the result does not depend on how the chunk range was split.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

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

// ---- The kept chunks of a row: recency order and stick-breaking weights ----

// best: the n kept candidates, best first (shared memory, warp-visible); sorted: k entries of
// shared scratch. Orders them most recent first and writes the row's k indices and weights, -1 / 0
// past n. Called by one warp. Chunk indices are distinct, so ranks are too.
__device__ void FinishSelection(const Cand* best, int n, int k, Cand* sorted, int32_t* idx,
                                float* wt, int lane) {
  for (int j = lane; j < n; j += kWarp) {
    const int32_t c = best[j].chunk;
    int rank = 0;
    for (int i = 0; i < n; ++i) rank += best[i].chunk > c ? 1 : 0;
    sorted[rank] = best[j];
  }
  __syncwarp();
  // Stick-breaking as StickBreaking() in kernels/cpu/retrieval.cc: the softplus and exp terms per
  // lane, the running sum in slot order (the same additions, so the same bits).
  float cum = 0.0f;
  for (int j0 = 0; j0 < n; j0 += kWarp) {
    const int j = j0 + lane;
    const float s = j < n ? sorted[j].score : 0.0f;
    const float sp = s > kStickBreakingSoftplusThreshold ? s : log1pf(expf(s));
    float mine = 0.0f;
    for (int i = 0; i < kWarp && j0 + i < n; ++i) {
      cum += __shfl_sync(kFullMask, sp, i);
      if (i == lane) mine = cum;
    }
    if (j < n) {
      wt[j] = expf(s - mine);
      idx[j] = sorted[j].chunk;
    }
  }
  for (int j = n + lane; j < k; j += kWarp) {
    idx[j] = -1;
    wt[j] = 0.0f;
  }
}

// ---- Decode-shaped calls: one kernel scans, selects and merges ----
// A block per (row, chunk range) scores its range (a warp per chunk, two chunks' loads in flight)
// and writes the range's top-K; the row's last block to finish merges the ranges' lists and writes
// the selection, so a decode step pays one launch and no serial insertion. Candidates travel as
// 64-bit keys whose unsigned order is the CPU's total order, so a candidate's place in a top-K is
// the count of keys above it: no comparisons chained through a list.

using Key = unsigned long long;  // 0: no candidate (below every real key)

__device__ __forceinline__ Key MakeKey(float score, int32_t chunk) {
  score += 0.0f;  // -0 -> +0: the CPU's order ranks them equal, then by chunk
  const unsigned u = __float_as_uint(score);
  const unsigned ord = (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);  // NaN never reaches here
  return (static_cast<Key>(ord) << 32) | static_cast<unsigned>(INT32_MAX - chunk);
}

__device__ __forceinline__ Cand KeyCand(Key key) {
  if (key == 0) return NoCand();
  const unsigned ord = static_cast<unsigned>(key >> 32);
  const unsigned u = (ord & 0x80000000u) != 0 ? (ord & 0x7fffffffu) : ~ord;
  return Cand{__uint_as_float(u), INT32_MAX - static_cast<int32_t>(key & 0xffffffffu)};
}

constexpr int kSelWarps = 8;
constexpr int kSelThreads = kSelWarps * kWarp;
constexpr int kSelMaxK = kWarp;  // a warp holds a top-K, one key per lane
constexpr int kSelMinPart = 16;  // chunks per range: two per warp, one round trip
constexpr int kSelMaxPart = 1024;
// Blocks per SM a row's ranges aim for. Measured at 1M tokens of decode (batch 1, retrieval +
// sparse attention in a CUDA graph): 1 / 2 / 4 per SM took 0.050 / 0.046 / 0.048 ms.
constexpr int kSelBlocksPerSm = 2;

// The warp's top-K (k <= 32) so far, best first in lanes < k (0 where none; `pay` rides along),
// updated with one offered key per lane. Real keys are distinct, so the ranks of the real keys
// among the 32 + k are distinct too; `buf` / `pbuf` (k entries each) are warp-private shared
// memory.
__device__ __forceinline__ Key WarpTopKAdd(Key best, int& pay, Key x, int x_pay, int k, Key* buf,
                                           int* pbuf, int lane) {
  int rb = 0, rx = 0;  // keys above `best` / `x` among the warp's list and its offers
  for (int j = 0; j < k; ++j) {
    const Key y = __shfl_sync(kFullMask, best, j);
    rb += y > best ? 1 : 0;
    rx += y > x ? 1 : 0;
  }
#pragma unroll 8
  for (int j = 0; j < kWarp; ++j) {
    const Key y = __shfl_sync(kFullMask, x, j);
    rb += y > best ? 1 : 0;
    rx += y > x ? 1 : 0;
  }
  if (lane < k) {
    buf[lane] = 0;
    pbuf[lane] = -1;
  }
  __syncwarp();
  if (best != 0 && rb < k) {
    buf[rb] = best;
    pbuf[rb] = pay;
  }
  if (x != 0 && rx < k) {
    buf[rx] = x;
    pbuf[rx] = x_pay;
  }
  __syncwarp();
  const Key out = lane < k ? buf[lane] : 0;
  if (lane < k) pay = pbuf[lane];
  __syncwarp();  // buf is rewritten by the next call
  return out;
}

// Shared memory: keys, the range's [heads][part_len] (the last block stages a head's [parts][k]
// lists there), per-warp lists and payloads [warps][k] twice (the warps' results; their private
// buffers).
__host__ __device__ inline int SelectKeySlots(int heads, int part_len, int parts, int k) {
  return heads * part_len > parts * k ? heads * part_len : parts * k;
}

size_t SelectSmemBytes(int heads, int part_len, int parts, int k) {
  return static_cast<size_t>(SelectKeySlots(heads, part_len, parts, k)) * sizeof(Key) +
         static_cast<size_t>(2 * kSelWarps) * k * (sizeof(Key) + sizeof(int)) + 16;
}

struct SelectArgs {
  const float* r;
  ChunkMemoryBatch mem;
  int dim, heads, dh, k;
  int64_t chunk_size;
  float inv_sqrt;
  int part_len, parts;
  Key* partials;       // [rows][heads][parts][k]
  unsigned* counters;  // [rows], zero between calls
  int32_t* indices;
  float* weights;
};

// The block's k best of n keys (warp w offers keys w * 32 + lane, then + 256, ...) into `out`
// (k entries, best first; payloads into out_pay when given). keys_at(i) returns key i's key and
// payload. Ends with the block synchronised.
template <class KeyAt>
__device__ __forceinline__ void BlockTopK(int n, int k, KeyAt keys_at, Key* pool, int* ppool,
                                          Key* wbuf, int* wpbuf, Key* out, int* out_pay) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  Key* buf = wbuf + warp * k;
  int* pbuf = wpbuf + warp * k;
  Key best = 0;
  int pay = -1;
  for (int base = warp * kWarp; base < n; base += kSelThreads) {
    Key x = 0;
    int xp = -1;
    if (base + lane < n) keys_at(base + lane, x, xp);
    best = WarpTopKAdd(best, pay, x, xp, k, buf, pbuf, lane);
  }
  if (lane < k) {
    pool[warp * k + lane] = best;
    ppool[warp * k + lane] = pay;
  }
  __syncthreads();
  if (warp == 0) {
    const int pooled = min(kSelWarps, (n + kWarp - 1) / kWarp) * k;  // warps that had keys
    best = 0;
    pay = -1;
    for (int base = 0; base < pooled; base += kWarp) {
      const int i = base + lane;
      const Key x = i < pooled ? pool[i] : 0;
      const int xp = i < pooled ? ppool[i] : -1;
      best = WarpTopKAdd(best, pay, x, xp, k, buf, pbuf, lane);
    }
    if (lane < k) {
      out[lane] = best;
      if (out_pay != nullptr) out_pay[lane] = pay;
    }
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kSelThreads, 2) ScanSelectKernel(SelectArgs a) {
  AllowDependentGrids();
  WaitForPriorGrids();
  extern __shared__ float4 smem4[];
  Key* keys = reinterpret_cast<Key*>(smem4);  // [heads][part_len], or a head's [parts][k]
  Key* pool = keys + SelectKeySlots(a.heads, a.part_len, a.parts, a.k);  // [warps][k]
  Key* wbuf = pool + kSelWarps * a.k;                                    // [warps][k]
  int* ppool = reinterpret_cast<int*>(wbuf + kSelWarps * a.k);           // [warps][k]
  int* wpbuf = ppool + kSelWarps * a.k;                                  // [warps][k]
  __shared__ bool s_last;
  __shared__ Key s_top[kSelMaxK];
  __shared__ int s_list[kSelMaxK];
  __shared__ Cand s_best[kSelMaxK], s_sorted[kSelMaxK];
  const int64_t row = blockIdx.x / a.parts;
  const int part = static_cast<int>(blockIdx.x % a.parts);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int k = a.k, heads = a.heads, dh = a.dh;

  // The query is read where it is used (L1 / L2 after the first warp), so its loads and the
  // first landmarks' go out together.
  const float* rrow = a.r + row * a.dim;
  const int64_t c0 = static_cast<int64_t>(part) * a.part_len;
  const int n =
      static_cast<int>(Max64(0, Min64(a.part_len, EligibleChunks(a.mem, row, a.chunk_size) - c0)));
  const float* lm = n > 0 ? a.mem.landmarks[a.mem.row_seq[row]] + c0 * a.dim : nullptr;
  const bool vec = dh % 4 == 0 && a.dim % 4 == 0 && reinterpret_cast<uintptr_t>(lm) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(rrow) % 16 == 0;
  const int groups = (dh + 3) / 4;

  // Scores: chunks i and i + warps together (both loads in flight), the same sums in the same
  // order as the prefill path and the CPU's definition of a score per head.
  for (int i = warp; i < a.part_len; i += 2 * kSelWarps) {
    const int i2 = i + kSelWarps;
    const bool has1 = i < n, has2 = i2 < n;
    const float* l1 = lm + static_cast<int64_t>(has1 ? i : 0) * a.dim;
    const float* l2 = lm + static_cast<int64_t>(has2 ? i2 : 0) * a.dim;
    for (int e = 0; e < heads; ++e) {
      float acc1 = 0.0f, acc2 = 0.0f;
      if (has1) {
        const float* re = rrow + e * dh;
        if (vec) {
#pragma unroll 8
          for (int g = lane; g < groups; g += kWarp) {
            const float4 x1 = __ldg(reinterpret_cast<const float4*>(l1 + e * dh) + g);
            const float4 x2 = __ldg(reinterpret_cast<const float4*>(l2 + e * dh) + g);
            const float4 y = __ldg(reinterpret_cast<const float4*>(re) + g);
            acc1 = fmaf(x1.x, y.x, acc1);
            acc1 = fmaf(x1.y, y.y, acc1);
            acc1 = fmaf(x1.z, y.z, acc1);
            acc1 = fmaf(x1.w, y.w, acc1);
            acc2 = fmaf(x2.x, y.x, acc2);
            acc2 = fmaf(x2.y, y.y, acc2);
            acc2 = fmaf(x2.z, y.z, acc2);
            acc2 = fmaf(x2.w, y.w, acc2);
          }
        } else {
          for (int g = lane; g < groups; g += kWarp) {
            for (int t = 4 * g; t < 4 * g + 4 && t < dh; ++t) {
              const float y = __ldg(re + t);
              acc1 = fmaf(__ldg(l1 + e * dh + t), y, acc1);
              acc2 = fmaf(__ldg(l2 + e * dh + t), y, acc2);
            }
          }
        }
      }
      const float s1 = WarpSum(acc1), s2 = WarpSum(acc2);
      if (lane == 0) {
        keys[e * a.part_len + i] =
            has1 ? MakeKey(CleanScore(s1 * a.inv_sqrt), static_cast<int32_t>(c0 + i)) : 0;
        if (i2 < a.part_len) {
          keys[e * a.part_len + i2] =
              has2 ? MakeKey(CleanScore(s2 * a.inv_sqrt), static_cast<int32_t>(c0 + i2)) : 0;
        }
      }
    }
  }
  __syncthreads();

  // This range's top-K per head.
  for (int e = 0; e < heads; ++e) {
    const Key* ke = keys + e * a.part_len;
    BlockTopK(
        a.part_len, k, [&](int i, Key& x, int& xp) { x = ke[i]; }, pool, ppool, wbuf, wpbuf, s_top,
        nullptr);
    Key* out = a.partials + ((row * heads + e) * a.parts + part) * k;
    for (int j = threadIdx.x; j < k; j += kSelThreads) out[j] = s_top[j];
  }

  // Publish the lists, then count this block in; the row's last block merges.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    s_last = atomicAdd(&a.counters[row], 1u) == static_cast<unsigned>(a.parts - 1);
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();  // see every other block's lists

  for (int e = 0; e < heads; ++e) {
    // The head's lists into shared memory in one pass (one round trip to L2).
    const Key* src = a.partials + (row * heads + e) * a.parts * k;
    for (int i = threadIdx.x; i < a.parts * k; i += kSelThreads) keys[i] = __ldcg(src + i);
    __syncthreads();
    // A list whose head is not among the k best heads holds nothing of the row's top-K (k heads
    // beat all of it), so the k best of the k best heads' lists are the row's.
    BlockTopK(
        a.parts, k, [&](int p, Key& x, int& xp) { x = keys[p * k], xp = p; }, pool, ppool, wbuf,
        wpbuf, s_top, s_list);
    if (warp == 0) {
      Key best = 0;
      int pay = -1;
      for (int base = 0; base < k * k; base += kWarp) {
        const int q = base + lane;
        const int list = s_list[q < k * k ? q / k : 0];
        const Key x = q < k * k && list >= 0 ? keys[list * k + q % k] : 0;
        best = WarpTopKAdd(best, pay, x, -1, k, wbuf, wpbuf, lane);
      }
      const int nkept = __popc(__ballot_sync(kFullMask, lane < k && best != 0));
      if (lane < k) s_best[lane] = KeyCand(best);
      __syncwarp();
      FinishSelection(s_best, nkept, k, s_sorted, a.indices + (row * heads + e) * k,
                      a.weights + (row * heads + e) * k, lane);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) a.counters[row] = 0u;
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

// Staged partial lists [parts][k], the merged [k] and sorted [k] lists, a head per part, and the
// tournament's per-round state.
size_t MergeSmemBytes(int64_t parts, int k) {
  return static_cast<size_t>(parts + 2) * k * sizeof(Cand) +
         static_cast<size_t>(parts) * sizeof(int) + sizeof(TournamentSmem) + 16;
}

// The merge of a (row, head)'s partial lists by list-head tournament (prefill-shaped calls).
__global__ void __launch_bounds__(kMergeThreads)
    MergeKernel(const Cand* __restrict__ partials, int parts, int k, int32_t* __restrict__ indices,
                float* __restrict__ weights) {
  AllowDependentGrids();
  WaitForPriorGrids();
  extern __shared__ float4 smem4[];
  TournamentSmem& ts = *reinterpret_cast<TournamentSmem*>(smem4);
  Cand* cands = reinterpret_cast<Cand*>(smem4 + (sizeof(TournamentSmem) + 15) / 16);  // [parts][k]
  Cand* lists = cands + parts * k;                                                    // [k]
  Cand* sorted = lists + k;                                                           // [k]
  int* heads = reinterpret_cast<int*>(sorted + k);                                    // [parts]
  const int64_t rh = blockIdx.x;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const Cand* src = partials + rh * parts * k;
  for (int i = threadIdx.x; i < parts * k; i += kMergeThreads) cands[i] = src[i];
  __syncthreads();
  BlockTournament(cands, parts, k, lists, heads, ts);
  if (warp != 0) return;

  // lists[0, n) are the kept chunks, best first.
  int n = 0;
  while (n < k && lists[n].chunk != kNoChunk) ++n;
  FinishSelection(lists, n, k, sorted, indices + rh * k, weights + rh * k, lane);
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

  // Decode-shaped calls (few rows): one kernel scans, selects and merges (ScanSelectKernel).
  // Spread each row's chunks over enough (row, range) blocks to fill the GPU twice, at two to 128
  // chunks per warp.
  if (rows < kTiledMinRows && k <= kSelMaxK && rows <= Context::kCountersPerSlot) {
    const int64_t target = CeilDiv(kSelBlocksPerSm * sms, rows);
    const int64_t part_len =
        std::clamp<int64_t>(CeilDiv(max_chunks, target), kSelMinPart, kSelMaxPart);
    const int64_t parts = std::max<int64_t>(1, CeilDiv(max_chunks, part_len));
    const size_t smem = parts * k <= (1 << 20) ? SelectSmemBytes(nheads, static_cast<int>(part_len),
                                                                 static_cast<int>(parts), k)
                                               : SIZE_MAX;
    if (rows * parts <= INT32_MAX && smem <= ctx.max_shared_per_block) {
      ASSIGN_OR_RETURN(void* scratch,
                       ctx.Scratch(ScratchSlot::kRetrieval,
                                   static_cast<size_t>(rows * nheads * parts * k) * sizeof(Key)));
      SelectArgs a;
      a.r = r;
      a.mem = mem;
      a.dim = dim;
      a.heads = nheads;
      a.dh = dh;
      a.k = k;
      a.chunk_size = chunk_size;
      a.inv_sqrt = inv_sqrt;
      a.part_len = static_cast<int>(part_len);
      a.parts = static_cast<int>(parts);
      a.partials = static_cast<Key*>(scratch);
      a.counters = ctx.Counters(Context::CounterSlot::kRetrieval);
      a.indices = indices;
      a.weights = weights;
      RETURN_IF_ERROR(PrepareSmem(ctx, ScanSelectKernel, smem, "RetrieveChunks"));
      return Launch(ctx, ScanSelectKernel, static_cast<unsigned>(rows * parts), kSelThreads, smem,
                    a);
    }
  }

  // Prefill-shaped calls: 64-row tiles, then a merge kernel.
  const size_t tile_smem = TileSmemBytes(k);
  if (MergeSmemBytes(1, k) > ctx.max_shared_per_block || tile_smem > ctx.max_shared_per_block) {
    return absl::UnimplementedError(absl::StrCat("RetrieveChunks: top_k ", k, " is too large"));
  }
  const int64_t merge_cap = std::max<int64_t>(
      1, (static_cast<int64_t>(kMergeSmemTarget) - static_cast<int64_t>(MergeSmemBytes(0, k))) /
             static_cast<int64_t>(k * sizeof(Cand) + sizeof(int)));
  // Enough blocks for a few waves; ranges are whole 64-chunk tiles.
  const int64_t tiles = std::max<int64_t>(1, CeilDiv(max_chunks, kTileChunks));
  const int64_t row_tiles = CeilDiv(rows, kTileRows);
  int64_t parts = std::clamp<int64_t>(CeilDiv(4 * sms, row_tiles * nheads), 1, tiles);
  parts = std::min<int64_t>({parts, merge_cap, 65535});
  const int64_t part_len = CeilDiv(tiles, parts) * kTileChunks;
  parts = std::max<int64_t>(1, CeilDiv(max_chunks, part_len));
  if (row_tiles > INT32_MAX || nheads > 65535) {
    return absl::UnimplementedError("RetrieveChunks: grid too large");
  }

  const size_t partial_bytes = static_cast<size_t>(rows * nheads * parts * k) * sizeof(Cand);
  ASSIGN_OR_RETURN(void* scratch, ctx.Scratch(ScratchSlot::kRetrieval, partial_bytes));
  Cand* partials = static_cast<Cand*>(scratch);
  RETURN_IF_ERROR(PrepareSmem(ctx, ScanTilesKernel, tile_smem, "RetrieveChunks"));
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(parts),
                  static_cast<unsigned>(nheads));
  RETURN_IF_ERROR(Launch(ctx, ScanTilesKernel, grid, kTileThreads, tile_smem, r, rows, mem, dim,
                         nheads, dh, k, chunk_size, inv_sqrt, part_len, static_cast<int>(parts),
                         partials));

  const size_t merge_smem = MergeSmemBytes(parts, k);
  RETURN_IF_ERROR(PrepareSmem(ctx, MergeKernel, merge_smem, "RetrieveChunks"));
  return Launch(ctx, MergeKernel, static_cast<unsigned>(rows * nheads), kMergeThreads, merge_smem,
                partials, static_cast<int>(parts), k, indices, weights);
}

}  // namespace ramba::kernels::cuda
