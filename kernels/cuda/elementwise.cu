// Embedding lookup, norms and element-wise ops. Each kernel has a float4 path, taken when every
// pointer it touches is 16-byte aligned and every row stride and length is a multiple of 4, and a
// scalar path for everything else. Numerics follow kernels/cpu/: the same float expressions in
// the same order (only sums of squares are reduced in a different order), IEEE division and
// square root, no fused multiply-add where the CPU rounds the products separately.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm_input.cuh"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/ops.h"

namespace ramba::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Blocks for `work` items of `per_block` each, capped (kernels loop with a grid stride).
int GridFor(int64_t work, int64_t per_block, const Context& ctx) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  const int64_t cap = std::max<int64_t>(1, static_cast<int64_t>(ctx.num_sms) * 16);
  return static_cast<int>(std::max<int64_t>(1, std::min(blocks, cap)));
}

__device__ __forceinline__ int64_t GlobalThread() {
  return blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
}
__device__ __forceinline__ int64_t GridThreads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}
// The warp's index over the grid and the number of warps in it (one row per warp).
__device__ __forceinline__ int64_t GlobalWarp() {
  return blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
}
__device__ __forceinline__ int64_t GridWarps() {
  return static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Same expression as the CPU's SiluF: x / (1 + exp(-x)).
__device__ __forceinline__ float Silu(float v) { return v / (1.0f + expf(-v)); }

// ---- Embed ----

template <DType kType>
__device__ __forceinline__ float TableValue(const void* table, int64_t idx) {
  if constexpr (kType == DType::kF32) {
    return static_cast<const float*>(table)[idx];
  } else if constexpr (kType == DType::kBF16) {
    return __uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t*>(table)[idx]) << 16);
  } else {
    return __half2float(__ushort_as_half(static_cast<const uint16_t*>(table)[idx]));
  }
}

// Four consecutive values starting at idx (idx % 4 == 0, table aligned for the vector load).
template <DType kType>
__device__ __forceinline__ float4 TableValue4(const void* table, int64_t idx) {
  if constexpr (kType == DType::kF32) {
    return *reinterpret_cast<const float4*>(static_cast<const float*>(table) + idx);
  } else {
    const uint2 u = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(table) + idx);
    float4 f;
    if constexpr (kType == DType::kBF16) {
      f.x = __uint_as_float(u.x << 16);
      f.y = __uint_as_float(u.x & 0xffff0000u);
      f.z = __uint_as_float(u.y << 16);
      f.w = __uint_as_float(u.y & 0xffff0000u);
    } else {
      f.x = __half2float(__ushort_as_half(static_cast<unsigned short>(u.x & 0xffffu)));
      f.y = __half2float(__ushort_as_half(static_cast<unsigned short>(u.x >> 16)));
      f.z = __half2float(__ushort_as_half(static_cast<unsigned short>(u.y & 0xffffu)));
      f.w = __half2float(__ushort_as_half(static_cast<unsigned short>(u.y >> 16)));
    }
    return f;
  }
}

// One block per output row. A token outside the table (a caller bug the CPU backend rejects)
// gives a NaN row instead of an out-of-bounds read that would poison the whole context.
template <DType kType, bool kVec>
__global__ void EmbedKernel(const int32_t* tokens, int64_t n, const void* table, int64_t rows,
                            int64_t cols, float* out) {
  AllowDependentGrids();
  WaitForPriorGrids();
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t t = tokens[i];
    const bool valid = t >= 0 && t < rows;
    const int64_t base = t * cols;
    float* dst = out + i * cols;
    if constexpr (kVec) {
      for (int64_t v = threadIdx.x; v < cols / 4; v += blockDim.x) {
        reinterpret_cast<float4*>(dst)[v] =
            valid ? TableValue4<kType>(table, base + 4 * v) : make_float4(NAN, NAN, NAN, NAN);
      }
    } else {
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
        dst[c] = valid ? TableValue<kType>(table, base + c) : NAN;
      }
    }
  }
}

template <DType kType>
absl::Status LaunchEmbed(Context& ctx, const int32_t* tokens, int64_t n, const MatrixView& table,
                         float* out) {
  const size_t vec_bytes = kType == DType::kF32 ? 16 : 8;
  const bool vec = table.cols % 4 == 0 && Aligned16(out) &&
                   reinterpret_cast<uintptr_t>(table.data) % vec_bytes == 0;
  const int grid = GridFor(n, 1, ctx);
  constexpr int kEmbedThreads = 128;
  void (*kernel)(const int32_t*, int64_t, const void*, int64_t, int64_t, float*) =
      vec ? EmbedKernel<kType, true> : EmbedKernel<kType, false>;
  return Launch(ctx, kernel, grid, kEmbedThreads, 0, tokens, n, table.data, table.rows, table.cols,
                out);
}

// ---- RmsNorm / GatedRmsNorm: one warp per row (per group) ----
// Each writes through an output policy: f32 rows (the ops themselves) or a GemmInput (a norm
// feeding a projection with many rows: no f32 round trip before the GEMM's conversion). Both
// run the same code, so the two give the same values.

struct F32Out {
  float* y;
  int64_t ld;
  __device__ void Store4(int64_t r, int64_t c, float4 v) const {
    *reinterpret_cast<float4*>(y + r * ld + c) = v;
  }
  __device__ void Store1(int64_t r, int64_t c, float v) const { y[r * ld + c] = v; }
  __device__ void FinishRow(int64_t, int64_t, int) const {}
};

template <bool kBf16>
struct GemmInputOut {
  GemmInput in;
  __device__ void Store4(int64_t r, int64_t c, float4 v) const {
    StoreGemmInput4<kBf16>(in, GemmInputRow(in, r), c, v);
  }
  __device__ void Store1(int64_t r, int64_t c, float v) const {
    StoreGemmInput1<kBf16>(in, GemmInputRow(in, r), c, v);
  }
  // Zeroes the row's padding columns [dim, ldh).
  __device__ void FinishRow(int64_t r, int64_t dim, int lane) const {
    ZeroGemmInputPad(in, GemmInputRow(in, r), dim, lane, 32);
  }
};

// Float4 slots of a row that a lane keeps in registers between the sum of squares and the
// scaling pass (slots lane, lane + 32, ...): 16 cover a 2048-wide row, so the second pass reads
// nothing again (with thousands of rows in flight a re-read would miss L2); wider rows re-read
// the rest. The kernels are held to 128 registers (two 256-thread blocks per SM; ptxas: no
// spills) so that enough rows are in flight.
constexpr int kCachedSlots = 16;

__device__ __forceinline__ float4 Gate4(float4 a, float4 b) {
  return make_float4(a.x * Silu(b.x), a.y * Silu(b.y), a.z * Silu(b.z), a.w * Silu(b.w));
}

__device__ __forceinline__ void AddSquares(float4 a, float& ss) {
  ss += a.x * a.x;
  ss += a.y * a.y;
  ss += a.z * a.z;
  ss += a.w * a.w;
}

__device__ __forceinline__ float4 Scale4(float4 w, float4 a, float scale) {
  return make_float4(w.x * (a.x * scale), w.y * (a.y * scale), w.z * (a.z * scale),
                     w.w * (a.w * scale));
}

// y may alias x: every lane reads its elements before it writes them, and no lane touches
// another lane's elements.
template <bool kVec, class Out>
__global__ void __launch_bounds__(kThreads, 2)
    RmsNormKernel(const float* x, int64_t ldx, const float* weight, int64_t rows, int64_t dim,
                  float eps, Out out) {
  AllowDependentGrids();
  WaitForPriorGrids();
  const int lane = threadIdx.x % 32;
  for (int64_t r = GlobalWarp(); r < rows; r += GridWarps()) {
    const float* xr = x + r * ldx;
    float ss = 0.0f;
    if constexpr (kVec) {
      const auto* x4 = reinterpret_cast<const float4*>(xr);
      const auto* w4 = reinterpret_cast<const float4*>(weight);
      const int64_t slots = dim / 4;
      float4 cache[kCachedSlots];
#pragma unroll
      for (int j = 0; j < kCachedSlots; ++j) {
        const int64_t v = lane + 32 * j;
        if (v < slots) {
          cache[j] = x4[v];
          AddSquares(cache[j], ss);
        }
      }
      for (int64_t v = lane + 32 * kCachedSlots; v < slots; v += 32) AddSquares(x4[v], ss);
      ss = WarpSum(ss);
      const float scale = 1.0f / sqrtf(ss / static_cast<float>(dim) + eps);
#pragma unroll
      for (int j = 0; j < kCachedSlots; ++j) {
        const int64_t v = lane + 32 * j;
        if (v < slots) out.Store4(r, 4 * v, Scale4(w4[v], cache[j], scale));
      }
      for (int64_t v = lane + 32 * kCachedSlots; v < slots; v += 32) {
        out.Store4(r, 4 * v, Scale4(w4[v], x4[v], scale));
      }
    } else {
      for (int64_t i = lane; i < dim; i += 32) ss += xr[i] * xr[i];
      ss = WarpSum(ss);
      const float scale = 1.0f / sqrtf(ss / static_cast<float>(dim) + eps);
      for (int64_t i = lane; i < dim; i += 32) out.Store1(r, i, weight[i] * (xr[i] * scale));
    }
    out.FinishRow(r, dim, lane);
  }
}

// Gate first (as the CPU does: g = y * silu(z)), then normalise the group. out may alias y or z
// (each lane reads its elements before it writes them).
template <bool kVec, class Out>
__global__ void __launch_bounds__(kThreads, 2)
    GatedRmsNormKernel(const float* y, int64_t ldy, const float* z, int64_t ldz,
                       const float* weight, int64_t rows, int64_t dim, int64_t group_size,
                       float eps, Out out) {
  AllowDependentGrids();
  WaitForPriorGrids();
  const int lane = threadIdx.x % 32;
  const int64_t groups = dim / group_size;
  const int64_t items = rows * groups;
  for (int64_t item = GlobalWarp(); item < items; item += GridWarps()) {
    const int64_t r = item / groups;
    const int64_t g0 = (item - r * groups) * group_size;
    const float* yr = y + r * ldy + g0;
    const float* zr = z + r * ldz + g0;
    const float* wg = weight + g0;
    float ss = 0.0f;
    if constexpr (kVec) {
      const auto* y4 = reinterpret_cast<const float4*>(yr);
      const auto* z4 = reinterpret_cast<const float4*>(zr);
      const auto* w4 = reinterpret_cast<const float4*>(wg);
      const int64_t slots = group_size / 4;
      float4 cache[kCachedSlots];  // gated values
#pragma unroll
      for (int j = 0; j < kCachedSlots; ++j) {
        const int64_t v = lane + 32 * j;
        if (v < slots) {
          cache[j] = Gate4(y4[v], z4[v]);
          AddSquares(cache[j], ss);
        }
      }
      for (int64_t v = lane + 32 * kCachedSlots; v < slots; v += 32) {
        AddSquares(Gate4(y4[v], z4[v]), ss);
      }
      ss = WarpSum(ss);
      const float scale = 1.0f / sqrtf(ss / static_cast<float>(group_size) + eps);
#pragma unroll
      for (int j = 0; j < kCachedSlots; ++j) {
        const int64_t v = lane + 32 * j;
        if (v < slots) out.Store4(r, g0 + 4 * v, Scale4(w4[v], cache[j], scale));
      }
      for (int64_t v = lane + 32 * kCachedSlots; v < slots; v += 32) {
        out.Store4(r, g0 + 4 * v, Scale4(w4[v], Gate4(y4[v], z4[v]), scale));
      }
    } else {
      for (int64_t i = lane; i < group_size; i += 32) {
        const float g = yr[i] * Silu(zr[i]);
        ss += g * g;
      }
      ss = WarpSum(ss);
      const float scale = 1.0f / sqrtf(ss / static_cast<float>(group_size) + eps);
      for (int64_t i = lane; i < group_size; i += 32) {
        out.Store1(r, g0 + i, wg[i] * ((yr[i] * Silu(zr[i])) * scale));
      }
    }
    if (g0 + group_size == dim) out.FinishRow(r, dim, lane);
  }
}

// ---- Block-per-row variants for few rows (decode): a warp alone walking a 2048-wide row waits
// on one memory latency per 128 values; 1024 threads keep the whole row in flight. ----

constexpr int kRowThreads = 1024;  // a 2048-wide row: two values per thread

__device__ float BlockSum(float v, float* shared) {
  v = WarpSum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kRowThreads / 32; ++w) total += shared[w];
  __syncthreads();  // shared is reused by the next call
  return total;
}

// Scalar loads, each thread owns elements t, t + kRowThreads, ...: coalesced and alias-safe (a
// thread reads its elements before it writes them).
__global__ void __launch_bounds__(kRowThreads) RmsNormRowKernel(const float* x, int64_t ldx,
                                                                const float* weight, float* y,
                                                                int64_t ldy, int64_t dim,
                                                                float eps) {
  AllowDependentGrids();
  WaitForPriorGrids();
  __shared__ float shared[kRowThreads / 32];
  const float* xr = x + blockIdx.x * ldx;
  float* yr = y + blockIdx.x * ldy;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += kRowThreads) ss += xr[i] * xr[i];
  ss = BlockSum(ss, shared);
  const float scale = 1.0f / sqrtf(ss / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += kRowThreads) yr[i] = weight[i] * (xr[i] * scale);
}

__global__ void __launch_bounds__(kRowThreads) GatedRmsNormRowKernel(
    const float* y, int64_t ldy, const float* z, int64_t ldz, const float* weight, float* out,
    int64_t ldo, int64_t groups, int64_t group_size, float eps) {
  AllowDependentGrids();
  WaitForPriorGrids();
  __shared__ float shared[kRowThreads / 32];
  const int64_t r = blockIdx.x / groups;
  const int64_t g0 = (blockIdx.x - r * groups) * group_size;
  const float* yr = y + r * ldy + g0;
  const float* zr = z + r * ldz + g0;
  const float* wg = weight + g0;
  float* o = out + r * ldo + g0;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < group_size; i += kRowThreads) {
    const float g = yr[i] * Silu(zr[i]);
    o[i] = g;
    ss += g * g;
  }
  ss = BlockSum(ss, shared);
  const float scale = 1.0f / sqrtf(ss / static_cast<float>(group_size) + eps);
  for (int64_t i = threadIdx.x; i < group_size; i += kRowThreads) o[i] = wg[i] * (o[i] * scale);
}


// ---- Add / SwiGlu: flat arrays ----

__global__ void AddKernel(float* y, const float* x, int64_t n, bool vec) {
  AllowDependentGrids();
  WaitForPriorGrids();
  int64_t done = 0;
  if (vec) {
    auto* y4 = reinterpret_cast<float4*>(y);
    const auto* x4 = reinterpret_cast<const float4*>(x);
    for (int64_t v = GlobalThread(); v < n / 4; v += GridThreads()) {
      float4 a = y4[v];
      const float4 b = x4[v];
      a.x += b.x;
      a.y += b.y;
      a.z += b.z;
      a.w += b.w;
      y4[v] = a;
    }
    done = n / 4 * 4;
  }
  for (int64_t i = done + GlobalThread(); i < n; i += GridThreads()) y[i] += x[i];
}

// out may alias gate or up: each element is read before the same thread writes it.
__global__ void SwiGluKernel(const float* gate, const float* up, float* out, int64_t n,
                             bool vec) {
  AllowDependentGrids();
  WaitForPriorGrids();
  int64_t done = 0;
  if (vec) {
    const auto* g4 = reinterpret_cast<const float4*>(gate);
    const auto* u4 = reinterpret_cast<const float4*>(up);
    auto* o4 = reinterpret_cast<float4*>(out);
    for (int64_t v = GlobalThread(); v < n / 4; v += GridThreads()) {
      const float4 g = g4[v];
      const float4 u = u4[v];
      o4[v] = make_float4(Silu(g.x) * u.x, Silu(g.y) * u.y, Silu(g.z) * u.z, Silu(g.w) * u.w);
    }
    done = n / 4 * 4;
  }
  for (int64_t i = done + GlobalThread(); i < n; i += GridThreads()) {
    out[i] = Silu(gate[i]) * up[i];
  }
}

// ---- BlockMean: one thread per output element, rows summed in order (bitwise equal to CPU) ----

__global__ void BlockMeanKernel(const float* x, int64_t num_blocks, int64_t block_len,
                                int64_t dim, float* out) {
  AllowDependentGrids();
  WaitForPriorGrids();
  const int64_t total = num_blocks * dim;
  const float len = static_cast<float>(block_len);
  for (int64_t idx = GlobalThread(); idx < total; idx += GridThreads()) {
    const int64_t b = idx / dim;
    const int64_t c = idx - b * dim;
    const float* src = x + b * block_len * dim + c;
    float s = 0.0f;
    for (int64_t r = 0; r < block_len; ++r) s += src[r * dim];
    out[idx] = s / len;
  }
}

// ---- RopeInChunk ----

// inv_freq computed on the host with the CPU's exact float expression (powf from the same libm),
// passed by value; head_dim / 2 above this falls back to a double-precision pow on the device.
constexpr int kMaxHostFreqs = 256;
struct RopeFreqs {
  float inv[kMaxHostFreqs];
};

// One thread per (row, frequency), looping over heads. Angles are float(pos) * inv_freq in float;
// cos and sin are evaluated in double and rounded, i.e. the correctly rounded float values the
// CPU's cosf / sinf return (up to rare last-bit differences). Products are rounded separately as
// on the CPU (__fmul_rn blocks FMA contraction).
__global__ void RopeKernel(float* x, int64_t rows, int64_t heads, int64_t head_dim,
                           int64_t period, float theta, RopeFreqs freqs, bool host_freqs) {
  AllowDependentGrids();
  WaitForPriorGrids();
  const int64_t half = head_dim / 2;
  const int64_t total = rows * half;
  for (int64_t idx = GlobalThread(); idx < total; idx += GridThreads()) {
    const int64_t r = idx / half;
    const int64_t i = idx - r * half;
    float inv;
    if (host_freqs) {
      inv = freqs.inv[i];
    } else {
      const float e = static_cast<float>(2 * i) / static_cast<float>(head_dim);
      inv = 1.0f / static_cast<float>(pow(static_cast<double>(theta), static_cast<double>(e)));
    }
    const float angle = __fmul_rn(static_cast<float>(r % period), inv);
    double sd, cd;
    sincos(static_cast<double>(angle), &sd, &cd);
    const float s = static_cast<float>(sd), c = static_cast<float>(cd);
    float* p = x + r * heads * head_dim + i;
    for (int64_t h = 0; h < heads; ++h, p += head_dim) {
      const float a = p[0], b = p[half];
      p[0] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
      p[half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    }
  }
}

}  // namespace

absl::Status Embed(Context& ctx, const int32_t* tokens, int64_t n, MatrixView table, float* out) {
  switch (table.dtype) {
    case DType::kF32:
      return LaunchEmbed<DType::kF32>(ctx, tokens, n, table, out);
    case DType::kBF16:
      return LaunchEmbed<DType::kBF16>(ctx, tokens, n, table, out);
    case DType::kF16:
      return LaunchEmbed<DType::kF16>(ctx, tokens, n, table, out);
  }
  return absl::InvalidArgumentError("Embed: unsupported table dtype");
}

// Rows (or groups) below which the block-per-row kernels win.
bool NormRowsUseBlocks(const Context& ctx, int64_t items, int64_t width) {
  return width >= 512 && items <= 2 * static_cast<int64_t>(ctx.num_sms) && items <= INT32_MAX;
}

// The warp-per-row norm kernels for output policy Out, vector or scalar loads.
template <class Out>
absl::Status LaunchRmsNorm(Context& ctx, bool vec, const float* x, int64_t ldx,
                           const float* weight, int64_t rows, int64_t dim, float eps, Out out) {
  const int grid = GridFor(rows, kWarpsPerBlock, ctx);
  return Launch(ctx, vec ? RmsNormKernel<true, Out> : RmsNormKernel<false, Out>, grid, kThreads,
                0, x, ldx, weight, rows, dim, eps, out);
}

template <class Out>
absl::Status LaunchGatedRmsNorm(Context& ctx, bool vec, const float* y, int64_t ldy,
                                const float* z, int64_t ldz, const float* weight, int64_t rows,
                                int64_t dim, int64_t group_size, float eps, Out out) {
  const int grid = GridFor(rows * (dim / group_size), kWarpsPerBlock, ctx);
  return Launch(ctx, vec ? GatedRmsNormKernel<true, Out> : GatedRmsNormKernel<false, Out>, grid,
                kThreads, 0, y, ldy, z, ldz, weight, rows, dim, group_size, eps, out);
}

absl::Status RmsNormToGemmInput(Context& ctx, const float* x, int64_t ldx, const float* weight,
                                int64_t rows, int64_t dim, float eps, const GemmInput& in) {
  const bool vec = dim % 4 == 0 && ldx % 4 == 0 && Aligned16(x) && Aligned16(weight);
  return in.bf16 ? LaunchRmsNorm(ctx, vec, x, ldx, weight, rows, dim, eps, GemmInputOut<true>{in})
                 : LaunchRmsNorm(ctx, vec, x, ldx, weight, rows, dim, eps, GemmInputOut<false>{in});
}

absl::Status GatedRmsNormToGemmInput(Context& ctx, const float* y, int64_t ldy, const float* z,
                                     int64_t ldz, const float* weight, int64_t rows, int64_t dim,
                                     int64_t group_size, float eps, const GemmInput& in) {
  const bool vec = group_size % 4 == 0 && ldy % 4 == 0 && ldz % 4 == 0 && Aligned16(y) &&
                   Aligned16(z) && Aligned16(weight);
  return in.bf16 ? LaunchGatedRmsNorm(ctx, vec, y, ldy, z, ldz, weight, rows, dim, group_size, eps,
                                      GemmInputOut<true>{in})
                 : LaunchGatedRmsNorm(ctx, vec, y, ldy, z, ldz, weight, rows, dim, group_size, eps,
                                      GemmInputOut<false>{in});
}

absl::Status RmsNorm(Context& ctx, const float* x, int64_t ldx, const float* weight, float* y,
                     int64_t ldy, int64_t rows, int64_t dim, float eps) {
  if (NormRowsUseBlocks(ctx, rows, dim)) {
    return Launch(ctx, RmsNormRowKernel, static_cast<unsigned>(rows), kRowThreads, 0, x, ldx,
                  weight, y, ldy, dim, eps);
  }
  const bool vec = dim % 4 == 0 && ldx % 4 == 0 && ldy % 4 == 0 && Aligned16(x) &&
                   Aligned16(y) && Aligned16(weight);
  return LaunchRmsNorm(ctx, vec, x, ldx, weight, rows, dim, eps, F32Out{y, ldy});
}

absl::Status GatedRmsNorm(Context& ctx, const float* y, int64_t ldy, const float* z, int64_t ldz,
                          const float* weight, float* out, int64_t ldo, int64_t rows, int64_t dim,
                          int64_t group_size, float eps) {
  const int64_t groups = dim / group_size;
  if (NormRowsUseBlocks(ctx, rows * groups, group_size)) {
    return Launch(ctx, GatedRmsNormRowKernel, static_cast<unsigned>(rows * groups), kRowThreads, 0,
                  y, ldy, z, ldz, weight, out, ldo, groups, group_size, eps);
  }
  const bool vec = group_size % 4 == 0 && ldy % 4 == 0 && ldz % 4 == 0 && ldo % 4 == 0 &&
                   Aligned16(y) && Aligned16(z) && Aligned16(out) && Aligned16(weight);
  return LaunchGatedRmsNorm(ctx, vec, y, ldy, z, ldz, weight, rows, dim, group_size, eps,
                            F32Out{out, ldo});
}

absl::Status Add(Context& ctx, float* y, const float* x, int64_t n) {
  const bool vec = Aligned16(y) && Aligned16(x);
  return Launch(ctx, AddKernel, GridFor(vec ? (n + 3) / 4 : n, kThreads, ctx), kThreads, 0, y, x,
                n, vec);
}

absl::Status SwiGlu(Context& ctx, const float* gate, const float* up, float* out, int64_t n) {
  const bool vec = Aligned16(gate) && Aligned16(up) && Aligned16(out);
  return Launch(ctx, SwiGluKernel, GridFor(vec ? (n + 3) / 4 : n, kThreads, ctx), kThreads, 0,
                gate, up, out, n, vec);
}

absl::Status BlockMean(Context& ctx, const float* x, int64_t num_blocks, int64_t block_len,
                       int64_t dim, float* out) {
  return Launch(ctx, BlockMeanKernel, GridFor(num_blocks * dim, kThreads, ctx), kThreads, 0, x,
                num_blocks, block_len, dim, out);
}

absl::Status RopeInChunk(Context& ctx, float* x, int64_t rows, int64_t heads, int64_t head_dim,
                         int64_t period, float theta) {
  const int64_t half = head_dim / 2;
  RopeFreqs freqs = {};
  const bool host_freqs = half <= kMaxHostFreqs;
  if (host_freqs) {
    // The CPU's expression (kernels/cpu/attention.cc), evaluated by the same host libm.
    for (int64_t i = 0; i < half; ++i) {
      const float e = static_cast<float>(2 * i) / static_cast<float>(head_dim);
      freqs.inv[i] = 1.0f / powf(theta, e);
    }
  }
  return Launch(ctx, RopeKernel, GridFor(rows * half, kThreads, ctx), kThreads, 0, x, rows, heads,
                head_dim, period, theta, freqs, host_freqs);
}

}  // namespace ramba::kernels::cuda
