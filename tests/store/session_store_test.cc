// Tests for store/session_store.h against a real RocksDB in a temporary directory.
#include "store/session_store.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "store/keys.h"
#include "store/record.h"
#include "store/testing.h"

extern char** environ;

namespace ramba::store {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

// Deterministic pseudo-random bytes for (tag, index): distinct blobs per session and chunk.
std::string Blob(const std::string& tag, int64_t index, size_t size) {
  uint64_t seed = 1469598103934665603ull;
  for (char c : tag) seed = (seed ^ static_cast<uint8_t>(c)) * 1099511628211ull;
  std::mt19937_64 rng(seed ^ static_cast<uint64_t>(index) * 0x9E3779B97F4A7C15ull);
  std::string out(size, '\0');
  for (char& c : out) c = static_cast<char>(rng());
  return out;
}

// A commit of `n` new chunks [first, first + n) written by `tag`, position 64 per chunk + 1.
CommitRequest MakeCommit(const std::string& id, int64_t expected, int64_t first, int64_t n,
                         const std::string& tag, size_t chunk_bytes = 512) {
  CommitRequest r;
  r.session_id = id;
  r.expected_position = expected;
  r.new_position = (first + n) * 64 + 1;
  r.metadata = absl::StrCat("meta:", tag, ":", first + n);
  r.states = absl::StrCat("states:", tag, ":", r.new_position, Blob(tag, -1, 100));
  for (int64_t i = first; i < first + n; ++i) r.new_chunks.emplace_back(i, Blob(tag, i, chunk_bytes));
  if (n > 0) r.new_landmarks = absl::StrCat("lmk:", tag, ":", first, "-", first + n);
  return r;
}

std::string Landmarks(const std::string& tag, int64_t first, int64_t end) {
  return absl::StrCat("lmk:", tag, ":", first, "-", end);
}

class StoreFixture : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ramba_store_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    options_.path = dir_ + "/db";
    Reopen();
  }
  void TearDown() override {
    store_.reset();
    fs::remove_all(dir_);
  }
  void Reopen() {
    store_.reset();
    auto s = SessionStore::Open(options_);
    ASSERT_TRUE(s.ok()) << s.status();
    store_ = *std::move(s);
  }
  int64_t Count(const std::string& cf) {
    auto n = testing::CountKeys(*store_, cf);
    EXPECT_TRUE(n.ok()) << n.status();
    return n.value_or(-1);
  }
  // Asserts that every chunk of `id` in [0, n) equals Blob(tag_of(i), i).
  template <typename TagOf>
  void ExpectChunks(const std::string& id, int64_t n, TagOf tag_of, size_t bytes = 512) {
    for (int64_t i = 0; i < n; ++i) {
      auto chunk = store_->LoadChunk(id, i);
      ASSERT_TRUE(chunk.ok()) << id << " chunk " << i << ": " << chunk.status();
      EXPECT_EQ(*chunk, Blob(tag_of(i), i, bytes)) << id << " chunk " << i;
    }
  }

  std::string dir_;
  StoreOptions options_;
  std::unique_ptr<SessionStore> store_;
};

// Every store behaviour holds with states snapshots inline in RocksDB and in state slot files.
class SessionStoreTest : public StoreFixture, public ::testing::WithParamInterface<bool> {
 protected:
  void SetUp() override {
    options_.state_slot_min_bytes = GetParam() ? 0 : INT64_MAX;
    StoreFixture::SetUp();
  }
};

TEST_P(SessionStoreTest, CreateCommitLoadRoundTrip) {
  ASSERT_TRUE(store_->Commit(MakeCommit("a", -1, 0, 2, "a")).ok());
  ASSERT_TRUE(store_->Commit(MakeCommit("a", 2 * 64 + 1, 2, 3, "a")).ok());
  ASSERT_TRUE(store_->Commit(MakeCommit("a", 5 * 64 + 1, 5, 0, "a")).ok());  // states only

  auto loaded = store_->Load("a");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const SessionRecord& rec = loaded->record;
  EXPECT_EQ(rec.id, "a");
  EXPECT_EQ(rec.position, 5 * 64 + 1);
  EXPECT_EQ(rec.num_chunks, 5);
  EXPECT_EQ(rec.metadata, "meta:a:5");
  EXPECT_GT(rec.created_unix_micros, 0);
  EXPECT_GE(rec.updated_unix_micros, rec.created_unix_micros);
  ASSERT_EQ(rec.chunk_sources.size(), 1u);  // consecutive commits extend one source
  EXPECT_EQ(rec.chunk_sources[0].begin, 0);
  EXPECT_EQ(rec.chunk_sources[0].end, 5);
  EXPECT_EQ(loaded->states, MakeCommit("a", 0, 5, 0, "a").states);
  EXPECT_THAT(loaded->landmarks,
              ::testing::ElementsAre(Landmarks("a", 0, 2), Landmarks("a", 2, 5)));
  ExpectChunks("a", 5, [](int64_t) { return "a"; });

  auto many = store_->LoadChunks("a", {4, 0, 2});
  ASSERT_TRUE(many.ok()) << many.status();
  EXPECT_THAT(*many, ::testing::ElementsAre(Blob("a", 4, 512), Blob("a", 0, 512), Blob("a", 2, 512)));
  EXPECT_EQ(store_->LoadChunk("a", 5).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(store_->LoadChunk("a", -1).status().code(), absl::StatusCode::kOutOfRange);

  auto record = store_->GetRecord("a");
  ASSERT_TRUE(record.ok());
  EXPECT_EQ(record->position, rec.position);
  EXPECT_EQ(store_->NumSessions(), 1);
}

TEST_P(SessionStoreTest, PositionMismatchIsFailedPreconditionAndChangesNothing) {
  ASSERT_TRUE(store_->Commit(MakeCommit("s1", -1, 0, 1, "s1")).ok());
  absl::Status st = store_->Commit(MakeCommit("s1", 7, 1, 1, "x"));
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_THAT(st.message(), HasSubstr("\"s1\""));
  EXPECT_THAT(st.message(), HasSubstr("position 65"));
  EXPECT_THAT(st.message(), HasSubstr("expected position 7"));
  auto rec = store_->GetRecord("s1");
  ASSERT_TRUE(rec.ok());
  EXPECT_EQ(rec->position, 65);
  EXPECT_EQ(rec->num_chunks, 1);
  EXPECT_EQ(Count("chunks"), 1);
}

TEST_P(SessionStoreTest, CreateExistingIsAlreadyExists) {
  ASSERT_TRUE(store_->Commit(MakeCommit("dup", -1, 0, 1, "dup")).ok());
  absl::Status st = store_->Commit(MakeCommit("dup", -1, 0, 1, "other"));
  EXPECT_EQ(st.code(), absl::StatusCode::kAlreadyExists) << st;
  EXPECT_THAT(st.message(), HasSubstr("\"dup\""));
  ExpectChunks("dup", 1, [](int64_t) { return "dup"; });
  EXPECT_EQ(store_->Fork("dup", "dup", "").code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(store_->NumSessions(), 1);
}

TEST_P(SessionStoreTest, MissingSessionIsNotFound) {
  const auto kNotFound = absl::StatusCode::kNotFound;
  EXPECT_EQ(store_->GetRecord("nope").status().code(), kNotFound);
  EXPECT_EQ(store_->Load("nope").status().code(), kNotFound);
  EXPECT_EQ(store_->LoadChunk("nope", 0).status().code(), kNotFound);
  EXPECT_EQ(store_->Delete("nope").code(), kNotFound);
  EXPECT_EQ(store_->UpdateMetadata("nope", "m").code(), kNotFound);
  EXPECT_EQ(store_->Fork("nope", "child", "").code(), kNotFound);
  absl::Status st = store_->Commit(MakeCommit("nope", 0, 0, 1, "nope"));
  EXPECT_EQ(st.code(), kNotFound);
  EXPECT_THAT(st.message(), HasSubstr("session \"nope\" not found"));
}

TEST_P(SessionStoreTest, InvalidRequestsAreInvalidArgument) {
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(store_->Commit(MakeCommit("", -1, 0, 1, "e")).code(), kInvalid);
  const std::string long_id(129, 'x');
  absl::Status st = store_->Commit(MakeCommit(long_id, -1, 0, 1, "l"));
  EXPECT_EQ(st.code(), kInvalid);
  EXPECT_THAT(st.message(), HasSubstr("129 bytes"));
  EXPECT_EQ(store_->GetRecord("").status().code(), kInvalid);
  EXPECT_EQ(store_->Fork("", "c", "").code(), kInvalid);
  EXPECT_THAT(store_->Fork("p", long_id, "").message(), HasSubstr("child session id"));
  EXPECT_TRUE(store_->Commit(MakeCommit(std::string(128, 'x'), -1, 0, 1, "m")).ok());

  CommitRequest gap = MakeCommit("g", -1, 1, 2, "g");  // a new session's chunks start at 0
  st = store_->Commit(gap);
  EXPECT_EQ(st.code(), kInvalid);
  EXPECT_THAT(st.message(), HasSubstr("new_chunks[0] has index 1, expected 0"));
  CommitRequest no_landmarks = MakeCommit("g", -1, 0, 2, "g");
  no_landmarks.new_landmarks.clear();
  EXPECT_EQ(store_->Commit(no_landmarks).code(), kInvalid);
  CommitRequest stray_landmarks = MakeCommit("g", -1, 0, 0, "g");
  stray_landmarks.new_landmarks = "x";
  EXPECT_EQ(store_->Commit(stray_landmarks).code(), kInvalid);
  CommitRequest backwards = MakeCommit("g", -1, 0, 0, "g");
  backwards.expected_position = 10;
  backwards.new_position = 9;
  EXPECT_EQ(store_->Commit(backwards).code(), kInvalid);
  EXPECT_EQ(store_->List("", 0).status().code(), kInvalid);
  EXPECT_EQ(store_->NumSessions(), 1);
}

TEST_P(SessionStoreTest, IdsThatPrefixEachOtherAndBinaryIdsStaySeparate) {
  const std::vector<std::string> ids = {"ab", "abc", "ab#1", std::string("a\0b", 3), "a"};
  for (const std::string& id : ids) ASSERT_TRUE(store_->Commit(MakeCommit(id, -1, 0, 3, id)).ok());
  ASSERT_TRUE(store_->Delete("ab").ok());
  ASSERT_TRUE(store_->CompactAll().ok());
  for (const std::string& id : ids) {
    if (id == "ab") continue;
    ExpectChunks(id, 3, [&](int64_t) { return id; });
    auto loaded = store_->Load(id);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    EXPECT_THAT(loaded->landmarks, ::testing::ElementsAre(Landmarks(id, 0, 3)));
  }
  EXPECT_EQ(Count("chunks"), 12);
}

TEST_P(SessionStoreTest, ReopenKeepsEverything) {
  ASSERT_TRUE(store_->Commit(MakeCommit("p", -1, 0, 2, "p")).ok());
  ASSERT_TRUE(store_->Fork("p", "c", "child-meta").ok());
  ASSERT_TRUE(store_->Commit(MakeCommit("c", 2 * 64 + 1, 2, 2, "c")).ok());
  ASSERT_TRUE(store_->UpdateMetadata("p", "new-meta").ok());
  Reopen();
  EXPECT_EQ(store_->NumSessions(), 2);
  auto p = store_->Load("p");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->record.metadata, "new-meta");
  EXPECT_EQ(p->record.position, 2 * 64 + 1);
  ExpectChunks("p", 2, [](int64_t) { return "p"; });
  auto c = store_->Load("c");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->record.metadata, "meta:c:4");
  EXPECT_EQ(c->record.num_chunks, 4);
  EXPECT_THAT(c->landmarks, ::testing::ElementsAre(Landmarks("p", 0, 2), Landmarks("c", 2, 4)));
  ExpectChunks("c", 4, [](int64_t i) { return i < 2 ? "p" : "c"; });
  // New sessions after a reopen get fresh origins: nothing collides with the old ones.
  ASSERT_TRUE(store_->Fork("c", "d", "").ok());
  ASSERT_TRUE(store_->Commit(MakeCommit("d", 4 * 64 + 1, 4, 1, "d")).ok());
  auto d = store_->GetRecord("d");
  ASSERT_TRUE(d.ok());
  EXPECT_NE(d->origin, c->record.origin);
  EXPECT_NE(d->origin, p->record.origin);
  ExpectChunks("c", 4, [](int64_t i) { return i < 2 ? "p" : "c"; });
  ExpectChunks("d", 5, [](int64_t i) { return i < 2 ? "p" : i < 4 ? "c" : "d"; });
}

TEST_P(SessionStoreTest, CorruptedRecordsAreDataLoss) {
  ASSERT_TRUE(store_->Commit(MakeCommit("v", -1, 0, 3, "v")).ok());
  auto rec = store_->GetRecord("v");
  ASSERT_TRUE(rec.ok());
  const std::string key1 = ChunkKey(rec->origin, 1);

  // A flipped payload bit in chunk 1.
  auto raw = testing::GetRaw(*store_, "chunks", key1);
  ASSERT_TRUE(raw.ok()) << raw.status();
  std::string flipped = *raw;
  flipped[flipped.size() / 2] ^= 0x10;
  ASSERT_TRUE(testing::PutRaw(*store_, "chunks", key1, flipped).ok());
  auto chunk = store_->LoadChunk("v", 1);
  EXPECT_EQ(chunk.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(chunk.status().message(), HasSubstr("session \"v\": chunk 1"));
  EXPECT_THAT(chunk.status().message(), HasSubstr("checksum mismatch"));
  EXPECT_TRUE(store_->LoadChunk("v", 0).ok());  // the others are fine

  // A valid record under the wrong key (chunk 0's value as chunk 1): the CRC covers the key.
  auto raw0 = testing::GetRaw(*store_, "chunks", ChunkKey(rec->origin, 0));
  ASSERT_TRUE(raw0.ok());
  ASSERT_TRUE(testing::PutRaw(*store_, "chunks", key1, *raw0).ok());
  EXPECT_EQ(store_->LoadChunk("v", 1).status().code(), absl::StatusCode::kDataLoss);

  // A truncated session record, a bad magic in the states.
  auto raw_rec = testing::GetRaw(*store_, "sessions", "v");
  ASSERT_TRUE(raw_rec.ok());
  ASSERT_TRUE(testing::PutRaw(*store_, "sessions", "v", raw_rec->substr(0, 10)).ok());
  auto got = store_->GetRecord("v");
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(got.status().message(), HasSubstr("session \"v\": session record"));
  ASSERT_TRUE(testing::PutRaw(*store_, "sessions", "v", *raw_rec).ok());
  auto raw_states = testing::GetRaw(*store_, "states", "v");
  ASSERT_TRUE(raw_states.ok());
  std::string bad_magic = *raw_states;
  bad_magic[0] = 'X';
  ASSERT_TRUE(testing::PutRaw(*store_, "states", "v", bad_magic).ok());
  auto loaded = store_->Load("v");
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(loaded.status().message(), HasSubstr("states snapshot: bad record magic"));

  // A session record whose payload is internally inconsistent but correctly wrapped is caught by
  // the decoder; a missing landmark blob by Load.
  ASSERT_TRUE(testing::PutRaw(*store_, "states", "v", *raw_states).ok());
  ASSERT_TRUE(store_->Load("v").ok());
  ASSERT_TRUE(testing::PutRaw(*store_, "landmarks", ChunkKey(rec->origin, 0), "").ok());
  loaded = store_->Load("v");
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(loaded.status().message(), HasSubstr("landmarks at chunk 0"));
}

TEST_P(SessionStoreTest, CorruptedSstFileOnDiskIsDataLoss) {
  const std::string kTag = "disk";
  ASSERT_TRUE(store_->Commit(MakeCommit("d", -1, 0, 4, kTag, 4096)).ok());
  ASSERT_TRUE(store_->CompactAll().ok());  // into SST files, WAL obsolete
  store_.reset();
  // Flip one byte of chunk 2's payload inside whichever SST file holds it.
  const std::string needle = Blob(kTag, 2, 4096).substr(1000, 64);
  bool corrupted = false;
  for (const auto& entry : fs::directory_iterator(options_.path)) {
    if (entry.path().extension() != ".sst") continue;
    std::fstream f(entry.path(), std::ios::in | std::ios::out | std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const size_t at = bytes.find(needle);
    if (at == std::string::npos) continue;
    f.seekp(static_cast<std::streamoff>(at + 10));
    const char c = static_cast<char>(bytes[at + 10] ^ 0x01);
    f.write(&c, 1);
    corrupted = true;
  }
  ASSERT_TRUE(corrupted) << "chunk payload not found in any SST file";
  Reopen();
  auto chunk = store_->LoadChunk("d", 2);
  EXPECT_EQ(chunk.status().code(), absl::StatusCode::kDataLoss) << chunk.status();
  EXPECT_THAT(chunk.status().message(), HasSubstr("chunk 2"));
}

TEST_P(SessionStoreTest, ForkSharesChunksAndSurvivesParentDeletion) {
  constexpr size_t kBytes = 64 << 10;  // large enough for the reclaimed bytes to show
  ASSERT_TRUE(store_->Commit(MakeCommit("parent", -1, 0, 2, "parent", kBytes)).ok());
  ASSERT_TRUE(store_->Commit(MakeCommit("parent", 2 * 64 + 1, 2, 2, "parent", kBytes)).ok());
  ASSERT_TRUE(store_->Fork("parent", "child", "child-meta").ok());
  EXPECT_EQ(Count("chunks"), 4);  // shared, not copied

  auto child = store_->Load("child");
  ASSERT_TRUE(child.ok()) << child.status();
  EXPECT_EQ(child->record.position, 4 * 64 + 1);
  EXPECT_EQ(child->record.metadata, "child-meta");
  EXPECT_EQ(child->states, MakeCommit("parent", 0, 4, 0, "parent").states);
  EXPECT_THAT(child->landmarks,
              ::testing::ElementsAre(Landmarks("parent", 0, 2), Landmarks("parent", 2, 4)));
  ExpectChunks("child", 4, [](int64_t) { return "parent"; }, kBytes);

  // Both continue independently from chunk 4.
  ASSERT_TRUE(store_->Commit(MakeCommit("parent", 4 * 64 + 1, 4, 2, "parent", kBytes)).ok());
  ASSERT_TRUE(store_->Commit(MakeCommit("child", 4 * 64 + 1, 4, 3, "child", kBytes)).ok());
  ExpectChunks("parent", 6, [](int64_t) { return "parent"; }, kBytes);
  ExpectChunks("child", 7, [](int64_t i) { return i < 4 ? "parent" : "child"; }, kBytes);
  EXPECT_EQ(Count("chunks"), 9);

  ASSERT_TRUE(store_->Delete("parent").ok());
  EXPECT_EQ(store_->GetRecord("parent").status().code(), absl::StatusCode::kNotFound);
  // The parent's chunks 4 and 5 were visible to nobody else: gone with it.
  EXPECT_EQ(Count("chunks"), 7);
  child = store_->Load("child");
  ASSERT_TRUE(child.ok()) << child.status();
  EXPECT_THAT(child->landmarks,
              ::testing::ElementsAre(Landmarks("parent", 0, 2), Landmarks("parent", 2, 4),
                                     Landmarks("child", 4, 7)));
  ExpectChunks("child", 7, [](int64_t i) { return i < 4 ? "parent" : "child"; }, kBytes);
  ASSERT_TRUE(store_->Commit(MakeCommit("child", 7 * 64 + 1, 7, 1, "child", kBytes)).ok());
  ExpectChunks("child", 8, [](int64_t i) { return i < 4 ? "parent" : "child"; }, kBytes);

  ASSERT_TRUE(store_->CompactAll().ok());
  const int64_t before = store_->ApproximateBytes();
  EXPECT_GT(before, 8 * static_cast<int64_t>(kBytes));
  ASSERT_TRUE(store_->Delete("child").ok());
  for (const char* cf : {"sessions", "states", "chunks", "landmarks", "refcounts"}) {
    EXPECT_EQ(Count(cf), 0) << cf;
  }
  EXPECT_EQ(store_->NumSessions(), 0);
  ASSERT_TRUE(store_->CompactAll().ok());
  const int64_t after = store_->ApproximateBytes();
  EXPECT_LT(after, before / 4) << "before " << before << " after " << after;
}

TEST_P(SessionStoreTest, DeletingTheChildFirstKeepsTheParent) {
  ASSERT_TRUE(store_->Commit(MakeCommit("p", -1, 0, 3, "p")).ok());
  ASSERT_TRUE(store_->Fork("p", "c", "").ok());
  ASSERT_TRUE(store_->Commit(MakeCommit("c", 3 * 64 + 1, 3, 1, "c")).ok());
  ASSERT_TRUE(store_->Delete("c").ok());
  EXPECT_EQ(Count("chunks"), 3);
  ExpectChunks("p", 3, [](int64_t) { return "p"; });
  ASSERT_TRUE(store_->Commit(MakeCommit("p", 3 * 64 + 1, 3, 1, "p")).ok());
  ExpectChunks("p", 4, [](int64_t) { return "p"; });
  ASSERT_TRUE(store_->Delete("p").ok());
  EXPECT_EQ(Count("chunks"), 0);
  EXPECT_EQ(Count("refcounts"), 0);
}

TEST_P(SessionStoreTest, ForkOfAFork) {
  ASSERT_TRUE(store_->Commit(MakeCommit("a", -1, 0, 2, "a")).ok());
  ASSERT_TRUE(store_->Fork("a", "b", "").ok());
  ASSERT_TRUE(store_->Commit(MakeCommit("b", 2 * 64 + 1, 2, 2, "b")).ok());
  ASSERT_TRUE(store_->Fork("b", "c", "").ok());
  ASSERT_TRUE(store_->Commit(MakeCommit("c", 4 * 64 + 1, 4, 2, "c")).ok());
  ASSERT_TRUE(store_->Commit(MakeCommit("a", 2 * 64 + 1, 2, 1, "a")).ok());
  ASSERT_TRUE(store_->Commit(MakeCommit("b", 4 * 64 + 1, 4, 1, "b")).ok());
  auto c = store_->GetRecord("c");
  ASSERT_TRUE(c.ok());
  ASSERT_EQ(c->chunk_sources.size(), 3u);
  auto c_tag = [](int64_t i) { return i < 2 ? "a" : i < 4 ? "b" : "c"; };

  ASSERT_TRUE(store_->Delete("b").ok());  // the middle generation
  ExpectChunks("c", 6, c_tag);
  ExpectChunks("a", 3, [](int64_t) { return "a"; });
  EXPECT_EQ(Count("chunks"), 3 + 2 + 2);  // a's 3, b's 2 that c sees, c's 2
  ASSERT_TRUE(store_->Delete("a").ok());
  ExpectChunks("c", 6, c_tag);
  EXPECT_EQ(Count("chunks"), 6);
  auto loaded = store_->Load("c");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_THAT(loaded->landmarks, ::testing::ElementsAre(Landmarks("a", 0, 2), Landmarks("b", 2, 4),
                                                        Landmarks("c", 4, 6)));
  ASSERT_TRUE(store_->Delete("c").ok());
  EXPECT_EQ(Count("chunks"), 0);
  EXPECT_EQ(Count("landmarks"), 0);
  EXPECT_EQ(Count("refcounts"), 0);
}

TEST_P(SessionStoreTest, ReusingADeletedIdDoesNotTouchChunksItsForksStillHold) {
  ASSERT_TRUE(store_->Commit(MakeCommit("x", -1, 0, 2, "old")).ok());
  ASSERT_TRUE(store_->Fork("x", "y", "").ok());
  ASSERT_TRUE(store_->Delete("x").ok());
  ASSERT_TRUE(store_->Commit(MakeCommit("x", -1, 0, 3, "new")).ok());
  ExpectChunks("y", 2, [](int64_t) { return "old"; });
  ExpectChunks("x", 3, [](int64_t) { return "new"; });
  ASSERT_TRUE(store_->Delete("y").ok());
  ExpectChunks("x", 3, [](int64_t) { return "new"; });
  EXPECT_EQ(Count("chunks"), 3);
}

TEST_P(SessionStoreTest, ListPaginatesInIdOrder) {
  std::vector<std::string> ids;
  for (int i = 0; i < 25; ++i) ids.push_back(absl::StrCat("s", i < 10 ? "0" : "", i));
  std::vector<std::string> shuffled = ids;
  std::shuffle(shuffled.begin(), shuffled.end(), std::mt19937(42));
  for (const std::string& id : shuffled) {
    ASSERT_TRUE(store_->Commit(MakeCommit(id, -1, 0, 1, id)).ok());
  }
  std::vector<std::string> seen;
  std::vector<size_t> page_sizes;
  std::string token;
  do {
    auto page = store_->List(token, 10);
    ASSERT_TRUE(page.ok()) << page.status();
    page_sizes.push_back(page->sessions.size());
    for (const SessionRecord& r : page->sessions) {
      seen.push_back(r.id);
      EXPECT_EQ(r.metadata, absl::StrCat("meta:", r.id, ":1"));
      EXPECT_EQ(r.num_chunks, 1);
      EXPECT_TRUE(r.chunk_sources.empty());
    }
    token = page->next_page_token;
  } while (!token.empty() && page_sizes.size() < 10);
  EXPECT_THAT(page_sizes, ::testing::ElementsAre(10, 10, 5));
  EXPECT_EQ(seen, ids);
  auto all = store_->List("", 25);
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->sessions.size(), 25u);
  EXPECT_TRUE(all->next_page_token.empty());
  // A token naming a deleted session still continues after it.
  ASSERT_TRUE(store_->Delete("s09").ok());
  auto next = store_->List("s09", 2);
  ASSERT_TRUE(next.ok());
  ASSERT_EQ(next->sessions.size(), 2u);
  EXPECT_EQ(next->sessions[0].id, "s10");
  EXPECT_EQ(next->next_page_token, "s11");
}

TEST_P(SessionStoreTest, ConcurrentCommitsToSixteenSessions) {
  constexpr int kThreads = 16, kCommits = 20;
  std::vector<std::thread> threads;
  std::vector<absl::Status> errors(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      const std::string id = absl::StrCat("t", t);
      int64_t pos = -1;
      for (int c = 0; c < kCommits; ++c) {
        CommitRequest r = MakeCommit(id, pos, c, 1, id);
        absl::Status st = store_->Commit(r);
        if (!st.ok()) {
          errors[t] = st;
          return;
        }
        pos = r.new_position;
      }
    });
  }
  for (auto& th : threads) th.join();
  for (const absl::Status& st : errors) EXPECT_TRUE(st.ok()) << st;
  EXPECT_EQ(store_->NumSessions(), kThreads);
  for (int t = 0; t < kThreads; ++t) {
    const std::string id = absl::StrCat("t", t);
    auto loaded = store_->Load(id);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    EXPECT_EQ(loaded->record.num_chunks, kCommits);
    EXPECT_EQ(loaded->states, MakeCommit(id, 0, kCommits, 0, id).states);
    EXPECT_EQ(loaded->landmarks.size(), static_cast<size_t>(kCommits));
    ExpectChunks(id, kCommits, [&](int64_t) { return id; });
  }
}

TEST_P(SessionStoreTest, ConcurrentForksAndDeletesOfOneParentKeepRefcountsExact) {
  ASSERT_TRUE(store_->Commit(MakeCommit("root", -1, 0, 4, "root")).ok());
  constexpr int kThreads = 8, kRounds = 10;
  std::vector<std::thread> threads;
  std::vector<absl::Status> errors(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < kRounds && errors[t].ok(); ++r) {
        const std::string id = absl::StrCat("f", t, "_", r);
        errors[t] = store_->Fork("root", id, "");
        if (errors[t].ok()) errors[t] = store_->Commit(MakeCommit(id, 4 * 64 + 1, 4, 1, id));
        if (errors[t].ok() && r % 2 == 0) errors[t] = store_->Delete(id);
      }
    });
  }
  for (auto& th : threads) th.join();
  for (const absl::Status& st : errors) EXPECT_TRUE(st.ok()) << st;
  EXPECT_EQ(store_->NumSessions(), 1 + kThreads * kRounds / 2);
  ASSERT_TRUE(store_->Delete("root").ok());
  for (int t = 0; t < kThreads; ++t) {
    for (int r = 1; r < kRounds; r += 2) {
      const std::string id = absl::StrCat("f", t, "_", r);
      ExpectChunks(id, 5, [&](int64_t i) { return i < 4 ? std::string("root") : id; });
      ASSERT_TRUE(store_->Delete(id).ok());
    }
  }
  EXPECT_EQ(Count("chunks"), 0);
  EXPECT_EQ(Count("refcounts"), 0);
  EXPECT_EQ(store_->NumSessions(), 0);
}

TEST_P(SessionStoreTest, UnsyncedCommitsWork) {
  options_.sync_commits = false;
  Reopen();
  ASSERT_TRUE(store_->Commit(MakeCommit("u", -1, 0, 2, "u")).ok());
  ASSERT_TRUE(store_->Fork("u", "w", "").ok());
  ASSERT_TRUE(store_->Commit(MakeCommit("u", 2 * 64 + 1, 2, 1, "u")).ok());
  Reopen();
  ExpectChunks("u", 3, [](int64_t) { return "u"; });
  ExpectChunks("w", 2, [](int64_t) { return "u"; });
  ASSERT_TRUE(store_->Delete("u").ok());
  ASSERT_TRUE(store_->Delete("w").ok());
  EXPECT_EQ(Count("chunks"), 0);
}

// State slot files (store/state_slots.h): every snapshot goes to a slot here.
class StateSlotsTest : public StoreFixture {
 protected:
  void SetUp() override {
    options_.state_slot_min_bytes = 0;
    StoreFixture::SetUp();
  }
  std::string SlotDir() const { return options_.path + "/state-slots"; }
  std::vector<std::string> SlotFiles() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(SlotDir())) names.push_back(e.path().filename());
    std::sort(names.begin(), names.end());
    return names;
  }
  std::string Slot(const std::string& id, int slot) {
    auto rec = store_->GetRecord(id);
    EXPECT_TRUE(rec.ok()) << rec.status();
    const std::string origin = rec.ok() ? rec->origin : "";
    return absl::StrCat(SlotDir(), "/", origin.substr(origin.rfind('#') + 1), ".", slot);
  }
  static std::string ReadFile(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  }
  // A states snapshot of `bytes` for (id, position): content that tells commits apart.
  static std::string States(const std::string& id, int64_t position, size_t bytes = 200 << 10) {
    return Blob(absl::StrCat(id, "@", position), 0, bytes);
  }
};

TEST_F(StateSlotsTest, CommitsAlternateTwoSlotsAndDeleteRemovesThem) {
  int64_t pos = -1;
  std::vector<std::string> committed;
  for (int c = 0; c < 3; ++c) {
    CommitRequest r = MakeCommit("a", pos, c, 1, "a");
    r.states = States("a", r.new_position);
    ASSERT_TRUE(store_->Commit(r).ok());
    committed.push_back(r.states);
    pos = r.new_position;
    auto loaded = store_->Load("a");
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    EXPECT_EQ(loaded->states, r.states);
  }
  // Commit 0 wrote slot 0, commit 1 slot 1, commit 2 slot 0 again; the one before stays whole.
  EXPECT_EQ(SlotFiles().size(), 2u);
  EXPECT_EQ(ReadFile(Slot("a", 0)), committed[2]);
  EXPECT_EQ(ReadFile(Slot("a", 1)), committed[1]);
  // Not through RocksDB: its files hold the pointer, not the bytes.
  EXPECT_LT(testing::GetRaw(*store_, "states", "a")->size(), 100u);
  const int64_t bytes = store_->ApproximateBytes();  // the slots counted
  const std::string slot0 = Slot("a", 0);

  ASSERT_TRUE(store_->Delete("a").ok());
  EXPECT_TRUE(SlotFiles().empty());
  EXPECT_FALSE(fs::exists(slot0));
  EXPECT_LE(store_->ApproximateBytes(), bytes - 2 * (200 << 10) + 4096);  // + the tombstones
}

TEST_F(StateSlotsTest, ADamagedOrMissingSlotIsDataLossAndTheNextCommitRecovers) {
  CommitRequest a = MakeCommit("a", -1, 0, 1, "a");
  a.states = States("a", a.new_position);
  CommitRequest b = MakeCommit("b", -1, 0, 1, "b");
  b.states = States("b", b.new_position);
  ASSERT_TRUE(store_->Commit(a).ok());
  ASSERT_TRUE(store_->Commit(b).ok());
  const std::string slot = Slot("a", 0);
  {
    std::fstream f(slot, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(1234);
    f.put(static_cast<char>(a.states[1234] ^ 0x40));
  }
  auto loaded = store_->Load("a");
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(loaded.status().message(), HasSubstr("session \"a\": states snapshot: state slot"));
  EXPECT_THAT(loaded.status().message(), HasSubstr("checksum mismatch"));
  EXPECT_EQ(store_->Fork("a", "a2", "").code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(store_->Load("b").ok());  // other sessions are untouched

  fs::resize_file(slot, 100);
  loaded = store_->Load("a");
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(loaded.status().message(), HasSubstr("holds 100 bytes"));
  fs::remove(slot);
  loaded = store_->Load("a");
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(loaded.status().message(), HasSubstr("is missing"));

  // The next commit writes the other slot and a pointer to it: the session reads again.
  CommitRequest next = MakeCommit("a", a.new_position, 1, 1, "a");
  next.states = States("a", next.new_position);
  ASSERT_TRUE(store_->Commit(next).ok());
  loaded = store_->Load("a");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->states, next.states);
}

TEST_F(StateSlotsTest, AFailedSlotWriteFailsTheCommitAndChangesNothing) {
  CommitRequest first = MakeCommit("a", -1, 0, 1, "a");
  first.states = States("a", first.new_position);
  ASSERT_TRUE(store_->Commit(first).ok());
  // A directory where the next slot goes: opening it for writing fails.
  const std::string next_slot = Slot("a", 1);
  fs::create_directory(next_slot);
  CommitRequest second = MakeCommit("a", first.new_position, 1, 2, "a");
  second.states = States("a", second.new_position);
  absl::Status s = store_->Commit(second);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_THAT(s.message(), HasSubstr("session \"a\": states snapshot: opening state slot"));
  auto loaded = store_->Load("a");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->record.position, first.new_position);
  EXPECT_EQ(loaded->record.num_chunks, 1);
  EXPECT_EQ(loaded->states, first.states);

  fs::remove(next_slot);
  ASSERT_TRUE(store_->Commit(second).ok());
  loaded = store_->Load("a");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->states, second.states);
  EXPECT_EQ(loaded->record.num_chunks, 3);
}

TEST_F(StateSlotsTest, OpenRemovesSlotFilesOfSessionsThatDoNotExist) {
  CommitRequest a = MakeCommit("a", -1, 0, 1, "a");
  a.states = States("a", a.new_position);
  ASSERT_TRUE(store_->Commit(a).ok());
  const std::string kept = Slot("a", 0);
  store_.reset();
  // What a crash leaves: a slot written for a session whose creation never committed, and one
  // of a session deleted before its files were unlinked.
  for (const char* name : {"999.0", "12345.1"}) std::ofstream(SlotDir() + "/" + name) << "stale";
  std::ofstream(SlotDir() + "/notes.txt") << "not a slot";
  Reopen();
  EXPECT_THAT(SlotFiles(), ::testing::ElementsAre(fs::path(kept).filename().string(), "notes.txt"));
  auto loaded = store_->Load("a");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->states, a.states);
}

TEST_F(StateSlotsTest, InlineSnapshotsMoveToSlotsAndBack) {
  options_.state_slot_min_bytes = INT64_MAX;  // as a store written before slots
  Reopen();
  CommitRequest r = MakeCommit("a", -1, 0, 1, "a");
  ASSERT_TRUE(store_->Commit(r).ok());
  ASSERT_TRUE(store_->Fork("a", "f", "").ok());
  options_.state_slot_min_bytes = 0;
  Reopen();
  auto loaded = store_->Load("a");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->states, r.states);
  EXPECT_TRUE(SlotFiles().empty());

  r = MakeCommit("a", r.new_position, 1, 1, "a");
  ASSERT_TRUE(store_->Commit(r).ok());
  EXPECT_EQ(SlotFiles().size(), 1u);
  options_.state_slot_min_bytes = INT64_MAX;
  Reopen();
  loaded = store_->Load("a");  // a slot pointer, read by a store writing inline
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->states, r.states);
  r = MakeCommit("a", r.new_position, 2, 1, "a");
  ASSERT_TRUE(store_->Commit(r).ok());
  loaded = store_->Load("a");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->states, r.states);
  auto fork = store_->Load("f");
  ASSERT_TRUE(fork.ok()) << fork.status();
  EXPECT_EQ(fork->states, MakeCommit("a", -1, 0, 1, "a").states);
}

TEST_F(StateSlotsTest, ForksGetTheirOwnSlots) {
  CommitRequest p = MakeCommit("parent", -1, 0, 2, "parent");
  p.states = States("parent", p.new_position);
  ASSERT_TRUE(store_->Commit(p).ok());
  ASSERT_TRUE(store_->Fork("parent", "child", "").ok());
  EXPECT_NE(Slot("child", 0), Slot("parent", 0));
  // Two commits of the child write both of its slots; the parent's stay as they were.
  int64_t pos = p.new_position;
  for (int c = 0; c < 2; ++c) {
    CommitRequest r = MakeCommit("child", pos, 2 + c, 1, "child");
    r.states = States("child", r.new_position);
    ASSERT_TRUE(store_->Commit(r).ok());
    pos = r.new_position;
  }
  auto parent = store_->Load("parent");
  ASSERT_TRUE(parent.ok()) << parent.status();
  EXPECT_EQ(parent->states, p.states);
  ASSERT_TRUE(store_->Delete("parent").ok());
  auto child = store_->Load("child");
  ASSERT_TRUE(child.ok()) << child.status();
  EXPECT_EQ(child->states, States("child", pos));
  EXPECT_EQ(SlotFiles().size(), 2u);
}

TEST_F(StateSlotsTest, LoadsDuringCommitsSeeWholeSnapshots) {
  options_.sync_commits = false;
  Reopen();
  CommitRequest r = MakeCommit("s", -1, 0, 0, "s");
  r.states = States("s", r.new_position, 64 << 10);
  ASSERT_TRUE(store_->Commit(r).ok());
  std::atomic<bool> done{false};
  std::thread writer([&] {
    int64_t pos = r.new_position;
    for (int c = 0; c < 200; ++c) {
      CommitRequest next = MakeCommit("s", pos, 0, 0, "s");
      next.new_position = pos + 1;
      next.states = States("s", next.new_position, 64 << 10);
      if (!store_->Commit(next).ok()) break;
      pos = next.new_position;
    }
    done = true;
  });
  int loads = 0;
  while (!done) {
    auto loaded = store_->Load("s");
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    ASSERT_EQ(loaded->states, States("s", loaded->record.position, 64 << 10));
    ++loads;
  }
  writer.join();
  auto last = store_->Load("s");
  ASSERT_TRUE(last.ok());
  EXPECT_EQ(last->record.position, r.new_position + 200);
  EXPECT_GT(loads, 0);
}

TEST_F(StoreFixture, FormatVersionIsUpgradedAndANewerOneRefused) {
  auto version = [&]() -> uint64_t {
    auto raw = testing::GetRaw(*store_, "meta", "format");
    EXPECT_TRUE(raw.ok()) << raw.status();
    uint64_t v = 0;
    absl::string_view in = absl::string_view(*raw).substr(20);
    EXPECT_TRUE(GetFixed64(&in, &v));
    return v;
  };
  EXPECT_EQ(version(), 2u);
  auto put_version = [&](uint64_t v) {
    std::string payload;
    PutFixed64(&payload, v);
    ASSERT_TRUE(
        testing::PutRaw(*store_, "meta", "format", WrapRecord(RecordKind::kMeta, "format", payload))
            .ok());
  };
  put_version(1);  // a store written before state slots
  Reopen();
  EXPECT_EQ(version(), 2u);
  put_version(3);
  store_.reset();
  auto s = SessionStore::Open(options_);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.status().message(), HasSubstr("format version 3"));
}

// Crash durability: a child process commits and is killed with SIGKILL without closing the DB;
// every acknowledged commit must be there when the parent reopens it. The child re-executes this
// binary (fork + execve, so it starts with a clean RocksDB) running CrashChild.Commits.
constexpr int kCrashCommits = 25;

void RunCrashChild(const std::string& path, bool sync, bool slots) {
  const std::string self = fs::read_symlink("/proc/self/exe");
  std::vector<std::string> env_strings = {absl::StrCat("RAMBA_STORE_CRASH_PATH=", path),
                                          absl::StrCat("RAMBA_STORE_CRASH_SYNC=", sync ? 1 : 0),
                                          absl::StrCat("RAMBA_STORE_CRASH_SLOTS=", slots ? 1 : 0)};
  std::vector<char*> envp;
  for (char** e = environ; *e != nullptr; ++e) envp.push_back(*e);
  for (std::string& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::string filter = "--gtest_filter=CrashChild.Commits";
  std::vector<char*> argv = {const_cast<char*>(self.c_str()), filter.data(), nullptr};
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    execve(self.c_str(), argv.data(), envp.data());
    _exit(127);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status)) << "child exited with status " << WEXITSTATUS(status)
                                   << " instead of killing itself";
  EXPECT_EQ(WTERMSIG(status), SIGKILL);
}

TEST(CrashChild, Commits) {
  const char* path = std::getenv("RAMBA_STORE_CRASH_PATH");
  if (path == nullptr) GTEST_SKIP() << "runs only as the child of CrashDurabilityTest";
  StoreOptions options;
  options.path = path;
  options.sync_commits = std::string(std::getenv("RAMBA_STORE_CRASH_SYNC")) == "1";
  options.state_slot_min_bytes =
      std::string(std::getenv("RAMBA_STORE_CRASH_SLOTS")) == "1" ? 0 : INT64_MAX;
  auto store = SessionStore::Open(options);
  if (!store.ok()) _exit(2);
  int64_t pos = -1;
  for (int c = 0; c < kCrashCommits; ++c) {
    CommitRequest r = MakeCommit("crash", pos, c, 1, "crash");
    if (!(*store)->Commit(r).ok()) _exit(3);
    pos = r.new_position;
  }
  if (!(*store)->Fork("crash", "crash-fork", "").ok()) _exit(4);
  kill(getpid(), SIGKILL);  // no Close, no destructor: the DB is abandoned mid-flight
  _exit(5);
}

INSTANTIATE_TEST_SUITE_P(States, SessionStoreTest, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "Slots" : "Inline"; });

class CrashDurabilityTest : public StoreFixture,
                            public ::testing::WithParamInterface<std::tuple<bool, bool>> {};

TEST_P(CrashDurabilityTest, AcknowledgedCommitsSurviveSigkill) {
  const auto [sync, slots] = GetParam();
  options_.sync_commits = sync;
  options_.state_slot_min_bytes = slots ? 0 : INT64_MAX;
  store_.reset();  // the child owns the DB while it runs
  RunCrashChild(options_.path, sync, slots);
  Reopen();
  auto loaded = store_->Load("crash");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->record.num_chunks, kCrashCommits);
  EXPECT_EQ(loaded->record.position, kCrashCommits * 64 + 1);
  EXPECT_EQ(loaded->landmarks.size(), static_cast<size_t>(kCrashCommits));
  EXPECT_EQ(loaded->states, MakeCommit("crash", 0, kCrashCommits, 0, "crash").states);
  ExpectChunks("crash", kCrashCommits, [](int64_t) { return "crash"; });
  ExpectChunks("crash-fork", kCrashCommits, [](int64_t) { return "crash"; });
  EXPECT_EQ(store_->NumSessions(), 2);
}

// sync = true is the power-loss guarantee; sync = false must still survive a process crash.
// Either way with states inline and in slot files.
INSTANTIATE_TEST_SUITE_P(SyncAndSlots, CrashDurabilityTest,
                         ::testing::Combine(::testing::Bool(), ::testing::Bool()),
                         [](const auto& info) {
                           return absl::StrCat(std::get<0>(info.param) ? "Sync" : "NoSync",
                                               std::get<1>(info.param) ? "Slots" : "Inline");
                         });

}  // namespace
}  // namespace ramba::store
