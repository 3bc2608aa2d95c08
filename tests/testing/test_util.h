// Helpers shared by the model tests: paths, small configs, error metrics.
#ifndef RAMBA_TESTS_TESTING_TEST_UTIL_H_
#define RAMBA_TESTS_TESTING_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "model/config.h"

namespace ramba::testing {

// The source tree: $RAMBA_SOURCE_DIR when set (binaries shipped to the GPU host run from another
// checkout), else the path compiled in.
inline std::string SourceDir() {
  const char* env = std::getenv("RAMBA_SOURCE_DIR");
  return env != nullptr && env[0] != '\0' ? env : RAMBA_SOURCE_DIR;
}
inline std::string FixtureDir() { return SourceDir() + "/tests/fixtures"; }

// The model fixtures (folders of tests/fixtures with an expected.safetensors), sorted.
inline std::vector<std::string> FixtureNames() {
  namespace fs = std::filesystem;
  std::vector<std::string> names;
  const fs::path dir = FixtureDir();
  if (!fs::exists(dir)) return names;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (fs::exists(e.path() / "expected.safetensors")) names.push_back(e.path().filename());
  }
  std::sort(names.begin(), names.end());
  return names;
}

// Largest per-row error relative to the row's largest magnitude: max_r max_i |a-b| / max_i |b|.
// Robust to logits near zero, strict on every row.
inline double MaxRowRelError(const std::vector<float>& a, const std::vector<float>& b,
                             int64_t cols) {
  if (a.size() != b.size() || cols <= 0) return INFINITY;
  double worst = 0;
  for (size_t r = 0; r * cols < a.size(); ++r) {
    double diff = 0, scale = 1e-30;
    for (int64_t i = 0; i < cols; ++i) {
      const double x = a[r * cols + i], y = b[r * cols + i];
      if (!std::isfinite(x)) return INFINITY;
      diff = std::max(diff, std::abs(x - y));
      scale = std::max(scale, std::abs(y));
    }
    worst = std::max(worst, diff / scale);
  }
  return worst;
}

// A small but complete RAMba: 2 lower Mamba blocks, 2 x [HSA, 2 Mamba], encoder with CLS,
// GQA in the encoder, 2 kv heads in chunk memory.
inline ModelConfig SmallConfig() {
  ModelConfig c;
  c.hidden_size = 64;
  c.vocab_size = 300;
  c.num_lower_layers = 2;
  c.num_upper_layers = 4;
  c.num_mamba_per_gca = 2;
  c.state_size = 16;
  c.head_dim = 16;
  c.expand = 2;
  c.num_heads = 8;
  c.n_groups = 2;
  c.conv_kernel = 4;
  c.chunk_size = 64;
  c.chunk_topk = 4;
  c.retrieval_dim = 64;
  c.encoder_layers = 1;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.num_kv_heads = 2;
  c.time_step_max_limit = INFINITY;
  return c;
}

inline ModelConfig Config370M() { return Reference370MConfig(); }

inline std::vector<int32_t> RandomTokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::vector<int32_t> t(n);
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& v : t) {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    v = static_cast<int32_t>(x % vocab);
  }
  return t;
}

}  // namespace ramba::testing

#endif  // RAMBA_TESTS_TESTING_TEST_UTIL_H_
