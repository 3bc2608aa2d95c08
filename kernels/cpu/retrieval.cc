// Landmark retrieval: per (row, head) a scan over the eligible chunks keeping a sorted top-K list,
// then reordering by chunk index and stick-breaking weights. Work items are (row, head, chunk
// range): when there are few rows (decode) and many chunks, the chunk range is split so every
// thread scores a share, and the per-range lists are merged. The kept set is defined by a total
// order (score descending, then chunk index ascending), so the result does not depend on how the
// range was split or on the thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/vec.h"

namespace ramba::kernels::cpu {
namespace {

constexpr float kStickBreakingSoftplusThreshold = 15.0f;
// Chunks scored per work item before a (row, head) scan is split across threads.
constexpr int64_t kChunksPerPart = 1024;

struct Cand {
  float score;
  int32_t chunk;
};

inline bool Better(const Cand& a, const Cand& b) {
  return a.score > b.score || (a.score == b.score && a.chunk < b.chunk);
}

// Inserts `x` into `list` (best first, `n` of at most `k` entries) if it makes the cut.
inline void Insert(Cand* list, int64_t* n, int64_t k, Cand x) {
  int64_t pos;
  if (*n == k) {
    if (!Better(x, list[k - 1])) return;
    pos = k - 1;
  } else {
    pos = (*n)++;
  }
  while (pos > 0 && Better(x, list[pos - 1])) {
    list[pos] = list[pos - 1];
    --pos;
  }
  list[pos] = x;
}

inline int64_t Eligible(const ChunkMemoryBatch& mem, int64_t row, int64_t chunk_size) {
  const int64_t t = mem.row_position[row];
  if (t < 0) return 0;
  return std::min<int64_t>(mem.num_chunks[mem.row_seq[row]], t / chunk_size);
}

}  // namespace

void StickBreaking(const float* scores, int64_t n, float* weights) {
  float cum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    cum += Softplus(scores[j], kStickBreakingSoftplusThreshold);
    weights[j] = std::exp(scores[j] - cum);
  }
}

void RetrieveChunks(const float* r, int64_t rows, const ChunkMemoryBatch& mem,
                    int64_t retrieval_dim, int64_t heads, int64_t top_k, int64_t chunk_size,
                    int32_t* indices, float* weights) {
  if (rows <= 0 || heads <= 0 || top_k <= 0) return;
  const int64_t dh = retrieval_dim / heads;
  const float inv_sqrt = 1.0f / std::sqrt(static_cast<float>(dh));
  int64_t max_eligible = 0;
  for (int64_t i = 0; i < rows; ++i) max_eligible = std::max(max_eligible, Eligible(mem, i, chunk_size));
  const int64_t threads = omp_get_max_threads();
  int64_t parts = 1;
  if (rows * heads < 2 * threads && max_eligible > kChunksPerPart) {
    parts = std::min<int64_t>((max_eligible + kChunksPerPart - 1) / kChunksPerPart, 4 * threads);
  }
  const int64_t part_len = (max_eligible + parts - 1) / std::max<int64_t>(parts, 1);
  const int64_t units = rows * heads * parts;
  std::vector<Cand> cands(static_cast<size_t>(units * top_k));
  std::vector<int64_t> counts(static_cast<size_t>(units), 0);

#pragma omp parallel for schedule(dynamic, 1) if (rows * max_eligible * retrieval_dim > kMinParallelWork)
  for (int64_t u = 0; u < units; ++u) {
    const int64_t row = u / (heads * parts);
    const int64_t e = (u / parts) % heads;
    const int64_t part = u % parts;
    const int64_t eligible = Eligible(mem, row, chunk_size);
    const int64_t c0 = part * part_len, c1 = std::min(eligible, c0 + part_len);
    const float* rq = r + row * retrieval_dim + e * dh;
    const float* lm = mem.landmarks[mem.row_seq[row]];
    Cand* list = cands.data() + u * top_k;
    int64_t n = 0;
    for (int64_t c = c0; c < c1; ++c) {
      float s = Dot(rq, lm + c * retrieval_dim + e * dh, dh) * inv_sqrt;
      if (std::isnan(s)) s = -INFINITY;
      Insert(list, &n, top_k, Cand{s, static_cast<int32_t>(c)});
    }
    counts[u] = n;
  }

#pragma omp parallel if (rows * heads * top_k * parts > kMinParallelWork)
  {
    std::vector<Cand> best(static_cast<size_t>(top_k));
    std::vector<float> s(static_cast<size_t>(top_k)), w(static_cast<size_t>(top_k));
#pragma omp for schedule(static)
    for (int64_t rh = 0; rh < rows * heads; ++rh) {
      int64_t n = 0;
      if (parts == 1) {
        n = counts[rh];
        std::copy(cands.begin() + rh * top_k, cands.begin() + rh * top_k + n, best.begin());
      } else {
        for (int64_t part = 0; part < parts; ++part) {
          const int64_t u = rh * parts + part;
          for (int64_t i = 0; i < counts[u]; ++i) Insert(best.data(), &n, top_k, cands[u * top_k + i]);
        }
      }
      // Most recent chunk first.
      std::sort(best.begin(), best.begin() + n,
                [](const Cand& a, const Cand& b) { return a.chunk > b.chunk; });
      for (int64_t j = 0; j < n; ++j) s[j] = best[j].score;
      StickBreaking(s.data(), n, w.data());
      int32_t* idx = indices + rh * top_k;
      float* wt = weights + rh * top_k;
      for (int64_t j = 0; j < top_k; ++j) {
        idx[j] = j < n ? best[j].chunk : -1;
        wt[j] = j < n ? w[j] : 0.0f;
      }
    }
  }
}

}  // namespace ramba::kernels::cpu
