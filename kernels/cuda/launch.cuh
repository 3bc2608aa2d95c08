// Kernel launches with programmatic dependent launch (PDL, sm_90): a kernel may be scheduled
// while the kernel before it on the stream is still finishing, and waits inside (griddepcontrol)
// only where it first touches that kernel's results. In a decode step of ~150 small kernels this
// hides each launch's ramp-up, and lets a GEMM start streaming its weights (which no earlier
// kernel writes) before its input exists.
//
// The rule every kernel launched through Launch() must follow: call WaitForPriorGrids() before
// reading any memory an earlier kernel may write and before writing any memory an earlier kernel
// may read. Kernels call AllowDependentGrids() early so that their successor is scheduled as soon
// as every block of theirs is running; the successor's own wait keeps it correct. (Not the
// persistent Mamba kernels: mamba_blocks.cu says why.)
// Without sm_90 (or with RAMBA_CUDA_PDL=0) both instructions are no-ops / plain launches.
#ifndef RAMBA_KERNELS_CUDA_LAUNCH_CUH_
#define RAMBA_KERNELS_CUDA_LAUNCH_CUH_

#include <cuda_runtime.h>

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ops.h"

namespace ramba::kernels::cuda {

__device__ __forceinline__ void WaitForPriorGrids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void AllowDependentGrids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, ctx.stream>>>(args...), with PDL when ctx.pdl is set, in
// thread-block clusters of `cluster` blocks along x when cluster > 1 (grid.x a multiple of it).
template <class... KernelArgs, class... Args>
absl::Status LaunchClusters(Context& ctx, int cluster, void (*kernel)(KernelArgs...), dim3 grid,
                            dim3 block, size_t smem, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = ctx.stream;
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (ctx.pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n++].val.clusterDim = {static_cast<unsigned>(cluster), 1, 1};
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  RAMBA_CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
  return absl::OkStatus();
}

template <class... KernelArgs, class... Args>
absl::Status Launch(Context& ctx, void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                    size_t smem, Args&&... args) {
  return LaunchClusters(ctx, 1, kernel, grid, block, smem, std::forward<Args>(args)...);
}

// Raises a kernel's dynamic shared memory limit when it needs more than the default 48 KiB;
// Unimplemented (naming `op`) when the device cannot give that much.
template <class Kernel>
absl::Status PrepareSmem(Context& ctx, Kernel kernel, size_t bytes, const char* op) {
  if (bytes > ctx.max_shared_per_block) {
    return absl::UnimplementedError(absl::StrCat(op, ": needs ", bytes,
                                                 " bytes of shared memory per block; the device "
                                                 "allows ",
                                                 ctx.max_shared_per_block));
  }
  if (bytes > 48 * 1024) {
    RAMBA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  return absl::OkStatus();
}

}  // namespace ramba::kernels::cuda

#endif  // RAMBA_KERNELS_CUDA_LAUNCH_CUH_
