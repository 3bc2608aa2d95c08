// Persistent formats of the session store: the record envelope every value is wrapped in, and the
// payloads of the store's own records (session record, refcount, landmark blob, meta).
//
// Envelope (little-endian), 20 bytes followed by the payload:
//   0  u32 magic 'RMST'           8  u64 payload length
//   4  u8  envelope version (1)   16 u32 CRC-32C of (key, bytes 0..15, payload)
//   5  u8  kind (RecordKind)
//   6  u16 reserved, zero
// The CRC covers the key too, so a value found under another key (a misdirected or stale write)
// fails verification like a flipped bit does. Unwrapping never returns an unverified payload.
#ifndef RAMBA_STORE_RECORD_H_
#define RAMBA_STORE_RECORD_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "store/session_store.h"

namespace ramba::store {

inline constexpr uint32_t kRecordMagic = 0x54534D52u;  // "RMST" in file order
inline constexpr uint8_t kRecordVersion = 1;
inline constexpr size_t kRecordHeaderBytes = 20;

enum class RecordKind : uint8_t {
  kSession = 1,    // SessionRecord
  kStates = 2,     // opaque states snapshot
  kChunk = 3,      // opaque chunk K/V blob
  kLandmarks = 4,  // LandmarkBlob
  kRefcount = 5,   // Refcount
  kMeta = 6,       // store metadata (format version, origin counter)
  kStateSlot = 7,  // StateSlotPointer: where a states snapshot kept in a slot file is
};

// The kind a value's envelope names, unverified (to pick the decoder of a column family that
// holds two kinds); nullopt when the value is too short or its magic is wrong.
std::optional<RecordKind> PeekRecordKind(absl::string_view value);
const char* RecordKindName(RecordKind kind);

// The envelope header of a record with `payload` stored under `key`. The value is the header
// followed by the payload (kept separate so a large blob is not copied to prepend 20 bytes).
std::string EncodeRecordHeader(RecordKind kind, absl::string_view key, absl::string_view payload);
inline std::string WrapRecord(RecordKind kind, absl::string_view key, absl::string_view payload) {
  std::string v = EncodeRecordHeader(kind, key, payload);
  v.append(payload.data(), payload.size());
  return v;
}

// Verifies `value` (read under `key`) and returns a view of its payload inside `value`. DataLoss
// with a message saying what is wrong (size, magic, version, kind, checksum) otherwise; callers
// prefix what the record is ("session \"a\" chunk 3: ").
absl::StatusOr<absl::string_view> UnwrapRecord(RecordKind kind, absl::string_view key,
                                              absl::string_view value);

// SessionRecord payload: u16 format version (1), then id, origin, metadata (u32 length + bytes),
// position, num_chunks, created, updated (i64), u32 source count, sources (origin, begin, end).
std::string EncodeSessionRecord(const SessionRecord& record);
// DataLoss when truncated, oversized, of an unknown version, or inconsistent (sources not
// covering [0, num_chunks) in order).
absl::StatusOr<SessionRecord> DecodeSessionRecord(absl::string_view payload);

// How many sessions reference an origin's chunks, and the highest chunk end any fork took from
// it (chunks of the origin at or above it are referenced only by the origin's own session).
struct Refcount {
  int64_t count = 0;
  int64_t shared_end = 0;
};
std::string EncodeRefcount(const Refcount& r);
absl::StatusOr<Refcount> DecodeRefcount(absl::string_view payload);

// A landmark blob covering chunks [first, end); `first` is in the key.
struct LandmarkBlob {
  int64_t end = 0;
  absl::string_view blob;
};
std::string EncodeLandmarkPayloadHeader(int64_t end);  // 8 bytes; the blob follows
absl::StatusOr<LandmarkBlob> DecodeLandmarkPayload(absl::string_view payload);

// A states snapshot kept in a state slot file (store/state_slots.h), as its pointer in the states
// column family records it: the file's number (the session's origin number), which of its two
// slots, and the snapshot's length and CRC-32C. Payload: u16 format version (1), u64 file, u8
// slot, u64 length, u32 crc.
struct StateSlotPointer {
  uint64_t file = 0;
  int slot = 0;  // 0 or 1
  uint64_t length = 0;
  uint32_t crc = 0;
};
std::string EncodeStateSlotPointer(const StateSlotPointer& p);
absl::StatusOr<StateSlotPointer> DecodeStateSlotPointer(absl::string_view payload);

// Fixed-width little-endian helpers shared with the store.
void PutFixed64(std::string* out, uint64_t v);
bool GetFixed64(absl::string_view* in, uint64_t* v);

}  // namespace ramba::store

#endif  // RAMBA_STORE_RECORD_H_
