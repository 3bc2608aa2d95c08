// Tests for store/crc32c.h, store/keys.h and store/record.h (formats, no RocksDB).
#include <random>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "store/crc32c.h"
#include "store/keys.h"
#include "store/record.h"

namespace ramba::store {
namespace {

using ::testing::HasSubstr;

TEST(Crc32c, KnownVectorsAndPortableAgreement) {
  EXPECT_EQ(Crc32c("123456789"), 0xE3069283u);  // the CRC-32C check value
  EXPECT_EQ(Crc32c(""), 0u);
  EXPECT_EQ(Crc32c(std::string(32, '\0')), 0x8A9136AAu);  // RFC 3720 B.4
  std::mt19937 rng(7);
  std::string data(1003, '\0');
  for (char& c : data) c = static_cast<char>(rng());
  for (size_t off : {0u, 1u, 3u, 7u}) {
    const absl::string_view s = absl::string_view(data).substr(off);
    EXPECT_EQ(Crc32cExtend(0, s.data(), s.size()), Crc32cExtendPortable(0, s.data(), s.size()));
    // Extending in two pieces equals one pass.
    const uint32_t a = Crc32cExtend(0, s.data(), 100);
    EXPECT_EQ(Crc32cExtend(a, s.data() + 100, s.size() - 100), Crc32c(s));
  }
}

TEST(Keys, ChunkKeysOrderNumericallyAndDoNotInterleaveOrigins) {
  EXPECT_LT(ChunkKey("a", 2), ChunkKey("a", 10));
  EXPECT_LT(ChunkKey("a", 255), ChunkKey("a", 256));
  EXPECT_LT(ChunkKey("a", int64_t{1} << 40), ChunkKey("a", (int64_t{1} << 40) + 1));
  const KeyRange r = ChunkKeyRange("ab", 3);
  for (const std::string& other : {std::string("abc"), std::string("a"), std::string("ab\xff")}) {
    for (int64_t i : {int64_t{0}, int64_t{5}, INT64_MAX}) {
      const std::string k = ChunkKey(other, i);
      EXPECT_FALSE(k >= r.begin && k < r.end) << other << " " << i;
    }
  }
  EXPECT_FALSE(ChunkKey("ab", 2) >= r.begin);
  EXPECT_TRUE(ChunkKey("ab", 3) >= r.begin && ChunkKey("ab", 3) < r.end);
  EXPECT_TRUE(ChunkKey("ab", INT64_MAX) < r.end);
  auto d = DecodeChunkKey(ChunkKey("x#7", 42));
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->origin, "x#7");
  EXPECT_EQ(d->index, 42);
  EXPECT_FALSE(DecodeChunkKey("").ok());
  EXPECT_FALSE(DecodeChunkKey(ChunkKey("x", 1).substr(0, 5)).ok());
}

TEST(Keys, SessionIdValidation) {
  EXPECT_TRUE(ValidateSessionId("a").ok());
  EXPECT_TRUE(ValidateSessionId(std::string(128, 'z')).ok());
  EXPECT_EQ(ValidateSessionId("").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ValidateSessionId(std::string(129, 'z'), "child id").message(),
              HasSubstr("child id must be 1 to 128 bytes, got 129"));
}

TEST(Record, WrapUnwrapAndEveryCorruption) {
  const std::string key = "k", payload = "hello payload";
  const std::string v = WrapRecord(RecordKind::kStates, key, payload);
  ASSERT_EQ(v.size(), kRecordHeaderBytes + payload.size());
  auto p = UnwrapRecord(RecordKind::kStates, key, v);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, payload);
  // Every single-bit flip anywhere in the value is detected.
  for (size_t i = 0; i < v.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string bad = v;
      bad[i] ^= static_cast<char>(1 << bit);
      EXPECT_EQ(UnwrapRecord(RecordKind::kStates, key, bad).status().code(),
                absl::StatusCode::kDataLoss) << "byte " << i << " bit " << bit;
    }
  }
  EXPECT_THAT(UnwrapRecord(RecordKind::kChunk, key, v).status().message(),
              HasSubstr("expected a chunk record"));
  EXPECT_THAT(UnwrapRecord(RecordKind::kStates, "other", v).status().message(),
              HasSubstr("checksum mismatch"));
  EXPECT_THAT(UnwrapRecord(RecordKind::kStates, key, v.substr(0, 5)).status().message(),
              HasSubstr("shorter than"));
  EXPECT_THAT(UnwrapRecord(RecordKind::kStates, key, v + "x").status().message(),
              HasSubstr("header says"));
}

TEST(Record, SessionRecordRoundTripAndValidation) {
  SessionRecord r;
  r.id = std::string("id\0x", 4);
  r.origin = "id#3";
  r.metadata = std::string(1000, 'm');
  r.position = 12345;
  r.num_chunks = 7;
  r.created_unix_micros = 1;
  r.updated_unix_micros = 2;
  r.chunk_sources = {{"p#1", 0, 4}, {"id#3", 4, 7}};
  const std::string enc = EncodeSessionRecord(r);
  auto d = DecodeSessionRecord(enc);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->id, r.id);
  EXPECT_EQ(d->origin, r.origin);
  EXPECT_EQ(d->metadata, r.metadata);
  EXPECT_EQ(d->position, r.position);
  EXPECT_EQ(d->num_chunks, r.num_chunks);
  EXPECT_EQ(d->created_unix_micros, 1);
  EXPECT_EQ(d->updated_unix_micros, 2);
  ASSERT_EQ(d->chunk_sources.size(), 2u);
  EXPECT_EQ(d->chunk_sources[1].origin, "id#3");
  EXPECT_EQ(d->chunk_sources[1].begin, 4);
  EXPECT_EQ(d->chunk_sources[1].end, 7);
  // Every truncation fails cleanly.
  for (size_t n = 0; n < enc.size(); ++n) {
    EXPECT_EQ(DecodeSessionRecord(enc.substr(0, n)).status().code(), absl::StatusCode::kDataLoss);
  }
  SessionRecord gap = r;
  gap.chunk_sources[1].begin = 5;
  EXPECT_THAT(DecodeSessionRecord(EncodeSessionRecord(gap)).status().message(),
              HasSubstr("do not tile"));
  SessionRecord short_cover = r;
  short_cover.num_chunks = 8;
  EXPECT_EQ(DecodeSessionRecord(EncodeSessionRecord(short_cover)).status().code(),
            absl::StatusCode::kDataLoss);
  std::string future = enc;
  future[0] = 9;
  EXPECT_THAT(DecodeSessionRecord(future).status().message(), HasSubstr("version 9"));
}

TEST(Record, RefcountAndLandmarks) {
  auto r = DecodeRefcount(EncodeRefcount({3, 17}));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->count, 3);
  EXPECT_EQ(r->shared_end, 17);
  EXPECT_FALSE(DecodeRefcount(EncodeRefcount({0, 0})).ok());
  EXPECT_FALSE(DecodeRefcount("abc").ok());
  auto l = DecodeLandmarkPayload(EncodeLandmarkPayloadHeader(9) + "blob");
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->end, 9);
  EXPECT_EQ(l->blob, "blob");
  EXPECT_FALSE(DecodeLandmarkPayload("1234").ok());
}

TEST(Record, StateSlotPointerAndPeekedKind) {
  const StateSlotPointer p{42, 1, 1153434, 0xDEADBEEF};
  const std::string payload = EncodeStateSlotPointer(p);
  auto d = DecodeStateSlotPointer(payload);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->file, 42u);
  EXPECT_EQ(d->slot, 1);
  EXPECT_EQ(d->length, 1153434u);
  EXPECT_EQ(d->crc, 0xDEADBEEFu);
  EXPECT_FALSE(DecodeStateSlotPointer(payload.substr(0, payload.size() - 1)).ok());
  EXPECT_FALSE(DecodeStateSlotPointer(payload + "x").ok());
  std::string slot2 = payload;
  slot2[10] = 2;  // u16 version, u64 file, then the slot byte
  EXPECT_THAT(DecodeStateSlotPointer(slot2).status().message(), HasSubstr("slot 2"));

  const std::string value = WrapRecord(RecordKind::kStateSlot, "id", payload);
  EXPECT_EQ(PeekRecordKind(value), RecordKind::kStateSlot);
  EXPECT_EQ(PeekRecordKind(WrapRecord(RecordKind::kStates, "id", "abc")), RecordKind::kStates);
  EXPECT_EQ(PeekRecordKind(value.substr(0, 19)), std::nullopt);
  EXPECT_EQ(PeekRecordKind("X" + value.substr(1)), std::nullopt);
  EXPECT_FALSE(UnwrapRecord(RecordKind::kStates, "id", value).ok());  // kinds are not mixed up
}

TEST(Keys, OriginNumbers) {
  EXPECT_EQ(OriginNumber(MakeOrigin("a", 7)), 7u);
  EXPECT_EQ(OriginNumber(MakeOrigin("x#3", 12)), 12u);  // ids may hold '#'
  EXPECT_EQ(OriginNumber("no-number"), std::nullopt);
  EXPECT_EQ(OriginNumber("a#"), std::nullopt);
  EXPECT_EQ(OriginNumber("a#1x"), std::nullopt);
}

}  // namespace
}  // namespace ramba::store
