// How much neighbouring rows' chunk selections overlap: picks per distinct chunk within aligned
// blocks of consecutive rows (1.0: no chunk picked twice in a block). Shared by bench-ops (the
// selections it times) and selection-reuse (a model's own).
#ifndef RAMBA_TOOLS_SELECTION_STATS_H_
#define RAMBA_TOOLS_SELECTION_STATS_H_

#include <algorithm>
#include <cstdint>
#include <vector>

namespace ramba::tools {

struct ReuseCount {
  int64_t picks = 0;
  int64_t distinct = 0;
  double Ratio() const { return distinct > 0 ? static_cast<double>(picks) / distinct : 1.0; }
};

// Adds the picks and distinct chunks of `sel` ([rows][per_row] chunk indices, negative: unused)
// over blocks of `block_rows` rows to *count.
inline void CountReuse(const int32_t* sel, int64_t rows, int64_t per_row, int64_t block_rows,
                       ReuseCount* count) {
  std::vector<int32_t> b;
  for (int64_t r0 = 0; r0 < rows; r0 += block_rows) {
    b.clear();
    for (int64_t i = r0 * per_row; i < std::min(rows, r0 + block_rows) * per_row; ++i) {
      if (sel[i] >= 0) b.push_back(sel[i]);
    }
    count->picks += static_cast<int64_t>(b.size());
    std::sort(b.begin(), b.end());
    count->distinct += std::unique(b.begin(), b.end()) - b.begin();
  }
}

}  // namespace ramba::tools

#endif  // RAMBA_TOOLS_SELECTION_STATS_H_
