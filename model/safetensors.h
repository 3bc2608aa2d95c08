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

// Parses a whole safetensors file held in memory. Every malformation is an InvalidArgument /
// DataLoss error naming what is wrong: short file, header length past the end, header not a JSON
// object, unknown dtype (only F32, BF16, F16 are supported), shape/offset mismatch, offsets
// out of range, overlapping or unordered data, duplicate names.
absl::StatusOr<TensorMap> ParseSafetensors(std::string_view file_bytes);
absl::StatusOr<TensorMap> ReadSafetensors(const std::string& path);

// Writes tensors (in name order) with optional string metadata.
std::string SerializeSafetensors(const TensorMap& tensors,
                                 const std::map<std::string, std::string>& metadata = {});
absl::Status WriteSafetensors(const std::string& path, const TensorMap& tensors,
                              const std::map<std::string, std::string>& metadata = {});

// Builds a float32 tensor (convenience for tests and tools).
TensorData MakeF32Tensor(std::vector<int64_t> shape, const std::vector<float>& values);

}  // namespace ramba

#endif  // RAMBA_MODEL_SAFETENSORS_H_
