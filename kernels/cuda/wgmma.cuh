// Warpgroup-level bf16 tensor-core products (wgmma.mma_async, sm_90a): four warps issue one
// m64nNk16 product whose B operand the tensor cores read from shared memory themselves, once for
// the warpgroup, instead of each warp loading its fragments (ldmatrix) as mma.sync needs.
// PTX ISA: "Asynchronous Warpgroup Level Matrix Multiply-Accumulate".
//
// Layouts used here (PTX ISA, "wgmma.m64nNk16"): warp w of the warpgroup owns rows 16w..16w + 15
// of M, and within them its A fragment (from registers) and its accumulator tiles are exactly
// mma.cuh's m16n8k16 A and C layouts (d[n][0..3] for columns 8n..8n + 7), so a row block's
// accumulator, packed to bf16, is the A fragment of a following product, as with mma.sync.
// B is K-major in shared memory with the 128-byte swizzle: row r (an N index) of 64 bf16 (one
// 128-byte line) at r * 128, its 16-byte unit u at unit u ^ (r % 8); tiles 1,024-byte aligned.
#ifndef RAMBA_KERNELS_CUDA_WGMMA_CUH_
#define RAMBA_KERNELS_CUDA_WGMMA_CUH_

#include <cuda_runtime.h>

#include <cstdint>

namespace ramba::kernels::cuda {

// Descriptor of a K-major, 128-byte-swizzled B tile whose k-step starts at `shared_addr` (the
// tile's 1,024-byte-aligned base plus 32 bytes per k16 step within the 128-byte line): start
// address >> 4 in bits 0-13, leading offset unused (1) for swizzled K-major, stride 1,024 bytes
// (between 8-row groups) >> 4 in bits 32-45, swizzle mode 1 (128 bytes) in bits 62-63.
__device__ __forceinline__ uint64_t WgmmaDescSw128(uint32_t shared_addr) {
  return static_cast<uint64_t>((shared_addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

// Orders this thread's earlier register writes (accumulators, A fragments) before the
// warpgroup's next wgmma reads them.
__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}

__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}

// Waits until at most kPending committed groups are still running.
template <int kPending>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving accesses to accumulators across an asynchronous product.
__device__ __forceinline__ void WgmmaFenceOperands(float (&d)[8][4]) {
#pragma unroll
  for (int n = 0; n < 8; ++n) {
    asm volatile("" : "+f"(d[n][0]), "+f"(d[n][1]), "+f"(d[n][2]), "+f"(d[n][3])::"memory");
  }
}

__device__ __forceinline__ void WgmmaFenceOperands(uint32_t (&a)[4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    asm volatile("" : "+r"(a[i][0]), "+r"(a[i][1]), "+r"(a[i][2]), "+r"(a[i][3])::"memory");
  }
}

#define RAMBA_WGMMA_D32                                                                         \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),     \
      "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
      "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), \
      "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
      "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), \
      "+f"(d[7][2]), "+f"(d[7][3])

// d (64 x 64, f32) = a (64 x 16, bf16, K-major in shared memory, descriptor) * b (16 x 64, bf16,
// descriptor) + (accumulate ? d : 0). Asynchronous, as below.
__device__ __forceinline__ void WgmmaM64N64K16(float (&d)[8][4], uint64_t a_desc, uint64_t b_desc,
                                               bool accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, 0;\n}\n"
      : RAMBA_WGMMA_D32
      : "l"(a_desc), "l"(b_desc), "r"(accumulate ? 1 : 0));
#else
  __trap();  // built for sm_90a only (CMakeLists.txt)
#endif
}

// d (64 x 64, f32) = a (64 x 16, bf16, registers) * b (16 x 64, bf16, descriptor) + (accumulate ?
// d : 0). Asynchronous: commit and wait before reading d or reusing a.
__device__ __forceinline__ void WgmmaM64N64K16(float (&d)[8][4], const uint32_t (&a)[4],
                                               uint64_t b_desc, bool accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %38, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, %37;\n}\n"
      : RAMBA_WGMMA_D32
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "n"(0), "r"(accumulate ? 1 : 0));
#else
  __trap();  // built for sm_90a only (CMakeLists.txt)
#endif
}

#undef RAMBA_WGMMA_D32

}  // namespace ramba::kernels::cuda

#endif  // RAMBA_KERNELS_CUDA_WGMMA_CUH_
