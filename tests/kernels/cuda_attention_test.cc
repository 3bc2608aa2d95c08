// The CUDA attention-side ops against the CPU backend on fresh random inputs: RetrieveChunks (the
// decode-shaped and the tiled prefill-shaped scan, ragged batches, ties, NaN, forks, misaligned
// arrays), SparseChunkAttention, HsaBlock (fused at decode shapes) and BlockAttention. Label gpu;
// skipped without a GPU.
//
// Retrieval inputs are random multiples of 1/16, so every dot product is exact in float whatever
// the summation order: CPU and GPU scores are bitwise equal, indices must match exactly (ties
// included), and equal scores are common.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/cuda_test_util.h"

namespace ramba::kernels::testing {
namespace {

constexpr int64_t kChunk = 64;

// Random multiples of 1/16 in [lo / 16, hi / 16].
std::vector<float> QuantizedVec(int64_t n, uint32_t seed, int lo = -24, int hi = 24) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(lo, hi);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<float>(dist(gen)) / 16.0f;
  return v;
}

// Chunk memory of several sequences, built on the host and mirrored on the GPU by Upload.
struct Memory {
  int64_t dim = 0;                            // retrieval dim
  int64_t kv_floats = 0;                      // floats per chunk (K then V); 0: no K/V
  std::vector<std::vector<float>> landmarks;  // per sequence [num_chunks, dim]
  std::vector<int> landmark_owner;            // sequence whose landmark array it reads
  std::vector<int64_t> num_chunks;
  std::vector<std::vector<int64_t>> chunk_ids;  // per sequence: storage id of each chunk
  std::vector<float> kv;                        // [ids, kv_floats]
  std::vector<int32_t> row_seq;
  std::vector<int64_t> row_pos;
  int64_t extra_bound = 0;  // added to max_num_chunks on the GPU (a loose bound)
  bool misalign = false;    // GPU landmark and K/V arrays start 4 bytes past 16-byte alignment

  // Host pointer arrays behind `cpu`.
  std::vector<const float*> cpu_landmarks;
  std::vector<std::vector<const float*>> cpu_tables;
  std::vector<const float* const*> cpu_table_ptrs;
  ChunkMemoryBatch cpu, gpu;

  int64_t rows() const { return static_cast<int64_t>(row_seq.size()); }

  int64_t NewChunkId(uint32_t seed) {
    const int64_t id = kv_floats == 0 ? 0 : static_cast<int64_t>(kv.size()) / kv_floats;
    if (kv_floats > 0) {
      const auto k = RandomVec(kv_floats / 2, seed, -2.0f, 2.0f);
      const auto v = RandomVec(kv_floats / 2, seed + 7777, -1.0f, 1.0f);
      kv.insert(kv.end(), k.begin(), k.end());
      kv.insert(kv.end(), v.begin(), v.end());
    }
    return id;
  }
  // A sequence of n chunks with fresh landmarks and K/V.
  int AddSequence(int64_t n, uint32_t seed) {
    const int s = static_cast<int>(num_chunks.size());
    landmarks.push_back(QuantizedVec(n * dim, seed));
    landmark_owner.push_back(s);
    num_chunks.push_back(n);
    chunk_ids.emplace_back();
    for (int64_t c = 0; c < n; ++c) chunk_ids.back().push_back(NewChunkId(seed * 131 + c));
    return s;
  }
  // A fork of `parent`: its first `shared` chunks (the same K/V pointers and landmark values),
  // then `extra` chunks of its own.
  int AddFork(int parent, int64_t shared, int64_t extra, uint32_t seed) {
    const int s = static_cast<int>(num_chunks.size());
    std::vector<float> lm(landmarks[parent].begin(), landmarks[parent].begin() + shared * dim);
    const auto own = QuantizedVec(extra * dim, seed);
    lm.insert(lm.end(), own.begin(), own.end());
    landmarks.push_back(std::move(lm));
    landmark_owner.push_back(s);
    num_chunks.push_back(shared + extra);
    std::vector<int64_t> ids(chunk_ids[parent].begin(), chunk_ids[parent].begin() + shared);
    for (int64_t c = 0; c < extra; ++c) ids.push_back(NewChunkId(seed * 131 + c));
    chunk_ids.push_back(std::move(ids));
    return s;
  }
  // A sequence reading `parent`'s landmark array and chunk table (the same pointers) but holding
  // only its first n chunks.
  int AddAlias(int parent, int64_t n) {
    const int s = static_cast<int>(num_chunks.size());
    landmarks.emplace_back();
    landmark_owner.push_back(parent);
    num_chunks.push_back(n);
    chunk_ids.emplace_back(chunk_ids[parent].begin(), chunk_ids[parent].begin() + n);
    return s;
  }
  void AddRow(int s, int64_t pos) {
    row_seq.push_back(s);
    row_pos.push_back(pos);
  }
  void ShuffleRows(uint32_t seed) {
    std::vector<size_t> perm(row_seq.size());
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), std::mt19937(seed));
    std::vector<int32_t> seq;
    std::vector<int64_t> pos;
    for (size_t i : perm) {
      seq.push_back(row_seq[i]);
      pos.push_back(row_pos[i]);
    }
    row_seq = seq;
    row_pos = pos;
  }
  const std::vector<float>& LandmarksOf(int s) const { return landmarks[landmark_owner[s]]; }
};

// Positions around every boundary that matters for eligibility, for chunk size cs.
std::vector<int64_t> EdgePositions(int64_t cs) {
  std::vector<int64_t> p = {0, 1, 20 * cs + 5, 120 * cs, int64_t{1} << 20};
  for (int64_t c : {1, 2, 3, 7, 299, 300}) {
    for (int64_t d : {-1, 0, 1}) p.push_back(c * cs + d);
  }
  return p;
}

struct Selection {
  std::vector<int32_t> idx;
  std::vector<float> w;
};

class CudaAttentionOpsTest : public CudaOpTest {
 protected:
  // Builds the CPU view and uploads the GPU copy of `m`.
  void Upload(Memory* m) {
    const size_t seqs = m->num_chunks.size();
    const int pad = m->misalign ? 1 : 0;
    std::vector<const float*> dev_lm(seqs, nullptr);
    m->cpu_landmarks.assign(seqs, nullptr);
    for (size_t s = 0; s < seqs; ++s) {
      if (m->landmark_owner[s] != static_cast<int>(s) || m->landmarks[s].empty()) continue;
      std::vector<float> padded(pad, 0.0f);
      padded.insert(padded.end(), m->landmarks[s].begin(), m->landmarks[s].end());
      dev_lm[s] = ToGpu(padded) + pad;
      m->cpu_landmarks[s] = m->landmarks[s].data();
    }
    for (size_t s = 0; s < seqs; ++s) {
      dev_lm[s] = dev_lm[m->landmark_owner[s]];
      m->cpu_landmarks[s] = m->cpu_landmarks[m->landmark_owner[s]];
    }
    m->cpu = ChunkMemoryBatch{};
    m->gpu = ChunkMemoryBatch{};
    if (m->kv_floats > 0) {
      std::vector<float> padded(pad, 0.0f);
      padded.insert(padded.end(), m->kv.begin(), m->kv.end());
      const float* base = ToGpu(padded) + pad;
      m->cpu_tables.assign(seqs, {});
      m->cpu_table_ptrs.clear();
      std::vector<const float* const*> dev_tables;
      for (size_t s = 0; s < seqs; ++s) {
        std::vector<const float*> dev_table;
        for (int64_t id : m->chunk_ids[s]) {
          m->cpu_tables[s].push_back(m->kv.data() + id * m->kv_floats);
          dev_table.push_back(base + id * m->kv_floats);
        }
        dev_tables.push_back(ToGpu(dev_table));
        m->cpu_table_ptrs.push_back(m->cpu_tables[s].data());
      }
      m->cpu.chunk_kv = m->cpu_table_ptrs.data();
      m->gpu.chunk_kv = ToGpu(dev_tables);
    }
    m->cpu.row_seq = m->row_seq.data();
    m->cpu.row_position = m->row_pos.data();
    m->cpu.landmarks = m->cpu_landmarks.data();
    m->cpu.num_chunks = m->num_chunks.data();
    m->gpu.row_seq = ToGpu(m->row_seq);
    m->gpu.row_position = ToGpu(m->row_pos);
    m->gpu.landmarks = ToGpu(dev_lm);
    m->gpu.num_chunks = ToGpu(m->num_chunks);
    m->gpu.max_num_chunks =
        *std::max_element(m->num_chunks.begin(), m->num_chunks.end()) + m->extra_bound;
    m->gpu.num_seqs = static_cast<int64_t>(seqs);
  }

  // RetrieveChunks on both backends; indices must match exactly, weights to 1e-5. Returns the
  // CPU's selection. positive_r: queries in [0, 1.5], so landmarks of large positive values
  // score far above random ones.
  Selection CheckRetrieve(const Memory& m, int64_t heads, int64_t top_k, uint32_t seed,
                          bool positive_r = false, int64_t cs = kChunk) {
    SCOPED_TRACE(::testing::Message() << "rows=" << m.rows() << " dim=" << m.dim
                                      << " heads=" << heads << " top_k=" << top_k);
    const int64_t rows = m.rows(), n = rows * heads * top_k;
    const std::vector<float> r = QuantizedVec(rows * m.dim, seed, positive_r ? 0 : -24, 24);
    Selection want{std::vector<int32_t>(n, 77), std::vector<float>(n, 77.0f)};
    const absl::Status cst = cpu_->RetrieveChunks(r.data(), rows, m.cpu, m.dim, heads, top_k, cs,
                                                  want.idx.data(), want.w.data());
    EXPECT_TRUE(cst.ok()) << cst;
    // Twice: the decode-shaped kernel's last block resets its arrival counters, which the second
    // call relies on.
    for (int call = 0; call < 2; ++call) {
      SCOPED_TRACE(::testing::Message() << "call " << call);
      int32_t* gi = Poisoned<int32_t>(n);
      float* gw = Poisoned<float>(n);
      const absl::Status st =
          gpu_->RetrieveChunks(ToGpu(r), rows, m.gpu, m.dim, heads, top_k, cs, gi, gw);
      EXPECT_TRUE(st.ok()) << st;
      const std::vector<int32_t> idx = FromGpu(gi, n);
      const std::vector<float> w = FromGpu(gw, n);
      int64_t mismatches = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (idx[i] == want.idx[i]) {
          if (idx[i] < 0) EXPECT_EQ(w[i], 0.0f) << "unused slot " << i;
          continue;
        }
        if (mismatches++ < 8) {
          ADD_FAILURE() << "row " << i / (heads * top_k) << " head " << (i / top_k) % heads
                        << " slot " << i % top_k << ": gpu chunk " << idx[i] << ", cpu chunk "
                        << want.idx[i];
        }
      }
      EXPECT_EQ(mismatches, 0);
      EXPECT_LE(NormRelError(w, want.w), 1e-5);
    }
    return want;
  }

  // SparseChunkAttention on the GPU with RAMBA_CUDA_SPARSE_ATTENTION = `path` ("" for the
  // default choice); null when the call failed.
  std::vector<float> GpuSparse(const Memory& m, const Selection& sel, const std::vector<float>& q,
                               int64_t rheads, int64_t top_k, int64_t nh, int64_t nkv, int64_t hd,
                               int64_t cs, const char* path) {
    if (*path != '\0') setenv("RAMBA_CUDA_SPARSE_ATTENTION", path, 1);
    const int64_t n = m.rows() * nh * hd;
    float* go = Poisoned<float>(n);
    const absl::Status st = gpu_->SparseChunkAttention(
        ToGpu(q), m.rows(), m.gpu, ToGpu(sel.idx), ToGpu(sel.w), rheads, top_k, nh, nkv, hd, cs, go);
    unsetenv("RAMBA_CUDA_SPARSE_ATTENTION");
    EXPECT_TRUE(st.ok()) << st;
    return FromGpu(go, n);
  }

  // Rows whose selection is empty must output exact zeros; returns how many there were.
  static int64_t CheckEmptyRowsAreZero(const std::vector<float>& got, const Selection& sel,
                                       int64_t rows, int64_t rheads, int64_t top_k, int64_t width) {
    int64_t empty_rows = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const auto b = sel.idx.begin() + r * rheads * top_k;
      if (std::any_of(b, b + rheads * top_k, [](int32_t c) { return c >= 0; })) continue;
      ++empty_rows;
      for (int64_t i = r * width; i < (r + 1) * width; ++i) EXPECT_EQ(got[i], 0.0f) << i;
    }
    return empty_rows;
  }

  // SparseChunkAttention on both backends with the given selection: the f32 path to 1e-5; where
  // the shape has a bf16 tensor-core path (head dim 64, 64-key chunks, 16 query heads per kv
  // head), that path too: against the CPU on bf16-rounded Q, K and V (only P's rounding and the
  // summation order differ) and against the exact CPU result at bf16 precision.
  // Returns the path the default chose.
  enum class Path { kF32, kBf16, kShared, kFailed };
  Path CheckSparse(const Memory& m, const Selection& sel, int64_t rheads, int64_t top_k, int64_t nh,
                   int64_t nkv, int64_t hd, int64_t cs, uint32_t seed) {
    SCOPED_TRACE(::testing::Message()
                 << "rows=" << m.rows() << " nh=" << nh << " nkv=" << nkv << " rheads=" << rheads
                 << " hd=" << hd << " cs=" << cs << " top_k=" << top_k);
    EXPECT_EQ(m.kv_floats, 2 * cs * nkv * hd);
    const int64_t rows = m.rows(), n = rows * nh * hd;
    const std::vector<float> q = RandomVec(n, seed, -2.0f, 2.0f);
    std::vector<float> want(n, 99.0f);
    const absl::Status cst =
        cpu_->SparseChunkAttention(q.data(), rows, m.cpu, sel.idx.data(), sel.w.data(), rheads,
                                   top_k, nh, nkv, hd, cs, want.data());
    EXPECT_TRUE(cst.ok()) << cst;
    if (!cst.ok()) return Path::kFailed;

    const std::vector<float> got = GpuSparse(m, sel, q, rheads, top_k, nh, nkv, hd, cs, "f32");
    EXPECT_LE(NormRelError(got, want), 1e-5);
    EXPECT_GT(CheckEmptyRowsAreZero(got, sel, rows, rheads, top_k, nh * hd), 0);

    if (hd != 64 || cs != 64 || nh != 16 * nkv) return Path::kF32;
    const std::vector<float> tc = GpuSparse(m, sel, q, rheads, top_k, nh, nkv, hd, cs, "bf16");
    auto round = [](std::vector<float> v) {
      for (float& x : v) x = Bf16ToF32(F32ToBf16(x));
      return v;
    };
    const std::vector<float> q16 = round(q), kv16 = round(m.kv);
    std::vector<std::vector<const float*>> tables16(m.cpu_tables.size());
    std::vector<const float* const*> table_ptrs16;
    for (size_t s = 0; s < tables16.size(); ++s) {
      for (int64_t id : m.chunk_ids[s]) tables16[s].push_back(kv16.data() + id * m.kv_floats);
      table_ptrs16.push_back(tables16[s].data());
    }
    ChunkMemoryBatch mem16 = m.cpu;
    mem16.chunk_kv = table_ptrs16.data();
    std::vector<float> want16(n, 99.0f);
    EXPECT_TRUE(cpu_->SparseChunkAttention(q16.data(), rows, mem16, sel.idx.data(), sel.w.data(),
                                           rheads, top_k, nh, nkv, hd, cs, want16.data())
                    .ok());
    EXPECT_LE(NormRelError(tc, want16), 4e-3);
    EXPECT_LE(NormRelError(tc, want), 1e-2);
    EXPECT_GT(CheckEmptyRowsAreZero(tc, sel, rows, rheads, top_k, nh * hd), 0);
    // The block-shared kernel, with 16 and 8 rows per block: the same bf16 products, each row's
    // chunks added in union order (most recent first) instead of slot order, so it stays within
    // rounding of the per-warp kernel as well as of the CPU.
    std::vector<float> shared8;  // the default block size's result
    for (const char* block_rows : {"16", "8"}) {
      SCOPED_TRACE(::testing::Message() << "block-shared, " << block_rows << " rows per block");
      ScopedEnv env("RAMBA_CUDA_SPARSE_ROWS", block_rows);
      const std::vector<float> sh = GpuSparse(m, sel, q, rheads, top_k, nh, nkv, hd, cs, "shared");
      if (block_rows[0] == '8') shared8 = sh;
      EXPECT_LE(NormRelError(sh, tc), 1e-3);
      EXPECT_LE(NormRelError(sh, want16), 4e-3);
      EXPECT_LE(NormRelError(sh, want), 1e-2);
      EXPECT_GT(CheckEmptyRowsAreZero(sh, sel, rows, rheads, top_k, nh * hd), 0);
      // Deterministic: each row's sum has one order whatever the warps' timing.
      EXPECT_TRUE(sh == GpuSparse(m, sel, q, rheads, top_k, nh, nkv, hd, cs, "shared"));
    }
    // The default picks one of the three paths: the shared one with 8 rows per block, or past its
    // top-K of 16 the per-warp kernel (which "shared" then runs too).
    const std::vector<float> dflt = GpuSparse(m, sel, q, rheads, top_k, nh, nkv, hd, cs, "");
    if (top_k <= 16 && dflt == shared8) return Path::kShared;
    if (dflt == tc) return Path::kBf16;
    EXPECT_TRUE(dflt == got) << "the default matches no path";
    return Path::kF32;
  }

  void CheckBlockAttention(int64_t blocks, int64_t len, int64_t nh, int64_t nkv, int64_t hd,
                           uint32_t seed, bool misalign = false) {
    SCOPED_TRACE(::testing::Message() << blocks << "x" << len << " nh=" << nh << " nkv=" << nkv
                                      << " hd=" << hd << " misalign=" << misalign);
    const int64_t rows = blocks * len;
    const auto q = RandomVec(rows * nh * hd, seed, -2.0f, 2.0f);
    const auto k = RandomVec(rows * nkv * hd, seed + 1, -2.0f, 2.0f);
    const auto v = RandomVec(rows * nkv * hd, seed + 2);
    std::vector<float> want(rows * nh * hd, 99.0f);
    ASSERT_TRUE(
        cpu_->BlockAttention(q.data(), k.data(), v.data(), want.data(), blocks, len, nh, nkv, hd)
            .ok());
    // Misaligned: every array starts one float past a 16-byte boundary.
    const int pad = misalign ? 1 : 0;
    auto padded = [&](const std::vector<float>& x) {
      std::vector<float> p(pad, 0.0f);
      p.insert(p.end(), x.begin(), x.end());
      return ToGpu(p) + pad;
    };
    float* go = Poisoned<float>(rows * nh * hd + pad) + pad;
    const absl::Status st =
        gpu_->BlockAttention(padded(q), padded(k), padded(v), go, blocks, len, nh, nkv, hd);
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_LE(NormRelError(FromGpu(go, rows * nh * hd), want), 1e-5);
  }

  // Sequences of 0, 1, 7 and 300 chunks, a fork of the 300 sharing 250 chunks, and an alias of
  // the 300 holding 120 (same landmark array and chunk pointers); a row at every edge position
  // of every sequence, shuffled. `copies` > 1 repeats the rows (more rows: the tiled scan).
  Memory RaggedMemory(int64_t dim, int64_t kv_floats, int64_t cs, int copies, uint32_t seed) {
    Memory m;
    m.dim = dim;
    m.kv_floats = kv_floats;
    for (int64_t n : {0, 1, 7, 300}) m.AddSequence(n, seed++);
    m.AddFork(3, 250, 20, seed++);
    m.AddAlias(3, 120);
    for (int copy = 0; copy < copies; ++copy) {
      for (int s = 0; s < 6; ++s) {
        for (int64_t p : EdgePositions(cs)) m.AddRow(s, p);
      }
    }
    m.ShuffleRows(seed);
    return m;
  }
};

// ---------------- RetrieveChunks ----------------

TEST_F(CudaAttentionOpsTest, RetrieveRaggedBatchAtEdgePositions) {
  uint32_t seed = 1;
  for (int copies : {1, 3}) {  // 138 rows: decode-shaped scan; 414 rows: tiled scan
    for (int64_t heads : {1, 2}) {
      for (int64_t top_k : {1, 3, 8}) {
        Memory m = RaggedMemory(64, 0, kChunk, copies, seed++);
        Upload(&m);
        CheckRetrieve(m, heads, top_k, seed++);
      }
    }
  }
}

TEST_F(CudaAttentionOpsTest, RetrieveWithLooseChunkBound) {
  // max_num_chunks only sizes the grid: a loose bound gives the same result.
  for (int copies : {1, 3}) {
    Memory m = RaggedMemory(64, 0, kChunk, copies, 40);
    m.extra_bound = 5000;
    Upload(&m);
    CheckRetrieve(m, 2, 8, 41);
  }
}

TEST_F(CudaAttentionOpsTest, RetrieveMisalignedAndOddDims) {
  // Landmarks not 16-byte aligned, and head dims not a multiple of 4: the scalar load paths.
  uint32_t seed = 50;
  for (int copies : {1, 3}) {
    for (auto [dim, heads] : {std::pair<int64_t, int64_t>{64, 2}, {30, 3}, {7, 1}}) {
      Memory m = RaggedMemory(dim, 0, kChunk, copies, seed++);
      m.misalign = dim == 64;
      Upload(&m);
      CheckRetrieve(m, heads, 3, seed++);
      CheckRetrieve(m, heads, 8, seed++);
    }
  }
}

TEST_F(CudaAttentionOpsTest, RetrieveTiesAndNaN) {
  const int64_t dim = 32;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int copies : {1, 25}) {  // 13 rows: decode-shaped scan; 301 rows: tiled scan
    for (int64_t heads : {1, 2}) {
      Memory m;
      m.dim = dim;
      // Sequence 0: 40 identical landmarks, so every score ties and the lowest chunks win.
      const int s0 = m.AddSequence(40, 7);
      for (int64_t c = 1; c < 40; ++c) {
        std::copy(m.landmarks[s0].begin(), m.landmarks[s0].begin() + dim,
                  m.landmarks[s0].begin() + c * dim);
      }
      // Sequence 1: NaN in chunk 3's first head and in every head of chunk 7.
      const int s1 = m.AddSequence(10, 8);
      m.landmarks[s1][3 * dim + 1] = nan;
      m.landmarks[s1][7 * dim] = nan;
      m.landmarks[s1][7 * dim + dim / 2] = nan;
      // Sequence 2: every landmark NaN: all scores -inf, kept by chunk index with weight 0.
      const int s2 = m.AddSequence(5, 9);
      for (float& x : m.landmarks[s2]) x = nan;
      for (int copy = 0; copy < copies; ++copy) {
        for (int s : {s0, s1, s2}) {
          for (int64_t p : {int64_t{0}, 3 * kChunk + 1, 6 * kChunk, 100 * kChunk}) m.AddRow(s, p);
        }
      }
      m.AddRow(s1, 8 * kChunk);
      m.ShuffleRows(copies);
      Upload(&m);
      for (int64_t top_k : {3, 8}) {
        const Selection sel = CheckRetrieve(m, heads, top_k, 60 + heads);
        for (int64_t r = 0; r < m.rows(); ++r) {
          if (m.row_pos[r] != 100 * kChunk) continue;
          const int32_t* idx = sel.idx.data() + r * heads * top_k;
          const float* w = sel.w.data() + r * heads * top_k;
          if (m.row_seq[r] == s0) {
            // 40 tied chunks: chunks top_k - 1 .. 0 are kept.
            for (int64_t j = 0; j < top_k; ++j) EXPECT_EQ(idx[j], top_k - 1 - j);
          } else if (m.row_seq[r] == s2) {
            // NaN chunks are kept (by chunk index) with weight 0.
            EXPECT_EQ(idx[0], std::min<int64_t>(top_k, 5) - 1);
            EXPECT_EQ(w[0], 0.0f);
          }
        }
      }
    }
  }
}

// Landmarks of large positive values (strong: +1.5 everywhere, medium: +0.5) score far above
// random ones against queries in [0, 1.5], so they are always selected and tie among themselves.
void PlantDuplicates(Memory* m, int s, const std::vector<int64_t>& strong,
                     const std::vector<int64_t>& medium) {
  for (int64_t c : strong) std::fill_n(m->landmarks[s].begin() + c * m->dim, m->dim, 1.5f);
  for (int64_t c : medium) std::fill_n(m->landmarks[s].begin() + c * m->dim, m->dim, 0.5f);
}

TEST_F(CudaAttentionOpsTest, RetrieveDecodeBatchOverLongMemory) {
  // 64 rows of a decode batch over sequences of 20000 and 12000 chunks (and a fork reading the
  // first 16000 of the 20000): each row's scan is split over many blocks.
  const int64_t dim = 1024;
  Memory m;
  m.dim = dim;
  const int a = m.AddSequence(20000, 11);
  const int b = m.AddSequence(12000, 12);
  const int c = m.AddAlias(a, 16000);
  PlantDuplicates(&m, a, {150, 9000, 15999, 19999},
                  {5, 6, 4000, 8000, 12000, 16000, 16001, 19000, 19998, 200, 300, 17000});
  PlantDuplicates(&m, b, {11999}, {1, 2, 3, 6000, 11998});
  // NaN in the first head of a strong chunk and in the second head of a medium one.
  m.landmarks[a][9000 * dim + 5] = std::numeric_limits<float>::quiet_NaN();
  m.landmarks[a][16000 * dim + dim - 1] = std::numeric_limits<float>::quiet_NaN();
  std::mt19937 gen(13);
  for (int i = 0; i < 64; ++i) {
    const int s = i % 3 == 0 ? a : (i % 3 == 1 ? b : c);
    const int64_t full = m.num_chunks[s] * kChunk;
    const int64_t pos =
        i % 4 == 3 ? std::uniform_int_distribution<int64_t>(0, full)(gen) : full + i % kChunk;
    m.AddRow(s, pos);
  }
  Upload(&m);
  for (int64_t heads : {1, 2}) CheckRetrieve(m, heads, 8, 14 + heads, /*positive_r=*/true);
  CheckRetrieve(m, 2, 3, 17, /*positive_r=*/false);
}

TEST_F(CudaAttentionOpsTest, RetrieveOneRowOverManyRanges) {
  // Batch-1 decode: one row's scan split over ~2 blocks per SM. 70,000 chunks give ranges of more
  // than 256 chunks (several rounds per warp) and 5,000 chunks more than 256 ranges (several
  // rounds of list heads in the merge); top_k 32 is the one-kernel path's largest, 33 goes to the
  // tiled path.
  uint32_t seed = 80;
  for (int64_t chunks : {70000, 5000, 20}) {
    Memory m;
    m.dim = 64;
    const int s = m.AddSequence(chunks, seed++);
    PlantDuplicates(&m, s, {0, chunks / 2, chunks - 1},
                    {1, chunks / 3, chunks / 2 + 1, chunks - 2});
    m.AddRow(s, chunks * kChunk + 5);
    Upload(&m);
    for (int64_t top_k : {1, 8, 32, 33}) {
      CheckRetrieve(m, 1, top_k, seed++, /*positive_r=*/true);
      CheckRetrieve(m, 2, top_k, seed++);
    }
  }
}

TEST_F(CudaAttentionOpsTest, RetrievePrefillOverManyChunks) {
  // 2000 consecutive rows of one sequence over its 500 chunks (the tiled scan), with ties and NaN.
  const int64_t dim = 1024;
  Memory m;
  m.dim = dim;
  const int s = m.AddSequence(500, 21);
  PlantDuplicates(&m, s, {3, 250, 499}, {10, 11, 100, 200, 300, 301, 302, 400, 450, 480, 498});
  m.landmarks[s][250 * dim] = std::numeric_limits<float>::quiet_NaN();
  for (int64_t i = 0; i < 2000; ++i) m.AddRow(s, 500 * kChunk - 2000 + i);
  Upload(&m);
  CheckRetrieve(m, 2, 8, 22, /*positive_r=*/true);
  CheckRetrieve(m, 1, 8, 23, /*positive_r=*/true);
  CheckRetrieve(m, 2, 3, 24);
}

TEST_F(CudaAttentionOpsTest, RetrievePrefillFromTheStart) {
  // Rows 0..1999 of a new sequence: most see fewer than top_k chunks, the first 64 see none.
  Memory m;
  m.dim = 256;
  const int s = m.AddSequence(31, 31);
  for (int64_t i = 0; i < 2000; ++i) m.AddRow(s, i);
  Upload(&m);
  CheckRetrieve(m, 1, 8, 32);
  CheckRetrieve(m, 2, 3, 33);
}

// ---------------- SparseChunkAttention ----------------

TEST_F(CudaAttentionOpsTest, SparseAttentionOverRetrievedChunks) {
  struct Config {
    int64_t nh, nkv, rheads, hd, top_k;
  };
  uint32_t seed = 100;
  for (const Config& cf : {Config{4, 1, 1, 64, 8}, Config{16, 1, 1, 64, 8}, Config{32, 2, 2, 64, 8},
                           Config{32, 2, 1, 64, 3}, Config{16, 2, 1, 64, 3},
                           Config{16, 2, 2, 64, 8}, Config{4, 2, 2, 32, 1}, Config{6, 3, 3, 12, 3},
                           Config{5, 5, 1, 7, 8}}) {
    Memory m = RaggedMemory(96, 2 * kChunk * cf.nkv * cf.hd, kChunk, 1, seed++);
    Upload(&m);
    Selection sel = CheckRetrieve(m, cf.rheads, cf.top_k, seed++);
    // A zero weight on a used slot adds nothing.
    for (size_t i = 0; i < sel.idx.size(); ++i) {
      if (sel.idx[i] >= 0 && i % 5 == 0) sel.w[i] = 0.0f;
    }
    // Under 257 rows the default stays on f32.
    EXPECT_EQ(CheckSparse(m, sel, cf.rheads, cf.top_k, cf.nh, cf.nkv, cf.hd, kChunk, seed++),
              Path::kF32);
  }
}

TEST_F(CudaAttentionOpsTest, SparseAttentionMisalignedAndOddChunks) {
  // K/V arrays one float past alignment, and an odd chunk size with an odd head dim.
  Memory m = RaggedMemory(64, 2 * kChunk * 2 * 64, kChunk, 1, 200);
  m.misalign = true;
  Upload(&m);
  CheckSparse(m, CheckRetrieve(m, 2, 8, 201), 2, 8, 16, 2, 64, kChunk, 202);
  Memory m1 = RaggedMemory(64, 2 * kChunk * 64, kChunk, 1, 205);  // the bf16 path's shapes
  m1.misalign = true;
  Upload(&m1);
  CheckSparse(m1, CheckRetrieve(m1, 1, 8, 206), 1, 8, 16, 1, 64, kChunk, 207);

  const int64_t cs = 13;
  Memory odd = RaggedMemory(40, 2 * cs * 1 * 7, cs, 1, 210);
  Upload(&odd);
  CheckSparse(odd, CheckRetrieve(odd, 1, 3, 211, false, cs), 1, 3, 4, 1, 7, cs, 212);
}

TEST_F(CudaAttentionOpsTest, SparseAttentionDecodeAndPrefillShapes) {
  // 256 decode rows spread over the sequences, then 1000 prefill rows of one sequence.
  for (int64_t rows : {256, 1000}) {
    for (auto [nkv, rheads] : {std::pair<int64_t, int64_t>{1, 1}, {2, 2}}) {
      Memory m;
      m.dim = 128;
      m.kv_floats = 2 * kChunk * nkv * 64;
      const int s0 = m.AddSequence(300, 300 + rows);
      const int s1 = m.AddFork(s0, 200, 30, 301 + rows);
      for (int64_t i = 0; i < rows; ++i) {
        if (rows == 256) {
          m.AddRow(i % 2 == 0 ? s0 : s1, (i * 97) % (300 * kChunk + 50));
        } else {
          m.AddRow(s0, 300 * kChunk - rows + i);
        }
      }
      m.AddRow(s1, 10);  // selects nothing
      Upload(&m);
      const Selection sel = CheckRetrieve(m, rheads, 8, 302);
      const int64_t nh = 16 * nkv;
      const Path chosen = CheckSparse(m, sel, rheads, 8, nh, nkv, 64, kChunk, 303);
      // Both are prefill-shaped (over 256 rows of two sequences): the block-shared kernel.
      EXPECT_EQ(chosen, Path::kShared);
    }
  }
}

TEST_F(CudaAttentionOpsTest, SparseAttentionRowsSharingChunks) {
  // Neighbouring rows that picked the same chunks (as trained models' neighbouring tokens do):
  // rows copy the selection of the first row of their group of 8 (two of three rows), or of the
  // group of 16, or keep their own.
  Memory m;
  m.dim = 128;
  m.kv_floats = 2 * kChunk * 64;
  const int s0 = m.AddSequence(300, 400);
  const int s1 = m.AddSequence(40, 401);
  for (int64_t i = 0; i < 1200; ++i) m.AddRow(i < 1000 ? s0 : s1, 40 * kChunk + i % 700);
  Upload(&m);
  Selection sel = CheckRetrieve(m, 1, 8, 402);
  for (int64_t r = 0; r < m.rows(); ++r) {
    const int64_t from = r % 3 == 0 ? r : (r % 5 == 0 ? r / 16 * 16 : r / 8 * 8);
    if (m.row_seq[from] != m.row_seq[r]) continue;
    std::copy_n(sel.idx.begin() + from * 8, 8, sel.idx.begin() + r * 8);
    std::copy_n(sel.w.begin() + from * 8, 8, sel.w.begin() + r * 8);
  }
  m.AddRow(s1, 3);  // selects nothing
  Upload(&m);
  sel.idx.insert(sel.idx.end(), 8, -1);
  sel.w.insert(sel.w.end(), 8, 0.0f);
  EXPECT_EQ(CheckSparse(m, sel, 1, 8, 16, 1, 64, kChunk, 403), Path::kShared);
}

TEST_F(CudaAttentionOpsTest, SparseAttentionUnsortedRepeatedAndWideSelections) {
  // Selections retrieval never makes, which the block-shared kernel's union must still handle:
  // unsorted slots, a chunk in two slots of one row, unused slots between used ones, rows of two
  // sequences (and a fork sharing chunk pointers) in one block, neighbours copying each other's
  // slots; top-K up to the shared kernel's 16 and past it (20: the per-warp kernel instead).
  Memory m;
  m.dim = 64;
  m.kv_floats = 2 * kChunk * 64;
  const int s0 = m.AddSequence(300, 500);
  const int s1 = m.AddFork(s0, 250, 40, 501);
  for (int64_t i = 0; i < 700; ++i) m.AddRow(i < 500 || i % 2 == 0 ? s0 : s1, 0);
  m.AddRow(s1, 0);  // selects nothing
  Upload(&m);
  std::mt19937 rng(502);
  for (int64_t top_k : {8, 16, 20}) {
    Selection sel;
    for (int64_t r = 0; r < m.rows(); ++r) {
      const int64_t n = m.num_chunks[m.row_seq[r]];
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t prev = static_cast<int64_t>(sel.idx.size()) - top_k;  // row r - 1, slot j
        const uint32_t roll = rng() % 10;
        int32_t c = static_cast<int32_t>(rng() % n);
        if (roll == 0 || r + 1 == m.rows()) {
          c = -1;
        } else if (roll == 1 && j > 0) {
          c = sel.idx.back();  // the previous slot's chunk again
        } else if (roll < 6 && r > 0 && m.row_seq[r - 1] == m.row_seq[r]) {
          c = sel.idx[prev];
        }
        sel.idx.push_back(c);
        sel.w.push_back(c < 0 ? 0.0f : (rng() % 7 == 0 ? 0.0f : (rng() % 1000) / 1000.0f));
      }
    }
    EXPECT_EQ(CheckSparse(m, sel, 1, top_k, 16, 1, 64, kChunk, 503 + top_k),
              top_k <= 16 ? Path::kShared : Path::kBf16);
  }
}

// ---------------- HsaBlock ----------------

class CudaHsaBlockTest : public CudaAttentionOpsTest {
 protected:
  // Backend::HsaBlock over `rows` rows of sequences of 0, 5 and 300 chunks, with random
  // selections (unused slots and zero weights included); h has row stride d + pad. The GPU (the
  // fused kernel when `fused`, else the three ops) against the CPU's three ops on the same
  // weights, compared on what the block adds to h.
  void Check(int64_t rows, int64_t nh, int64_t nkv, int64_t rheads, int64_t d, int64_t top_k,
             bool bf16, bool fused, uint32_t seed, int64_t pad = 0) {
    SCOPED_TRACE(::testing::Message()
                 << "rows=" << rows << " nh=" << nh << " nkv=" << nkv << " rheads=" << rheads
                 << " d=" << d << " top_k=" << top_k << (bf16 ? " bf16" : " f32"));
    constexpr int64_t hd = 64;
    const int64_t width = nh * hd, ldh = d + pad;
    Memory m;
    m.dim = 32;
    m.kv_floats = 2 * kChunk * nkv * hd;
    m.AddSequence(300, seed);
    m.AddSequence(5, seed + 1);
    m.AddSequence(0, seed + 2);
    std::mt19937 rng(seed);
    for (int64_t r = 0; r < rows; ++r) m.AddRow(static_cast<int>(r % 3), 0);
    Upload(&m);
    // Slots: a random chunk of the row's sequence, or unused (-1, weight 0), or a zero weight;
    // the third sequence has no chunks, so its rows select nothing.
    Selection sel;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = m.num_chunks[m.row_seq[r]];
      for (int64_t j = 0; j < rheads * top_k; ++j) {
        const uint32_t roll = rng() % 8;
        const int32_t c = n == 0 || roll == 0 ? -1 : static_cast<int32_t>(rng() % n);
        sel.idx.push_back(c);
        sel.w.push_back(c < 0 || roll == 1 ? 0.0f : 0.05f + (rng() % 1000) / 1000.0f);
      }
    }
    const Weights wq = RandomWeights(width, d, seed + 3, 0.05f);
    const Weights wo = RandomWeights(d, width, seed + 4, 0.05f);
    MatrixView gq = wq.gpu, go = wo.gpu;
    if (!bf16) {
      gq = MatrixView{ToGpu(wq.rounded), DType::kF32, width, d};
      go = MatrixView{ToGpu(wo.rounded), DType::kF32, d, width};
    }
    const std::vector<float> norm = RandomVec(d, seed + 5, 0.5f, 1.5f);
    const std::vector<float> h0 = RandomVec(rows * ldh, seed + 6, -2.0f, 2.0f);

    HsaBlockArgs a;
    a.rows = rows;
    a.ldh = ldh;
    a.eps = 1e-6f;
    a.retrieval_heads = rheads;
    a.top_k = top_k;
    a.nh = nh;
    a.nkv = nkv;
    a.hd = hd;
    a.chunk_size = kChunk;
    HsaBlockArgs c = a;
    std::vector<float> want = h0, xn(rows * ldh), q(rows * width), attn(rows * width);
    c.h = want.data();
    c.norm_weight = norm.data();
    c.q_proj = wq.cpu;
    c.o_proj = wo.cpu;
    c.mem = m.cpu;
    c.indices = sel.idx.data();
    c.weights = sel.w.data();
    c.xn = xn.data();
    c.q = q.data();
    c.attn = attn.data();
    ASSERT_TRUE(cpu_->HsaBlock(c).ok());

    a.norm_weight = ToGpu(norm);
    a.q_proj = gq;
    a.o_proj = go;
    a.mem = m.gpu;
    a.indices = ToGpu(sel.idx);
    a.weights = ToGpu(sel.w);
    a.xn = Poisoned<float>(rows * ldh);
    a.q = Poisoned<float>(rows * width);
    a.attn = Poisoned<float>(rows * width);
    auto run = [&](const char* fused_env) {
      ScopedEnv env("RAMBA_CUDA_FUSED_HSA", fused_env);
      a.h = ToGpu(h0);
      const absl::Status st = gpu_->HsaBlock(a);
      EXPECT_TRUE(st.ok()) << st;
      return FromGpu(a.h, rows * ldh);
    };
    const std::vector<float> got = run("1"), again = run("1"), ops = run("0");
    auto delta = [&](const std::vector<float>& h) {
      std::vector<float> out;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t k = 0; k < d; ++k) out.push_back(h[r * ldh + k] - h0[r * ldh + k]);
      }
      return out;
    };
    EXPECT_LE(NormRelError(delta(got), delta(want)), 1e-4);
    EXPECT_LE(NormRelError(delta(ops), delta(want)), 1e-4);
    EXPECT_TRUE(got == again) << "not deterministic (or the counters were left dirty)";
    // The fused kernel sums in another order than the three ops: its bits differ.
    EXPECT_EQ(got != ops, fused) << "path taken";
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = d; k < ldh; ++k) EXPECT_EQ(got[r * ldh + k], h0[r * ldh + k]) << "padding";
      if (m.row_seq[r] == 2) {  // selects nothing: h unchanged
        for (int64_t k = 0; k < d; ++k) EXPECT_EQ(got[r * ldh + k], h0[r * ldh + k]) << r;
      }
    }
  }
};

TEST_F(CudaHsaBlockTest, FusedDecodeShapesMatchCpu) {
  Check(1, 16, 1, 1, 1024, 8, true, true, 10);   // the 370M config, batch 1
  Check(4, 16, 1, 1, 1024, 8, true, true, 20);   // batch 4, a row of each sequence
  Check(2, 16, 1, 1, 1024, 8, false, true, 30);  // f32 weights
  Check(3, 4, 1, 1, 256, 8, true, true, 40);     // ramba-tiny's shapes
}

TEST_F(CudaHsaBlockTest, FusedOddShapesMatchCpu) {
  Check(3, 8, 2, 2, 512, 12, true, true, 50);      // GQA, two retrieval heads, 12 slots
  Check(2, 16, 2, 1, 1024, 3, true, true, 60);     // fewer slots than blocks per head
  Check(2, 8, 1, 1, 1024, 16, true, true, 70, 4);  // q narrower than h, padded rows of h
  Check(1, 32, 1, 1, 2048, 8, false, true, 80);    // the largest tiles (f32, d 2048)
}

TEST_F(CudaHsaBlockTest, OtherShapesRunTheThreeOps) {
  Check(5, 16, 1, 1, 1024, 8, true, false, 90);  // more rows than the fused kernel takes
  Check(2, 4, 1, 1, 320, 8, true, false, 100);   // d not a multiple of 256
  Check(2, 4, 1, 1, 256, 20, true, false, 110);  // top-K past 16
}

TEST_F(CudaHsaBlockTest, BadArgumentsAreErrors) {
  const Weights wq = RandomWeights(1024, 1024, 1), wo = RandomWeights(1024, 1024, 2);
  HsaBlockArgs a;
  a.h = Poisoned<float>(1024);
  a.ldh = 1024;
  a.rows = 1;
  a.norm_weight = ToGpu(RandomVec(1024, 3, 0.5f, 1.5f));
  a.q_proj = wq.gpu;
  a.o_proj = wo.gpu;
  a.indices = ToGpu(std::vector<int32_t>(8, -1));
  a.weights = ToGpu(std::vector<float>(8, 0.0f));
  a.mem.row_seq = ToGpu(std::vector<int32_t>{0});
  a.mem.num_chunks = ToGpu(std::vector<int64_t>{0});
  a.mem.chunk_kv = ToGpu(std::vector<const float* const*>{nullptr});
  a.retrieval_heads = 1;
  a.top_k = 8;
  a.nh = 16;
  a.nkv = 1;
  a.hd = 64;
  a.chunk_size = kChunk;
  auto code = [&](HsaBlockArgs b) { return gpu_->HsaBlock(b).code(); };
  EXPECT_EQ(code(a), absl::StatusCode::kOk);  // selects nothing: h unchanged
  HsaBlockArgs b = a;
  b.nh = 8;  // q_proj has 16 heads' rows
  EXPECT_EQ(code(b), absl::StatusCode::kInvalidArgument);
  b = a;
  b.nkv = 3;  // does not divide nh
  EXPECT_EQ(code(b), absl::StatusCode::kInvalidArgument);
  b = a;
  b.top_k = 0;
  EXPECT_EQ(code(b), absl::StatusCode::kInvalidArgument);
  b = a;
  b.ldh = 512;  // narrower than d
  EXPECT_EQ(code(b), absl::StatusCode::kInvalidArgument);
  b = a;
  b.indices = nullptr;
  EXPECT_EQ(code(b), absl::StatusCode::kInvalidArgument);
  b = a;
  b.rows = 0;  // nothing to do, whatever else is set
  b.h = nullptr;
  EXPECT_EQ(code(b), absl::StatusCode::kOk);
  EXPECT_TRUE(gpu_->Synchronize().ok());
}

// ---------------- BlockAttention ----------------

TEST_F(CudaAttentionOpsTest, BlockAttentionMatchesCpu) {
  CheckBlockAttention(40, 65, 16, 4, 64, 1);  // chunk + CLS blocks, GQA
  CheckBlockAttention(33, 65, 4, 1, 64, 2);   // MQA
  CheckBlockAttention(6, 65, 4, 4, 32, 3);    // MHA, hd 32
  CheckBlockAttention(5, 17, 4, 2, 32, 4);    // short blocks
  CheckBlockAttention(7, 17, 2, 1, 64, 5);
  CheckBlockAttention(3, 65, 6, 2, 12, 6);  // generic head dim, float4 path
  CheckBlockAttention(2, 7, 3, 1, 5, 7);    // odd sizes, scalar path
  CheckBlockAttention(1, 1, 2, 1, 64, 8);   // one-row blocks
  CheckBlockAttention(4, 65, 4, 2, 64, 9, /*misalign=*/true);
  CheckBlockAttention(1000, 65, 4, 4, 64, 10);  // a prefill's worth of chunks
}

TEST_F(CudaAttentionOpsTest, BlockAttentionOfNothingIsOk) {
  float* x = Poisoned<float>(16);
  EXPECT_TRUE(gpu_->BlockAttention(x, x, x, x, 0, 65, 4, 1, 64).ok());
  EXPECT_TRUE(gpu_->Synchronize().ok());
}

}  // namespace
}  // namespace ramba::kernels::testing
