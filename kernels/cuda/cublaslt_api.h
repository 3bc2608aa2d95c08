// cuBLASLt, loaded with dlopen the first time a CUDA backend is created, instead of linked.
// Why: libcublasLt carries a large static TLS block. Linked into an executable it raises glibc's
// minimum thread stack above the 100 KiB that Debian's civetweb (under prometheus-cpp's /metrics
// exposer) asks for, and the metrics server then fails to start - on every host, GPU or not.
// Loaded later, its TLS is dynamic and nothing else changes; CPU-only hosts never load it.
#ifndef RAMBA_KERNELS_CUDA_CUBLASLT_API_H_
#define RAMBA_KERNELS_CUDA_CUBLASLT_API_H_

#include <cublasLt.h>

#include "absl/status/status.h"

namespace ramba::kernels::cuda {

// Entry points used by the backend, with cuBLASLt's own signatures.
struct CublasLtApi {
#define RAMBA_CUBLASLT_FUNCTIONS(X)                                                       \
  X(cublasLtCreate) X(cublasLtDestroy) X(cublasLtMatmul) X(cublasLtMatmulAlgoGetHeuristic) \
  X(cublasLtMatmulDescCreate) X(cublasLtMatmulDescDestroy) X(cublasLtMatmulDescSetAttribute) \
  X(cublasLtMatmulPreferenceCreate) X(cublasLtMatmulPreferenceDestroy)                   \
  X(cublasLtMatmulPreferenceSetAttribute) X(cublasLtMatrixLayoutCreate)                  \
  X(cublasLtMatrixLayoutDestroy)
#define RAMBA_CUBLASLT_MEMBER(name) decltype(&::name) name = nullptr;
  RAMBA_CUBLASLT_FUNCTIONS(RAMBA_CUBLASLT_MEMBER)
#undef RAMBA_CUBLASLT_MEMBER
};

// Loads the library once (thread-safe); an error names what could not be found.
absl::Status LoadCublasLt();
// The loaded entry points; only valid after LoadCublasLt() succeeded.
const CublasLtApi& CublasLt();

}  // namespace ramba::kernels::cuda

#endif  // RAMBA_KERNELS_CUDA_CUBLASLT_API_H_
