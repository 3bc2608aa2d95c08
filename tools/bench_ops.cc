// bench-ops: the HSA kernels alone, on random data, against their floors.
//
//   bench-ops --device cuda --lengths 16384,65536,1048576
// For each length L (tokens of one sequence, L / 64 chunks of K/V in memory):
//  - prefill sparse attention: L query rows x 16 heads over 1 kv head, head dim 64, top-8 chunks of
//    64 keys (RetrieveChunks picks them from random landmarks first, untimed); FLOP floor
//    4 * L * heads * K * 64 * 64 at the given --tflops (default: H100 SXM dense bf16 tensor cores,
//    the precision of the prefill path). --selection=block gives every 64-row query block its
//    first row's selection (chunks shared by neighbouring tokens, as in the reference kernel's
//    Q_X = 64 mode); token (default) keeps each row's own, random and so rarely shared;
//    neighbours: each slot keeps the previous row's chunk with probability 0.8, as a trained
//    model's neighbouring tokens often do (at 64K, picks per distinct chunk in 8 / 16 consecutive
//    rows: ramba-tiny 2.1 / 3.0 on a passkey haystack, 3.2 / 5.1 on source text (selection-reuse);
//    this mode 3.5 / 4.4; token 1.1 / 1.2); file: a model's own selections, as selection-reuse
//    --dump wrote them (--selection_file; one row per token from position 0, top-8, checked
//    against the causal bound). The reuse of the selections measured is printed;
//    RAMBA_CUDA_SPARSE_ATTENTION picks the kernel (f32, bf16 per warp, shared per query block);
//  - decode retrieval + sparse attention for --decode_batch rows at position L: bytes floor =
//    every landmark read once (L / 64 x retrieval_dim x 4 B per row's sequence) + the selected
//    chunks' K/V, at the measured copy bandwidth. Timed per op call (host launch and
//    synchronisation included) and, on a backend with graphs, per step of 16 back-to-back steps
//    captured in one graph, as decode runs them.
// Timing: one warm-up, then the median of --reps runs, each closed by Synchronize.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/status_macros.h"
#include "kernels/backend.h"
#include "tools/bench_util.h"
#include "tools/selection_stats.h"

ABSL_FLAG(std::string, device, "cuda", "cpu, cuda or auto");
ABSL_FLAG(std::string, lengths, "16384,65536,1048576", "Comma-separated sequence lengths");
ABSL_FLAG(int32_t, heads, 16, "Query heads");
ABSL_FLAG(int32_t, retrieval_dim, 1024, "Landmark width (370M: 1024)");
ABSL_FLAG(int32_t, decode_batch, 1, "Rows of the decode measurement (each its own sequence)");
ABSL_FLAG(int32_t, reps, 20, "Timed repetitions");
ABSL_FLAG(int64_t, max_prefill_rows, 1 << 20, "Longest prefill measured");
ABSL_FLAG(double, tflops, 989, "Compute peak for the prefill floor (H100 SXM: 989 bf16 tensor "
          "cores, 67 f32 CUDA cores)");
ABSL_FLAG(std::string, selection, "token",
          "Prefill selections: token (each row its own), block "
          "(each 64-row block shares its first row's), neighbours (each slot keeps the previous "
          "row's chunk with probability 0.8) or file (--selection_file)");
ABSL_FLAG(std::string, selection_file, "",
          "With --selection file: selections written by selection-reuse --dump");

namespace {

using ramba::kernels::Backend;
using ramba::kernels::Buffer;

constexpr int64_t kChunk = 64, kTopK = 8, kHeadDim = 64;

// Each row's slot keeps the previous row's chunk with probability `keep`, the rest of the row
// comes from its own selection (no chunk twice); slots end sorted most recent first, as
// retrieval returns them. Weights stay with the slot positions (any weights time the same).
void ShareWithNeighbours(int64_t rows, double keep, std::vector<int32_t>* idx) {
  std::mt19937 rng(1234);
  std::bernoulli_distribution coin(keep);
  std::vector<int32_t> own(kTopK);
  for (int64_t r = 1; r < rows; ++r) {
    int32_t* row = idx->data() + r * kTopK;
    const int32_t* prev = row - kTopK;
    std::copy_n(row, kTopK, own.begin());
    int n = 0;
    for (int j = 0; j < kTopK; ++j) {
      if (prev[j] >= 0 && coin(rng)) row[n++] = prev[j];
    }
    for (int j = 0; j < kTopK && n < kTopK; ++j) {
      if (own[j] >= 0 && std::find(row, row + n, own[j]) == row + n) row[n++] = own[j];
    }
    std::fill(row + n, row + kTopK, -1);
    std::sort(row, row + n, std::greater<int32_t>());
  }
}

// Picks per distinct chunk within aligned blocks of `block_rows` rows (1: nothing shared).
double Reuse(const std::vector<int32_t>& idx, int64_t block_rows) {
  ramba::tools::ReuseCount count;
  ramba::tools::CountReuse(idx.data(), static_cast<int64_t>(idx.size()) / kTopK, kTopK, block_rows,
                           &count);
  return count.Ratio();
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "bench-ops: %s\n", s.ToString().c_str());
  return 1;
}

std::vector<float> Random(int64_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

using ramba::bench::InGraphSeconds;
using ramba::bench::MedianSeconds;
using ramba::bench::Put;

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  auto backend = ramba::kernels::CreateBackend(absl::GetFlag(FLAGS_device));
  if (!backend.ok()) return Fail(backend.status());
  Backend* be = backend->get();
  const int64_t nh = absl::GetFlag(FLAGS_heads), rdim = absl::GetFlag(FLAGS_retrieval_dim);
  const int reps = absl::GetFlag(FLAGS_reps);
  const double bw = ramba::bench::MeasureCopyBandwidth(be);
  const double tflops = absl::GetFlag(FLAGS_tflops);
  const std::string selection = absl::GetFlag(FLAGS_selection);
  if (tflops <= 0 || (selection != "token" && selection != "block" && selection != "neighbours" &&
                      selection != "file")) {
    return Fail(absl::InvalidArgumentError(
        "--tflops must be positive, --selection token|block|neighbours|file"));
  }
  ramba::tools::Selections from_file;
  if (selection == "file") {
    auto read = ramba::tools::ReadSelections(absl::GetFlag(FLAGS_selection_file));
    if (!read.ok()) return Fail(read.status());
    if (read->per_row != kTopK) {
      return Fail(absl::InvalidArgumentError(absl::StrCat("--selection_file has ", read->per_row,
                                                          " picks per row; ", kTopK, " needed")));
    }
    from_file = *std::move(read);
  }
  std::printf("device=%s copy bandwidth %.0f GB/s; prefill floor at %.0f TFLOP/s\n",
              std::string(be->name()).c_str(), bw, tflops);

  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_lengths), ',')) {
    int64_t L = 0;
    if (!absl::SimpleAtoi(part, &L) || L < kChunk)
      return Fail(absl::InvalidArgumentError("length"));
    const int64_t chunks = L / kChunk;
    // One sequence's chunk memory: K/V blocks (one allocation, pointer table into it) + landmarks.
    const int64_t kv_floats = 2 * kChunk * kHeadDim;
    auto kv = be->Allocate(chunks * kv_floats * sizeof(float));
    if (!kv.ok()) return Fail(kv.status());
    for (int64_t c0 = 0; c0 < chunks; c0 += 256) {
      const int64_t n = std::min<int64_t>(256, chunks - c0);
      const auto v = Random(n * kv_floats, static_cast<uint32_t>(c0 + 1));
      if (auto s = be->Upload(kv->as<float>() + c0 * kv_floats, v.data(), v.size() * 4); !s.ok()) {
        return Fail(s);
      }
    }
    std::vector<const float*> table(chunks);
    for (int64_t c = 0; c < chunks; ++c) table[c] = kv->as<float>() + c * kv_floats;
    auto table_dev = Put(be, table);
    auto landmarks = Put(be, Random(chunks * rdim, 99));
    if (!table_dev.ok() || !landmarks.ok()) return Fail(absl::InternalError("upload"));

    auto measure = [&](int64_t rows, bool decode) -> absl::Status {
      // Decode: `rows` sequences (all sharing this memory) at position L; prefill: one sequence.
      const int64_t seqs = decode ? rows : 1;
      std::vector<int32_t> row_seq(rows);
      std::vector<int64_t> row_pos(rows);
      for (int64_t r = 0; r < rows; ++r) {
        row_seq[r] = decode ? static_cast<int32_t>(r) : 0;
        row_pos[r] = decode ? L : r;
      }
      ASSIGN_OR_RETURN(Buffer d_seq, Put(be, row_seq));
      ASSIGN_OR_RETURN(Buffer d_pos, Put(be, row_pos));
      ASSIGN_OR_RETURN(Buffer d_lm,
                       Put(be, std::vector<const float*>(seqs, landmarks->as<float>())));
      ASSIGN_OR_RETURN(Buffer d_nc, Put(be, std::vector<int64_t>(seqs, chunks)));
      ASSIGN_OR_RETURN(Buffer d_tab,
                       Put(be, std::vector<const float* const*>(
                                   seqs, table_dev->as<const float* const>())));
      ramba::kernels::ChunkMemoryBatch mem;
      mem.row_seq = d_seq.as<int32_t>();
      mem.row_position = d_pos.as<int64_t>();
      mem.landmarks = d_lm.as<const float* const>();
      mem.num_chunks = d_nc.as<int64_t>();
      mem.chunk_kv = d_tab.as<const float* const* const>();
      mem.max_num_chunks = chunks;
      mem.num_seqs = seqs;
      ASSIGN_OR_RETURN(Buffer r, Put(be, Random(rows * rdim, 5)));
      ASSIGN_OR_RETURN(Buffer q, Put(be, Random(rows * nh * kHeadDim, 6)));
      ASSIGN_OR_RETURN(Buffer out, be->Allocate(rows * nh * kHeadDim * sizeof(float)));
      ASSIGN_OR_RETURN(Buffer idx, be->Allocate(rows * kTopK * sizeof(int32_t)));
      ASSIGN_OR_RETURN(Buffer w, be->Allocate(rows * kTopK * sizeof(float)));
      auto retrieve = [&] {
        return be->RetrieveChunks(r.as<float>(), rows, mem, rdim, 1, kTopK, kChunk,
                                  idx.as<int32_t>(), w.as<float>());
      };
      auto attend = [&] {
        return be->SparseChunkAttention(q.as<float>(), rows, mem, idx.as<int32_t>(), w.as<float>(),
                                        1, kTopK, nh, 1, kHeadDim, kChunk, out.as<float>());
      };
      const double t_ret = MedianSeconds(be, reps, retrieve);
      // Prefill: the selections timed (retrieval's, or replaced per --selection), kept on the host
      // to count what they read. Every selected (row, chunk) pair reads the chunk's K/V (16 KiB
      // in bf16) unless rows share it.
      int64_t pairs = 0;
      double reuse8 = 1, reuse16 = 1;
      if (!decode) {
        std::vector<int32_t> hi(rows * kTopK);
        RETURN_IF_ERROR(be->Download(hi.data(), idx.data(), hi.size() * sizeof(int32_t)));
        if (selection == "block") {
          std::vector<float> hw(rows * kTopK);
          RETURN_IF_ERROR(be->Download(hw.data(), w.data(), hw.size() * sizeof(float)));
          for (int64_t row = 0; row < rows; ++row) {
            const int64_t first = row / kChunk * kChunk;  // same eligible chunks as `row`
            std::copy_n(hi.begin() + first * kTopK, kTopK, hi.begin() + row * kTopK);
            std::copy_n(hw.begin() + first * kTopK, kTopK, hw.begin() + row * kTopK);
          }
          RETURN_IF_ERROR(be->Upload(w.data(), hw.data(), hw.size() * sizeof(float)));
        } else if (selection == "file") {
          RETURN_IF_ERROR(ramba::tools::CheckSelections(from_file, rows, chunks, kChunk));
          std::copy_n(from_file.indices.begin(), rows * kTopK, hi.begin());
        } else if (selection == "neighbours") {
          ShareWithNeighbours(rows, 0.8, &hi);
        }
        if (selection != "token") {
          RETURN_IF_ERROR(be->Upload(idx.data(), hi.data(), hi.size() * sizeof(int32_t)));
        }
        pairs = std::count_if(hi.begin(), hi.end(), [](int32_t c) { return c >= 0; });
        reuse8 = Reuse(hi, 8);
        reuse16 = Reuse(hi, 16);
      }
      const double t_att = MedianSeconds(be, reps, attend);
      if (decode) {
        const double bytes = rows * (chunks * rdim * 4.0 + kTopK * kv_floats * 4.0);
        const double floor = bytes / (bw * 1e9);
        std::printf("decode  L=%8lld rows=%4lld: retrieval %8.3f ms + sparse attention %7.3f ms = "
                    "%8.3f ms | bytes floor %.3f ms (%.1f MB), ratio %.2fx\n",
                    static_cast<long long>(L), static_cast<long long>(rows), 1e3 * t_ret,
                    1e3 * t_att, 1e3 * (t_ret + t_att), 1e3 * floor, bytes / 1e6,
                    (t_ret + t_att) / floor);
        // The same pair as a decode step runs it: inside a graph, without a host launch and
        // synchronisation per op (which the figures above include).
        constexpr int kGraphSteps = 16;
        const double t_graph = InGraphSeconds(be, reps, kGraphSteps, [&]() -> absl::Status {
          RETURN_IF_ERROR(retrieve());
          return attend();
        });
        // Each op alone in a graph too: where the step's time goes without a profiler's
        // serialisation (the two need not add up: PDL overlaps one op's start with the other).
        const double t_graph_ret = InGraphSeconds(be, reps, kGraphSteps, retrieve);
        const double t_graph_att = InGraphSeconds(be, reps, kGraphSteps, attend);
        if (!std::isnan(t_graph)) {
          std::printf(
              "decode  L=%8lld rows=%4lld: retrieval + sparse attention in a graph of %d "
              "steps %8.3f ms per step, ratio %.2fx (alone: retrieval %.3f ms, sparse "
              "attention %.3f ms)\n",
              static_cast<long long>(L), static_cast<long long>(rows), kGraphSteps, 1e3 * t_graph,
              t_graph / floor, 1e3 * t_graph_ret, 1e3 * t_graph_att);
        }
      } else {
        const double flops = 4.0 * rows * nh * kTopK * kChunk * kHeadDim;
        const double floor = flops / (tflops * 1e12);
        const double chunk_bytes = pairs * 2.0 * kChunk * kHeadDim * 2;
        std::printf(
            "prefill L=%8lld selection=%s: sparse attention %8.3f ms (FLOP floor %.3f ms "
            "at %.0f TFLOP/s, %.2fx; unshared chunk reads %.2f GB = %.2f TB/s; picks per "
            "distinct chunk in 8 / 16 rows %.2f / %.2f) | retrieval %8.3f ms\n",
            static_cast<long long>(L), selection.c_str(), 1e3 * t_att, 1e3 * floor, tflops,
            t_att / floor, chunk_bytes / 1e9, chunk_bytes / t_att / 1e12, reuse8, reuse16,
            1e3 * t_ret);
      }
      return absl::OkStatus();
    };
    if (L <= absl::GetFlag(FLAGS_max_prefill_rows)) {
      if (auto s = measure(L, false); !s.ok()) return Fail(s);
    }
    if (auto s = measure(absl::GetFlag(FLAGS_decode_batch), true); !s.ok()) return Fail(s);
  }
  return 0;
}
