#include "store/keys.h"

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace ramba::store {
namespace {

void AppendBigEndian64(std::string* out, uint64_t v) {
  for (int shift = 56; shift >= 0; shift -= 8) out->push_back(static_cast<char>((v >> shift) & 0xFF));
}

std::string OriginPrefix(absl::string_view origin) {
  std::string key;
  key.reserve(1 + origin.size() + 8);
  key.push_back(static_cast<char>(static_cast<uint8_t>(origin.size())));
  key.append(origin.data(), origin.size());
  return key;
}

}  // namespace

absl::Status ValidateSessionId(absl::string_view id, absl::string_view field) {
  if (id.empty() || id.size() > kMaxSessionIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat(field, " must be 1 to ", kMaxSessionIdBytes,
                                                   " bytes, got ", id.size(), " bytes"));
  }
  return absl::OkStatus();
}

std::string ChunkKey(absl::string_view origin, int64_t index) {
  std::string key = OriginPrefix(origin);
  AppendBigEndian64(&key, static_cast<uint64_t>(index));
  return key;
}

absl::StatusOr<DecodedChunkKey> DecodeChunkKey(absl::string_view key) {
  if (key.empty()) return absl::InvalidArgumentError("chunk key is empty");
  const size_t len = static_cast<uint8_t>(key[0]);
  if (len == 0 || key.size() != 1 + len + 8) {
    return absl::InvalidArgumentError(absl::StrCat("chunk key of ", key.size(),
                                                   " bytes does not match its origin length ", len));
  }
  DecodedChunkKey out;
  out.origin.assign(key.data() + 1, len);
  uint64_t v = 0;
  for (size_t i = 0; i < 8; ++i) v = (v << 8) | static_cast<uint8_t>(key[1 + len + i]);
  if (v > static_cast<uint64_t>(INT64_MAX)) {
    return absl::InvalidArgumentError("chunk key index is negative");
  }
  out.index = static_cast<int64_t>(v);
  return out;
}

KeyRange ChunkKeyRange(absl::string_view origin, int64_t from) {
  KeyRange r;
  r.begin = ChunkKey(origin, from);
  // Indices are non-negative int64, so every key of `origin` sorts below index 2^63.
  r.end = OriginPrefix(origin);
  AppendBigEndian64(&r.end, uint64_t{1} << 63);
  return r;
}

std::string MakeOrigin(absl::string_view session_id, uint64_t n) {
  return absl::StrCat(session_id, "#", n);
}

std::optional<uint64_t> OriginNumber(absl::string_view origin) {
  const size_t hash = origin.rfind('#');
  uint64_t n = 0;
  if (hash == absl::string_view::npos || !absl::SimpleAtoi(origin.substr(hash + 1), &n)) {
    return std::nullopt;
  }
  return n;
}

std::string Quote(absl::string_view s) { return absl::StrCat("\"", absl::CEscape(s), "\""); }

}  // namespace ramba::store
