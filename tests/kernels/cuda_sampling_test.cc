// CUDA Sample vs the CPU reference (kernels/cpu/sampling.cc) on fresh random logits: greedy must
// match exactly; sampled tokens must match except where a uniform (or top_p) lands within rounding
// of a cumulative-mass boundary (the GPU sums fixed-point masses and its expf may differ from the
// CPU's in the last bit). Such mismatches are recognised by recomputing the CPU's cumulative sums,
// and counted and bounded. At u = 1 the CPU's own double rounding decides; there the GPU must
// return the exact answer, the last kept token with p > 0.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/cuda_test_util.h"

namespace ramba::kernels {
namespace {

using testing::CudaOpTest;

enum class Shape { kNormal, kPeaked, kFlat, kNearFlat, kTies };

std::vector<float> MakeLogits(Shape shape, int64_t rows, int64_t vocab, std::mt19937& gen) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::vector<float> l(static_cast<size_t>(rows * vocab));
  for (int64_t r = 0; r < rows; ++r) {
    float* row = l.data() + r * vocab;
    for (int64_t i = 0; i < vocab; ++i) {
      switch (shape) {
        case Shape::kNormal:
          row[i] = normal(gen);
          break;
        case Shape::kPeaked:
          row[i] = normal(gen) - 12.0f;
          break;
        case Shape::kFlat:
          row[i] = 0.25f;
          break;
        case Shape::kNearFlat:
          row[i] = 1e-3f * unit(gen);
          break;
        case Shape::kTies:
          row[i] = std::floor(4.0f * unit(gen));
          break;
      }
    }
    if (shape == Shape::kPeaked) {  // one dominant token and a few runners-up
      row[gen() % vocab] = 10.0f;
      for (int j = 0; j < 3; ++j) row[gen() % vocab] = 6.0f + j;
    }
  }
  return l;
}

// The CPU's decision for one row, recomputed with its arithmetic and a full sort: how close the
// deciding cumulative sums came to their targets, as a fraction of the kept mass. A GPU/CPU
// mismatch is acceptable only when one of these margins is tiny.
struct Decision {
  double cut_margin = INFINITY;  // top-p cut
  double cdf_margin = INFINITY;  // inverse-CDF crossing
  // u == 1 after clamping (cdf_margin is then left infinite): in exact arithmetic the walk
  // never exceeds u * mass, so the answer is the last kept token with p > 0. The CPU's double sums
  // (mass in id order, the walk in rank order) may cross early, inside a tail of probabilities
  // below rounding; the GPU's exact sums do not, so the GPU must return exactly this token.
  bool u_is_one = false;
  int32_t last_positive = -1;
};

Decision Decide(const float* logits, int64_t vocab, const SamplingParams& sp, float uniform) {
  Decision d;
  auto clean = [](float l) { return std::isnan(l) ? -INFINITY : l; };
  float mx = -INFINITY;
  for (int64_t i = 0; i < vocab; ++i) mx = std::max(mx, clean(logits[i]));
  if (!(sp.temperature > 0.0f) || mx == -INFINITY) return d;  // deterministic
  const float inv_t = 1.0f / sp.temperature;
  std::vector<float> p(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < vocab; ++i) {
    const float l = clean(logits[i]);
    p[i] = mx == INFINITY ? (l == INFINITY ? 1.0f : 0.0f) : std::exp((l - mx) * inv_t);
  }
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    const float la = clean(logits[a]), lb = clean(logits[b]);
    return la > lb || (la == lb && a < b);
  });
  int64_t kept = sp.top_k > 0 && sp.top_k < vocab ? sp.top_k : vocab;
  if (sp.min_p > 0.0f) {
    // The min-p cut: the GPU's expf may put a token within rounding of min_p on the other side.
    int64_t n = 0;
    while (n < kept && p[order[n]] >= sp.min_p) ++n;
    if (n < kept) {
      d.cut_margin = std::abs(static_cast<double>(p[order[n]]) - sp.min_p);
      if (n > 0) {
        d.cut_margin =
            std::min(d.cut_margin, std::abs(static_cast<double>(p[order[n - 1]]) - sp.min_p));
      }
      kept = std::max<int64_t>(n, 1);
    }
  }
  double mass = 0.0;
  for (int64_t j = 0; j < kept; ++j) mass += p[order[j]];
  if (!(mass > 0.0)) return d;
  if (sp.top_p < 1.0f) {
    const double target = static_cast<double>(sp.top_p) * mass;
    double cum = 0.0, prev = 0.0;
    int64_t n = 0;
    while (n < kept) {
      prev = cum;
      cum += p[order[n]];
      ++n;
      if (cum >= target) break;
    }
    d.cut_margin = std::min(d.cut_margin, std::abs(cum - target) / mass);
    if (n > 1) d.cut_margin = std::min(d.cut_margin, std::abs(target - prev) / mass);
    kept = std::max<int64_t>(n, 1);
    mass = cum;
  }
  for (int64_t j = 0; j < kept; ++j) {
    if (p[order[j]] > 0.0f) d.last_positive = order[j];
  }
  const double u = std::min(std::max(static_cast<double>(uniform), 0.0), 1.0);
  d.u_is_one = u == 1.0;
  if (d.u_is_one) return d;
  const double target = u * mass;
  double cum = 0.0, prev = 0.0;
  int64_t j = 0;
  for (; j < kept; ++j) {
    prev = cum;
    cum += p[order[j]];
    if (cum > target) break;
  }
  d.cdf_margin = std::abs(cum - target) / mass;
  if (j > 0) d.cdf_margin = std::min(d.cdf_margin, std::abs(target - prev) / mass);
  return d;
}

class CudaSampleTest : public CudaOpTest {
 protected:
  // Samples on both backends (GPU output poisoned first) and checks every row: exact for greedy
  // and deterministic rows, else equal or within 1e-6 of a boundary (counted by kind).
  void Check(const std::vector<float>& logits, int64_t rows, int64_t vocab,
             const std::vector<SamplingParams>& params, const std::vector<float>& uniforms,
             const std::string& what) {
    ASSERT_EQ(logits.size(), static_cast<size_t>(rows * vocab));
    ASSERT_EQ(params.size(), static_cast<size_t>(rows));
    ASSERT_EQ(uniforms.size(), static_cast<size_t>(rows));
    std::vector<int32_t> want(static_cast<size_t>(rows), -7);
    ASSERT_TRUE(
        cpu_->Sample(logits.data(), rows, vocab, params.data(), uniforms.data(), want.data()).ok());
    const float* d_logits = ToGpu(logits);
    int32_t* d_out = Poisoned<int32_t>(rows);
    const absl::Status st =
        gpu_->Sample(d_logits, rows, vocab, params.data(), uniforms.data(), d_out);
    ASSERT_TRUE(st.ok()) << st;
    const std::vector<int32_t> got = FromGpu(d_out, rows);
    for (int64_t r = 0; r < rows; ++r) {
      ++cases_;
      const SamplingParams& sp = params[r];
      ASSERT_GE(got[r], 0) << what << " row " << r << " not written or out of range";
      ASSERT_LT(got[r], vocab) << what << " row " << r;
      if (got[r] == want[r]) continue;
      std::ostringstream ctx;
      ctx << what << " row " << r << " T=" << sp.temperature << " top_k=" << sp.top_k
          << " top_p=" << sp.top_p << " min_p=" << sp.min_p << " u=" << uniforms[r] << ": gpu "
          << got[r] << " cpu " << want[r];
      ASSERT_GT(sp.temperature, 0.0f) << "greedy mismatch: " << ctx.str();
      const Decision d = Decide(logits.data() + r * vocab, vocab, sp, uniforms[r]);
      if (d.cut_margin < 1e-6) {  // a cut itself is within rounding: any token may follow
        ++cut_mismatches_;
        continue;
      }
      if (d.u_is_one) {
        ++rounding_fallbacks_;
        EXPECT_EQ(got[r], d.last_positive)
            << "u = 1 must take the last positive token: " << ctx.str();
        continue;
      }
      ++mismatches_;
      EXPECT_LT(d.cdf_margin, 1e-6) << "mismatch away from any boundary: " << ctx.str();
    }
  }
  void TearDown() override {
    if (cases_ > 0) {
      std::cout << "[ sample ] " << cases_ << " rows compared; mismatches: " << mismatches_
                << " at a CDF boundary, " << cut_mismatches_ << " after a top-p cut at a boundary, "
                << rounding_fallbacks_ << " where the CPU's u = 1 walk ended early\n";
      EXPECT_LE(mismatches_, 2 + cases_ / 100);
      EXPECT_LE(cut_mismatches_, cases_ / 4);
    }
    CudaOpTest::TearDown();
  }

  std::mt19937 gen_{1234};
  int64_t cases_ = 0;
  int64_t mismatches_ = 0;
  int64_t cut_mismatches_ = 0;
  int64_t rounding_fallbacks_ = 0;
};

// The parameter grid of the brief (and min_p): every combination, cycled over a batch's rows.
std::vector<SamplingParams> ParamGrid() {
  std::vector<SamplingParams> grid;
  for (float t : {0.5f, 1.0f, 2.0f}) {
    for (int32_t k : {0, 1, 5, 40}) {
      for (float p : {1.0f, 0.9f, 0.5f, 1e-6f}) {
        for (float m : {0.0f, 0.05f, 0.3f}) grid.push_back({t, k, p, m});
      }
    }
  }
  return grid;
}

std::vector<float> Uniforms(int64_t rows, std::mt19937& gen) {
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::vector<float> u(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r)
    u[r] = r % 11 == 3 ? 0.0f : r % 11 == 7 ? 0.999999f : unit(gen);
  return u;
}

TEST_F(CudaSampleTest, GreedyMatchesExactly) {
  for (int64_t vocab : {256, 1000, 50280}) {
    for (int64_t rows : {1, 7, 256}) {
      std::vector<float> logits = MakeLogits(Shape::kNormal, rows, vocab, gen_);
      for (int64_t r = 0; r < rows; ++r) {
        float* row = logits.data() + r * vocab;
        const float mx = *std::max_element(row, row + vocab);
        switch (r % 8) {
          case 1:  // ties at the max: lowest id wins
            row[gen_() % vocab] = mx + 1.0f;
            row[gen_() % vocab] = mx + 1.0f;
            break;
          case 2:  // NaNs count as -inf
            for (int j = 0; j < 20; ++j) row[gen_() % vocab] = NAN;
            break;
          case 3:
            std::fill(row, row + vocab, -INFINITY);
            break;
          case 4:
            std::fill(row, row + vocab, NAN);
            break;
          case 5:
            row[vocab - 1] = INFINITY;
            row[vocab / 2] = INFINITY;
            break;
          case 6:
            std::fill(row, row + vocab, -1.0f);
            row[vocab - 1] = 0.0f;
            row[3] = -0.0f;
            break;
          default:
            break;
        }
      }
      const std::vector<SamplingParams> params(rows, SamplingParams{0.0f, 5, 0.5f});
      Check(logits, rows, vocab, params, Uniforms(rows, gen_),
            "greedy V=" + std::to_string(vocab) + " rows=" + std::to_string(rows));
    }
  }
  EXPECT_EQ(mismatches_, 0);
}

TEST_F(CudaOpTest, TokenLogprobsMatchCpu) {
  std::mt19937 gen(99);
  for (int64_t vocab : {1, 257, 50280}) {
    for (int64_t rows : {1, 5, 130}) {
      for (Shape shape : {Shape::kNormal, Shape::kPeaked, Shape::kFlat}) {
        std::vector<float> logits = MakeLogits(shape, rows, vocab, gen);
        std::vector<int32_t> tokens(static_cast<size_t>(rows));
        for (int64_t r = 0; r < rows; ++r) {
          tokens[r] = static_cast<int32_t>(gen() % vocab);
          if (r % 7 == 3) {  // masked-out logits beside the token
            for (int64_t i = 0; i < vocab; i += 3) {
              if (i != tokens[r]) logits[r * vocab + i] = -INFINITY;
            }
          }
        }
        if (rows > 2) tokens[1] = static_cast<int32_t>(vocab);  // out of range: NaN
        std::vector<float> want(static_cast<size_t>(rows));
        ASSERT_TRUE(
            cpu_->TokenLogprobs(logits.data(), rows, vocab, tokens.data(), want.data()).ok());
        float* d_out = Poisoned<float>(rows);
        ASSERT_TRUE(gpu_->TokenLogprobs(ToGpu(logits), rows, vocab, ToGpu(tokens), d_out).ok());
        const std::vector<float> got = FromGpu(d_out, rows);
        for (int64_t r = 0; r < rows; ++r) {
          if (std::isnan(want[r])) {
            EXPECT_TRUE(std::isnan(got[r])) << "vocab " << vocab << " row " << r;
          } else if (std::isinf(want[r])) {
            EXPECT_EQ(got[r], want[r]) << "vocab " << vocab << " row " << r;
          } else {
            EXPECT_NEAR(got[r], want[r], 2e-5 + 1e-6 * std::fabs(want[r]))
                << "vocab " << vocab << " row " << r;
          }
        }
      }
    }
  }
}

TEST_F(CudaOpTest, TopLogprobsMatchCpu) {
  std::mt19937 gen(5);
  for (int64_t vocab : {20, 257, 50280, 60001}) {
    for (int64_t rows : {1, 5, 130}) {
      for (Shape shape : {Shape::kNormal, Shape::kPeaked, Shape::kTies, Shape::kFlat}) {
        for (int64_t n : {1, 7, 20}) {
          std::vector<float> logits = MakeLogits(shape, rows, vocab, gen);
          if (rows > 2) {  // NaN and -inf entries rank last
            logits[vocab] = NAN;
            logits[vocab + 1] = -INFINITY;
          }
          std::vector<int32_t> want_ids(rows * n);
          std::vector<float> want_lp(rows * n);
          ASSERT_TRUE(
              cpu_->TopLogprobs(logits.data(), rows, vocab, n, want_ids.data(), want_lp.data())
                  .ok());
          int32_t* d_ids = Poisoned<int32_t>(rows * n);
          float* d_lp = Poisoned<float>(rows * n);
          ASSERT_TRUE(gpu_->TopLogprobs(ToGpu(logits), rows, vocab, n, d_ids, d_lp).ok());
          const std::vector<int32_t> ids = FromGpu(d_ids, rows * n);
          const std::vector<float> lp = FromGpu(d_lp, rows * n);
          ASSERT_EQ(ids, want_ids) << "vocab " << vocab << " rows " << rows << " n " << n;
          for (int64_t i = 0; i < rows * n; ++i) {
            if (std::isnan(want_lp[i])) {
              EXPECT_TRUE(std::isnan(lp[i])) << i;
            } else if (std::isinf(want_lp[i])) {
              EXPECT_EQ(lp[i], want_lp[i]) << i;
            } else {
              EXPECT_NEAR(lp[i], want_lp[i], 2e-5 + 1e-6 * std::fabs(want_lp[i]))
                  << "vocab " << vocab << " rows " << rows << " n " << n << " entry " << i;
            }
          }
        }
      }
    }
  }
}

// Penalties are elementwise with the same rounding on both backends: bit-exact.
TEST_F(CudaOpTest, BiasHeldBackTokensPenaltiesAndCountsMatchCpu) {
  std::mt19937 gen(7);
  for (int64_t vocab : {1, 3, 257, 50280}) {
    for (int64_t rows : {1, 6, 130}) {
      std::vector<float> logits = MakeLogits(Shape::kNormal, rows, vocab, gen);
      logits[0] = -INFINITY;
      std::vector<std::vector<int32_t>> counts(static_cast<size_t>(rows));
      std::vector<int32_t*> d_counts(static_cast<size_t>(rows), nullptr);
      std::vector<PenaltyParams> cpu_params(static_cast<size_t>(rows));
      std::vector<PenaltyParams> gpu_params(static_cast<size_t>(rows));
      std::vector<std::vector<float>> bias(static_cast<size_t>(rows));
      for (int64_t r = 0; r < rows; ++r) {
        // Rows 5k + 1 and 5k + 4 have a logit bias, 5k + 2 has neither bias nor penalties
        // (copied), 5k + 4 has only the bias, 5k + 3 holds tokens back.
        if (r % 5 == 1 || r % 5 == 4) {
          bias[r].assign(static_cast<size_t>(vocab), 0.0f);
          for (float& b : bias[r]) {
            if (gen() % 3 == 0) b = (static_cast<int>(gen() % 401) - 200) * 0.5f;
          }
          cpu_params[r].bias = bias[r].data();
          gpu_params[r].bias = ToGpu(bias[r]);
        }
        if (r % 5 == 2 || r % 5 == 4) continue;
        std::vector<int32_t>& c = counts[r];
        c.assign(static_cast<size_t>(vocab), 0);
        for (int32_t& x : c) {
          const uint32_t g = gen();
          if (g % 4 == 0) x = static_cast<int32_t>(g / 4 % 5);
          if (g % 7 == 0) x |= PenaltyParams::kPromptTokenBit;
          if (g % 11 == 0) x |= PenaltyParams::kHeldBackBit;
        }
        d_counts[r] = ToGpu(c);
        const float presence = (static_cast<int>(gen() % 9) - 4) * 0.37f;
        const float frequency = (static_cast<int>(gen() % 9) - 4) * 0.29f;
        const float repetition = 0.3f + (gen() % 17) * 0.13f;
        for (auto [params, counts_ptr] :
             {std::pair(&cpu_params[r], c.data()), std::pair(&gpu_params[r], d_counts[r])}) {
          params->counts = counts_ptr;
          params->presence = presence;
          params->frequency = frequency;
          params->repetition = repetition;
          params->hold_back = r % 5 == 3;
        }
      }
      std::vector<float> want(logits.size());
      ASSERT_TRUE(
          cpu_->ApplyPenalties(logits.data(), rows, vocab, cpu_params.data(), want.data()).ok());
      float* d_out = Poisoned<float>(rows * vocab);
      ASSERT_TRUE(gpu_->ApplyPenalties(ToGpu(logits), rows, vocab, gpu_params.data(), d_out).ok());
      const std::vector<float> got = FromGpu(d_out, rows * vocab);
      int64_t differ = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        differ += std::memcmp(&got[i], &want[i], sizeof(float)) != 0;
      }
      EXPECT_EQ(differ, 0) << "vocab " << vocab << " rows " << rows;

      // Two rounds of counting, the second with every row's token the same.
      std::vector<int32_t> tokens(static_cast<size_t>(rows));
      for (int32_t& t : tokens) t = static_cast<int32_t>(gen() % (vocab + 1));  // vocab: skipped
      const int32_t* d_tokens = ToGpu(tokens);
      for (int round = 0; round < 2; ++round) {
        ASSERT_TRUE(cpu_->CountTokens(cpu_params.data(), rows, vocab, tokens.data()).ok());
        ASSERT_TRUE(gpu_->CountTokens(gpu_params.data(), rows, vocab, d_tokens).ok());
      }
      for (int64_t r = 0; r < rows; ++r) {
        if (d_counts[r] == nullptr) continue;
        EXPECT_EQ(FromGpu(d_counts[r], vocab), counts[r]) << "vocab " << vocab << " row " << r;
      }
    }
  }
}

TEST_F(CudaSampleTest, ParamGridMatchesCpu) {
  const std::vector<SamplingParams> grid = ParamGrid();
  for (int64_t vocab : {256, 1000, 50280}) {
    for (int64_t rows : {1, 7, 256}) {
      const int rounds = rows == 256 ? 3 : 12;
      for (int round = 0; round < rounds; ++round) {
        const std::vector<float> logits = MakeLogits(Shape::kNormal, rows, vocab, gen_);
        std::vector<SamplingParams> params(static_cast<size_t>(rows));
        for (int64_t r = 0; r < rows; ++r) params[r] = grid[(r + round * rows) % grid.size()];
        Check(logits, rows, vocab, params, Uniforms(rows, gen_),
              "grid V=" + std::to_string(vocab) + " rows=" + std::to_string(rows));
      }
    }
  }
}

TEST_F(CudaSampleTest, PeakedFlatAndTiedRowsMatchCpu) {
  const std::vector<SamplingParams> grid = ParamGrid();
  for (Shape shape : {Shape::kPeaked, Shape::kFlat, Shape::kNearFlat, Shape::kTies}) {
    for (int64_t vocab : {256, 50280}) {
      const int64_t rows = 96;
      const std::vector<float> logits = MakeLogits(shape, rows, vocab, gen_);
      std::vector<SamplingParams> params(static_cast<size_t>(rows));
      for (int64_t r = 0; r < rows; ++r) params[r] = grid[(r * 7) % grid.size()];
      Check(logits, rows, vocab, params, Uniforms(rows, gen_),
            "shape " + std::to_string(static_cast<int>(shape)) + " V=" + std::to_string(vocab));
    }
  }
}

// One row, many uniforms: the inverse CDF over the whole vocabulary (no cut) and after large cuts
// (top_k above the kernel's candidate list, top_p keeping most of a flat row, min_p cuts).
TEST_F(CudaSampleTest, ManyUniformsOverOneRow) {
  const int64_t vocab = 50280, rows = 256;
  for (Shape shape : {Shape::kNormal, Shape::kNearFlat}) {
    const std::vector<float> one = MakeLogits(shape, 1, vocab, gen_);
    std::vector<float> logits;
    for (int64_t r = 0; r < rows; ++r) logits.insert(logits.end(), one.begin(), one.end());
    for (SamplingParams sp :
         {SamplingParams{1.0f, 0, 1.0f}, SamplingParams{0.7f, 0, 0.95f},
          SamplingParams{1.3f, 10000, 1.0f}, SamplingParams{1.0f, 3000, 0.9f},
          SamplingParams{1.0f, 0, 1.0f, 0.001f}, SamplingParams{1.0f, 0, 0.9f, 0.2f}}) {
      std::vector<float> u(static_cast<size_t>(rows));
      for (int64_t r = 0; r < rows; ++r) u[r] = (r + 0.5f) / rows;
      u[0] = 0.0f;
      u[rows - 1] = 0.999999f;
      Check(logits, rows, vocab, std::vector<SamplingParams>(rows, sp), u,
            "one row, shape " + std::to_string(static_cast<int>(shape)) +
                " top_k=" + std::to_string(sp.top_k));
    }
  }
}

TEST_F(CudaSampleTest, SpecialValuesAndClampedUniforms) {
  for (int64_t vocab : {256, 50280}) {
    const int64_t rows = 48;
    std::vector<float> logits = MakeLogits(Shape::kNormal, rows, vocab, gen_);
    std::vector<SamplingParams> params(static_cast<size_t>(rows));
    std::vector<float> u(static_cast<size_t>(rows));
    const float clamped[] = {-0.5f, 1.0f, 1.5f, 0.0f, 0.999999f, 0.5f};
    for (int64_t r = 0; r < rows; ++r) {
      float* row = logits.data() + r * vocab;
      switch (r % 6) {
        case 0:
          for (int j = 0; j < 50; ++j) row[gen_() % vocab] = NAN;
          break;
        case 1:
          std::fill(row, row + vocab, -INFINITY);
          break;  // all -inf: token 0
        case 2:
          row[5] = INFINITY;
          row[vocab - 2] = INFINITY;
          row[7] = NAN;
          break;
        case 3:
          for (int j = 0; j < vocab / 4; ++j) row[gen_() % vocab] = -INFINITY;
          break;
        case 4:
          std::fill(row, row + vocab, 0.0f);
          for (int j = 0; j < vocab; j += 3) row[j] = -0.0f;
          break;
        default:
          for (int j = 0; j < vocab; j += 2) row[j] = -200.0f;
          break;  // p underflows to 0
      }
      params[r] = SamplingParams{r % 4 == 0 ? 0.5f : 1.0f, (r / 6) % 2 == 0 ? 0 : 40,
                                 (r / 12) % 2 == 0 ? 1.0f : 0.8f};
      u[r] = clamped[(r / 6) % 6];
    }
    Check(logits, rows, vocab, params, u, "special V=" + std::to_string(vocab));
  }
}

// A vocabulary too large for the row to sit in shared memory takes the global-memory path.
TEST_F(CudaSampleTest, LargeVocabularyMatchesCpu) {
  const int64_t vocab = 131072, rows = 12;
  const std::vector<SamplingParams> grid = ParamGrid();
  const std::vector<float> logits = MakeLogits(Shape::kNormal, rows, vocab, gen_);
  std::vector<SamplingParams> params(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) params[r] = grid[(r * 5) % grid.size()];
  params[0].temperature = 0.0f;
  Check(logits, rows, vocab, params, Uniforms(rows, gen_), "V=131072");
}

TEST_F(CudaSampleTest, DeterministicAndIndependentOfBatch) {
  const int64_t vocab = 50280, rows = 64;
  const std::vector<SamplingParams> grid = ParamGrid();
  const std::vector<float> logits = MakeLogits(Shape::kNormal, rows, vocab, gen_);
  std::vector<SamplingParams> params(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) params[r] = grid[r % grid.size()];
  const std::vector<float> u = Uniforms(rows, gen_);
  const float* d_logits = ToGpu(logits);
  int32_t* d_out = Poisoned<int32_t>(rows);
  ASSERT_TRUE(gpu_->Sample(d_logits, rows, vocab, params.data(), u.data(), d_out).ok());
  const std::vector<int32_t> first = FromGpu(d_out, rows);
  ASSERT_TRUE(gpu_->Sample(d_logits, rows, vocab, params.data(), u.data(), d_out).ok());
  EXPECT_EQ(FromGpu(d_out, rows), first);
  for (int64_t r : {int64_t{0}, int64_t{17}, rows - 1}) {
    int32_t* d_one = Poisoned<int32_t>(1);
    ASSERT_TRUE(gpu_->Sample(d_logits + r * vocab, 1, vocab, &params[r], &u[r], d_one).ok());
    EXPECT_EQ(FromGpu(d_one, 1)[0], first[r]) << r;
  }
}

// Not a check: prints the kernel's time for a 256-row decode batch over GPT-NeoX's vocabulary.
TEST_F(CudaSampleTest, ReportsTiming) {
  const int64_t vocab = 50280, rows = 256;
  struct Case {
    const char* name;
    Shape shape;
    SamplingParams sp;
  };
  const Case cases[] = {{"greedy", Shape::kNormal, {0.0f, 0, 1.0f}},
                        {"T=1 top_k=40", Shape::kNormal, {1.0f, 40, 1.0f}},
                        {"T=0.8 top_k=40 top_p=0.9", Shape::kNormal, {0.8f, 40, 0.9f}},
                        {"T=1 top_p=0.9 peaked", Shape::kPeaked, {1.0f, 0, 0.9f}},
                        {"T=1 top_p=0.9 normal", Shape::kNormal, {1.0f, 0, 0.9f}},
                        {"T=1 min_p=0.05 normal", Shape::kNormal, {1.0f, 0, 1.0f, 0.05f}},
                        {"T=1 full CDF normal", Shape::kNormal, {1.0f, 0, 1.0f}},
                        {"T=1 top_p=0.95 near-flat", Shape::kNearFlat, {1.0f, 0, 0.95f}},
                        {"T=1 full CDF flat", Shape::kFlat, {1.0f, 0, 1.0f}}};
  int32_t* d_out = Poisoned<int32_t>(rows);
  for (const Case& c : cases) {
    const float* d_logits = ToGpu(MakeLogits(c.shape, rows, vocab, gen_));
    const std::vector<SamplingParams> params(rows, c.sp);
    const std::vector<float> u = Uniforms(rows, gen_);
    ASSERT_TRUE(gpu_->Sample(d_logits, rows, vocab, params.data(), u.data(), d_out).ok());
    ASSERT_TRUE(gpu_->Synchronize().ok());
    const int reps = 20;
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) {
      ASSERT_TRUE(gpu_->Sample(d_logits, rows, vocab, params.data(), u.data(), d_out).ok());
    }
    ASSERT_TRUE(gpu_->Synchronize().ok());
    const double us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
            .count() /
        reps;
    std::cout << "[ timing ] Sample 256 x 50280, " << c.name << ": " << us << " us\n";
  }
}

}  // namespace
}  // namespace ramba::kernels
