#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"

namespace ramba {
namespace {

using json = nlohmann::json;
using kernels::DType;

constexpr char kMetadataKey[] = "__metadata__";

bool DTypeFromName(const std::string& name, DType* out) {
  if (name == "F32") {
    *out = DType::kF32;
  } else if (name == "BF16") {
    *out = DType::kBF16;
  } else if (name == "F16") {
    *out = DType::kF16;
  } else {
    return false;
  }
  return true;
}

const char* SafetensorsDTypeName(DType t) {
  switch (t) {
    case DType::kF32: return "F32";
    case DType::kBF16: return "BF16";
    case DType::kF16: return "F16";
  }
  return "?";
}

bool IsKnownUnsupportedDType(const std::string& name) {
  static const char* const kNames[] = {"F64",  "I64",     "I32",     "I16",    "I8",  "U64",
                                       "U32",  "U16",     "U8",      "BOOL",   "F8_E4M3",
                                       "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64"};
  for (const char* n : kNames) {
    if (name == n) return true;
  }
  return false;
}

uint64_t ReadLe64(const char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

void AppendLe64(std::string* out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

absl::Status TensorError(const std::string& name, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("safetensors tensor '", name, "': ", what));
}

// Reads a non-negative JSON integer.
bool AsUint(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer() && v.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(v.get<int64_t>());
    return true;
  }
  return false;
}

struct Entry {
  std::string name;
  uint64_t begin = 0, end = 0;
};

absl::Status ParseMetadata(const json& meta, std::map<std::string, std::string>* out) {
  if (!meta.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors '__metadata__' must be an object of strings, got ",
                     meta.type_name()));
  }
  for (const auto& [k, v] : meta.items()) {
    if (!v.is_string()) {
      return absl::InvalidArgumentError(absl::StrCat("safetensors '__metadata__' value '", k,
                                                     "' must be a string, got ", v.type_name()));
    }
    (*out)[k] = v.get<std::string>();
  }
  return absl::OkStatus();
}

absl::Status WithPath(const absl::Status& s, const std::string& path) {
  return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
}

}  // namespace

int64_t TensorData::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<float> TensorData::ToFloat() const {
  const size_t n = bytes.size() / kernels::DTypeSize(dtype);
  std::vector<float> out(n);
  switch (dtype) {
    case DType::kF32:
      std::memcpy(out.data(), bytes.data(), n * sizeof(float));
      break;
    case DType::kBF16:
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) {
        const uint16_t v = static_cast<uint16_t>(static_cast<unsigned char>(bytes[2 * i]) |
                                                 (static_cast<unsigned char>(bytes[2 * i + 1]) << 8));
        out[i] = dtype == DType::kBF16 ? kernels::Bf16ToF32(v) : kernels::F16ToF32(v);
      }
      break;
  }
  return out;
}

absl::StatusOr<TensorMap> ParseSafetensors(std::string_view file_bytes,
                                           std::map<std::string, std::string>* metadata) {
  if (file_bytes.size() < 8) {
    return absl::DataLossError(absl::StrCat("safetensors file is ", file_bytes.size(),
                                            " bytes, shorter than its 8-byte header length"));
  }
  const uint64_t header_len = ReadLe64(file_bytes.data());
  if (header_len > file_bytes.size() - 8) {
    return absl::DataLossError(absl::StrCat("safetensors header length ", header_len,
                                            " runs past the end of the file (", file_bytes.size(),
                                            " bytes)"));
  }
  const std::string_view header = file_bytes.substr(8, header_len);
  const std::string_view data = file_bytes.substr(8 + header_len);

  // The callback sees every top-level key, which a parsed json object would silently dedupe.
  std::set<std::string> seen;
  std::string duplicate;
  const json::parser_callback_t cb = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth == 1 && event == json::parse_event_t::key && parsed.is_string()) {
      if (!seen.insert(parsed.get<std::string>()).second && duplicate.empty()) {
        duplicate = parsed.get<std::string>();
      }
    }
    return true;
  };
  json root;
  try {
    root = json::parse(header.begin(), header.end(), cb);
  } catch (const json::parse_error& e) {
    std::string what = e.what();
    // Drop nlohmann's "[json.exception.parse_error.101] parse error at line 1, column 2: ".
    if (const size_t colon = what.find(": "); colon != std::string::npos) {
      what = what.substr(colon + 2);
    }
    return absl::InvalidArgumentError(absl::StrCat("safetensors header is not valid JSON at byte ",
                                                   e.byte > 0 ? e.byte - 1 : 0, ": ", what));
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors header is not valid JSON: ", e.what()));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors header must be a JSON object, got ", root.type_name()));
  }
  if (!duplicate.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors header names tensor '", duplicate, "' more than once"));
  }

  TensorMap tensors;
  std::map<std::string, std::string> meta;
  std::vector<Entry> entries;
  for (const auto& [name, e] : root.items()) {
    if (name == kMetadataKey) {
      RETURN_IF_ERROR(ParseMetadata(e, &meta));
      continue;
    }
    if (!e.is_object()) {
      return TensorError(name, absl::StrCat("entry must be an object, got ", e.type_name()));
    }
    TensorData t;
    // dtype
    auto dt = e.find("dtype");
    if (dt == e.end()) return TensorError(name, "missing 'dtype'");
    if (!dt->is_string()) return TensorError(name, "'dtype' must be a string");
    const std::string dtype_name = dt->get<std::string>();
    if (!DTypeFromName(dtype_name, &t.dtype)) {
      return TensorError(name, absl::StrCat(IsKnownUnsupportedDType(dtype_name) ? "dtype "
                                                                                : "unknown dtype ",
                                            dtype_name, " is not supported (only F32, BF16, F16)"));
    }
    // shape
    auto sh = e.find("shape");
    if (sh == e.end()) return TensorError(name, "missing 'shape'");
    if (!sh->is_array()) return TensorError(name, "'shape' must be an array");
    uint64_t elements = 1;
    bool overflow = false;
    for (const json& d : *sh) {
      uint64_t dim = 0;
      if (!AsUint(d, &dim)) {
        return TensorError(name, absl::StrCat("'shape' entries must be non-negative integers, got ",
                                              d.dump()));
      }
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) overflow = true;
      if (dim != 0 && elements > std::numeric_limits<uint64_t>::max() / dim) overflow = true;
      elements *= dim;
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    const uint64_t elem_size = kernels::DTypeSize(t.dtype);
    if (overflow || elements > std::numeric_limits<uint64_t>::max() / elem_size) {
      return TensorError(name, "'shape' has too many elements");
    }
    // data_offsets
    auto off = e.find("data_offsets");
    if (off == e.end()) return TensorError(name, "missing 'data_offsets'");
    Entry entry{name, 0, 0};
    if (!off->is_array() || off->size() != 2 || !AsUint((*off)[0], &entry.begin) ||
        !AsUint((*off)[1], &entry.end)) {
      return TensorError(name, absl::StrCat("'data_offsets' must be [begin, end] of non-negative "
                                            "integers, got ", off->dump()));
    }
    if (entry.begin > entry.end) {
      return TensorError(name, absl::StrCat("'data_offsets' [", entry.begin, ", ", entry.end,
                                            "] end before they begin"));
    }
    if (elements * elem_size != entry.end - entry.begin) {
      return TensorError(name, absl::StrCat("shape ", sh->dump(), " of ", dtype_name, " needs ",
                                            elements * elem_size, " bytes but data_offsets [",
                                            entry.begin, ", ", entry.end, "] hold ",
                                            entry.end - entry.begin));
    }
    if (entry.end > data.size()) {
      return absl::DataLossError(absl::StrCat(
          "safetensors tensor '", name, "': data_offsets [", entry.begin, ", ", entry.end,
          "] run past the end of the data section (", data.size(), " bytes)"));
    }
    t.bytes.assign(data.data() + entry.begin, entry.end - entry.begin);
    entries.push_back(std::move(entry));
    tensors.emplace(name, std::move(t));
  }

  // Byte ranges must not overlap (empty tensors occupy no bytes). Gaps are tolerated.
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const Entry* prev = nullptr;
  for (const Entry& e : entries) {
    if (e.begin == e.end) continue;
    if (prev != nullptr && e.begin < prev->end) {
      return absl::InvalidArgumentError(absl::StrCat(
          "safetensors tensors '", prev->name, "' [", prev->begin, ", ", prev->end, ") and '",
          e.name, "' [", e.begin, ", ", e.end, ") overlap"));
    }
    prev = &e;
  }
  if (metadata != nullptr) *metadata = std::move(meta);
  return tensors;
}

absl::StatusOr<TensorMap> ReadSafetensors(const std::string& path,
                                          std::map<std::string, std::string>* metadata) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::ErrnoToStatus(err, absl::StrCat("cannot open ", path));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::ErrnoToStatus(err, absl::StrCat("cannot stat ", path));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size == 0) {
    ::close(fd);
    return WithPath(ParseSafetensors(std::string_view(), metadata).status(), path);
  }
  // Map rather than read: only the tensor bytes are copied, once, into the TensorMap.
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);
  if (map == MAP_FAILED) return absl::ErrnoToStatus(map_err, absl::StrCat("cannot mmap ", path));
  ::madvise(map, size, MADV_SEQUENTIAL);
  absl::StatusOr<TensorMap> result =
      ParseSafetensors(std::string_view(static_cast<const char*>(map), size), metadata);
  ::munmap(map, size);
  if (!result.ok()) return WithPath(result.status(), path);
  return result;
}

std::string SerializeSafetensors(const TensorMap& tensors,
                                 const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header[kMetadataKey] = std::move(meta);
  }
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    nlohmann::ordered_json e = nlohmann::ordered_json::object();
    e["dtype"] = SafetensorsDTypeName(t.dtype);
    e["shape"] = t.shape;
    e["data_offsets"] = {offset, offset + t.bytes.size()};
    offset += t.bytes.size();
    header[name] = std::move(e);
  }
  std::string header_text = header.dump();
  // Pad with spaces so that the data section starts 8-byte aligned, as the reference writer does.
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  std::string out;
  out.reserve(8 + header_text.size() + offset);
  AppendLe64(&out, header_text.size());
  out += header_text;
  for (const auto& [name, t] : tensors) out += t.bytes;
  return out;
}

absl::Status WriteSafetensors(const std::string& path, const TensorMap& tensors,
                              const std::map<std::string, std::string>& metadata) {
  for (const auto& [name, t] : tensors) {
    if (name == kMetadataKey) {
      return absl::InvalidArgumentError("a tensor may not be named '__metadata__'");
    }
    bool bad_shape = false;
    for (int64_t d : t.shape) bad_shape |= d < 0;
    if (bad_shape || t.bytes.size() != static_cast<uint64_t>(t.NumElements()) *
                                           kernels::DTypeSize(t.dtype)) {
      return TensorError(name, absl::StrCat("holds ", t.bytes.size(), " bytes, which does not "
                                            "match its shape and dtype"));
    }
  }
  const std::string bytes = SerializeSafetensors(tensors, metadata);
  // Written next to the target and renamed over it, so that readers never see a partial file.
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) return absl::ErrnoToStatus(errno, absl::StrCat("cannot create ", tmp));
  const bool wrote = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  const int write_err = errno;
  if (std::fclose(f) != 0 || !wrote) {
    std::remove(tmp.c_str());
    return absl::ErrnoToStatus(wrote ? errno : write_err, absl::StrCat("cannot write ", tmp));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    return absl::ErrnoToStatus(err, absl::StrCat("cannot rename ", tmp, " to ", path));
  }
  return absl::OkStatus();
}

TensorData MakeF32Tensor(std::vector<int64_t> shape, const std::vector<float>& values) {
  TensorData t;
  t.dtype = DType::kF32;
  t.shape = std::move(shape);
  t.bytes.assign(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
  return t;
}

}  // namespace ramba
