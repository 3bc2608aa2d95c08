// Tests for kernels/backend.h basics: dtype helpers and conversions, Buffer ownership, backend
// creation, memory ops and argument validation of the CPU backend.
#include "kernels/backend.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/vec.h"
#include "tests/kernels/kernel_test_util.h"

namespace ramba::kernels {
namespace {

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TEST(DTypeTest, SizesAndNames) {
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeName(DType::kF32), "f32");
  EXPECT_EQ(DTypeName(DType::kBF16), "bf16");
  EXPECT_EQ(DTypeName(DType::kF16), "f16");
}

TEST(DTypeTest, Bf16RoundsToNearestEven) {
  EXPECT_EQ(F32ToBf16(1.0f), 0x3f80);
  EXPECT_EQ(F32ToBf16(FromBits(0x3f808000u)), 0x3f80);  // tie, even stays
  EXPECT_EQ(F32ToBf16(FromBits(0x3f818000u)), 0x3f82);  // tie, odd rounds up
  EXPECT_EQ(F32ToBf16(FromBits(0x3f808001u)), 0x3f81);  // above tie
  EXPECT_EQ(F32ToBf16(-2.0f), 0xc000);
  EXPECT_EQ(F32ToBf16(INFINITY), 0x7f80);
  EXPECT_EQ(F32ToBf16(FromBits(0x7f7fffffu)), 0x7f80);  // max float rounds to inf
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(NAN))));
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(FromBits(0x7f800001u)))));  // low-payload NaN
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = Bf16ToF32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(F32ToBf16(f), h) << h;
  }
}

TEST(DTypeTest, F16ExhaustiveRoundTripAndVectorPath) {
  std::vector<uint16_t> all(0x10000);
  for (uint32_t h = 0; h < 0x10000; ++h) all[h] = static_cast<uint16_t>(h);
  std::vector<float> vec(all.size());
  cpu::F16RowToF32(all.data(), static_cast<int64_t>(all.size()), vec.data());
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = F16ToF32(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(vec[h])) << h;
      ASSERT_TRUE(std::isnan(F16ToF32(F32ToF16(f))));
      continue;
    }
    ASSERT_EQ(Bits(vec[h]), Bits(f)) << h;
    ASSERT_EQ(F32ToF16(f), h) << h;
  }
  EXPECT_EQ(F16ToF32(0x3c00), 1.0f);
  EXPECT_EQ(F16ToF32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(F16ToF32(0x7bff), 65504.0f);
}

TEST(DTypeTest, F16RoundsToNearestEven) {
  EXPECT_EQ(F32ToF16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie -> even
  EXPECT_EQ(F32ToF16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie -> even (up)
  EXPECT_EQ(F32ToF16(65519.0f), 0x7bff);
  EXPECT_EQ(F32ToF16(65520.0f), 0x7c00);  // tie at max -> inf
  EXPECT_EQ(F32ToF16(-1e10f), 0xfc00);
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -25)), 0x0000);  // half the smallest subnormal: even
  EXPECT_EQ(F32ToF16(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(F32ToF16(std::ldexp(3.0f, -25)), 0x0002);  // 1.5 ulp tie -> even (2)
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -14) - std::ldexp(1.0f, -26)), 0x0400);  // into normals
  EXPECT_EQ(F32ToF16(-0.0f), 0x8000);
}

TEST(DTypeTest, Bf16VectorPathMatchesScalar) {
  std::vector<uint16_t> all(0x10000);
  for (uint32_t h = 0; h < 0x10000; ++h) all[h] = static_cast<uint16_t>(h);
  std::vector<float> vec(all.size());
  cpu::Bf16RowToF32(all.data(), static_cast<int64_t>(all.size()), vec.data());
  for (uint32_t h = 0; h < 0x10000; ++h) ASSERT_EQ(Bits(vec[h]), Bits(Bf16ToF32(h)));
}

// Counts frees so Buffer ownership can be observed.
class CountingBackend : public CpuBackend {
 public:
  CountingBackend() : CpuBackend(0) {}
  int frees = 0;

 protected:
  void Free(void* data, size_t bytes) override {
    ++frees;
    CpuBackend::Free(data, bytes);
  }
};

TEST(BufferTest, MoveSemantics) {
  CountingBackend be;
  {
    Buffer empty;
    EXPECT_TRUE(empty.empty());
    EXPECT_EQ(empty.size(), 0u);
    empty.Reset();  // no-op
  }
  EXPECT_EQ(be.frees, 0);
  EXPECT_EQ(be.held_bytes(), 0);
  absl::StatusOr<Buffer> a = be.Allocate(100);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(be.held_bytes(), 100);
  void* pa = a->data();
  EXPECT_EQ(a->size(), 100u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(pa) % 64, 0u);

  Buffer b(std::move(*a));  // move construction transfers ownership
  EXPECT_TRUE(a->empty());
  EXPECT_EQ(a->size(), 0u);
  EXPECT_EQ(b.data(), pa);
  EXPECT_EQ(b.size(), 100u);
  EXPECT_EQ(be.frees, 0);
  EXPECT_EQ(be.held_bytes(), 100);  // moved, not counted twice

  Buffer c = std::move(*be.Allocate(8));
  EXPECT_EQ(be.held_bytes(), 108);
  c = std::move(b);  // move assignment frees c's old memory
  EXPECT_EQ(be.frees, 1);
  EXPECT_EQ(be.held_bytes(), 100);
  EXPECT_EQ(c.data(), pa);
  EXPECT_TRUE(b.empty());

  Buffer& self = c;
  c = std::move(self);  // self-move keeps the buffer
  EXPECT_EQ(c.data(), pa);
  EXPECT_EQ(be.frees, 1);

  c.as<char>()[99] = 7;
  c.Reset();
  EXPECT_EQ(be.frees, 2);
  EXPECT_EQ(be.held_bytes(), 0);
  EXPECT_TRUE(c.empty());
  { Buffer d = std::move(*be.Allocate(16)); }
  EXPECT_EQ(be.frees, 3);
  EXPECT_EQ(be.held_bytes(), 0);
}

TEST(BufferTest, ZeroBytesIsStillAValidPointer) {
  auto be = testing::Cpu();
  auto b = be->Allocate(0);
  ASSERT_TRUE(b.ok());
  EXPECT_NE(b->data(), nullptr);
  EXPECT_EQ(b->size(), 0u);
}

TEST(BackendTest, Create) {
  auto cpu = CreateBackend("cpu");
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ((*cpu)->name(), "cpu");
  EXPECT_TRUE((*cpu)->host_accessible());
  EXPECT_EQ((*cpu)->weight_dtype(), DType::kF32);
  auto autob = CreateBackend("auto", 1);
  ASSERT_TRUE(autob.ok());
  if (!CudaAvailable()) {
    // Without a GPU, auto falls back to the CPU and an explicit cuda is a clear error: no
    // CUDA backend in this build (Unimplemented) or no device visible (FailedPrecondition).
    EXPECT_EQ((*autob)->name(), "cpu");
    const absl::StatusCode code = CreateBackend("cuda").status().code();
    EXPECT_TRUE(code == absl::StatusCode::kUnimplemented ||
                code == absl::StatusCode::kFailedPrecondition)
        << CreateBackend("cuda").status();
  }
  EXPECT_EQ(CreateBackend("tpu").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(BackendTest, ScatterRowsWritesEachRowToItsPointer) {
  auto be = testing::Cpu();
  std::vector<float> src = {1, 2, 3, 9, 4, 5, 6, 9};  // 2 rows of 3, ld 4
  std::vector<float> a(3, 0), b(5, 0);
  float* dst[] = {b.data() + 1, a.data()};
  ASSERT_TRUE(be->ScatterRows(src.data(), 4, dst, 2, 3).ok());
  EXPECT_EQ(b, (std::vector<float>{0, 1, 2, 3, 0}));
  EXPECT_EQ(a, (std::vector<float>{4, 5, 6}));
  float* bad[] = {a.data(), nullptr};
  EXPECT_EQ(be->ScatterRows(src.data(), 4, bad, 2, 3).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be->ScatterRows(src.data(), 2, dst, 2, 3).code(), absl::StatusCode::kInvalidArgument);
}

// n chunks of `floats` values, chunk b's value i = 10 b + i: each tells where it came from.
std::vector<std::vector<float>> NumberedChunks(int n, int64_t floats) {
  std::vector<std::vector<float>> blocks(n, std::vector<float>(floats));
  for (int b = 0; b < n; ++b) {
    for (int64_t i = 0; i < floats; ++i) blocks[b][i] = 10.0f * b + i;
  }
  return blocks;
}

// Host-tier chunks a row selected are copied into the staging blocks; device ones are pointed at
// where they are; empty slots stay empty; the view's indices are slot numbers.
TEST(BackendTest, StageHostChunksCopiesOnlyHostTierSelections) {
  auto be = CreateCpuBackend(1);
  constexpr int64_t kFloats = 8, kHeads = 1, kTopK = 3;
  const std::vector<std::vector<float>> blocks = NumberedChunks(5, kFloats);
  // Sequence 0: chunks 0..2, the first two in the host tier; sequence 1: chunks 3..4, none.
  const float* table0[] = {blocks[0].data(), blocks[1].data(), blocks[2].data()};
  const float* table1[] = {blocks[3].data(), blocks[4].data()};
  const float* const* tables[] = {table0, table1};
  ChunkMemoryBatch mem;
  mem.chunk_kv = tables;
  const int64_t host_chunks[] = {2, 0};
  const int32_t indices[] = {2, 0, -1, 1, 0, -1};
  std::vector<float> staged_blocks(2 * kTopK * kFloats, -1.0f);
  const float* slots[2 * kTopK];
  const float* const* staged_tables[2];
  int64_t num_chunks[2];
  int32_t staged_indices[2 * kTopK];
  uint64_t tier_counts[3] = {5, 1, 7};  // adds to what is there: 4 selected, 1 host-tier, 0 cached
  StagedChunks out{staged_blocks.data(), slots,          staged_tables,
                   num_chunks,           staged_indices, tier_counts};
  ASSERT_TRUE(be->StageHostChunks(mem, host_chunks, indices, 2, kHeads, kTopK, kFloats, out).ok());
  EXPECT_EQ(tier_counts[0], 9u);
  EXPECT_EQ(tier_counts[1], 2u);
  EXPECT_EQ(tier_counts[2], 7u);
  EXPECT_EQ(slots[0], table0[2]);                           // on the device: read in place
  EXPECT_EQ(slots[1], staged_blocks.data() + 1 * kFloats);  // host tier: copied
  EXPECT_EQ(std::vector<float>(slots[1], slots[1] + kFloats), blocks[0]);
  EXPECT_EQ(slots[2], nullptr);
  EXPECT_EQ(slots[3], table1[1]);
  EXPECT_EQ(slots[4], table1[0]);
  EXPECT_EQ(staged_blocks[0], -1.0f);  // nothing copied for slots read in place
  EXPECT_EQ(std::vector<int32_t>(staged_indices, staged_indices + 6),
            (std::vector<int32_t>{0, 1, -1, 0, 1, -1}));
  EXPECT_EQ(staged_tables[0], slots);
  EXPECT_EQ(staged_tables[1], slots + kTopK);
  EXPECT_EQ(num_chunks[0], kTopK);
  EXPECT_EQ(num_chunks[1], kTopK);
}

// A row's chunk cache across steps (two slots; chunks 0-4 in the host tier, 5 on the device):
// hits read the slot, misses go to the least recently used slot not used this step, and when
// every slot was used this step, to the step's own block. A second row has no cache.
TEST(BackendTest, StageHostChunksKeepsEachRowsCacheLeastRecentlyUsedOut) {
  auto be = CreateCpuBackend(1);
  constexpr int64_t kFloats = 4, kTopK = 3, kSlots = 2;
  const std::vector<std::vector<float>> blocks = NumberedChunks(6, kFloats);
  std::vector<const float*> table;
  for (const auto& b : blocks) table.push_back(b.data());
  const float* const* tables[] = {table.data(), table.data()};
  ChunkMemoryBatch mem;
  mem.chunk_kv = tables;
  const int64_t host_chunks[] = {5, 5};
  std::vector<float> cache(kSlots * kFloats, -1.0f);
  std::vector<int32_t> tags(ChunkCacheRows::TagWords(kSlots), 0);
  float* cache_blocks[] = {cache.data(), nullptr};
  int32_t* cache_tags[] = {tags.data(), nullptr};
  std::vector<float> step_blocks(2 * kTopK * kFloats);
  const float* slots[2 * kTopK];
  const float* const* staged_tables[2];
  int64_t num_chunks[2];
  int32_t staged_indices[2 * kTopK], copies[2 * kTopK];
  uint64_t counts[3] = {0, 0, 0};
  StagedChunks out{step_blocks.data(), slots, staged_tables, num_chunks, staged_indices, counts};
  out.cache = {cache_blocks, cache_tags, kSlots};
  out.copies = copies;
  const float* slot0 = cache.data();
  const float* slot1 = cache.data() + kFloats;
  auto step = [&](std::vector<int32_t> row0) {
    std::vector<int32_t> indices = row0;
    indices.insert(indices.end(), {0, 1, 2});  // row 1: no cache, copied for the step each time
    EXPECT_TRUE(
        be->StageHostChunks(mem, host_chunks, indices.data(), 2, 1, kTopK, kFloats, out).ok());
    for (int j = 0; j < kTopK; ++j) {
      if (indices[j] >= 0) {
        EXPECT_EQ(std::vector<float>(slots[j], slots[j] + kFloats), blocks[indices[j]]) << j;
      }
      EXPECT_EQ(slots[kTopK + j], step_blocks.data() + (kTopK + j) * kFloats);
    }
  };
  step({0, 1, 5});  // two misses fill the slots; 5 is on the device
  EXPECT_EQ(slots[0], slot0);
  EXPECT_EQ(slots[1], slot1);
  EXPECT_EQ(slots[2], table[5]);
  EXPECT_EQ(counts[0], 6u);
  EXPECT_EQ(counts[1], 5u);
  EXPECT_EQ(counts[2], 0u);
  step({1, 2, -1});  // 1 hits; 2 replaces 0, used longest ago
  EXPECT_EQ(slots[0], slot1);
  EXPECT_EQ(slots[1], slot0);
  EXPECT_EQ(counts[1], 10u);
  EXPECT_EQ(counts[2], 1u);
  step({2, 0, 2});  // 2 hits twice; 0 replaces 1, the slot not used this step
  EXPECT_EQ(slots[0], slot0);
  EXPECT_EQ(slots[1], slot1);
  EXPECT_EQ(slots[2], slot0);
  EXPECT_EQ(counts[2], 3u);
  step({3, 4, 1});  // both slots used at step 3: 3 and 4 take them (ties by slot), 1 none
  EXPECT_EQ(slots[0], slot0);
  EXPECT_EQ(slots[1], slot1);
  EXPECT_EQ(slots[2], step_blocks.data() + 2 * kFloats);
  EXPECT_EQ(counts[0], 6u + 5u + 6u + 6u);
  EXPECT_EQ(counts[2], 3u);
  EXPECT_EQ(tags, (std::vector<int32_t>{4, 5, 4, 4, 4}));  // chunks 3, 4; last uses; clock
}

// The inputs of a StageSelectedHostChunks call, in host memory: two sequences (6 chunks, the
// first 4 in the host tier; 3 chunks, the first 2), three rows of 3 picks. Host-tier picks:
// sequence 0 chunk 1 three times, chunk 3 once; sequence 1 chunk 0 twice.
struct SelectedHostChunksCase {
  static constexpr int64_t kFloats = 8, kPerRow = 3, kRows = 3;
  std::vector<std::vector<float>> chunks;
  std::vector<const float*> table0, table1;
  std::vector<const float* const*> tables;
  std::vector<int64_t> num_chunks = {6, 3};
  std::vector<int32_t> row_seq = {0, 0, 1};
  std::vector<int32_t> indices = {1, 4, -1, 1, 3, 1, 0, 2, 0};
  std::vector<int64_t> host_offsets = {0, 4, 6}, table_offsets = {0, 6, 9};

  SelectedHostChunksCase() {
    for (int b = 0; b < 9; ++b) {
      chunks.emplace_back(kFloats);
      for (int i = 0; i < kFloats; ++i) chunks[b][i] = 100.0f * b + i;
    }
    for (int c = 0; c < 6; ++c) table0.push_back(chunks[c].data());
    for (int c = 0; c < 3; ++c) table1.push_back(chunks[6 + c].data());
    tables = {table0.data(), table1.data()};
  }
  ChunkMemoryBatch Mem() const {
    ChunkMemoryBatch mem;
    mem.chunk_kv = tables.data();
    mem.num_chunks = num_chunks.data();
    mem.row_seq = row_seq.data();
    mem.num_seqs = 2;
    mem.max_num_chunks = 6;
    return mem;
  }
};

// Each selected host-tier chunk is copied once (however often picked), the most picked first when
// they do not all fit; the new tables point at the copies and at every other chunk in place.
TEST(BackendTest, StageSelectedHostChunksCopiesEachOnceMostPickedFirst) {
  auto be = CreateCpuBackend(1);
  SelectedHostChunksCase in;
  constexpr int64_t kFloats = SelectedHostChunksCase::kFloats;
  // capacity -> (sequence, chunk) staged, in slot order.
  const std::vector<std::pair<int64_t, std::vector<std::pair<int, int>>>> cases = {
      {10, {{0, 1}, {0, 3}, {1, 0}}},
      {3, {{0, 1}, {0, 3}, {1, 0}}},
      {2, {{0, 1}, {1, 0}}},
      {1, {{0, 1}}},
      {0, {}}};
  for (const auto& [capacity, want] : cases) {
    SCOPED_TRACE(capacity);
    std::vector<float> blocks(std::max<int64_t>(capacity, 1) * kFloats, -1.0f);
    std::vector<int32_t> picks(6);
    std::vector<const float*> sources(std::max<int64_t>(capacity, 1)), entries(9);
    std::vector<const float* const*> tables(2);
    int32_t staged = -1;
    StagedChunkTables out;
    out.blocks = blocks.data();
    out.capacity = capacity;
    out.host_offsets = in.host_offsets.data();
    out.total_host = 6;
    out.picks = picks.data();
    out.sources = sources.data();
    out.staged = &staged;
    out.table_offsets = in.table_offsets.data();
    out.entries = entries.data();
    out.tables = tables.data();
    uint64_t tier_counts[3] = {0, 0, 0};
    out.tier_counts = tier_counts;
    ASSERT_TRUE(be->StageSelectedHostChunks(in.Mem(), in.indices.data(),
                                            SelectedHostChunksCase::kRows,
                                            SelectedHostChunksCase::kPerRow, kFloats, out)
                    .ok());
    EXPECT_EQ(staged, static_cast<int32_t>(want.size()));
    EXPECT_EQ(tier_counts[0], 8u);  // every pick but the -1
    EXPECT_EQ(tier_counts[1], 6u);  // host-tier picks, however many are staged
    EXPECT_EQ(tables[0], entries.data());
    EXPECT_EQ(tables[1], entries.data() + 6);
    for (int s = 0; s < 2; ++s) {
      for (int c = 0; c < in.num_chunks[s]; ++c) {
        const float* original = in.tables[s][c];
        const float* got = tables[s][c];
        const auto it = std::find(want.begin(), want.end(), std::make_pair(s, c));
        if (it == want.end()) {
          EXPECT_EQ(got, original) << s << " " << c;
        } else {
          EXPECT_EQ(got, blocks.data() + (it - want.begin()) * kFloats) << s << " " << c;
          EXPECT_EQ(std::vector<float>(got, got + kFloats),
                    std::vector<float>(original, original + kFloats));
        }
      }
    }
  }
}

TEST(BackendTest, MemoryOps) {
  auto be = testing::Cpu();
  auto buf = be->Allocate(16 * sizeof(float));
  ASSERT_TRUE(buf.ok());
  std::vector<float> src(16), dst(16, -1.0f);
  for (int i = 0; i < 16; ++i) src[i] = static_cast<float>(i);
  ASSERT_TRUE(be->Upload(buf->data(), src.data(), 64).ok());
  ASSERT_TRUE(be->Copy(buf->as<float>() + 1, buf->as<float>(), 8 * sizeof(float)).ok());  // overlap
  ASSERT_TRUE(be->Zero(buf->as<float>() + 12, 4 * sizeof(float)).ok());
  ASSERT_TRUE(be->Synchronize().ok());
  ASSERT_TRUE(be->Download(dst.data(), buf->data(), 64).ok());
  const std::vector<float> want = {0, 0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 0, 0, 0, 0};
  EXPECT_EQ(dst, want);
  EXPECT_FALSE(be->Upload(nullptr, src.data(), 4).ok());
  EXPECT_FALSE(be->Download(dst.data(), nullptr, 4).ok());
  EXPECT_TRUE(be->Copy(nullptr, nullptr, 0).ok());
}

TEST(BackendTest, AllocateHostCopyHoldsTheBytesAndCountsAsHost) {
  auto be = testing::Cpu();
  const std::vector<float> src = {1.5f, -2.0f, 3.25f, 7.0f};
  auto buf = be->AllocateHostCopy(src.data(), src.size() * sizeof(float));
  ASSERT_TRUE(buf.ok()) << buf.status();
  EXPECT_TRUE(buf->host());
  EXPECT_EQ(be->host_held_bytes(), 16);
  EXPECT_EQ(be->held_bytes(), 0);
  std::vector<float> got(src.size());
  ASSERT_TRUE(be->Download(got.data(), buf->data(), 16).ok());
  EXPECT_EQ(got, src);
  buf->Reset();
  EXPECT_EQ(be->host_held_bytes(), 0);
  EXPECT_FALSE(be->AllocateHostCopy(nullptr, 4).ok());
}

TEST(BackendTest, BadArgumentsAreErrorsNotCrashes) {
  auto be = testing::Cpu();
  std::vector<float> a(64, 1.0f), b(64, 1.0f);
  const absl::StatusCode kBad = absl::StatusCode::kInvalidArgument;
  MatrixView w{a.data(), DType::kF32, 4, 4};
  EXPECT_EQ(be->Matmul(a.data(), 4, -1, w, nullptr, b.data(), 4, false).code(), kBad);
  EXPECT_EQ(be->Matmul(nullptr, 4, 2, w, nullptr, b.data(), 4, false).code(), kBad);
  EXPECT_EQ(be->Matmul(a.data(), 3, 2, w, nullptr, b.data(), 4, false).code(), kBad);
  EXPECT_EQ(be->RmsNorm(a.data(), 8, nullptr, b.data(), 8, 2, 8, 1e-5f).code(), kBad);
  EXPECT_EQ(be->RmsNorm(a.data(), 8, a.data(), b.data(), 8, -2, 8, 1e-5f).code(), kBad);
  EXPECT_EQ(be->GatedRmsNorm(a.data(), 8, a.data(), 8, a.data(), b.data(), 8, 2, 8, 3, 1e-5f).code(),
            kBad);
  EXPECT_EQ(be->Add(b.data(), a.data(), -1).code(), kBad);
  EXPECT_EQ(be->SwiGlu(nullptr, a.data(), b.data(), 4).code(), kBad);
  EXPECT_EQ(be->BlockMean(a.data(), 2, 0, 4, b.data()).code(), kBad);
  EXPECT_EQ(be->RopeInChunk(a.data(), 2, 2, 7, 65, 1e4f).code(), kBad);
  EXPECT_EQ(be->BlockAttention(a.data(), a.data(), a.data(), b.data(), 1, 2, 3, 2, 4).code(), kBad);
  const int32_t bad_token = 9;
  EXPECT_EQ(be->Embed(&bad_token, 1, w, b.data()).code(), kBad);
  const int64_t bad_offsets[] = {0, 3, 2};
  float* states[] = {a.data(), a.data()};
  EXPECT_EQ(be->CausalConv1dSilu(a.data(), 4, bad_offsets, 2, states, a.data(), nullptr, 4, 2,
                                 b.data()).code(),
            kBad);
  SsmParams p;  // zero sizes
  EXPECT_EQ(be->SsmScan(a.data(), 8, a.data(), 1, bad_offsets, 1, states, p, b.data()).code(), kBad);
  const SamplingParams sp{-1.0f, 0, 1.0f};
  const float u = 0.5f;
  int32_t out;
  EXPECT_EQ(be->Sample(a.data(), 1, 8, &sp, &u, &out).code(), kBad);
  EXPECT_EQ(be->Sample(a.data(), 1, 0, &sp, &u, &out).code(), kBad);
  for (float min_p : {-0.5f, 1.5f, NAN}) {
    const SamplingParams mp{1.0f, 0, 1.0f, min_p};
    EXPECT_EQ(be->Sample(a.data(), 1, 8, &mp, &u, &out).code(), kBad) << min_p;
  }
  std::vector<int32_t> counts(8, 0);
  for (const PenaltyParams& pp : {PenaltyParams{counts.data(), NAN, 0.0f, 1.0f},
                                  PenaltyParams{counts.data(), 0.0f, INFINITY, 1.0f},
                                  PenaltyParams{counts.data(), 0.0f, 0.0f, 0.0f},
                                  PenaltyParams{counts.data(), 0.0f, 0.0f, -2.0f}}) {
    EXPECT_EQ(be->ApplyPenalties(a.data(), 1, 8, &pp, b.data()).code(), kBad);
  }
  const PenaltyParams ok_penalty{counts.data(), 1.0f, 0.0f, 1.0f};
  EXPECT_EQ(be->ApplyPenalties(a.data(), 1, 8, &ok_penalty, a.data() + 4).code(), kBad);  // overlap
  EXPECT_EQ(be->ApplyPenalties(a.data(), 1, 0, &ok_penalty, b.data()).code(), kBad);
  EXPECT_EQ(be->CountTokens(&ok_penalty, 1, 8, nullptr).code(), kBad);
}

}  // namespace
}  // namespace ramba::kernels
