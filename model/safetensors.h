// Reading and writing the safetensors format: 8-byte little-endian header length, a JSON header
// {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data.
#ifndef RAMBA_MODEL_SAFETENSORS_H_
#define RAMBA_MODEL_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"

namespace ramba {

// One tensor of a safetensors file: its dtype, shape and raw little-endian bytes.
struct TensorData {
  kernels::DType dtype = kernels::DType::kF32;
  std::vector<int64_t> shape;
  std::string bytes;  // exactly NumElements() * DTypeSize(dtype) bytes

  int64_t NumElements() const;
  // The values converted to float32.
  std::vector<float> ToFloat() const;
};

// Name -> tensor, sorted by name. Owns the data.
using TensorMap = std::map<std::string, TensorData>;

// Parses a whole safetensors file held in memory. Every malformation is an error naming what is
// wrong (and the tensor): DataLoss when the file is shorter than it claims (under 8 bytes, header
// length past the end, data_offsets past the end of the data section); InvalidArgument for a bad
// header (not a JSON object, entry missing dtype/shape/data_offsets, unknown dtype - only F32,
// BF16, F16 are supported -, negative dims, shape/offset size mismatch, overlapping data, duplicate
// names, "__metadata__" not an object of strings). Gaps between tensors are tolerated. When
// `metadata` is not null it receives the "__metadata__" entries.
absl::StatusOr<TensorMap> ParseSafetensors(std::string_view file_bytes,
                                           std::map<std::string, std::string>* metadata = nullptr);
// Reads a safetensors file (mmap'ed, only tensor bytes are copied). NotFound when it does not
// exist; parse errors are prefixed with the path.
absl::StatusOr<TensorMap> ReadSafetensors(const std::string& path,
                                          std::map<std::string, std::string>* metadata = nullptr);

// Writes tensors (in name order, data 8-byte aligned) with optional string metadata. Each tensor's
// bytes must match its shape and dtype (WriteSafetensors checks this; SerializeSafetensors assumes
// it). WriteSafetensors writes `path`.tmp and renames it over `path`.
std::string SerializeSafetensors(const TensorMap& tensors,
                                 const std::map<std::string, std::string>& metadata = {});
absl::Status WriteSafetensors(const std::string& path, const TensorMap& tensors,
                              const std::map<std::string, std::string>& metadata = {});

// Builds a float32 tensor (convenience for tests and tools); values.size() should equal the
// product of `shape`.
TensorData MakeF32Tensor(std::vector<int64_t> shape, const std::vector<float>& values);

}  // namespace ramba

#endif  // RAMBA_MODEL_SAFETENSORS_H_
