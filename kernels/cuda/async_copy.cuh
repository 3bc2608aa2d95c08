// Hopper (sm_90) asynchronous copies into shared memory: transaction mbarriers and the bulk copy
// engine (cp.async.bulk, the one-dimensional form of TMA: one thread moves a contiguous block,
// no tensor map). A producer arms a barrier with the bytes it expects and issues the copy; the
// copy's completion (complete_tx) finishes the barrier's phase, which consumers wait on by
// parity. PTX ISA: "mbarrier", "cp.async.bulk".
#ifndef RAMBA_KERNELS_CUDA_ASYNC_COPY_CUH_
#define RAMBA_KERNELS_CUDA_ASYNC_COPY_CUH_

#include <cuda_runtime.h>

#include <cstdint>

namespace ramba::kernels::cuda {

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// `count` arrivals complete each phase.
__device__ __forceinline__ void MbarrierInit(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(SharedAddress(bar)), "r"(count)
               : "memory");
}

// Makes initialised barriers visible to the copy engine; then a block-wide barrier.
__device__ __forceinline__ void FenceMbarrierInit() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// One arrival that also expects `bytes` of copies to complete before the phase does.
__device__ __forceinline__ void MbarrierArriveExpectTx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(SharedAddress(bar)),
               "r"(bytes)
               : "memory");
}

// Waits until the phase with this parity (0 for phases 0, 2, ...) has completed. kCluster:
// acquire at cluster scope, for phases completed by other cluster blocks' StoreToRank.
template <bool kCluster = false>
__device__ __forceinline__ void MbarrierWait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = SharedAddress(bar);
  uint32_t done = 0;
  do {
    if constexpr (kCluster) {
      asm volatile(
          "{\n.reg .pred p;\n"
          "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
          "selp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(addr), "r"(parity)
          : "memory");
    } else {
      asm volatile(
          "{\n.reg .pred p;\n"
          "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
          "selp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(addr), "r"(parity)
          : "memory");
    }
  } while (!done);
}

// Copies `bytes` (a multiple of 16; both addresses 16-byte aligned) from global to shared memory
// and completes that many bytes of `bar`'s transaction count when done.
__device__ __forceinline__ void BulkCopyToShared(void* dst, const void* src, uint32_t bytes,
                                                 uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(SharedAddress(dst)),
      "l"(src), "r"(bytes), "r"(SharedAddress(bar))
      : "memory");
}

// Distributed shared memory (thread-block clusters): the address of the same shared variable in
// cluster block `rank`.
__device__ __forceinline__ uint32_t MapToRank(uint32_t shared_addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(shared_addr), "r"(rank));
  return r;
}

// Stores v at a cluster block's shared address and completes 4 bytes of that block's barrier
// `bar` (an address from MapToRank): the receiver waits on its own barrier, armed with the bytes
// it expects, instead of a cluster-wide barrier.
__device__ __forceinline__ void StoreToRank(uint32_t addr, float v, uint32_t bar) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];" ::"r"(addr),
      "r"(__float_as_uint(v)), "r"(bar)
      : "memory");
}

// Asynchronous 4- and 16-byte copies from global to shared memory (cp.async, sm_80): the thread
// goes on; CpAsyncWaitAll() before its barrier to the readers.
__device__ __forceinline__ void CpAsync4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(SharedAddress(dst)), "l"(src)
               : "memory");
}
__device__ __forceinline__ void CpAsync16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(SharedAddress(dst)), "l"(src)
               : "memory");
}
__device__ __forceinline__ void CpAsyncWaitAll() {
  asm volatile("cp.async.wait_all;" ::: "memory");
}
// Groups: CpAsyncCommit() closes the thread's copies issued since the last commit into a group;
// CpAsyncWaitGroup<n>() returns once at most n of its committed groups are still in flight.
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int n>
__device__ __forceinline__ void CpAsyncWaitGroup() {
  asm volatile("cp.async.wait_group %0;" ::"n"(n) : "memory");
}

}  // namespace ramba::kernels::cuda

#endif  // RAMBA_KERNELS_CUDA_ASYNC_COPY_CUH_
