// Key encoding of the session store's column families. No RocksDB types: plain byte strings.
//
//   sessions, states   key = session id bytes, unchanged (so RocksDB's bytewise order is id order,
//                      which List pages through)
//   refcounts          key = origin bytes, unchanged
//   chunks, landmarks  key = [u8 origin length][origin bytes][u64 big-endian chunk index]
//
// The length prefix keeps one origin's keys from interleaving with another whose name extends it
// ("ab" vs "abc"), and big-endian indices make iteration order numeric, so one origin's chunks are
// one contiguous, ordered key range (DeleteRange and range scans rely on both).
#ifndef RAMBA_STORE_KEYS_H_
#define RAMBA_STORE_KEYS_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace ramba::store {

// Session ids are client-visible strings of 1 to kMaxSessionIdBytes bytes (any byte values).
inline constexpr size_t kMaxSessionIdBytes = 128;
// Origins are generated ("<session id>#<n>"), so they fit the one-byte length prefix.
inline constexpr size_t kMaxOriginBytes = 255;

// InvalidArgument naming `field` unless `id` is a valid session id.
absl::Status ValidateSessionId(absl::string_view id, absl::string_view field = "session id");

// Key of chunk (or landmark blob) `index` of `origin`. Requires 1 <= origin.size() <= 255 and
// index >= 0.
std::string ChunkKey(absl::string_view origin, int64_t index);

struct DecodedChunkKey {
  std::string origin;
  int64_t index = 0;
};
// Inverse of ChunkKey; InvalidArgument on a malformed key.
absl::StatusOr<DecodedChunkKey> DecodeChunkKey(absl::string_view key);

// [ChunkKey(origin, from), end of origin's key range): every chunk key of `origin` with index >=
// `from`, and no other key.
struct KeyRange {
  std::string begin;
  std::string end;  // exclusive
};
KeyRange ChunkKeyRange(absl::string_view origin, int64_t from = 0);

// The origin ("chunk namespace") of the `n`-th session incarnation created in a store: unique even
// when a deleted id is reused while forks still hold the old incarnation's chunks.
std::string MakeOrigin(absl::string_view session_id, uint64_t n);
// The `n` of an origin made by MakeOrigin (the number after its last '#'); nullopt otherwise.
std::optional<uint64_t> OriginNumber(absl::string_view origin);

// Printable form of an id or origin for error messages (C escapes, quoted).
std::string Quote(absl::string_view s);

}  // namespace ramba::store

#endif  // RAMBA_STORE_KEYS_H_
