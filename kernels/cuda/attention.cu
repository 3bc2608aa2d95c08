// Bidirectional block attention for the chunk encoder (blocks of a chunk plus its CLS row, small
// head dims). A CTA per (block, kv head) stages the block's K and V in shared memory once; its
// warps then take (query head of the group, query row) items, one softmax over the block's keys
// each.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/warp_attend.cuh"

namespace ramba::kernels::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarp;
constexpr size_t kDefaultSmem = 48 * 1024;


using warp_attend::KeyStride;

size_t SmemBytes(int len, int hd) {
  return sizeof(float) * (static_cast<size_t>(len) * KeyStride(hd) + static_cast<size_t>(len) * hd +
                          static_cast<size_t>(kWarps) * hd + static_cast<size_t>(kWarps) * len);
}


// vec_io: q, k, v are 16-byte aligned and hd % 4 == 0, so rows load as float4.
template <int kHd>
__global__ void __launch_bounds__(kThreads, 2)
    BlockAttentionKernel(const float* __restrict__ q, const float* __restrict__ k,
                         const float* __restrict__ v, float* __restrict__ out, int len, int nh,
                         int nkv, int hd_rt, float scale, bool vec_io) {
  AllowDependentGrids();
  WaitForPriorGrids();
  const int hd = kHd > 0 ? kHd : hd_rt;
  const int ks = KeyStride(hd);
  const int group = nh / nkv;
  extern __shared__ float4 smem4[];
  float* kbuf = reinterpret_cast<float*>(smem4);  // [len][ks]
  float* vbuf = kbuf + len * ks;                  // [len][hd]
  float* qbuf = vbuf + len * hd;                  // [warps][hd]
  float* pbuf = qbuf + kWarps * hd;               // [warps][len]
  const int64_t b = blockIdx.x / nkv;
  const int g = static_cast<int>(blockIdx.x % nkv);
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  const int64_t r0 = b * len;
  const int64_t kv_stride = static_cast<int64_t>(nkv) * hd;
  const int64_t q_stride = static_cast<int64_t>(nh) * hd;

  const int64_t head0 = r0 * kv_stride + static_cast<int64_t>(g) * hd;
  warp_attend::StageKeysValues<kThreads>(k + head0, v + head0, kv_stride, len, hd, vec_io, kbuf,
                                         vbuf, tid);
  __syncthreads();

  float* qw = qbuf + warp * hd;
  float* pw = pbuf + warp * len;
  for (int item = warp; item < group * len; item += kWarps) {
    const int h = g * group + item / len;
    const int64_t row = r0 + item % len;
    const float* qi = q + row * q_stride + static_cast<int64_t>(h) * hd;
    for (int t = lane; t < hd; t += kWarp) qw[t] = __ldg(qi + t);
    __syncwarp();
    warp_attend::WarpAttend<kHd>(qw, kbuf, vbuf, pw, ks, len, hd, scale, /*weight=*/1.0f,
                                 /*accumulate=*/false,
                                 out + row * q_stride + static_cast<int64_t>(h) * hd, lane);
  }
}

template <int kHd>
absl::Status LaunchBlockAttention(Context& ctx, const float* q, const float* k, const float* v,
                                  float* out, int64_t num_blocks, int len, int nh, int nkv, int hd,
                                  float scale, bool vec_io) {
  const size_t smem = SmemBytes(len, hd);
  if (smem > ctx.max_shared_per_block) {
    return absl::UnimplementedError(absl::StrCat("BlockAttention: block_len ", len, " x head dim ",
                                                 hd, " needs ", smem,
                                                 " bytes of shared memory per block"));
  }
  if (smem > kDefaultSmem) {
    RAMBA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(BlockAttentionKernel<kHd>,
                                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    static_cast<int>(smem)));
  }
  return Launch(ctx, BlockAttentionKernel<kHd>, static_cast<unsigned>(num_blocks * nkv), kThreads,
                smem, q, k, v, out, len, nh, nkv, hd, scale, vec_io);
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

absl::Status BlockAttention(Context& ctx, const float* q, const float* k, const float* v,
                            float* out, int64_t num_blocks, int64_t block_len, int64_t nh,
                            int64_t nkv, int64_t hd) {
  if (num_blocks == 0 || block_len == 0) return absl::OkStatus();
  if (block_len > 65536 || hd > 4096 || nh > 65536 || num_blocks * nkv > INT32_MAX) {
    return absl::UnimplementedError("BlockAttention: sizes beyond the CUDA kernel's limits");
  }
  // Same float steps as the CPU reference.
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const bool vec_io = hd % 4 == 0 && Aligned16(q) && Aligned16(k) && Aligned16(v);
  const int len = static_cast<int>(block_len), ih = static_cast<int>(hd);
  const int inh = static_cast<int>(nh), inkv = static_cast<int>(nkv);
  // Specialised head dims unroll the dot products; the generic kernel handles the rest.
  if (hd == 64) {
    return LaunchBlockAttention<64>(ctx, q, k, v, out, num_blocks, len, inh, inkv, ih, scale,
                                    vec_io);
  }
  if (hd == 32) {
    return LaunchBlockAttention<32>(ctx, q, k, v, out, num_blocks, len, inh, inkv, ih, scale,
                                    vec_io);
  }
  return LaunchBlockAttention<0>(ctx, q, k, v, out, num_blocks, len, inh, inkv, ih, scale, vec_io);
}

}  // namespace ramba::kernels::cuda
