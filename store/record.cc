#include "store/record.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "store/crc32c.h"
#include "store/keys.h"

namespace ramba::store {
namespace {

constexpr uint16_t kSessionRecordVersion = 1;
constexpr uint16_t kRefcountVersion = 1;
constexpr uint16_t kStateSlotPointerVersion = 1;

void PutFixed16(std::string* out, uint16_t v) {
  out->push_back(static_cast<char>(v & 0xFF));
  out->push_back(static_cast<char>(v >> 8));
}
void PutFixed32(std::string* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
uint64_t LoadLe(const char* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
bool GetFixed16(absl::string_view* in, uint16_t* v) {
  if (in->size() < 2) return false;
  *v = static_cast<uint16_t>(LoadLe(in->data(), 2));
  in->remove_prefix(2);
  return true;
}
bool GetFixed32(absl::string_view* in, uint32_t* v) {
  if (in->size() < 4) return false;
  *v = static_cast<uint32_t>(LoadLe(in->data(), 4));
  in->remove_prefix(4);
  return true;
}
bool GetInt64(absl::string_view* in, int64_t* v) {
  uint64_t u;
  if (!GetFixed64(in, &u)) return false;
  *v = static_cast<int64_t>(u);
  return true;
}
void PutBytes(std::string* out, absl::string_view s) {
  PutFixed32(out, static_cast<uint32_t>(s.size()));
  out->append(s.data(), s.size());
}
bool GetBytes(absl::string_view* in, std::string* s) {
  uint32_t n;
  if (!GetFixed32(in, &n) || in->size() < n) return false;
  s->assign(in->data(), n);
  in->remove_prefix(n);
  return true;
}

uint32_t RecordCrc(absl::string_view key, absl::string_view header16, absl::string_view payload) {
  uint32_t crc = Crc32cExtend(0, key.data(), key.size());
  crc = Crc32cExtend(crc, header16.data(), header16.size());
  return Crc32cExtend(crc, payload.data(), payload.size());
}

absl::Status Truncated(absl::string_view what) {
  return absl::DataLossError(absl::StrCat(what, " is truncated"));
}

}  // namespace

void PutFixed64(std::string* out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
bool GetFixed64(absl::string_view* in, uint64_t* v) {
  if (in->size() < 8) return false;
  *v = LoadLe(in->data(), 8);
  in->remove_prefix(8);
  return true;
}

const char* RecordKindName(RecordKind kind) {
  switch (kind) {
    case RecordKind::kSession: return "session record";
    case RecordKind::kStates: return "states snapshot";
    case RecordKind::kChunk: return "chunk";
    case RecordKind::kLandmarks: return "landmarks";
    case RecordKind::kRefcount: return "refcount";
    case RecordKind::kMeta: return "store metadata";
    case RecordKind::kStateSlot:
      return "state slot pointer";
  }
  return "unknown record";
}

std::string EncodeRecordHeader(RecordKind kind, absl::string_view key, absl::string_view payload) {
  std::string h;
  h.reserve(kRecordHeaderBytes);
  PutFixed32(&h, kRecordMagic);
  h.push_back(static_cast<char>(kRecordVersion));
  h.push_back(static_cast<char>(kind));
  PutFixed16(&h, 0);
  PutFixed64(&h, payload.size());
  PutFixed32(&h, RecordCrc(key, h, payload));
  return h;
}

absl::StatusOr<absl::string_view> UnwrapRecord(RecordKind kind, absl::string_view key,
                                              absl::string_view value) {
  if (value.size() < kRecordHeaderBytes) {
    return absl::DataLossError(absl::StrCat("record of ", value.size(),
                                            " bytes is shorter than its ", kRecordHeaderBytes,
                                            "-byte header"));
  }
  absl::string_view in = value;
  uint32_t magic = 0, crc = 0;
  uint16_t reserved = 0;
  uint64_t length = 0;
  GetFixed32(&in, &magic);
  const auto version = static_cast<uint8_t>(in[0]);
  const auto stored_kind = static_cast<uint8_t>(in[1]);
  in.remove_prefix(2);
  GetFixed16(&in, &reserved);
  GetFixed64(&in, &length);
  GetFixed32(&in, &crc);
  if (magic != kRecordMagic) {
    return absl::DataLossError(absl::StrCat("bad record magic 0x", absl::Hex(magic)));
  }
  if (version != kRecordVersion) {
    return absl::DataLossError(absl::StrCat("unsupported record version ", version,
                                            " (this build reads ", kRecordVersion, ")"));
  }
  if (stored_kind != static_cast<uint8_t>(kind) || reserved != 0) {
    return absl::DataLossError(absl::StrCat("expected a ", RecordKindName(kind),
                                            " record, found kind ", stored_kind));
  }
  if (length != in.size()) {
    return absl::DataLossError(absl::StrCat("record payload is ", in.size(),
                                            " bytes, header says ", length));
  }
  const uint32_t actual = RecordCrc(key, value.substr(0, 16), in);
  if (actual != crc) {
    return absl::DataLossError(absl::StrCat("record checksum mismatch (stored 0x", absl::Hex(crc),
                                            ", computed 0x", absl::Hex(actual), ")"));
  }
  return in;
}

std::optional<RecordKind> PeekRecordKind(absl::string_view value) {
  if (value.size() < kRecordHeaderBytes || LoadLe(value.data(), 4) != kRecordMagic) {
    return std::nullopt;
  }
  return static_cast<RecordKind>(static_cast<uint8_t>(value[5]));
}

std::string EncodeSessionRecord(const SessionRecord& r) {
  std::string out;
  out.reserve(64 + r.id.size() + r.origin.size() + r.metadata.size() +
              r.chunk_sources.size() * 48);
  PutFixed16(&out, kSessionRecordVersion);
  PutBytes(&out, r.id);
  PutBytes(&out, r.origin);
  PutBytes(&out, r.metadata);
  PutFixed64(&out, static_cast<uint64_t>(r.position));
  PutFixed64(&out, static_cast<uint64_t>(r.num_chunks));
  PutFixed64(&out, static_cast<uint64_t>(r.created_unix_micros));
  PutFixed64(&out, static_cast<uint64_t>(r.updated_unix_micros));
  PutFixed32(&out, static_cast<uint32_t>(r.chunk_sources.size()));
  for (const ChunkSource& s : r.chunk_sources) {
    PutBytes(&out, s.origin);
    PutFixed64(&out, static_cast<uint64_t>(s.begin));
    PutFixed64(&out, static_cast<uint64_t>(s.end));
  }
  return out;
}

absl::StatusOr<SessionRecord> DecodeSessionRecord(absl::string_view in) {
  constexpr absl::string_view kWhat = "session record";
  uint16_t version;
  if (!GetFixed16(&in, &version)) return Truncated(kWhat);
  if (version != kSessionRecordVersion) {
    return absl::DataLossError(absl::StrCat("unsupported session record version ", version));
  }
  SessionRecord r;
  uint32_t num_sources;
  if (!GetBytes(&in, &r.id) || !GetBytes(&in, &r.origin) || !GetBytes(&in, &r.metadata) ||
      !GetInt64(&in, &r.position) || !GetInt64(&in, &r.num_chunks) ||
      !GetInt64(&in, &r.created_unix_micros) || !GetInt64(&in, &r.updated_unix_micros) ||
      !GetFixed32(&in, &num_sources)) {
    return Truncated(kWhat);
  }
  // Each source takes at least 4 + 1 + 16 bytes: bound the count before reserving.
  if (num_sources > in.size() / 21) return Truncated(kWhat);
  r.chunk_sources.resize(num_sources);
  for (ChunkSource& s : r.chunk_sources) {
    if (!GetBytes(&in, &s.origin) || !GetInt64(&in, &s.begin) || !GetInt64(&in, &s.end)) {
      return Truncated(kWhat);
    }
  }
  if (!in.empty()) {
    return absl::DataLossError(absl::StrCat("session record has ", in.size(), " trailing bytes"));
  }
  if (r.position < 0 || r.num_chunks < 0 || r.origin.empty() ||
      r.origin.size() > kMaxOriginBytes) {
    return absl::DataLossError("session record has a negative position or chunk count or a bad origin");
  }
  int64_t next = 0;
  for (const ChunkSource& s : r.chunk_sources) {
    if (s.begin != next || s.end <= s.begin || s.origin.empty() ||
        s.origin.size() > kMaxOriginBytes) {
      return absl::DataLossError(absl::StrCat("session record chunk sources do not tile [0, ",
                                              r.num_chunks, ") at chunk ", next));
    }
    next = s.end;
  }
  if (next != r.num_chunks) {
    return absl::DataLossError(absl::StrCat("session record chunk sources cover [0, ", next,
                                            ") but it has ", r.num_chunks, " chunks"));
  }
  return r;
}

std::string EncodeRefcount(const Refcount& r) {
  std::string out;
  PutFixed16(&out, kRefcountVersion);
  PutFixed64(&out, static_cast<uint64_t>(r.count));
  PutFixed64(&out, static_cast<uint64_t>(r.shared_end));
  return out;
}

absl::StatusOr<Refcount> DecodeRefcount(absl::string_view in) {
  uint16_t version;
  Refcount r;
  if (!GetFixed16(&in, &version) || !GetInt64(&in, &r.count) || !GetInt64(&in, &r.shared_end) ||
      !in.empty()) {
    return absl::DataLossError("refcount record has the wrong size");
  }
  if (version != kRefcountVersion) {
    return absl::DataLossError(absl::StrCat("unsupported refcount version ", version));
  }
  if (r.count <= 0 || r.shared_end < 0) {
    return absl::DataLossError(absl::StrCat("refcount record holds count ", r.count,
                                            ", shared end ", r.shared_end));
  }
  return r;
}

std::string EncodeStateSlotPointer(const StateSlotPointer& p) {
  std::string out;
  PutFixed16(&out, kStateSlotPointerVersion);
  PutFixed64(&out, p.file);
  out.push_back(static_cast<char>(p.slot));
  PutFixed64(&out, p.length);
  PutFixed32(&out, p.crc);
  return out;
}

absl::StatusOr<StateSlotPointer> DecodeStateSlotPointer(absl::string_view in) {
  uint16_t version;
  StateSlotPointer p;
  if (!GetFixed16(&in, &version) || !GetFixed64(&in, &p.file) || in.empty()) {
    return absl::DataLossError("state slot pointer has the wrong size");
  }
  const auto slot = static_cast<uint8_t>(in[0]);
  in.remove_prefix(1);
  if (!GetFixed64(&in, &p.length) || !GetFixed32(&in, &p.crc) || !in.empty()) {
    return absl::DataLossError("state slot pointer has the wrong size");
  }
  if (version != kStateSlotPointerVersion) {
    return absl::DataLossError(absl::StrCat("unsupported state slot pointer version ", version));
  }
  if (slot > 1) return absl::DataLossError(absl::StrCat("state slot pointer names slot ", slot));
  p.slot = slot;
  return p;
}

std::string EncodeLandmarkPayloadHeader(int64_t end) {
  std::string out;
  PutFixed64(&out, static_cast<uint64_t>(end));
  return out;
}

absl::StatusOr<LandmarkBlob> DecodeLandmarkPayload(absl::string_view in) {
  LandmarkBlob b;
  if (!GetInt64(&in, &b.end)) return Truncated("landmark record");
  b.blob = in;
  return b;
}

}  // namespace ramba::store
