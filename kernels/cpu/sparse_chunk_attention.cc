// Sparse chunk attention (HSA query side): work items are (row, query head); each walks its top-K
// slots, runs an ordinary softmax over the chunk's keys and adds the weighted result. Inner loops
// are dot products / axpys over contiguous head_dim values.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/vec.h"

namespace ramba::kernels::cpu {

void SparseChunkAttention(const float* q, int64_t rows, const ChunkMemoryBatch& mem,
                          const int32_t* indices, const float* weights, int64_t retrieval_heads,
                          int64_t top_k, int64_t nh, int64_t nkv, int64_t hd, int64_t chunk_size,
                          float* out) {
  if (rows <= 0 || nh <= 0) return;
  const int64_t group = nh / nkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int64_t kv_half = chunk_size * nkv * hd;
#pragma omp parallel if (rows * nh * top_k * chunk_size * hd > kMinParallelWork)
  {
    std::vector<float> p(static_cast<size_t>(chunk_size));
#pragma omp for collapse(2) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t h = 0; h < nh; ++h) {
        const int64_t g = h / group;
        const int64_t e = g * retrieval_heads / nkv;
        const float* qh = q + (r * nh + h) * hd;
        float* o = out + (r * nh + h) * hd;
        std::fill(o, o + hd, 0.0f);
        const int32_t* idx = indices + (r * retrieval_heads + e) * top_k;
        const float* wt = weights + (r * retrieval_heads + e) * top_k;
        const float* const* table = mem.chunk_kv[mem.row_seq[r]];
        for (int64_t j = 0; j < top_k; ++j) {
          if (idx[j] < 0) continue;
          const float* K = table[idx[j]];
          const float* V = K + kv_half;
          AttendAccumulate(qh, K + g * hd, V + g * hd, nkv * hd, chunk_size, hd, scale, wt[j],
                           p.data(), o);
        }
      }
    }
  }
}

}  // namespace ramba::kernels::cpu
