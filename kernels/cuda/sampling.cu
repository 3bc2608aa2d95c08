// Token sampling, one thread block per row (greedy-only batches: several, GreedyKernel), matching
// kernels/cpu/sampling.cc token for token.
//
// Tokens are ranked by (logit descending, id ascending) as on the CPU, but nothing is sorted. Every
// question the sampler asks is "which token of the ranking is the first at which a cumulative
// weight reaches a threshold": the k-th token (weight 1: top-k, with min-p as a count of the tokens
// at or above its cut, and the last positive token), or the token where the cumulative probability
// mass reaches top_p * mass (top-p) or exceeds u * mass (the inverse CDF). Search() answers it by a
// radix select over 32-bit order-preserving keys of the logits: four passes of 8-bit digit
// histograms (count and mass per digit, highest digit first) narrow the answer to one logit value,
// and the tokens tied on that value are told apart by id. A pass costs O(vocab) whatever the
// distribution looks like, and a row takes about a dozen of them (the row stays in shared memory
// when it fits); once a top-k or top-p cut leaves few candidates, they are compacted into a short
// list and later passes run on it.
//
// Probabilities are exp((l - max) / T) in f32 as on the CPU, then held as fixed-point integers
// q = round(p * 2^S), with S chosen so that a whole row sums below 2^62. Integer sums are exact
// in any order, so histogram atomics are deterministic, and every cut is decided on exact
// cumulative sums. Those differ from the CPU's double sums by at most vocab^2 * 2^-62 of the mass
// (6e-10 for 50K tokens) plus expf's last-bit differences, so GPU and CPU disagree only when a
// uniform (or top_p) lands within rounding of a cumulative boundary, or a token's probability
// within rounding of min_p.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/ops.h"

namespace ramba::kernels::cuda {
namespace {

using Mass = unsigned long long;  // fixed-point probability mass (and counts, in shared state)

constexpr int kDigitBits = 8;
constexpr int kBins = 1 << kDigitBits;
constexpr int kLevels = 32 / kDigitBits;
constexpr int kBinsPerLane = kBins / 32;  // navigation: one warp scans the bins
// Histogram copies, picked by lane: lanes hitting one bin in the same instruction mostly update
// different words, so shared atomics on a few hot bins (flat distributions) serialise less.
constexpr int kReplicas = 4;
constexpr int kMaxThreads = 768;  // 80 registers a thread, no spills
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr size_t kMaxList = 4096;       // candidate list (key and id) capacity
constexpr size_t kMinList = 256;        // keep at least this much list room beside the row
constexpr int64_t kMaxVocab = 1 << 24;  // keeps S >= 38 (fixed-point resolution)
constexpr uint32_t kFullMask = 0xffffffffu;
constexpr uint32_t kNoBin = 0xffffffffu;

static_assert(kBins % 32 == 0 && kLevels * kDigitBits == 32, "digit layout");
static_assert(kMaxThreads % 32 == 0 && kMaxThreads >= kBins, "one thread per bin folds replicas");

// Per-row arguments, packed on the host.
struct RowArgs {
  float temperature;
  int32_t top_k;
  float top_p;
  float min_p;
  float uniform;
};

// Keys order like the CPU's Clean(logit): NaN counts as -inf and -0 ties with +0.
__device__ __forceinline__ uint32_t OrderedKey(float l) {
  if (l != l) l = -INFINITY;
  uint32_t b = __float_as_uint(l);
  if (b == 0x80000000u) b = 0;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float KeyToFloat(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Probability of a token from its key, the CPU's f32 arithmetic, and its fixed-point value.
struct Prob {
  float mx;
  float inv_t;
  float scale;  // 2^S
  bool mx_inf;  // +inf logits share all the mass
  __device__ __forceinline__ float P(uint32_t key) const {
    const float l = KeyToFloat(key);
    if (mx_inf) return l == INFINITY ? 1.0f : 0.0f;
    return expf(__fmul_rn(__fsub_rn(l, mx), inv_t));
  }
  // Exact scaling by a power of two, then round to an integer (NaN converts to 0).
  __device__ __forceinline__ Mass Q(uint32_t key) const {
    return __float2ull_rn(__fmul_rn(P(key), scale));
  }
};

// The tokens a pass iterates over: the whole row (keys in shared memory, or computed from global
// memory when the row does not fit) or a compacted list. Ids increase with the position.
struct View {
  const float* logits;   // the row, global memory
  const uint32_t* keys;  // shared memory keys, or null: compute from logits
  const uint32_t* ids;   // list ids, or null: id = position
  int n;
  __device__ __forceinline__ uint32_t Key(int i) const {
    return keys != nullptr ? keys[i] : OrderedKey(__ldg(logits + i));
  }
  __device__ __forceinline__ uint32_t Id(int i) const {
    return ids != nullptr ? ids[i] : static_cast<uint32_t>(i);
  }
};

enum class Goal : int { kCount, kTopP, kCdf };

// What Search looks for: the first ranked token at which the cumulative count reaches `count`
// (kCount), or the cumulative mass reaches top_p * mass (kTopP) or exceeds uniform * mass (kCdf).
struct Query {
  Goal goal;
  uint32_t count;
  float arg;        // top_p or the uniform
  Mass mass;        // mass of the kept set, when mass_known
  bool mass_known;  // else: the mass of all keys >= floor (only when nothing was cut yet)
  uint32_t floor;   // only keys >= floor take part (the kept set is a ranking prefix)
};

// Search state and result, shared; written by warp 0.
struct Nav {
  uint32_t prefix;      // key bits chosen so far; after the last level, the answer's key
  int found;            // 0: the threshold is above the kept weight (no crossing)
  Mass cnt_above;       // tokens (keys >= floor) ranked before every key with this prefix
  Mass mass_above;      // their mass (mass queries only)
  Mass mass;            // kept mass used for the threshold
  Mass thr;             // integer threshold on the cumulative weight
  Mass bin_cnt;         // tokens in the chosen bin (after the last level: ties on the key)
  uint32_t bin_min_id;  // lowest id in the chosen bin (last level)
};

// Shared memory. Dynamic: histograms, the candidate list and, when it fits, the row's keys.
// The regions sit at fixed offsets (the list's size, cap, is a launch argument), so addressing
// them costs no registers.
extern __shared__ __align__(16) unsigned char g_dyn[];
__shared__ Mass g_red[kMaxWarps];  // reduction scratch
__shared__ Nav g_nav;
__shared__ uint32_t g_result;

struct Smem {
  int cap;
  __device__ __forceinline__ Mass* hist_mass() const {  // [kBins * kReplicas]
    return reinterpret_cast<Mass*>(g_dyn);
  }
  __device__ __forceinline__ uint32_t* hist_cnt() const {  // [kBins * kReplicas]
    return reinterpret_cast<uint32_t*>(g_dyn + kBins * kReplicas * sizeof(Mass));
  }
  __device__ __forceinline__ uint32_t* min_id() const { return hist_cnt() + kBins * kReplicas; }
  __device__ __forceinline__ uint32_t* list_keys() const { return min_id() + kBins; }
  __device__ __forceinline__ uint32_t* list_ids() const { return list_keys() + cap; }
  __device__ __forceinline__ uint32_t* row_keys() const { return list_ids() + cap; }
  __device__ __forceinline__ Mass* red() const { return g_red; }
  __device__ __forceinline__ Nav* nav() const { return &g_nav; }
  __device__ __forceinline__ uint32_t* result() const { return &g_result; }
};

__device__ __forceinline__ Mass WarpInclusiveScan(Mass v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const Mass y = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += y;
  }
  return v;
}

// Block-wide sum / max; every thread gets the result. Ends with a barrier, so `red` is free again.
__device__ Mass BlockSum(Mass v, const Smem& sm) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  if ((threadIdx.x & 31) == 0) sm.red()[threadIdx.x >> 5] = v;
  __syncthreads();
  Mass s = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) s += sm.red()[w];
  __syncthreads();
  return s;
}

__device__ Mass BlockMax(Mass v, const Smem& sm) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, o));
  if ((threadIdx.x & 31) == 0) sm.red()[threadIdx.x >> 5] = v;
  __syncthreads();
  Mass m = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) m = max(m, sm.red()[w]);
  __syncthreads();
  return m;
}

// Exclusive prefix sum over threads in thread order; *total gets the sum. Ends with a barrier.
__device__ uint32_t BlockExclusiveScan(uint32_t v, const Smem& sm, uint32_t* total) {
  const int warp = threadIdx.x >> 5;
  const Mass incl = WarpInclusiveScan(v);
  if ((threadIdx.x & 31) == 31) sm.red()[warp] = incl;
  __syncthreads();
  Mass before = 0, sum = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) {
    if (w < warp) before += sm.red()[w];
    sum += sm.red()[w];
  }
  __syncthreads();
  *total = static_cast<uint32_t>(sum);
  return static_cast<uint32_t>(before + incl - v);
}

// Each thread's contiguous slice of [0, n), so that thread order is position order.
__device__ __forceinline__ void ThreadSlice(int n, int* begin, int* end) {
  const int64_t chunk = (static_cast<int64_t>(n) + blockDim.x - 1) / blockDim.x;
  const int64_t b = threadIdx.x * chunk;
  *begin = static_cast<int>(b < n ? b : n);
  *end = static_cast<int>(b + chunk < n ? b + chunk : n);
}

// Integer threshold on the cumulative weight (cum is an integer, so ">= x" is ">= ceil(x)" and
// "> x" is ">= floor(x) + 1"), with the CPU's clamps.
__device__ Mass Threshold(const Query& q, Mass mass) {
  if (q.goal == Goal::kCount) return q.count;
  if (q.goal == Goal::kTopP) {
    const double t = ceil(static_cast<double>(fmaxf(q.arg, 0.0f)) * static_cast<double>(mass));
    return t < 1.0 ? 1 : static_cast<Mass>(t);  // the CPU keeps at least one token
  }
  double u = q.arg;
  if (u < 0.0) u = 0.0;
  Mass t = mass;  // u >= 1 or NaN: nothing exceeds u * mass, the CPU falls back
  if (u < 1.0) t = min(static_cast<Mass>(floor(u * static_cast<double>(mass))), mass);
  return t + 1;
}

__device__ __forceinline__ void FlushRun(const Smem& sm, uint32_t bin, uint32_t cnt, Mass mass,
                                         uint32_t min_id, bool with_mass, bool last) {
  if (cnt == 0) return;
  const int slot = static_cast<int>(bin) * kReplicas + (threadIdx.x & (kReplicas - 1));
  atomicAdd(&sm.hist_cnt()[slot], cnt);
  if (with_mass) atomicAdd(&sm.hist_mass()[slot], mass);
  if (last) atomicMin(&sm.min_id()[bin], min_id);
}

// Warp 0: finds the bin, in descending key order, in which the cumulative weight reaches the
// threshold, and stores the updated state in g_nav. `nav` is the previous level's state.
__device__ void Navigate(const Smem& sm, const Query& q, int level, Nav nav) {
  const int lane = threadIdx.x;
  const bool by_mass = q.goal != Goal::kCount;
  const int hi = kBins - 1 - lane * kBinsPerLane;  // this lane's bins: hi, hi - 1, ...
  Mass lc = 0, lm = 0;
  for (int t = 0; t < kBinsPerLane; ++t) {
    lc += sm.hist_cnt()[(hi - t) * kReplicas];
    lm += sm.hist_mass()[(hi - t) * kReplicas];
  }
  const Mass ic = WarpInclusiveScan(lc);
  const Mass im = WarpInclusiveScan(lm);
  if (level == 0) {
    const Mass total_cnt = __shfl_sync(kFullMask, ic, 31);
    const Mass total_mass = __shfl_sync(kFullMask, im, 31);
    nav.prefix = 0;
    nav.cnt_above = 0;
    nav.mass_above = 0;
    nav.mass = q.mass_known ? q.mass : total_mass;
    nav.thr = Threshold(q, nav.mass);
    nav.found = nav.thr >= 1 && nav.thr <= (by_mass ? nav.mass : total_cnt);
  }
  const Mass lw = by_mass ? lm : lc;
  const Mass iw = by_mass ? im : ic;
  // The invariant weight_above < thr <= weight_above + weight(prefix range) gives need >= 1.
  const Mass need = nav.found ? nav.thr - (by_mass ? nav.mass_above : nav.cnt_above) : 0;
  const unsigned hit = __ballot_sync(kFullMask, nav.found && need >= 1 && iw >= need);
  if (hit == 0) {
    if (lane == 0) {
      nav.found = 0;
      *sm.nav() = nav;
    }
    return;
  }
  if (lane == __ffs(hit) - 1) {
    Mass cw = iw - lw, cc = ic - lc, cm = im - lm;
    int bin = hi;
    Mass bc = 0, bm = 0;
    for (int t = 0; t < kBinsPerLane; ++t) {
      bin = hi - t;
      bc = sm.hist_cnt()[bin * kReplicas];
      bm = sm.hist_mass()[bin * kReplicas];
      const Mass bw = by_mass ? bm : bc;
      if (cw + bw >= need) break;
      cw += bw;
      cc += bc;
      cm += bm;
    }
    nav.prefix = (nav.prefix << kDigitBits) | static_cast<uint32_t>(bin);
    nav.cnt_above += cc;
    nav.mass_above += cm;
    nav.bin_cnt = bc;
    nav.bin_min_id = sm.min_id()[bin];
    *sm.nav() = nav;
  }
}

// Radix select (see the file comment). Called by the whole block; the result is block-uniform.
// On success the answer's key is nav.prefix; the tokens before it in the ranking are the
// nav.cnt_above tokens with larger keys plus lower-id ties.
__device__ Nav Search(const View& v, const Prob& prob, const Query& q, const Smem& sm) {
  const int tid = threadIdx.x;
  const bool with_mass = q.goal != Goal::kCount;
  Nav nav{};
  for (int level = 0; level < kLevels; ++level) {
    const int shift = 32 - kDigitBits * (level + 1);
    const bool last = level == kLevels - 1;
    for (int i = tid; i < kBins * kReplicas; i += blockDim.x) {
      sm.hist_cnt()[i] = 0;
      sm.hist_mass()[i] = 0;
    }
    for (int i = tid; i < kBins; i += blockDim.x) sm.min_id()[i] = 0xffffffffu;
    __syncthreads();
    // Histogram of this level's digit over the keys in the current prefix range. Runs of equal
    // digits (common in flat or peaked rows) are merged in registers before the atomics.
    uint32_t run_bin = kNoBin, run_cnt = 0, run_min = 0;
    Mass run_mass = 0;
    for (int i = tid; i < v.n; i += blockDim.x) {
      const uint32_t key = v.Key(i);
      if (key < q.floor) continue;
      if (level > 0 && (key >> (shift + kDigitBits)) != nav.prefix) continue;
      const uint32_t bin = (key >> shift) & (kBins - 1);
      if (bin != run_bin) {
        FlushRun(sm, run_bin, run_cnt, run_mass, run_min, with_mass, last);
        run_bin = bin;
        run_cnt = 0;
        run_mass = 0;
        run_min = v.Id(i);  // ids increase along a thread's positions
      }
      ++run_cnt;
      if (with_mass) run_mass += prob.Q(key);
    }
    FlushRun(sm, run_bin, run_cnt, run_mass, run_min, with_mass, last);
    __syncthreads();
    if (tid < kBins) {  // fold the replicas into copy 0 (blockDim.x >= kBins)
      uint32_t c = 0;
      Mass m = 0;
      for (int r = 0; r < kReplicas; ++r) {
        c += sm.hist_cnt()[tid * kReplicas + r];
        m += sm.hist_mass()[tid * kReplicas + r];
      }
      sm.hist_cnt()[tid * kReplicas] = c;
      sm.hist_mass()[tid * kReplicas] = m;
    }
    __syncthreads();
    if (tid < 32) Navigate(sm, q, level, nav);
    __syncthreads();
    nav = *sm.nav();
    if (!nav.found) break;
  }
  return nav;
}

// 1-based position j among the tokens tied on the found key (ids ascending) that the threshold
// selects; the tokens of the key all have the same weight.
__device__ Mass TieIndex(const Nav& f, const Query& q, const Prob& prob) {
  if (q.goal == Goal::kCount) return f.thr - f.cnt_above;
  const Mass w = prob.Q(f.prefix);
  if (w == 0) return 1;  // cannot happen: the chosen bin had positive mass
  return (f.thr - f.mass_above + w - 1) / w;
}

// Id of the j-th (1-based) token of the view whose key is `key`, in id order.
__device__ uint32_t NthTie(const View& v, uint32_t key, Mass j, const Smem& sm) {
  if (threadIdx.x == 0) *sm.result() = 0;  // published by the scan's barrier
  int begin, end;
  ThreadSlice(v.n, &begin, &end);
  uint32_t c = 0;
  for (int i = begin; i < end; ++i) c += v.Key(i) == key;
  uint32_t total;
  const uint32_t before = BlockExclusiveScan(c, sm, &total);
  if (before < j && j <= static_cast<Mass>(before) + c) {
    Mass left = j - before;
    for (int i = begin; i < end; ++i) {
      if (v.Key(i) == key && --left == 0) {
        *sm.result() = v.Id(i);
        break;
      }
    }
  }
  __syncthreads();
  const uint32_t id = *sm.result();
  __syncthreads();
  return id;
}

// The token a successful search selects.
__device__ uint32_t TokenOf(const View& v, const Nav& f, const Query& q, const Prob& prob,
                            const Smem& sm) {
  const Mass j = TieIndex(f, q, prob);
  return j <= 1 ? f.bin_min_id : NthTie(v, f.prefix, j, sm);
}

// Copies the tokens with key >= floor, in id order, to the list; returns how many.
__device__ int Compact(const View& v, uint32_t floor, int cap, const Smem& sm) {
  int begin, end;
  ThreadSlice(v.n, &begin, &end);
  uint32_t c = 0;
  for (int i = begin; i < end; ++i) c += v.Key(i) >= floor;
  uint32_t total;
  uint32_t pos = BlockExclusiveScan(c, sm, &total);
  for (int i = begin; i < end; ++i) {
    const uint32_t key = v.Key(i);
    if (key < floor) continue;
    if (pos < static_cast<uint32_t>(cap)) {
      sm.list_keys()[pos] = key;
      sm.list_ids()[pos] = v.Id(i);
    }
    ++pos;
  }
  __syncthreads();
  return static_cast<int>(min(total, static_cast<uint32_t>(cap)));
}

// Mass of the tokens with key > `key`.
__device__ Mass MassAbove(const View& v, const Prob& prob, uint32_t key, const Smem& sm) {
  Mass s = 0;
  for (int i = threadIdx.x; i < v.n; i += blockDim.x) {
    const uint32_t k = v.Key(i);
    if (k > key) s += prob.Q(k);
  }
  return BlockSum(s, sm);
}

// The smallest key whose probability reaches min_p (the most likely token's, P == 1, does), by
// one thread's binary search over the key space: P does not decrease with the key, so min-p keeps
// the tokens with key >= the result, a ranking prefix. No pass over the row.
__device__ uint32_t MinPKey(const Prob& prob, float min_p, const Smem& sm) {
  if (threadIdx.x == 0) {
    uint32_t lo = 0, hi = OrderedKey(prob.mx);
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (prob.P(mid) >= min_p) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    *sm.result() = lo;
  }
  __syncthreads();
  const uint32_t key = *sm.result();
  __syncthreads();
  return key;
}

// Number of tokens with key >= floor.
__device__ Mass CountFrom(const View& v, uint32_t floor, const Smem& sm) {
  Mass c = 0;
  for (int i = threadIdx.x; i < v.n; i += blockDim.x) c += v.Key(i) >= floor;
  return BlockSum(c, sm);
}

// Number of tokens with key >= floor and p > 0.
__device__ Mass CountPositive(const View& v, const Prob& prob, uint32_t floor, const Smem& sm) {
  Mass c = 0;
  for (int i = threadIdx.x; i < v.n; i += blockDim.x) {
    const uint32_t k = v.Key(i);
    c += k >= floor && prob.P(k) > 0.0f;
  }
  return BlockSum(c, sm);
}

// f(i, logit) for every i < n: a block reads a whole row (50K logits for the 370M vocab), so
// each thread issues kLoadsInFlight loads before using any; one dependent L2 round trip per
// element cost ~33 us per decode step. (More loads in flight, or 16-byte ones, make ptxas spill
// within the kernel's 80 registers.)
constexpr int kLoadsInFlight = 8;
template <typename F>
__device__ __forceinline__ void ForEachLogit(const float* __restrict__ row, int n, F f) {
  const int stride = blockDim.x;
  for (int base = threadIdx.x; base < n; base += kLoadsInFlight * stride) {
    float v[kLoadsInFlight];
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      const int i = base + u * stride;
      v[u] = i < n ? __ldg(row + i) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      const int i = base + u * stride;
      if (i < n) f(i, v[u]);
    }
  }
}

__global__ void __launch_bounds__(kMaxThreads, 1)
    SampleKernel(const float* __restrict__ logits, int vocab, const RowArgs* __restrict__ args,
                 int32_t* __restrict__ out, int cap, int keys_in_smem, float scale) {
  AllowDependentGrids();
  WaitForPriorGrids();
  const Smem sm{cap};
  uint32_t* row_keys = keys_in_smem ? sm.row_keys() : nullptr;

  const int tid = threadIdx.x;
  const int row = blockIdx.x;
  const float* lrow = logits + static_cast<int64_t>(row) * vocab;
  const RowArgs a = args[row];

  if (!(a.temperature > 0.0f)) {
    // Greedy: the largest (key, -id).
    Mass best = 0;
    ForEachLogit(lrow, vocab, [&](int i, float x) {
      best = max(best, (static_cast<Mass>(OrderedKey(x)) << 32) |
                           (0xffffffffu - static_cast<uint32_t>(i)));
    });
    best = BlockMax(best, sm);
    if (tid == 0) out[row] = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(best));
    return;
  }

  uint32_t max_key = 0;
  ForEachLogit(lrow, vocab, [&](int i, float x) {
    const uint32_t key = OrderedKey(x);
    if (row_keys != nullptr) row_keys[i] = key;
    max_key = max(max_key, key);
  });
  max_key = static_cast<uint32_t>(BlockMax(max_key, sm));  // its barrier publishes row_keys
  if (max_key == OrderedKey(-INFINITY)) {  // every logit -inf or NaN: the CPU's argmax is 0
    if (tid == 0) out[row] = 0;
    return;
  }
  Prob prob;
  prob.mx = KeyToFloat(max_key);
  prob.mx_inf = prob.mx == INFINITY;
  prob.inv_t = __frcp_rn(a.temperature);  // == 1.0f / T, correctly rounded
  prob.scale = scale;

  View view{lrow, row_keys, nullptr, vocab};
  bool compacted = false;
  // After a cut, continue on a list of the tokens with key >= floor when they fit.
  auto maybe_compact = [&](uint32_t floor, Mass n_ge) {
    if (compacted || n_ge > static_cast<Mass>(cap)) return;
    const int n = Compact(view, floor, cap, sm);
    view = View{lrow, sm.list_keys(), sm.list_ids(), n};
    compacted = true;
  };

  uint32_t floor = 0;  // the kept set is the ranking prefix of `kept` tokens, all keys >= floor
  Mass kept = static_cast<Mass>(vocab);
  Mass mass = 0;
  bool mass_known = false;

  // Top-k and min-p both keep a ranking prefix, so together they keep the shorter one: min-p's is
  // the tokens with key >= its cut, all ties included.
  Mass top = a.top_k > 0 && a.top_k < vocab ? static_cast<Mass>(a.top_k) : kept;
  if (a.min_p > 0.0f) top = min(top, CountFrom(view, MinPKey(prob, a.min_p, sm), sm));
  if (top < kept) {
    const Query q{Goal::kCount, static_cast<uint32_t>(top), 0.0f, 0, false, 0};
    const Nav f = Search(view, prob, q, sm);  // always found: top < vocab
    kept = top;
    floor = f.prefix;
    maybe_compact(floor, f.cnt_above + f.bin_cnt);
    const Mass j = TieIndex(f, q, prob);
    mass = MassAbove(view, prob, f.prefix, sm) + j * prob.Q(f.prefix);
    mass_known = true;
  }

  if (a.top_p < 1.0f) {
    const Query q{Goal::kTopP, 0, a.top_p, mass, mass_known, floor};
    const Nav f = Search(view, prob, q, sm);
    mass = f.mass;
    mass_known = true;
    if (f.found) {  // else (zero mass) nothing is cut
      const Mass j = TieIndex(f, q, prob);
      kept = f.cnt_above + j;
      mass = f.mass_above + j * prob.Q(f.prefix);
      floor = f.prefix;
      maybe_compact(floor, f.cnt_above + f.bin_cnt);
    }
  }

  const Query q{Goal::kCdf, 0, a.uniform, mass, mass_known, floor};
  const Nav f = Search(view, prob, q, sm);
  uint32_t token;
  if (f.found) {
    token = TokenOf(view, f, q, prob, sm);
  } else {
    // The CPU's walk found no crossing (u == 1): it returns the last kept token with p > 0.
    // Probabilities do not increase along the ranking, so that is the token of rank
    // min(kept, #positive).
    const Mass positive = CountPositive(view, prob, floor, sm);
    const Mass rank = positive < 1 ? 1 : min(kept, positive);
    const Query qr{Goal::kCount, static_cast<uint32_t>(rank), 0.0f, 0, false, floor};
    const Nav g = Search(view, prob, qr, sm);
    token = g.found ? TokenOf(view, g, qr, prob, sm) : 0;
  }
  if (tid == 0) out[row] = static_cast<int32_t>(token);
}

// Greedy-only batches: a row's logits split over kGreedyBlocks-sized pieces, a block each, so the
// row is read with all loads in flight at once rather than by one block in ~8 dependent rounds
// (the one-block kernel took ~15 us per batch-1 decode step on an H100, Nsight Compute). Each
// block folds its piece's best (key, -id) into the row's 64-bit slot with atomicMax (the maximum
// does not depend on the order), then counts itself in; the row's last block writes the token
// and clears the slot and the count for the next call.
constexpr int kGreedyThreads = 256;
constexpr int kGreedyPerThread = 16;
constexpr int kGreedyPiece = kGreedyThreads * kGreedyPerThread;

__global__ void __launch_bounds__(kGreedyThreads)
    GreedyKernel(const float* __restrict__ logits, int vocab, int pieces, Mass* best_slots,
                 unsigned* counters, int32_t* __restrict__ out) {
  AllowDependentGrids();
  WaitForPriorGrids();
  __shared__ Mass s_best[kGreedyThreads / 32];
  const int row = blockIdx.x / pieces, piece = blockIdx.x % pieces;
  const float* lrow = logits + static_cast<int64_t>(row) * vocab;
  const int first = piece * kGreedyPiece + threadIdx.x;
  float v[kGreedyPerThread];
#pragma unroll
  for (int u = 0; u < kGreedyPerThread; ++u) {
    const int i = first + u * kGreedyThreads;
    v[u] = i < vocab ? __ldg(lrow + i) : 0.0f;
  }
  Mass best = 0;
#pragma unroll
  for (int u = 0; u < kGreedyPerThread; ++u) {
    const int i = first + u * kGreedyThreads;
    if (i < vocab) {
      best = max(best, (static_cast<Mass>(OrderedKey(v[u])) << 32) |
                           (0xffffffffu - static_cast<uint32_t>(i)));
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) best = max(best, __shfl_xor_sync(kFullMask, best, o));
  if (threadIdx.x % 32 == 0) s_best[threadIdx.x / 32] = best;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kGreedyThreads / 32; ++w) best = max(best, s_best[w]);
  atomicMax(best_slots + row, best);
  // acq_rel: releases this block's maximum, acquires those of the blocks counted before.
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;"
               : "=r"(old)
               : "l"(counters + row)
               : "memory");
  if (old != static_cast<unsigned>(pieces - 1)) return;
  const Mass all = atomicExch(best_slots + row, Mass{0});  // read and clear in one step
  out[row] = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(all));
  counters[row] = 0u;
}

// Backend::TokenLogprobs: a block per row. Each thread keeps a running (max, sum of exp(x -
// max)) over its strided share of the row, loading kLogprobPerThread values at once (one at a
// time, a 50K row took ~20 us of load latency), then the block merges them in a fixed order
// (deterministic); the sum is in f32 against the CPU's double, ~1e-6 relative.
constexpr int kLogprobThreads = 512;
constexpr int kLogprobPerThread = 16;

__device__ __forceinline__ void MergeLse(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;  // both empty
  s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
  m = mx;
}

// The row's max m and log of sum(exp(x - m)), for every thread of the block (kLogprobThreads);
// with thread_max, also the max over the thread's own share (x[threadIdx.x + k *
// kLogprobThreads], NaN left out; -inf when none).
__device__ __forceinline__ void BlockLogSumExp(const float* __restrict__ x, int vocab, float* max,
                                               float* log_sum, float* thread_max = nullptr) {
  __shared__ float ms[kLogprobThreads / 32], ss[kLogprobThreads / 32];
  __shared__ float result[2];
  float m = -INFINITY, s = 0.0f;
  for (int base = 0; base < vocab; base += kLogprobThreads * kLogprobPerThread) {
    float v[kLogprobPerThread];
#pragma unroll
    for (int u = 0; u < kLogprobPerThread; ++u) {
      const int i = base + u * kLogprobThreads + threadIdx.x;
      v[u] = i < vocab ? __ldg(x + i) : -INFINITY;
    }
#pragma unroll
    for (int u = 0; u < kLogprobPerThread; ++u) {
      if (v[u] > m) {
        s = s * __expf(m - v[u]) + 1.0f;
        m = v[u];
      } else if (v[u] != -INFINITY) {  // (-inf - -inf would make the sum NaN)
        s += __expf(v[u] - m);
      }
    }
  }
  if (thread_max != nullptr) *thread_max = m;
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kFullMask, m, o), s2 = __shfl_xor_sync(kFullMask, s, o);
    MergeLse(m, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) ms[warp] = m, ss[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    m = ms[0], s = ss[0];
    for (int w = 1; w < kLogprobThreads / 32; ++w) MergeLse(m, s, ms[w], ss[w]);
    result[0] = m;
    result[1] = logf(s);
  }
  __syncthreads();
  *max = result[0];
  *log_sum = result[1];
}

__global__ void __launch_bounds__(kLogprobThreads)
    TokenLogprobsKernel(const float* __restrict__ logits, int vocab,
                        const int32_t* __restrict__ tokens, float* __restrict__ out) {
  WaitForPriorGrids();
  AllowDependentGrids();
  const int row = blockIdx.x;
  const float* x = logits + static_cast<int64_t>(row) * vocab;
  float m, log_s;
  BlockLogSumExp(x, vocab, &m, &log_s);
  if (threadIdx.x != 0) return;
  const int32_t token = tokens[row];
  out[row] = token < 0 || token >= vocab ? __int_as_float(0x7fc00000) : x[token] - m - log_s;
}

// Orders tokens by (logit descending, id ascending): true when (v, i) comes before (w, j).
__device__ __forceinline__ bool RanksBefore(float v, int i, float w, int j) {
  return v > w || (v == w && i < j);
}

__device__ __forceinline__ float NanAsNegInf(float v) { return v != v ? -INFINITY : v; }

// The block's best (value, id) of every thread's (v, i), by RanksBefore; (-inf, INT_MAX) offers
// nothing. Every thread gets the result. Two barriers.
__device__ __forceinline__ void BlockPick(float v, int i, float* pick_v, int* pick_i) {
  __shared__ float warp_v[kLogprobThreads / 32];
  __shared__ int warp_i[kLogprobThreads / 32];
  __shared__ float best_v;
  __shared__ int best_i;
  for (int o = 16; o > 0; o >>= 1) {
    const float v2 = __shfl_xor_sync(kFullMask, v, o);
    const int i2 = __shfl_xor_sync(kFullMask, i, o);
    if (RanksBefore(v2, i2, v, i)) v = v2, i = i2;
  }
  if (threadIdx.x % 32 == 0) warp_v[threadIdx.x / 32] = v, warp_i[threadIdx.x / 32] = i;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kLogprobThreads / 32; ++w) {
      if (RanksBefore(warp_v[w], warp_i[w], v, i)) v = warp_v[w], i = warp_i[w];
    }
    best_v = v;
    best_i = i;
  }
  __syncthreads();
  *pick_v = best_v;
  *pick_i = best_i;
}

// The n best of `count` entries get(j) -> (value, id) in n rounds, each taking the best entry
// ranked after the last one taken; thread 0 writes round k's id to ids[k] and its logprob.
template <class Get>
__device__ __forceinline__ void PickBest(int count, Get get, int n, const float* x, float m,
                                         float log_s, int32_t* ids, float* out) {
  float last_v = INFINITY;  // before the first round everything ranks after (+inf, -1)
  int last_i = -1;
  for (int k = 0; k < n; ++k) {
    float bv = -INFINITY;
    int bi = INT_MAX;
    for (int j = threadIdx.x; j < count; j += kLogprobThreads) {
      const auto [v, i] = get(j);
      if (RanksBefore(last_v, last_i, v, i) && RanksBefore(v, i, bv, bi)) bv = v, bi = i;
    }
    BlockPick(bv, bi, &last_v, &last_i);
    if (threadIdx.x == 0) {
      ids[k] = last_i;
      out[k] = x[last_i] - m - log_s;
    }
  }
}

// Sorts the warp's 32 (v, i) pairs by RanksBefore (bitonic, through shuffles): lane k ends with
// the k-th.
__device__ __forceinline__ void WarpSortRanked(float& v, int& i) {
  const int lane = threadIdx.x % 32;
  for (int size = 2; size <= 32; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      const float v2 = __shfl_xor_sync(kFullMask, v, stride);
      const int i2 = __shfl_xor_sync(kFullMask, i, stride);
      // Runs of `size` alternate direction; within a pair the lower lane of an ascending run
      // keeps the pair's first.
      const bool keep_first = ((lane & stride) == 0) == ((lane & size) == 0);
      if (keep_first ? RanksBefore(v2, i2, v, i) : RanksBefore(v, i, v2, i2)) v = v2, i = i2;
    }
  }
}

constexpr int kTopCandidates = 4096;
// Up to this many candidates are ordered by counting, each against all: one barrier, where the
// n selection rounds take two per round.
constexpr int kRankedCandidates = 1024;

// One block per row: the log-sum-exp, and in the same pass each thread's own max; a threshold T,
// the n-th best of those maxima (n distinct tokens reach it, so the row's n best all do: each
// warp sorts its lanes' maxima, the n-th best of the warps' n best is found by counting); the
// tokens >= T gathered in shared memory (a few dozen unless the row is flat), each placed by
// counting the candidates ranked before it. A row with more than kRankedCandidates candidates
// takes n selection rounds over them, one with more than kTopCandidates over the whole row.
__global__ void __launch_bounds__(kLogprobThreads)
    TopLogprobsKernel(const float* __restrict__ logits, int vocab, int n, int32_t* __restrict__ ids,
                      float* __restrict__ out) {
  constexpr int kWarps = kLogprobThreads / 32;
  __shared__ float cand_v[kTopCandidates];
  __shared__ int cand_i[kTopCandidates];
  __shared__ float warp_best_v[kWarps * Backend::kMaxTopLogprobs];
  __shared__ int warp_best_i[kWarps * Backend::kMaxTopLogprobs];
  __shared__ int num_cand;
  __shared__ float threshold;
  WaitForPriorGrids();
  AllowDependentGrids();
  const int row = blockIdx.x;
  const float* x = logits + static_cast<int64_t>(row) * vocab;
  ids += static_cast<int64_t>(row) * n;
  out += static_cast<int64_t>(row) * n;
  float m, log_s, own_max;
  BlockLogSumExp(x, vocab, &m, &log_s, &own_max);
  // T: the n-th best (max, thread) pair.
  float v = own_max;
  int i = static_cast<int>(threadIdx.x);
  WarpSortRanked(v, i);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane < n) warp_best_v[warp * n + lane] = v, warp_best_i[warp * n + lane] = i;
  if (threadIdx.x == 0) num_cand = 0;
  __syncthreads();
  if (threadIdx.x < kWarps * n) {
    const float tv = warp_best_v[threadIdx.x];
    const int ti = warp_best_i[threadIdx.x];
    int before = 0;
    for (int k = 0; k < kWarps * n; ++k) {
      before += RanksBefore(warp_best_v[k], warp_best_i[k], tv, ti);
    }
    if (before == n - 1) threshold = tv;
  }
  __syncthreads();
  const float t = threshold;
  for (int j = threadIdx.x; j < vocab; j += kLogprobThreads) {
    const float xv = NanAsNegInf(__ldg(x + j));
    if (xv >= t) {
      const int slot = atomicAdd(&num_cand, 1);
      if (slot < kTopCandidates) cand_v[slot] = xv, cand_i[slot] = j;
    }
  }
  __syncthreads();
  const int count = num_cand;
  if (count <= kRankedCandidates) {
    for (int j = threadIdx.x; j < count; j += kLogprobThreads) {
      const float cv = cand_v[j];
      const int ci = cand_i[j];
      int before = 0;
      for (int k = 0; k < count; ++k) before += RanksBefore(cand_v[k], cand_i[k], cv, ci);
      if (before < n) ids[before] = ci, out[before] = x[ci] - m - log_s;
    }
  } else if (count <= kTopCandidates) {
    PickBest(count, [&](int j) { return std::pair<float, int>(cand_v[j], cand_i[j]); }, n, x, m,
             log_s, ids, out);
  } else {
    PickBest(vocab, [&](int j) { return std::pair<float, int>(NanAsNegInf(x[j]), j); }, n, x, m,
             log_s, ids, out);
  }
}

int CeilLog2(int64_t v) {
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

}  // namespace

// One logit under PenaltyParams' rule, rounded as kernels/cpu/ops.h's AdjustedLogit (the
// intrinsics keep nvcc from contracting into an FMA), so both backends agree to the bit.
__device__ __forceinline__ float AdjustedLogit(float l, int32_t count, float bias,
                                               const PenaltyParams& p) {
  l = __fadd_rn(l, bias);
  if (p.hold_back && (count & PenaltyParams::kHeldBackBit) != 0) return -INFINITY;
  const int32_t c = count & PenaltyParams::kGeneratedMask;
  if (c > 0 || (count & PenaltyParams::kPromptTokenBit) != 0) {
    l = l > 0.0f ? __fdiv_rn(l, p.repetition) : __fmul_rn(l, p.repetition);
  }
  if (c > 0) l = __fsub_rn(l, __fadd_rn(__fmul_rn(p.frequency, static_cast<float>(c)), p.presence));
  return l;
}

constexpr int kPenaltyThreads = 256;
constexpr int kPenaltyPerThread = 4;

// A small batch's parameters travel as a kernel argument, so the op needs no upload (a copy on
// the stream ahead of it, ~2-3 us at batch 1); larger ones are uploaded.
struct PenaltyRows {
  static constexpr int kInline = 16;
  PenaltyParams inline_rows[kInline];
  const PenaltyParams* uploaded;  // rows > kInline
  __device__ __forceinline__ const PenaltyParams& operator[](int64_t r) const {
    return uploaded != nullptr ? uploaded[r] : inline_rows[r];
  }
};

absl::StatusOr<PenaltyRows> StagePenaltyRows(Context& ctx, ScratchSlot slot,
                                             const PenaltyParams* params, int64_t rows) {
  PenaltyRows p{};
  if (rows <= PenaltyRows::kInline) {
    std::copy(params, params + rows, p.inline_rows);
    return p;
  }
  ASSIGN_OR_RETURN(void* dev, ctx.UploadScratch(slot, params,
                                                static_cast<size_t>(rows) * sizeof(PenaltyParams)));
  p.uploaded = static_cast<const PenaltyParams*>(dev);
  return p;
}

// Grid (pieces of kPenaltyThreads * kPenaltyPerThread logits, rows).
__global__ void __launch_bounds__(kPenaltyThreads)
    ApplyPenaltiesKernel(const float* __restrict__ logits, int vocab, const PenaltyRows params,
                         float* __restrict__ out) {
  WaitForPriorGrids();
  AllowDependentGrids();
  const int64_t row = blockIdx.y;
  const PenaltyParams p = params[row];
  const float* x = logits + row * vocab;
  float* y = out + row * vocab;
  const int base = blockIdx.x * kPenaltyThreads * kPenaltyPerThread;
#pragma unroll
  for (int u = 0; u < kPenaltyPerThread; ++u) {
    const int i = base + u * kPenaltyThreads + threadIdx.x;
    if (i >= vocab) break;
    const float l = __ldg(x + i);
    y[i] = p.counts == nullptr && p.bias == nullptr
               ? l
               : AdjustedLogit(l, p.counts != nullptr ? p.counts[i] : 0,
                               p.bias != nullptr ? __ldg(p.bias + i) : 0.0f, p);
  }
}

__global__ void CountTokensKernel(const PenaltyRows params, int rows, int vocab,
                                  const int32_t* __restrict__ tokens) {
  WaitForPriorGrids();
  AllowDependentGrids();
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const int32_t t = tokens[r];
  int32_t* counts = params[r].counts;
  if (counts != nullptr && t >= 0 && t < vocab) atomicAdd(counts + t, 1);
}

absl::Status ApplyPenalties(Context& ctx, const float* logits, int64_t rows, int64_t vocab,
                            const PenaltyParams* params, float* out) {
  if (rows == 0) return absl::OkStatus();
  if (rows > 65535 || vocab > INT32_MAX) {
    return absl::InvalidArgumentError("ApplyPenalties: too many rows or too large a vocab");
  }
  ASSIGN_OR_RETURN(const PenaltyRows p,
                   StagePenaltyRows(ctx, ScratchSlot::kPenalties, params, rows));
  constexpr int kPiece = kPenaltyThreads * kPenaltyPerThread;
  const dim3 grid(static_cast<unsigned>((vocab + kPiece - 1) / kPiece),
                  static_cast<unsigned>(rows));
  return Launch(ctx, ApplyPenaltiesKernel, grid, kPenaltyThreads, 0, logits,
                static_cast<int>(vocab), p, out);
}

absl::Status CountTokens(Context& ctx, const PenaltyParams* params, int64_t rows, int64_t vocab,
                         const int32_t* tokens) {
  if (rows == 0) return absl::OkStatus();
  if (rows > INT32_MAX || vocab > INT32_MAX) {
    return absl::InvalidArgumentError("CountTokens: too many rows or too large a vocab");
  }
  ASSIGN_OR_RETURN(const PenaltyRows p,
                   StagePenaltyRows(ctx, ScratchSlot::kPenaltyCounts, params, rows));
  constexpr int kThreads = 128;
  return Launch(ctx, CountTokensKernel, static_cast<unsigned>((rows + kThreads - 1) / kThreads),
                kThreads, 0, p, static_cast<int>(rows), static_cast<int>(vocab), tokens);
}

absl::Status TokenLogprobs(Context& ctx, const float* logits, int64_t rows, int64_t vocab,
                           const int32_t* tokens, float* out) {
  if (rows == 0) return absl::OkStatus();
  if (rows > INT32_MAX) return absl::InvalidArgumentError("TokenLogprobs: too many rows");
  return Launch(ctx, TokenLogprobsKernel, static_cast<unsigned>(rows), kLogprobThreads, 0, logits,
                static_cast<int>(vocab), tokens, out);
}

absl::Status TopLogprobs(Context& ctx, const float* logits, int64_t rows, int64_t vocab, int64_t n,
                         int32_t* ids, float* logprobs) {
  if (rows > INT32_MAX) return absl::InvalidArgumentError("TopLogprobs: too many rows");
  return Launch(ctx, TopLogprobsKernel, static_cast<unsigned>(rows), kLogprobThreads, 0, logits,
                static_cast<int>(vocab), static_cast<int>(n), ids, logprobs);
}

absl::Status Sample(Context& ctx, const float* logits, int64_t rows, int64_t vocab,
                    const SamplingParams* params, const float* uniforms, int32_t* out) {
  if (rows == 0) return absl::OkStatus();
  if (vocab > kMaxVocab) {
    return absl::InvalidArgumentError(
        absl::StrCat("Sample: vocab ", vocab, " exceeds the CUDA sampler's limit ", kMaxVocab));
  }
  if (rows > INT32_MAX) return absl::InvalidArgumentError("Sample: too many rows");
  std::vector<RowArgs> host(static_cast<size_t>(rows));
  bool any_sampled = false;
  for (int64_t r = 0; r < rows; ++r) {
    host[r] = RowArgs{params[r].temperature, params[r].top_k, params[r].top_p, params[r].min_p,
                      uniforms[r]};
    any_sampled = any_sampled || params[r].temperature > 0.0f;
  }
  if (!any_sampled && rows <= Context::kCountersPerSlot / 4 &&
      EnvSwitchOn("RAMBA_CUDA_GREEDY_KERNEL")) {
    const int pieces = static_cast<int>((vocab + kGreedyPiece - 1) / kGreedyPiece);
    unsigned* counters = ctx.Counters(Context::CounterSlot::kSampling);
    // Slots after the counters, 8-byte aligned (both zero between calls).
    Mass* slots = reinterpret_cast<Mass*>(counters + Context::kCountersPerSlot / 2);
    return Launch(ctx, GreedyKernel, static_cast<unsigned>(rows * pieces), kGreedyThreads, 0,
                  logits, static_cast<int>(vocab), pieces, slots, counters, out);
  }
  ASSIGN_OR_RETURN(void* dev_args, ctx.UploadScratch(ScratchSlot::kSampling, host.data(),
                                                     host.size() * sizeof(RowArgs)));

  // Shared memory: histograms, the candidate list and, when it fits, the row's keys.
  cudaFuncAttributes attr;
  RAMBA_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, SampleKernel));
  const size_t limit = std::max<size_t>(ctx.max_shared_per_block, 48 * 1024);
  const size_t budget = limit > attr.sharedSizeBytes ? limit - attr.sharedSizeBytes : 0;
  const size_t fixed = kBins * kReplicas * (sizeof(Mass) + sizeof(uint32_t)) + kBins * 4;
  const size_t row_bytes = static_cast<size_t>(vocab) * 4;
  size_t smem = 0;
  int cap = 0;
  int keys_in_smem = 0;
  if (any_sampled) {
    if (budget < fixed) return absl::InternalError("Sample: not enough shared memory");
    keys_in_smem = fixed + row_bytes + kMinList * 8 <= budget;
    const size_t room = budget - fixed - (keys_in_smem ? row_bytes : 0);
    cap = static_cast<int>(std::min<size_t>({room / 8, kMaxList, static_cast<size_t>(vocab)}));
    smem = fixed + static_cast<size_t>(cap) * 8 + (keys_in_smem ? row_bytes : 0);
  }
  RAMBA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      SampleKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));

  const int threads = vocab <= 4096 ? 256 : kMaxThreads;       // >= kBins (histogram fold)
  const float scale = std::ldexp(1.0f, 62 - CeilLog2(vocab));  // row mass < 2^62
  return Launch(ctx, SampleKernel, static_cast<unsigned>(rows), threads, smem, logits,
                static_cast<int>(vocab), static_cast<const RowArgs*>(dev_args), out, cap,
                keys_in_smem, scale);
}

}  // namespace ramba::kernels::cuda
