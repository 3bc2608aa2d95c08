// The CUDA backend's memory plumbing and device selection (label gpu; skipped without a GPU).
#include <gtest/gtest.h>

#include <cstring>
#include <numeric>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/cpu_backend.h"
#include "tests/kernels/cuda_test_util.h"

namespace ramba::kernels::testing {
namespace {

using CudaBackendTest = CudaOpTest;

TEST_F(CudaBackendTest, AutoPicksCudaWhenAGpuIsVisible) {
  auto be = CreateBackend("auto");
  ASSERT_TRUE(be.ok()) << be.status();
  EXPECT_EQ((*be)->name(), "cuda");
  EXPECT_FALSE((*be)->host_accessible());
  EXPECT_EQ((*be)->weight_dtype(), DType::kBF16);
}

TEST_F(CudaBackendTest, UploadCopyZeroDownloadRoundTrip) {
  std::vector<float> host = RandomVec(100003, 7);
  float* a = ToGpu(host);
  float* b = Poisoned<float>(host.size());
  ASSERT_TRUE(gpu_->Copy(b, a, host.size() * sizeof(float)).ok());
  EXPECT_EQ(FromGpu(b, host.size()), host);
  ASSERT_TRUE(gpu_->Zero(b + 10, 5 * sizeof(float)).ok());
  std::vector<float> got = FromGpu(b, host.size());
  for (int i = 0; i < 20; ++i) EXPECT_EQ(got[i], (i >= 10 && i < 15) ? 0.0f : host[i]) << i;
}

TEST_F(CudaBackendTest, ZeroByteAllocationIsUsable) {
  auto buf = gpu_->Allocate(0);
  ASSERT_TRUE(buf.ok()) << buf.status();
  EXPECT_NE(buf->data(), nullptr);
  EXPECT_TRUE(gpu_->Synchronize().ok());
}

TEST_F(CudaBackendTest, HugeAllocationFailsWithResourceExhausted) {
  auto buf = gpu_->Allocate(size_t{1} << 50);  // 1 PiB
  ASSERT_FALSE(buf.ok());
  EXPECT_EQ(buf.status().code(), absl::StatusCode::kResourceExhausted) << buf.status();
  // The backend still works afterwards.
  std::vector<int32_t> v(1000);
  std::iota(v.begin(), v.end(), 0);
  EXPECT_EQ(FromGpu(ToGpu(v), v.size()), v);
}

TEST_F(CudaBackendTest, RaggedOpsWithoutHostOffsetsAreRejected) {
  std::vector<int64_t> offs = {0, 4};
  int64_t* d_offs = ToGpu(offs);
  float* x = ToGpu(RandomVec(64, 1));
  SsmParams p;
  p.nheads = p.headdim = p.d_state = p.ngroups = 1;
  p.A_log = p.D = p.dt_bias = x;
  float* states[] = {x};
  float** d_states = ToGpu(std::vector<float*>(states, states + 1));
  EXPECT_EQ(gpu_->SsmScan(x, 4, x, 1, d_offs, 1, d_states, p, x).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(gpu_->CausalConv1dSilu(x, 4, d_offs, 1, d_states, x, nullptr, 4, 2, x).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ramba::kernels::testing

namespace ramba::kernels::testing {
namespace {

TEST_F(CudaOpTest, ScatterRowsMatchesCpu) {
  const int64_t rows = 37, cols = 301, ld = 320;
  std::vector<float> src = RandomVec(rows * ld, 3);
  float* d_src = ToGpu(src);
  float* d_dst = Poisoned<float>(rows * 2 * cols);
  std::vector<float*> ptrs;
  for (int64_t r = 0; r < rows; ++r) ptrs.push_back(d_dst + ((r * 7) % rows) * 2 * cols + cols / 3);
  ASSERT_TRUE(gpu_->ScatterRows(d_src, ld, ToGpu(ptrs), rows, cols).ok());
  std::vector<float> got = FromGpu(d_dst, rows * 2 * cols);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = ((r * 7) % rows) * 2 * cols + cols / 3;
    for (int64_t c = 0; c < cols; ++c) ASSERT_EQ(got[base + c], src[r * ld + c]) << r << "," << c;
  }
}

TEST_F(CudaOpTest, RecordedGraphReplaysWithNewInputs) {
  const int64_t n = 4096;
  float* a = ToGpu(RandomVec(n, 1));
  float* b = ToGpu(RandomVec(n, 2));
  ASSERT_TRUE(gpu_->BeginGraph().ok());
  ASSERT_TRUE(gpu_->Add(b, a, n).ok());  // recorded, not run
  auto id = gpu_->EndGraph();
  ASSERT_TRUE(id.ok()) << id.status();
  std::vector<float> before = FromGpu(b, n);
  EXPECT_EQ(before, RandomVec(n, 2)) << "recording must not run the ops";
  const std::vector<float> a2 = RandomVec(n, 5);
  ASSERT_TRUE(gpu_->Upload(a, a2.data(), n * sizeof(float)).ok());
  ASSERT_TRUE(gpu_->LaunchGraph(*id).ok());
  ASSERT_TRUE(gpu_->LaunchGraph(*id).ok());
  std::vector<float> got = FromGpu(b, n);
  for (int64_t i = 0; i < n; ++i) ASSERT_FLOAT_EQ(got[i], before[i] + 2 * a2[i]) << i;
  gpu_->DestroyGraph(*id);
  EXPECT_FALSE(gpu_->LaunchGraph(*id).ok());
}

// AllocateHostCopy writes its block from the host at once, so a block freed while queued work
// may still read it must not come back until the stream has passed the free.
TEST_F(CudaBackendTest, HostBlocksComeBackOnlyAfterTheWorkQueuedBeforeTheirFree) {
  const size_t bytes = size_t{96} << 20;  // over a slab: one block per slab
  std::vector<char> src(bytes);
  for (size_t i = 0; i < bytes; i += 4096) src[i] = static_cast<char>(i / 4096 * 7 + 1);
  auto a = gpu_->AllocateHost(bytes);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(a->host());
  void* const a_block = a->data();
  // Milliseconds of queued work (the block could be read by such work).
  auto busy = gpu_->Allocate(size_t{2} << 30);
  ASSERT_TRUE(busy.ok()) << busy.status();
  for (int i = 0; i < 8; ++i) ASSERT_TRUE(gpu_->Zero(busy->data(), busy->size()).ok());
  a->Reset();
  auto b = gpu_->AllocateHostCopy(src.data(), bytes);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_NE(b->data(), a_block) << "handed out again while queued work may read it";
  EXPECT_EQ(std::memcmp(b->data(), src.data(), bytes), 0);
  EXPECT_EQ(gpu_->host_held_bytes(), static_cast<int64_t>(bytes));
  ASSERT_TRUE(gpu_->Synchronize().ok());
  auto c = gpu_->AllocateHost(bytes);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->data(), a_block) << "a settled block is reused, not a new slab";
  // Kernels read the copy in place (mapped memory).
  std::vector<char> back(bytes);
  ASSERT_TRUE(gpu_->Download(back.data(), b->data(), bytes).ok());
  EXPECT_EQ(back, src);
}

// Chunk memories of several sequences with random values, as the host default reads them
// (cpu: host pointers) and as the GPU does (gpu): chunks [0, host[s]) of sequence s in mapped
// host memory (the host tier), the rest in GPU memory. Sequence s's values come from seed0 + s.
struct TieredChunks {
  std::vector<std::vector<float>> values;           // [sequence][chunk * floats]
  std::vector<std::vector<const float*>> cpu, gpu;  // [sequence][chunk]
  std::vector<kernels::Buffer> kept;
};
void MakeTieredChunks(Backend* gpu, const std::vector<int64_t>& num_chunks,
                      const std::vector<int64_t>& host, int64_t floats, int seed0,
                      TieredChunks* t) {
  const size_t n = num_chunks.size(), bytes = floats * sizeof(float);
  t->values.resize(n);
  t->cpu.resize(n);
  t->gpu.resize(n);
  for (size_t s = 0; s < n; ++s) {
    t->values[s] = RandomVec(num_chunks[s] * floats, seed0 + static_cast<int>(s));
    for (int64_t c = 0; c < num_chunks[s]; ++c) {
      const float* v = t->values[s].data() + c * floats;
      t->cpu[s].push_back(v);
      auto buf = c < host[s] ? gpu->AllocateHostCopy(v, bytes) : gpu->Allocate(bytes);
      ASSERT_TRUE(buf.ok()) << buf.status();
      if (c >= host[s]) ASSERT_TRUE(gpu->Upload(buf->data(), v, bytes).ok());
      t->gpu[s].push_back(buf->as<float>());
      t->kept.push_back(*std::move(buf));
    }
  }
}

// StageSelectedHostChunks on the GPU (host-tier chunks in mapped host memory, the others in GPU
// memory, many rows picking skewed chunks) chooses, copies and points exactly as the host
// default does on the same inputs, for capacities above, at and below the distinct picks.
TEST_F(CudaBackendTest, StageSelectedHostChunksMatchesTheHostDefault) {
  auto cpu = CreateCpuBackend(1);
  constexpr int64_t kFloats = 68, kPerRow = 8, kRows = 700;
  const std::vector<int64_t> num_chunks = {300, 5, 1200}, host = {290, 0, 1000};
  std::vector<int64_t> host_offsets = {0}, table_offsets = {0};
  for (int s = 0; s < 3; ++s) {
    host_offsets.push_back(host_offsets.back() + host[s]);
    table_offsets.push_back(table_offsets.back() + num_chunks[s]);
  }
  std::mt19937 rng(5);
  TieredChunks chunks;
  ASSERT_NO_FATAL_FAILURE(MakeTieredChunks(gpu_.get(), num_chunks, host, kFloats, 10, &chunks));
  const auto& cpu_tables = chunks.cpu;
  const auto& gpu_tables = chunks.gpu;
  std::vector<int32_t> row_seq(kRows), indices(kRows * kPerRow);
  for (int64_t r = 0; r < kRows; ++r) {
    row_seq[r] = static_cast<int32_t>(rng() % 3);
    for (int64_t j = 0; j < kPerRow; ++j) {
      const int64_t n = num_chunks[row_seq[r]];
      const uint32_t u = rng() % 10;  // skewed: a few chunks picked very often
      indices[r * kPerRow + j] =
          u == 0 ? -1 : static_cast<int32_t>(u < 4 ? rng() % std::min<int64_t>(n, 6) : rng() % n);
    }
  }
  const float* const* cpu_table_ptrs[] = {cpu_tables[0].data(), cpu_tables[1].data(),
                                          cpu_tables[2].data()};
  std::vector<const float* const*> gpu_table_ptrs;
  for (int s = 0; s < 3; ++s) gpu_table_ptrs.push_back(ToGpu(gpu_tables[s]));
  ChunkMemoryBatch cpu_mem, gpu_mem;
  cpu_mem.chunk_kv = cpu_table_ptrs;
  cpu_mem.num_chunks = num_chunks.data();
  cpu_mem.row_seq = row_seq.data();
  cpu_mem.num_seqs = 3;
  cpu_mem.max_num_chunks = 1200;
  gpu_mem = cpu_mem;
  gpu_mem.chunk_kv = ToGpu(gpu_table_ptrs);
  gpu_mem.num_chunks = ToGpu(num_chunks);
  gpu_mem.row_seq = ToGpu(row_seq);
  const int32_t* gpu_indices = ToGpu(indices);
  // What there is to choose from: the capacities below straddle it.
  std::set<std::pair<int, int>> distinct;
  for (int64_t i = 0; i < kRows * kPerRow; ++i) {
    const int s = row_seq[i / kPerRow];
    if (indices[i] >= 0 && indices[i] < host[s]) distinct.insert({s, indices[i]});
  }
  EXPECT_GT(distinct.size(), 600u);
  EXPECT_LT(distinct.size(), 5000u);
  for (int64_t capacity : {5000, 600, 37, 1, 0}) {
    SCOPED_TRACE(capacity);
    const int64_t cap1 = std::max<int64_t>(capacity, 1);
    std::vector<float> cpu_blocks(cap1 * kFloats);
    std::vector<int32_t> cpu_picks(host_offsets[3]);
    std::vector<const float*> cpu_sources(cap1), cpu_entries(table_offsets[3]);
    std::vector<const float* const*> cpu_out_tables(3);
    int32_t cpu_staged = -1;
    StagedChunkTables want{cpu_blocks.data(),   capacity,
                           host_offsets.data(), host_offsets[3],
                           cpu_picks.data(),    cpu_sources.data(),
                           &cpu_staged,         table_offsets.data(),
                           cpu_entries.data(),  cpu_out_tables.data()};
    ASSERT_TRUE(
        cpu->StageSelectedHostChunks(cpu_mem, indices.data(), kRows, kPerRow, kFloats, want).ok());
    StagedChunkTables got{Poisoned<float>(cap1 * kFloats),
                          capacity,
                          ToGpu(host_offsets),
                          host_offsets[3],
                          Poisoned<int32_t>(host_offsets[3]),
                          Poisoned<const float*>(cap1),
                          Poisoned<int32_t>(1),
                          ToGpu(table_offsets),
                          Poisoned<const float*>(table_offsets[3]),
                          Poisoned<const float* const*>(3)};
    ASSERT_TRUE(
        gpu_->StageSelectedHostChunks(gpu_mem, gpu_indices, kRows, kPerRow, kFloats, got).ok());
    EXPECT_EQ(FromGpu(got.staged, 1)[0], cpu_staged);
    EXPECT_EQ(cpu_staged, std::min<int64_t>(capacity, distinct.size()));
    const std::vector<const float*> entries = FromGpu(got.entries, table_offsets[3]);
    const std::vector<const float* const*> tables = FromGpu(got.tables, 3);
    const std::vector<float> blocks = FromGpu(got.blocks, cap1 * kFloats);
    int staged_seen = 0;
    for (int s = 0; s < 3; ++s) {
      EXPECT_EQ(tables[s], got.entries + table_offsets[s]);
      for (int64_t c = 0; c < num_chunks[s]; ++c) {
        const float* w = cpu_out_tables[s][c];
        const float* g = entries[table_offsets[s] + c];
        if (w == cpu_tables[s][c]) {
          EXPECT_EQ(g, gpu_tables[s][c]) << s << " " << c;
          continue;
        }
        const int64_t slot = (w - cpu_blocks.data()) / kFloats;
        ++staged_seen;
        ASSERT_EQ(g, got.blocks + slot * kFloats) << s << " " << c;
        EXPECT_EQ(std::vector<float>(blocks.begin() + slot * kFloats,
                                     blocks.begin() + (slot + 1) * kFloats),
                  std::vector<float>(w, w + kFloats));
      }
    }
    EXPECT_EQ(staged_seen, cpu_staged);
  }
}

// StageHostChunks with chunk caches on the GPU (a warp per row deciding hits and LRU victims)
// places, copies and counts exactly as the host default does, over steps of skewed picks with
// repeats, rows without a cache, and more distinct picks than slots.
TEST_F(CudaBackendTest, StageHostChunksCachesMatchTheHostDefault) {
  auto cpu = CreateCpuBackend(1);
  constexpr int64_t kFloats = 68, kHeads = 2, kTopK = 4, kPerRow = kHeads * kTopK, kRows = 40;
  constexpr int64_t kSlots = 6, kSteps = 8;
  std::mt19937 rng(9);
  std::vector<int64_t> num_chunks(kRows), host(kRows);
  for (int64_t r = 0; r < kRows; ++r) {
    num_chunks[r] = 10 + rng() % 60;
    host[r] = rng() % (num_chunks[r] + 1);
  }
  TieredChunks chunks;
  ASSERT_NO_FATAL_FAILURE(MakeTieredChunks(gpu_.get(), num_chunks, host, kFloats, 30, &chunks));
  const auto& cpu_tables = chunks.cpu;
  const auto& gpu_tables = chunks.gpu;
  std::vector<const float*const*> cpu_table_ptrs, gpu_table_ptrs;
  for (int64_t r = 0; r < kRows; ++r) {
    cpu_table_ptrs.push_back(cpu_tables[r].data());
    gpu_table_ptrs.push_back(ToGpu(gpu_tables[r]));
  }
  ChunkMemoryBatch cpu_mem, gpu_mem;
  cpu_mem.chunk_kv = cpu_table_ptrs.data();
  gpu_mem.chunk_kv = ToGpu(gpu_table_ptrs);
  const int64_t* gpu_host = ToGpu(host);
  // Every fifth row has no cache.
  const int64_t tag_words = ChunkCacheRows::TagWords(kSlots);
  std::vector<std::vector<float>> cpu_cache(kRows, std::vector<float>(kSlots * kFloats));
  std::vector<std::vector<int32_t>> cpu_tags(kRows, std::vector<int32_t>(tag_words, 0));
  std::vector<float*> cpu_cache_ptrs(kRows), gpu_cache_ptrs(kRows);
  std::vector<int32_t*> cpu_tag_ptrs(kRows), gpu_tag_ptrs(kRows);
  for (int64_t r = 0; r < kRows; ++r) {
    if (r % 5 == 4) continue;
    cpu_cache_ptrs[r] = cpu_cache[r].data();
    cpu_tag_ptrs[r] = cpu_tags[r].data();
    gpu_cache_ptrs[r] = Poisoned<float>(kSlots * kFloats);
    gpu_tag_ptrs[r] = ToGpu(std::vector<int32_t>(tag_words, 0));
  }
  std::vector<float> cpu_blocks(kRows * kPerRow * kFloats);
  std::vector<const float*> cpu_slots(kRows * kPerRow);
  std::vector<const float* const*> cpu_out_tables(kRows);
  std::vector<int64_t> cpu_num(kRows);
  std::vector<int32_t> cpu_idx(kRows * kPerRow), cpu_copies(kRows * kPerRow);
  std::vector<uint64_t> cpu_counts(3, 0);
  StagedChunks want{cpu_blocks.data(), cpu_slots.data(), cpu_out_tables.data(),
                    cpu_num.data(),    cpu_idx.data(),   cpu_counts.data()};
  want.cache = {cpu_cache_ptrs.data(), cpu_tag_ptrs.data(), kSlots};
  want.copies = cpu_copies.data();
  StagedChunks got{
      Poisoned<float>(kRows * kPerRow * kFloats), Poisoned<const float*>(kRows * kPerRow),
      Poisoned<const float* const*>(kRows),       Poisoned<int64_t>(kRows),
      Poisoned<int32_t>(kRows * kPerRow),         ToGpu(std::vector<uint64_t>(3, 0))};
  got.cache = {ToGpu(gpu_cache_ptrs), ToGpu(gpu_tag_ptrs), kSlots};
  got.copies = Poisoned<int32_t>(kRows * kPerRow);
  uint64_t hits = 0;
  for (int64_t step = 0; step < kSteps; ++step) {
    SCOPED_TRACE(step);
    std::vector<int32_t> indices(kRows * kPerRow);
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t j = 0; j < kPerRow; ++j) {
        const uint32_t u = rng() % 10;  // a few chunks picked often, so hits and repeats
        indices[r * kPerRow + j] =
            u == 0 ? -1
                   : static_cast<int32_t>(u < 6 ? rng() % std::min<int64_t>(num_chunks[r], 5)
                                                : rng() % num_chunks[r]);
      }
    }
    ASSERT_TRUE(cpu->StageHostChunks(cpu_mem, host.data(), indices.data(), kRows, kHeads, kTopK,
                                     kFloats, want)
                    .ok());
    ASSERT_TRUE(
        gpu_->StageHostChunks(gpu_mem, gpu_host, ToGpu(indices), kRows, kHeads, kTopK, kFloats, got)
            .ok());
    EXPECT_EQ(FromGpu(got.tier_counts, 3), cpu_counts);
    EXPECT_EQ(FromGpu(got.indices, kRows * kPerRow), cpu_idx);
    const std::vector<const float*> slots = FromGpu(got.slots, kRows * kPerRow);
    const std::vector<float> blocks = FromGpu(got.blocks, kRows * kPerRow * kFloats);
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t j = 0; j < kPerRow; ++j) {
        const int64_t i = r * kPerRow + j;
        const float* w = cpu_slots[i];
        const float* g = slots[i];
        const int32_t c = indices[i];
        if (c < 0) {
          EXPECT_EQ(g, nullptr);
        } else if (c >= host[r]) {
          EXPECT_EQ(g, gpu_tables[r][c]) << r << " " << j;
        } else if (w >= cpu_blocks.data() && w < cpu_blocks.data() + cpu_blocks.size()) {
          ASSERT_EQ(g, got.blocks + i * kFloats) << r << " " << j;
          EXPECT_EQ(
              std::vector<float>(blocks.begin() + i * kFloats, blocks.begin() + (i + 1) * kFloats),
              std::vector<float>(cpu_tables[r][c], cpu_tables[r][c] + kFloats));
        } else {
          const int64_t at = (w - cpu_cache[r].data()) / kFloats;
          ASSERT_EQ(g, gpu_cache_ptrs[r] + at * kFloats) << r << " " << j;
        }
      }
      if (cpu_tag_ptrs[r] == nullptr) continue;
      EXPECT_EQ(FromGpu(gpu_tag_ptrs[r], tag_words), cpu_tags[r]) << r;
      const std::vector<float> cache = FromGpu(gpu_cache_ptrs[r], kSlots * kFloats);
      for (int64_t k = 0; k < kSlots; ++k) {
        const int32_t c = cpu_tags[r][k] - 1;
        if (c < 0) continue;
        EXPECT_EQ(
            std::vector<float>(cache.begin() + k * kFloats, cache.begin() + (k + 1) * kFloats),
            std::vector<float>(cpu_tables[r][c], cpu_tables[r][c] + kFloats))
            << r << " " << k;
      }
    }
    hits = cpu_counts[2];
  }
  EXPECT_GT(hits, 100u);                 // the caches were hit
  EXPECT_LT(hits, cpu_counts[1] - 100);  // and missed
}

// A server creates and pages in sessions on its RPC threads while the model's thread may be
// recording a graph: those memory calls must run at once (not become part of the recording) and
// leave the recording as it was.
TEST_F(CudaOpTest, OtherThreadsMemoryCallsStayOutOfARecording) {
  const int64_t n = 70001;  // small uploads go through the staging ring, large ones direct
  float* a = ToGpu(RandomVec(n, 1));
  float* b = ToGpu(RandomVec(n, 2));
  const std::vector<float> b0 = FromGpu(b, n);
  ASSERT_TRUE(gpu_->BeginGraph().ok());
  ASSERT_TRUE(gpu_->Add(b, a, n).ok());  // recorded
  std::vector<float> copied, zeroed, small;
  absl::Status status;
  std::thread other([&] {
    const std::vector<float> host = RandomVec(n, 3);
    const std::vector<float> few = {1.5f, -2.0f, 3.25f};
    auto x = gpu_->Allocate(n * sizeof(float));
    auto y = gpu_->Allocate(n * sizeof(float));
    auto z = gpu_->Allocate(few.size() * sizeof(float));
    if (!x.ok() || !y.ok() || !z.ok()) {
      status = absl::InternalError("allocation failed");
      return;
    }
    status.Update(gpu_->Upload(x->data(), host.data(), n * sizeof(float)));
    status.Update(gpu_->Upload(z->data(), few.data(), few.size() * sizeof(float)));
    status.Update(gpu_->Copy(y->data(), x->data(), n * sizeof(float)));
    copied.resize(n);
    status.Update(gpu_->Download(copied.data(), y->data(), n * sizeof(float)));
    status.Update(gpu_->Zero(y->data(), n * sizeof(float)));
    zeroed.resize(n);
    status.Update(gpu_->Download(zeroed.data(), y->data(), n * sizeof(float)));
    small.resize(few.size());
    status.Update(gpu_->Download(small.data(), z->data(), few.size() * sizeof(float)));
  });  // x, y and z freed on that thread while the recording is still open
  other.join();
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(copied, RandomVec(n, 3));
  EXPECT_EQ(zeroed, std::vector<float>(n, 0.0f));
  EXPECT_EQ(small, (std::vector<float>{1.5f, -2.0f, 3.25f}));
  auto id = gpu_->EndGraph();
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_EQ(FromGpu(b, n), b0) << "recording must not run the ops";
  ASSERT_TRUE(gpu_->LaunchGraph(*id).ok());
  const std::vector<float> got = FromGpu(b, n);
  const std::vector<float> av = RandomVec(n, 1);
  for (int64_t i = 0; i < n; ++i) ASSERT_FLOAT_EQ(got[i], b0[i] + av[i]) << i;
  gpu_->DestroyGraph(*id);
}

}  // namespace
}  // namespace ramba::kernels::testing
