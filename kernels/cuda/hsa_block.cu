// A decode step's HSA block as one kernel (Backend::HsaBlock, a few one-token rows):
// h += o_proj(SparseChunkAttention(q_proj(RmsNorm(h)))). Run op by op it is five kernels
// (q_proj, its split-K reduce, the attention, o_proj, its reduce): ~27 us per block at batch 1
// on an H100 (Nsight Compute, docs/benchmarks.md) for ~4 MB of weights, i.e. launch and drain
// latency rather than bytes. Here a cluster of kCluster blocks per (row, query head) does the
// head's whole path:
//   1. every block normalises the row of h into shared memory and computes hd / kCluster rows of
//      the head's q (a warp each), which it pushes into every block of the cluster (st.async
//      completing the receiver's transaction barrier: one-way, no cluster-wide barrier);
//   2. block b attends over slots b, b + kCluster, ... of the row's top-K (their f32 K/V copied
//      into shared memory while step 1 runs) and pushes each slot's weighted output to every
//      block;
//   3. every block sums the slots in slot order (so each holds the same bits of the head's
//      output) and multiplies it into its d / kCluster rows of o_proj's columns for the head:
//      one head's partial of those entries of h, written to scratch;
//   4. per row and range of h, the last of the nh blocks to finish it (a counter) adds the heads'
//      partials to h in head order: deterministic, and h is written only after every block of
//      the row has read it (each cluster passed its step-1 reads before its barriers).
// Weights never change, so each block copies its two weight tiles into shared memory (cp.async)
// before waiting for the kernel before it.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "base/status_macros.h"
#include "kernels/cuda/async_copy.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/warp_attend.cuh"

namespace ramba::kernels::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kCluster = 8;  // blocks per (row, query head)
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kHd = 64;    // head dim
constexpr int kKeys = 64;  // keys per chunk
constexpr int kMaxTopK = 16;
constexpr int kMaxSlots = kMaxTopK / kCluster;  // slots per block
constexpr int kMaxD = 2048;
constexpr int kMaxRows = 4;
static_assert(kHd / kCluster == kWarps, "a warp per q row");
static_assert(kThreads == 4 * kKeys && kThreads == 4 * kHd, "thread layouts below");

struct HsaArgs {
  float* h;
  int64_t ldh;
  int d;
  const float* norm_w;
  float eps;
  const void* wq;  // [nh * kHd, d]
  const void* wo;  // [d, nh * kHd]
  ChunkMemoryBatch mem;
  const int32_t* indices;
  const float* weights;
  int rheads, top_k, nh, nkv;
  float scale;
  float* partials;     // [rows, nh, d]: each head's partial of h
  unsigned* counters;  // [rows, kCluster]: heads done with each range of h; zero between calls
};

// Eight consecutive weights as floats (16-byte aligned): bf16 bits, or f32.
__device__ __forceinline__ void Widen8(const uint16_t* p, float (&f)[8]) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(u[i] << 16);
    f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void Widen8(const float* p, float (&f)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

using warp_attend::WarpMax;
using warp_attend::WarpSum;

// Shared memory beyond the static arrays: the block's q_proj rows [kWarps][d], its o_proj tile
// [d / kCluster][kHd] (both of type W), then the normed row of h [d] (f32).
// Then, per slot the block takes, the chunk's K and V for the head's kv head [2][kKeys][kHd].
constexpr int kSlotFloats = 2 * kKeys * kHd;
int SlotsPerBlock(int top_k) { return (top_k + kCluster - 1) / kCluster; }
template <typename W>
size_t HsaSmemBytes(int d, int top_k) {
  return sizeof(W) * (static_cast<size_t>(kWarps) * d + static_cast<size_t>(d / kCluster) * kHd) +
         sizeof(float) *
             (static_cast<size_t>(d) + static_cast<size_t>(SlotsPerBlock(top_k)) * kSlotFloats);
}

template <typename W>
__global__ void __launch_bounds__(kThreads) HsaBlockKernel(const __grid_constant__ HsaArgs a) {
  const cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ __align__(16) float s_q[kHd];  // the head's q (read as float4)
  __shared__ float s_slot[kMaxTopK][kHd];  // each slot's weighted output
  __shared__ float s_o[kHd];               // the head's attention output
  __shared__ float s_p[kKeys];             // a slot's softmax numerators
  __shared__ float s_pv[kThreads / kHd][kHd];
  __shared__ float s_red[2][kWarps];
  __shared__ bool s_last;
  // Pushes from the cluster: the head's q (kHd floats), every slot's output (top_k * kHd).
  __shared__ uint64_t s_bar[2];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int d = a.d, rank = static_cast<int>(cluster.block_rank());
  const int64_t item = blockIdx.x / kCluster;
  const int row = static_cast<int>(item / a.nh), head = static_cast<int>(item % a.nh);
  const int width = a.nh * kHd;
  const int n0 = rank * (d / kCluster), nr = d / kCluster;  // this block's range of h
  W* wq_s = reinterpret_cast<W*>(smem);
  W* wo_s = wq_s + kWarps * d;
  float* x_s = reinterpret_cast<float*>(wo_s + nr * kHd);
  float* kv_s = x_s + d;  // [slots][2][kKeys][kHd]

  if (tid == 0) {
    MbarrierInit(&s_bar[0], 1);
    MbarrierInit(&s_bar[1], 1);
    FenceMbarrierInit();
    MbarrierArriveExpectTx(&s_bar[0], kHd * 4);
    MbarrierArriveExpectTx(&s_bar[1], a.top_k * kHd * 4);
  }
  // Every block's barriers exist before anyone pushes (the wait is just before the first push).
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");

  // Weights first (no kernel writes them): the tiles, and this thread's norm weights.
  constexpr int kRowVecs = kMaxD / (4 * kThreads);  // float4s of a row of h per thread
  float4 nw[kRowVecs];
#pragma unroll
  for (int i = 0; i < kRowVecs; ++i) {
    const int k = 4 * (tid + i * kThreads);
    if (k < d) nw[i] = *reinterpret_cast<const float4*>(a.norm_w + k);
  }
  {
    constexpr int kPer16 = 16 / sizeof(W);
    const W* wq =
        static_cast<const W*>(a.wq) + (static_cast<int64_t>(head) * kHd + rank * kWarps) * d;
    for (int i = tid; i < kWarps * d / kPer16; i += kThreads) {
      CpAsync16(wq_s + i * kPer16, wq + i * kPer16);  // the block's rows are contiguous
    }
    constexpr int kRow16 = kHd / kPer16;
    const W* wo = static_cast<const W*>(a.wo) + static_cast<int64_t>(n0) * width + head * kHd;
    for (int i = tid; i < nr * kRow16; i += kThreads) {
      const int n = i / kRow16, u = i % kRow16;
      CpAsync16(wo_s + n * kHd + u * kPer16, wo + static_cast<int64_t>(n) * width + u * kPer16);
    }
  }
  CpAsyncCommit();
  AllowDependentGrids();
  WaitForPriorGrids();

  // The row of h, then the block's slots: chunk pointers looked up now and K/V copied into
  // shared memory while step 1 runs (each lookup is a dependent round trip to memory).
  const float* hrow = a.h + row * a.ldh;
  float4 hv[kRowVecs];
#pragma unroll
  for (int i = 0; i < kRowVecs; ++i) {
    const int k = 4 * (tid + i * kThreads);
    if (k < d) hv[i] = *reinterpret_cast<const float4*>(hrow + k);
  }
  const int kvh = head / (a.nh / a.nkv);  // the head's kv head
  const int e = kvh * a.rheads / a.nkv;   // and retrieval head
  const int seq = a.mem.row_seq[row];
  const int64_t num_chunks = a.mem.num_chunks[seq];
  const float* const* table = a.mem.chunk_kv[seq];
  const int32_t* idx = a.indices + (static_cast<int64_t>(row) * a.rheads + e) * a.top_k;
  const float* wts = a.weights + (static_cast<int64_t>(row) * a.rheads + e) * a.top_k;
  const int64_t stride = static_cast<int64_t>(a.nkv) * kHd;  // between keys of a chunk
  float slot_w[kMaxSlots];  // each slot's weight; 0 for a slot that adds nothing
#pragma unroll
  for (int i = 0; i < kMaxSlots; ++i) {
    const int j = rank + i * kCluster;
    slot_w[i] = 0.0f;
    if (j >= a.top_k) continue;
    const int32_t c = idx[j];
    const float w = wts[j];
    // The same skips as SparseChunkAttention's kernels (the CPU rejects what is out of range).
    const float* kc = c >= 0 && c < num_chunks && w != 0.0f ? table[c] : nullptr;
    if (kc == nullptr) continue;
    slot_w[i] = w;
    kc += kvh * kHd;
    float* dst = kv_s + i * kSlotFloats;
    if (reinterpret_cast<uintptr_t>(kc) % 16 == 0) {  // block-uniform; stride is a multiple of 4
      for (int t = tid; t < 2 * kKeys * kHd / 4; t += kThreads) {
        const int half = t / (kKeys * kHd / 4), key = t / (kHd / 4) % kKeys, u = t % (kHd / 4);
        CpAsync16(dst + (half * kKeys + key) * kHd + 4 * u,
                  kc + (half * kKeys + key) * stride + 4 * u);
      }
    } else {
      for (int t = tid; t < 2 * kKeys * kHd; t += kThreads) {
        const int half = t / (kKeys * kHd), key = t / kHd % kKeys, u = t % kHd;
        CpAsync4(dst + (half * kKeys + key) * kHd + u, kc + (half * kKeys + key) * stride + u);
      }
    }
  }
  CpAsyncCommit();

  // ---- 1: RMSNorm of the row, this block's rows of q ----
  float ss = 0.0f;
#pragma unroll
  for (int i = 0; i < kRowVecs; ++i) {
    if (4 * (tid + i * kThreads) < d) {
      ss = fmaf(hv[i].x, hv[i].x, ss);
      ss = fmaf(hv[i].y, hv[i].y, ss);
      ss = fmaf(hv[i].z, hv[i].z, ss);
      ss = fmaf(hv[i].w, hv[i].w, ss);
    }
  }
  ss = WarpSum(ss);
  if (lane == 0) s_red[0][warp] = ss;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += s_red[0][w];
  const float inv = 1.0f / sqrtf(total / static_cast<float>(d) + a.eps);
#pragma unroll
  for (int i = 0; i < kRowVecs; ++i) {
    const int k = 4 * (tid + i * kThreads);
    if (k < d) {
      *reinterpret_cast<float4*>(x_s + k) =
          make_float4(nw[i].x * (hv[i].x * inv), nw[i].y * (hv[i].y * inv),
                      nw[i].z * (hv[i].z * inv), nw[i].w * (hv[i].w * inv));
    }
  }
  CpAsyncWaitGroup<1>();  // the weight tiles (K/V may still be in flight)
  __syncthreads();
  {
    const W* wrow = wq_s + warp * d;
    float acc = 0.0f;
    for (int k = 8 * lane; k < d; k += 256) {
      float w8[8];
      Widen8(wrow + k, w8);
      const float4 x0 = *reinterpret_cast<const float4*>(x_s + k);
      const float4 x1 = *reinterpret_cast<const float4*>(x_s + k + 4);
      acc = fmaf(w8[0], x0.x, acc);
      acc = fmaf(w8[1], x0.y, acc);
      acc = fmaf(w8[2], x0.z, acc);
      acc = fmaf(w8[3], x0.w, acc);
      acc = fmaf(w8[4], x1.x, acc);
      acc = fmaf(w8[5], x1.y, acc);
      acc = fmaf(w8[6], x1.z, acc);
      acc = fmaf(w8[7], x1.w, acc);
    }
    acc = WarpSum(acc);
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
    if (lane < kCluster) {
      StoreToRank(MapToRank(SharedAddress(&s_q[rank * kWarps + warp]), lane), acc,
                  MapToRank(SharedAddress(&s_bar[0]), lane));
    }
  }

  // ---- 2: this block's slots, from shared memory ----
  CpAsyncWaitGroup<0>();
  MbarrierWait<true>(&s_bar[0], 0);  // q from the cluster
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kMaxSlots; ++i) {
    const int j = rank + i * kCluster;
    if (j >= a.top_k) break;
    const float w = slot_w[i];
    float out = 0.0f;  // thread tid < kHd: dim tid of the slot's weighted output
    if (w != 0.0f) {
      const float* ks = kv_s + i * kSlotFloats;
      const float* vs = ks + kKeys * kHd;
      // Scores: four threads per key, 16 dims each.
      const int key = tid / 4, part = tid % 4;
      const float4* kr = reinterpret_cast<const float4*>(ks + key * kHd + part * 16);
      const float4* qr = reinterpret_cast<const float4*>(s_q + part * 16);
      float dot = 0.0f;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const float4 kv = kr[u], qv = qr[u];
        dot = fmaf(qv.x, kv.x, dot);
        dot = fmaf(qv.y, kv.y, dot);
        dot = fmaf(qv.z, kv.z, dot);
        dot = fmaf(qv.w, kv.w, dot);
      }
      dot += __shfl_xor_sync(0xffffffffu, dot, 1);
      dot += __shfl_xor_sync(0xffffffffu, dot, 2);
      const float score = dot * a.scale;
      const float m = WarpMax(score);
      if (lane == 0) s_red[0][warp] = m;
      __syncthreads();
      float mx = s_red[0][0];
#pragma unroll
      for (int r = 1; r < kWarps; ++r) mx = fmaxf(mx, s_red[0][r]);
      const float p = part == 0 ? expf(score - mx) : 0.0f;
      if (part == 0) s_p[key] = p;
      const float l = WarpSum(p);
      if (lane == 0) s_red[1][warp] = l;
      __syncthreads();
      float sum = 0.0f;
#pragma unroll
      for (int r = 0; r < kWarps; ++r) sum += s_red[1][r];
      // P V: thread (dim tid % 64) sums its quarter of the keys.
      const int dim = tid % kHd, q4 = tid / kHd;
      float acc = 0.0f;
#pragma unroll
      for (int u = 0; u < kKeys / 4; ++u) {
        const int kk = q4 * (kKeys / 4) + u;
        acc = fmaf(s_p[kk], vs[kk * kHd + dim], acc);
      }
      s_pv[q4][dim] = acc;
      __syncthreads();
      if (tid < kHd) out = (s_pv[0][tid] + s_pv[1][tid] + s_pv[2][tid] + s_pv[3][tid]) * (w / sum);
    }
    if (tid < kHd) {
#pragma unroll
      for (int r = 0; r < kCluster; ++r) {
        StoreToRank(MapToRank(SharedAddress(&s_slot[j][tid]), r), out,
                    MapToRank(SharedAddress(&s_bar[1]), r));
      }
    }
    __syncthreads();  // s_red / s_p / s_pv are free for the next slot
  }
  MbarrierWait<true>(&s_bar[1], 0);  // every slot's output

  // ---- 3: the head's output, and its partial of this block's range of h ----
  if (tid < kHd) {
    float o = 0.0f;
    for (int j = 0; j < a.top_k; ++j) o += s_slot[j][tid];
    s_o[tid] = o;
  }
  __syncthreads();
  {
    const int sub = tid % 8;  // eight lanes per row of the tile, eight weights each
    float o8[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) o8[i] = s_o[8 * sub + i];
    float* part = a.partials + (static_cast<int64_t>(row) * a.nh + head) * d + n0;
    for (int n = tid / 8; n < nr; n += kThreads / 8) {
      float w8[8];
      Widen8(wo_s + n * kHd + 8 * sub, w8);
      float acc = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc = fmaf(w8[i], o8[i], acc);
      acc += __shfl_xor_sync(0xffffffffu, acc, 1);
      acc += __shfl_xor_sync(0xffffffffu, acc, 2);
      acc += __shfl_xor_sync(0xffffffffu, acc, 4);
      if (sub == 0) part[n] = acc;
    }
  }
  // Every push into this block has landed (its barriers completed) and none follow, so the
  // block may exit without a cluster barrier.

  // ---- 4: the last head to finish this range adds every head's partial to h ----
  // The count releases the block's partial (ordered before it by the barrier) and acquires
  // the heads counted before it.
  __syncthreads();
  unsigned* counter = a.counters + row * kCluster + rank;
  if (tid == 0) {
    unsigned old;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;"
                 : "=r"(old)
                 : "l"(counter)
                 : "memory");
    s_last = old == static_cast<unsigned>(a.nh - 1);
  }
  __syncthreads();
  if (!s_last) return;
  const float* first = a.partials + static_cast<int64_t>(row) * a.nh * d + n0;
  float* hout = a.h + row * a.ldh + n0;
  for (int n = tid; n < nr; n += kThreads) {
    float v = 0.0f;
    for (int hh = 0; hh < a.nh; ++hh) v += __ldcg(first + static_cast<int64_t>(hh) * d + n);
    hout[n] += v;
  }
  if (tid == 0) *counter = 0u;
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename W>
absl::Status LaunchHsa(Context& ctx, const HsaArgs& args, int64_t rows) {
  const size_t smem = HsaSmemBytes<W>(args.d, args.top_k);
  RETURN_IF_ERROR(PrepareSmem(ctx, HsaBlockKernel<W>, smem, "HsaBlock"));
  const unsigned blocks = static_cast<unsigned>(rows * args.nh * kCluster);
  return LaunchClusters(ctx, kCluster, HsaBlockKernel<W>, dim3(blocks), dim3(kThreads), smem, args);
}

}  // namespace

absl::StatusOr<bool> FusedHsaBlock(Context& ctx, const HsaBlockArgs& a) {
  if (!EnvSwitchOn("RAMBA_CUDA_FUSED_HSA")) return false;
  // CudaBackend::HsaBlock has checked the heads, the projections' shapes and the pointers;
  // what is left is this kernel's own limits.
  const int64_t d = a.q_proj.cols;
  const bool shapes = a.rows <= kMaxRows && a.hd == kHd && a.chunk_size == kKeys &&
                      a.top_k <= kMaxTopK && d > 0 && d % 256 == 0 && d <= kMaxD &&
                      a.q_proj.dtype == a.o_proj.dtype &&
                      (a.q_proj.dtype == DType::kBF16 || a.q_proj.dtype == DType::kF32);
  const bool aligned = Aligned16(a.h) && a.ldh % 4 == 0 && Aligned16(a.norm_weight) &&
                       Aligned16(a.q_proj.data) && Aligned16(a.o_proj.data);
  if (!shapes || !aligned || a.mem.num_chunks == nullptr) return false;
  const size_t bytes = static_cast<size_t>(a.rows * a.nh * d) * sizeof(float);
  ASSIGN_OR_RETURN(void* scratch, ctx.Scratch(ScratchSlot::kAttention, bytes));
  HsaArgs args;
  args.h = a.h;
  args.ldh = a.ldh;
  args.d = static_cast<int>(d);
  args.norm_w = a.norm_weight;
  args.eps = a.eps;
  args.wq = a.q_proj.data;
  args.wo = a.o_proj.data;
  args.mem = a.mem;
  args.indices = a.indices;
  args.weights = a.weights;
  args.rheads = static_cast<int>(a.retrieval_heads);
  args.top_k = static_cast<int>(a.top_k);
  args.nh = static_cast<int>(a.nh);
  args.nkv = static_cast<int>(a.nkv);
  args.scale = 1.0f / std::sqrt(static_cast<float>(kHd));
  args.partials = static_cast<float*>(scratch);
  args.counters = ctx.Counters(Context::CounterSlot::kHsa);
  RETURN_IF_ERROR(a.q_proj.dtype == DType::kBF16 ? LaunchHsa<uint16_t>(ctx, args, a.rows)
                                                 : LaunchHsa<float>(ctx, args, a.rows));
  return true;
}

}  // namespace ramba::kernels::cuda
