// Chunk selections of the HSA query side, as the benchmarks and analysis tools handle them: how
// much neighbouring rows' selections overlap (picks per distinct chunk within aligned blocks of
// consecutive rows; 1.0: no chunk picked twice in a block), and a file format so that a model's
// own selections (selection-reuse --dump) can drive the kernel benchmark (bench-ops --selection
// file).
#ifndef RAMBA_TOOLS_SELECTION_STATS_H_
#define RAMBA_TOOLS_SELECTION_STATS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

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

// The rows of one sequence's selections: row r (token position r) picks indices[r * per_row ..].
struct Selections {
  int64_t per_row = 0;
  std::vector<int32_t> indices;
  int64_t rows() const { return per_row > 0 ? static_cast<int64_t>(indices.size()) / per_row : 0; }
};

// File: "RSEL", uint32 version 1, int64 rows, int64 per_row, then the int32 indices (host byte
// order: the files are made and read on the same kind of machine).
inline constexpr char kSelectionsMagic[4] = {'R', 'S', 'E', 'L'};

inline absl::Status WriteSelections(const std::string& path, const Selections& s) {
  std::ofstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot write ", path));
  const uint32_t version = 1;
  const int64_t rows = s.rows();
  f.write(kSelectionsMagic, 4);
  f.write(reinterpret_cast<const char*>(&version), sizeof(version));
  f.write(reinterpret_cast<const char*>(&rows), sizeof(rows));
  f.write(reinterpret_cast<const char*>(&s.per_row), sizeof(s.per_row));
  f.write(reinterpret_cast<const char*>(s.indices.data()),
          static_cast<std::streamsize>(rows * s.per_row * sizeof(int32_t)));
  f.close();
  return f ? absl::OkStatus() : absl::DataLossError(absl::StrCat("writing ", path, " failed"));
}

inline absl::StatusOr<Selections> ReadSelections(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  char magic[4];
  uint32_t version = 0;
  int64_t rows = 0;
  Selections s;
  f.read(magic, 4);
  f.read(reinterpret_cast<char*>(&version), sizeof(version));
  f.read(reinterpret_cast<char*>(&rows), sizeof(rows));
  f.read(reinterpret_cast<char*>(&s.per_row), sizeof(s.per_row));
  if (!f || std::memcmp(magic, kSelectionsMagic, 4) != 0 || version != 1) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a selections file (version 1)"));
  }
  if (rows < 0 || s.per_row <= 0 || s.per_row > 4096 || rows > (int64_t{1} << 32) / s.per_row) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": bad shape ", rows, " rows x ", s.per_row));
  }
  s.indices.resize(rows * s.per_row);
  f.read(reinterpret_cast<char*>(s.indices.data()),
         static_cast<std::streamsize>(s.indices.size() * sizeof(int32_t)));
  if (!f) return absl::DataLossError(absl::StrCat(path, ": truncated"));
  return s;
}

// Checks that the first `rows` rows are valid for one sequence of `chunks` chunks of
// `chunk_size` tokens read by token positions 0..rows-1: each index is -1 or a chunk wholly
// before its row ((c + 1) * chunk_size <= row), and no row names a chunk twice.
inline absl::Status CheckSelections(const Selections& s, int64_t rows, int64_t chunks,
                                    int64_t chunk_size) {
  if (s.rows() < rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("selections hold ", s.rows(), " rows, ", rows, " needed"));
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* row = s.indices.data() + r * s.per_row;
    for (int64_t j = 0; j < s.per_row; ++j) {
      const int32_t c = row[j];
      if (c == -1) continue;
      if (c < 0 || c >= chunks || (c + 1) * chunk_size > r) {
        return absl::InvalidArgumentError(absl::StrCat("row ", r, " picks chunk ", c,
                                                       ", which is not wholly before it (", chunks,
                                                       " chunks)"));
      }
      if (std::find(row, row + j, c) != row + j) {
        return absl::InvalidArgumentError(absl::StrCat("row ", r, " picks chunk ", c, " twice"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace ramba::tools

#endif  // RAMBA_TOOLS_SELECTION_STATS_H_
