#include "kernels/cuda/cublaslt_api.h"

#include <dlfcn.h>

#include <mutex>
#include <string>

#include "absl/strings/str_cat.h"

namespace ramba::kernels::cuda {
namespace {

CublasLtApi api;
absl::Status load_status = absl::UnknownError("cuBLASLt not loaded yet");
std::once_flag once;

absl::Status Load() {
  void* lib = nullptr;
  std::string tried;
  for (const char* name : {"libcublasLt.so.13", "/usr/local/cuda/lib64/libcublasLt.so.13"}) {
    lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (lib != nullptr) break;
    absl::StrAppend(&tried, tried.empty() ? "" : "; ", dlerror());
  }
  if (lib == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot load cuBLASLt (", tried, "); add its folder to LD_LIBRARY_PATH"));
  }
#define RAMBA_CUBLASLT_RESOLVE(name)                                                 \
  api.name = reinterpret_cast<decltype(api.name)>(dlsym(lib, #name));                \
  if (api.name == nullptr) {                                                         \
    return absl::FailedPreconditionError(absl::StrCat("cuBLASLt lacks " #name)); \
  }
  RAMBA_CUBLASLT_FUNCTIONS(RAMBA_CUBLASLT_RESOLVE)
#undef RAMBA_CUBLASLT_RESOLVE
  return absl::OkStatus();
}

}  // namespace

absl::Status LoadCublasLt() {
  std::call_once(once, [] { load_status = Load(); });
  return load_status;
}

const CublasLtApi& CublasLt() { return api; }

}  // namespace ramba::kernels::cuda
