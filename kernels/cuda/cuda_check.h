// Error plumbing for CUDA code: every runtime and cuBLASLt call is checked and turned into an
// absl::Status naming the call site, so a failed launch surfaces as an error, never as garbage.
#ifndef RAMBA_KERNELS_CUDA_CUDA_CHECK_H_
#define RAMBA_KERNELS_CUDA_CUDA_CHECK_H_

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace ramba::kernels::cuda {

inline absl::Status CudaError(cudaError_t e, const char* what, const char* file, int line) {
  return absl::InternalError(absl::StrCat(what, " failed at ", file, ":", line, ": ",
                                          cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
}
inline absl::Status CublasError(cublasStatus_t e, const char* what, const char* file, int line) {
  return absl::InternalError(absl::StrCat(what, " failed at ", file, ":", line, ": cuBLAS status ",
                                          static_cast<int>(e)));
}

}  // namespace ramba::kernels::cuda

#define RAMBA_CUDA_RETURN_IF_ERROR(expr)                                              \
  do {                                                                                \
    const cudaError_t ramba_cuda_err_ = (expr);                                       \
    if (ramba_cuda_err_ != cudaSuccess) {                                             \
      return ::ramba::kernels::cuda::CudaError(ramba_cuda_err_, #expr, __FILE__, __LINE__); \
    }                                                                                 \
  } while (0)

// After a <<<...>>> launch: configuration errors (too many threads, too much shared memory).
#define RAMBA_CUDA_CHECK_LAUNCH(name) RAMBA_CUDA_RETURN_IF_ERROR(cudaGetLastError())

#define RAMBA_CUBLAS_RETURN_IF_ERROR(expr)                                              \
  do {                                                                                  \
    const cublasStatus_t ramba_cublas_err_ = (expr);                                    \
    if (ramba_cublas_err_ != CUBLAS_STATUS_SUCCESS) {                                   \
      return ::ramba::kernels::cuda::CublasError(ramba_cublas_err_, #expr, __FILE__, __LINE__); \
    }                                                                                   \
  } while (0)

#endif  // RAMBA_KERNELS_CUDA_CUDA_CHECK_H_
