// Backend::MambaMixer (conv + SSM + gated norm, optionally out_proj) on the CUDA backend against the CPU backend's
// three separate ops (label gpu; skipped without a GPU). With RAMBA_CUDA_FUSED_MIXER=1 (set by
// the fixture) decode-shaped batches take the fused kernel (kernels/cuda/mamba_decode.cu): one-row and few-row sequences, empty ones, batches
// that start past row 0, heads not a multiple of the block's channels, several B/C groups and
// norm groups, repeated calls (the last-block counters must be back at zero), bitwise
// determinism; a prefill-shaped batch takes the unfused path through the same entry point.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <utility>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/cuda_test_util.h"

namespace ramba::kernels::testing {
namespace {

constexpr double kTol = 1e-5;

struct MixerCase {
  std::vector<int64_t> lens;
  int64_t base = 0;
  int64_t H = 6, P = 12, N = 40, G = 2;
  int64_t norm_groups = 2;
  bool conv_bias = true;
  uint32_t seed = 1;
  int64_t out_n = 0;  // > 0: the op ends with out += g * out_proj^T (bf16 weights [out_n, d_inner])
};

// Host data of one case; every array the CPU backend reads directly.
struct MixerData {
  MixerCase c;
  int64_t d_inner = 0, conv_dim = 0, ld = 0, rows_end = 0;
  std::vector<int64_t> offs;
  std::vector<float> zx, conv_w, conv_b, A_log, D, dt_bias, norm_w;
  std::vector<std::vector<float>> conv_states, ssm_states;
  std::vector<float> out_w;  // [out_n, d_inner], values rounded to bf16
  std::vector<float> out0;   // [rows_end, ld_out], the residual the projection adds into
  int64_t ld_out = 0;
};

MixerData MakeData(const MixerCase& c) {
  MixerData d;
  d.c = c;
  d.d_inner = c.H * c.P;
  d.conv_dim = d.d_inner + 2 * c.G * c.N;
  d.ld = d.d_inner + d.conv_dim + c.H + 3;  // a little padding past dt
  d.offs = {c.base};
  for (int64_t l : c.lens) d.offs.push_back(d.offs.back() + l);
  d.rows_end = d.offs.back();
  d.zx = RandomVec(d.rows_end * d.ld, c.seed, -2.0f, 2.0f);
  d.conv_w = RandomVec(d.conv_dim * 4, c.seed + 1, -0.7f, 0.7f);
  d.conv_b = RandomVec(d.conv_dim, c.seed + 2);
  d.A_log = RandomVec(c.H, c.seed + 3, -1.0f, 1.5f);
  d.D = RandomVec(c.H, c.seed + 4);
  d.dt_bias = RandomVec(c.H, c.seed + 5, -3.0f, 0.5f);
  d.norm_w = RandomVec(d.d_inner, c.seed + 6, 0.5f, 1.5f);
  for (size_t s = 0; s < c.lens.size(); ++s) {
    const uint32_t k = c.seed + 100 + 2 * static_cast<uint32_t>(s);
    d.conv_states.push_back(RandomVec(3 * d.conv_dim, k, -2.0f, 2.0f));
    d.ssm_states.push_back(RandomVec(c.H * c.P * c.N, k + 1, -1.0f, 1.0f));
  }
  if (c.out_n > 0) {
    d.out_w = RandomVec(c.out_n * d.d_inner, c.seed + 7, -0.1f, 0.1f);
    for (float& v : d.out_w) v = Bf16ToF32(F32ToBf16(v));
    d.ld_out = c.out_n + 2;
    d.out0 = RandomVec(d.rows_end * d.ld_out, c.seed + 8);
  }
  return d;
}

struct MixerResult {
  std::vector<float> g;    // rows [base, rows_end); not compared with an out projection
  std::vector<float> out;  // rows [base, rows_end) of the projection's output, when out_n > 0
  std::vector<std::vector<float>> conv_states, ssm_states;
};

class CudaMambaMixerTest : public CudaOpTest {
 protected:
  // The CUDA backend fuses only batches of 256 and more by default; these tests force it.
  void SetUp() override {
    CudaOpTest::SetUp();
    setenv("RAMBA_CUDA_FUSED_MIXER", "1", 1);
  }
  void TearDown() override {
    unsetenv("RAMBA_CUDA_FUSED_MIXER");
    CudaOpTest::TearDown();
  }

  MambaMixerArgs Args(const MixerData& d) {
    MambaMixerArgs a;
    a.ld = d.ld;
    a.num_seqs = static_cast<int64_t>(d.c.lens.size());
    a.host_seq_offsets = d.offs.data();
    a.conv_kernel = 4;
    a.ssm.nheads = d.c.H;
    a.ssm.headdim = d.c.P;
    a.ssm.d_state = d.c.N;
    a.ssm.ngroups = d.c.G;
    a.ssm.dt_min = 0.0f;
    a.ssm.dt_max = INFINITY;
    a.norm_group_size = d.d_inner / d.c.norm_groups;
    a.eps = 1e-5f;
    return a;
  }

  MixerResult RunCpu(const MixerData& d) {
    MixerResult r;
    r.conv_states = d.conv_states;
    r.ssm_states = d.ssm_states;
    std::vector<float*> cp, sp;
    for (auto& s : r.conv_states) cp.push_back(s.data());
    for (auto& s : r.ssm_states) sp.push_back(s.data());
    std::vector<float> xbc(d.rows_end * d.conv_dim), y(d.rows_end * d.d_inner),
        g(d.rows_end * d.d_inner);
    MambaMixerArgs a = Args(d);
    a.zxbcdt = d.zx.data();
    a.seq_offsets = d.offs.data();
    a.conv_states = cp.data();
    a.conv_weight = d.conv_w.data();
    a.conv_bias = d.c.conv_bias ? d.conv_b.data() : nullptr;
    a.ssm_states = sp.data();
    a.ssm.A_log = d.A_log.data();
    a.ssm.D = d.D.data();
    a.ssm.dt_bias = d.dt_bias.data();
    a.norm_weight = d.norm_w.data();
    a.xbc = xbc.data();
    a.y = y.data();
    a.g = g.data();
    std::vector<float> out = d.out0;
    if (d.c.out_n > 0) {
      a.out_proj = MatrixView{d.out_w.data(), DType::kF32, d.c.out_n, d.d_inner};
      a.out = out.data();
      a.ld_out = d.ld_out;
    }
    EXPECT_TRUE(cpu_->MambaMixer(a).ok());
    r.g.assign(g.begin() + d.c.base * d.d_inner, g.end());
    r.out.assign(out.begin() + d.c.base * d.ld_out, out.end());
    return r;
  }

  // Runs the mixer `calls` times on the GPU, each call on the states the previous one left, and
  // returns what the last call produced; `inputs` holds one zx per call.
  MixerResult RunGpu(const MixerData& d, const std::vector<std::vector<float>>& inputs) {
    std::vector<float*> cp, sp;
    for (const auto& s : d.conv_states) cp.push_back(ToGpu(s));
    for (const auto& s : d.ssm_states) sp.push_back(ToGpu(s));
    float* g = Poisoned<float>(d.rows_end * d.d_inner);
    MambaMixerArgs a = Args(d);
    a.seq_offsets = ToGpu(d.offs);
    a.conv_states = ToGpu(cp);
    a.conv_weight = ToGpu(d.conv_w);
    a.conv_bias = d.c.conv_bias ? ToGpu(d.conv_b) : nullptr;
    a.ssm_states = ToGpu(sp);
    a.ssm.A_log = ToGpu(d.A_log);
    a.ssm.D = ToGpu(d.D);
    a.ssm.dt_bias = ToGpu(d.dt_bias);
    a.norm_weight = ToGpu(d.norm_w);
    a.xbc = Poisoned<float>(d.rows_end * d.conv_dim);
    a.y = Poisoned<float>(d.rows_end * d.d_inner);
    a.g = g;
    float* out = nullptr;
    if (d.c.out_n > 0) {
      std::vector<uint16_t> w16(d.out_w.size());
      for (size_t i = 0; i < w16.size(); ++i) w16[i] = F32ToBf16(d.out_w[i]);
      a.out_proj = MatrixView{ToGpu(w16), DType::kBF16, d.c.out_n, d.d_inner};
      out = ToGpu(d.out0);
      a.out = out;
      a.ld_out = d.ld_out;
    }
    for (const auto& zx : inputs) {
      a.zxbcdt = ToGpu(zx);
      const absl::Status st = gpu_->MambaMixer(a);
      EXPECT_TRUE(st.ok()) << st;
    }
    MixerResult r;
    r.g = FromGpu(g + d.c.base * d.d_inner, (d.rows_end - d.c.base) * d.d_inner);
    if (out != nullptr) {
      r.out = FromGpu(out + d.c.base * d.ld_out, (d.rows_end - d.c.base) * d.ld_out);
    }
    for (size_t s = 0; s < cp.size(); ++s) {
      r.conv_states.push_back(FromGpu(cp[s], d.conv_states[s].size()));
      r.ssm_states.push_back(FromGpu(sp[s], d.ssm_states[s].size()));
    }
    return r;
  }

  void ExpectClose(const MixerResult& gpu, const MixerResult& cpu) {
    if (gpu.out.empty()) {
      EXPECT_LE(NormRelError(gpu.g, cpu.g), kTol);
    } else {
      // The projection of g (hi + lo bf16 products) adds its own ~1e-5.
      EXPECT_LE(NormRelError(gpu.out, cpu.out), 2 * kTol);
    }
    ASSERT_EQ(gpu.conv_states.size(), cpu.conv_states.size());
    for (size_t s = 0; s < cpu.conv_states.size(); ++s) {
      // The conv state is a copy of inputs: exact.
      EXPECT_EQ(gpu.conv_states[s], cpu.conv_states[s]) << "conv state of sequence " << s;
      EXPECT_LE(NormRelError(gpu.ssm_states[s], cpu.ssm_states[s]), kTol)
          << "ssm state of sequence " << s;
    }
  }

  void Check(const MixerCase& c) {
    const MixerData d = MakeData(c);
    ExpectClose(RunGpu(d, {d.zx}), RunCpu(d));
  }
};

TEST_F(CudaMambaMixerTest, OneRowPerSequence) { Check({.lens = {1, 1, 1, 1, 1}}); }

TEST_F(CudaMambaMixerTest, FewRowsEmptySequencesAndOffsetBase) {
  Check({.lens = {1, 0, 3, 8, 2, 0}, .base = 3, .seed = 7});
}

TEST_F(CudaMambaMixerTest, OddShapesOneGroupNoBias) {
  Check({.lens = {2, 1, 5}, .H = 5, .P = 9, .N = 33, .G = 1, .norm_groups = 1,
         .conv_bias = false, .seed = 11});
}

TEST_F(CudaMambaMixerTest, ManyNormGroupsSmallState) {
  Check({.lens = {1, 4}, .H = 8, .P = 16, .N = 16, .G = 4, .norm_groups = 8, .seed = 13});
}

TEST_F(CudaMambaMixerTest, LargeState) {
  Check({.lens = {1, 2}, .H = 4, .P = 8, .N = 256, .G = 2, .norm_groups = 2, .seed = 17});
}

TEST_F(CudaMambaMixerTest, Reference370MShape) {
  Check({.lens = {1, 1, 1}, .H = 32, .P = 64, .N = 128, .G = 1, .norm_groups = 1, .seed = 19});
}

// Rows past kDecodeMaxRows: the unfused path behind the same op.
TEST_F(CudaMambaMixerTest, PrefillShapeUsesThreeOps) {
  Check({.lens = {40, 1, 0, 17}, .seed = 23});
}

// Successive steps: the second call must see the first call's states, and the per-sequence
// counters the first call used must be back at zero (else the second call's norm is skipped).
TEST_F(CudaMambaMixerTest, SuccessiveStepsContinueTheState) {
  MixerCase c{.lens = {1, 1, 2}, .seed = 29};
  MixerData d = MakeData(c);
  const std::vector<float> first = d.zx;
  const std::vector<float> second = RandomVec(static_cast<int64_t>(d.zx.size()), 31, -2.0f, 2.0f);
  const MixerResult gpu = RunGpu(d, {first, second, second});
  // CPU: the same three steps.
  MixerResult cpu = RunCpu(d);
  for (int i = 0; i < 2; ++i) {
    MixerData next = d;
    next.conv_states = cpu.conv_states;
    next.ssm_states = cpu.ssm_states;
    next.zx = second;
    cpu = RunCpu(next);
  }
  ExpectClose(gpu, cpu);
}

// RAMBA_CUDA_FUSED_MIXER=2: the norm and B/C conv state finished by a second kernel.
TEST_F(CudaMambaMixerTest, FinishKernelVariant) {
  setenv("RAMBA_CUDA_FUSED_MIXER", "2", 1);
  Check({.lens = {1, 0, 3, 8, 2, 0}, .base = 3, .seed = 41});
  Check({.lens = {1, 1, 1}, .H = 32, .P = 64, .N = 128, .G = 1, .norm_groups = 1, .seed = 43});
  setenv("RAMBA_CUDA_FUSED_MIXER", "0", 1);  // and the three separate ops
  Check({.lens = {1, 2, 1}, .seed = 47});
}

// Enough sequences that blocks take many channels each (the per-batch channel split).
TEST_F(CudaMambaMixerTest, LargeBatchWideBlocks) {
  Check({.lens = std::vector<int64_t>(300, 1), .H = 32, .P = 64, .N = 128, .G = 1,
         .norm_groups = 1, .seed = 53});
}

// With out_proj the op also adds g * out_proj^T into the residual: after the fused decode kernel
// (a small-m GEMM), and on the unfused path, where the gated norm writes the cuBLASLt input itself
// for many rows (two products, or one over stacked weights) unless RAMBA_CUDA_FUSED_NORM=0.
TEST_F(CudaMambaMixerTest, OutProjection) {
  const MixerCase prefill{.lens = {300, 5, 0}, .base = 1, .H = 32, .P = 64, .N = 128, .G = 1,
                          .norm_groups = 1, .seed = 71, .out_n = 100};
  for (const char* level : {"0", "1"}) {
    SCOPED_TRACE(::testing::Message() << "RAMBA_CUDA_FUSED_NORM=" << level);
    const ScopedEnv norm("RAMBA_CUDA_FUSED_NORM", level);
    {
      const ScopedEnv mixer("RAMBA_CUDA_FUSED_MIXER", "1");
      Check({.lens = {1, 0, 3, 2}, .base = 2, .seed = 61, .out_n = 40});
    }
    const ScopedEnv mixer("RAMBA_CUDA_FUSED_MIXER", "0");
    Check({.lens = {1, 2, 1}, .seed = 67, .out_n = 33});
    Check({.lens = {1}, .H = 32, .P = 64, .N = 128, .G = 1, .norm_groups = 1, .seed = 69,
           .out_n = 64});
    Check(prefill);
    const ScopedEnv stacked("RAMBA_CUDA_STACKED_GEMM", "1");
    Check(prefill);
  }
}

// Decode batches of up to 16 rows with one norm group and bf16 out_proj: the SSM kernel applies
// the gate and out_proj folds the RMSNorm (CudaBackend::MambaMixer). Each case with the fold on
// and off (RAMBA_CUDA_GATED_FOLD=0) against the CPU: 1-3 rows (CUDA-core small-m kernel), 8 and
// 16 (tensor-core kernel), 12 rows at an odd width (norm, then the product), 2-row sequences
// and an offset base; 17 rows, two norm groups and a batch of empty sequences take the unfused
// ops either way.
TEST_F(CudaMambaMixerTest, GatedNormFoldedIntoOutProj) {
  const ScopedEnv mixer("RAMBA_CUDA_FUSED_MIXER", "0");
  // One B/C group; a new seed per case.
  uint32_t seed = 81;
  auto make = [&seed](std::vector<int64_t> lens, int64_t base, int64_t H, int64_t P, int64_t N,
                      int64_t norm_groups, int64_t out_n, bool conv_bias = true) {
    MixerCase c{.lens = std::move(lens), .base = base, .H = H, .P = P, .N = N, .G = 1};
    c.norm_groups = norm_groups;
    c.conv_bias = conv_bias;
    c.seed = seed++;
    c.out_n = out_n;
    return c;
  };
  std::vector<MixerCase> cases;
  for (int64_t n : {1, 3, 8, 16, 17}) {
    cases.push_back(make(std::vector<int64_t>(n, 1), 0, 32, 64, 128, 1, 96));
  }
  cases.push_back(make({2, 1, 0, 3}, 2, 8, 32, 64, 1, 40));
  cases.push_back(make(std::vector<int64_t>(12, 1), 0, 5, 9, 33, 1, 24, /*conv_bias=*/false));
  cases.push_back(make({1, 1, 1}, 0, 8, 32, 64, 2, 40));
  cases.push_back(make({0, 0}, 2, 8, 32, 64, 1, 40));
  for (const char* fold : {"1", "0"}) {
    const ScopedEnv env("RAMBA_CUDA_GATED_FOLD", fold);
    for (const MixerCase& c : cases) {
      SCOPED_TRACE(::testing::Message() << "fold " << fold << " seqs " << c.lens.size() << " H "
                                        << c.H << " norm groups " << c.norm_groups);
      Check(c);
    }
  }
}

TEST_F(CudaMambaMixerTest, BitwiseDeterministic) {
  const MixerData d = MakeData({.lens = {1, 1, 1, 1}, .H = 32, .P = 64, .N = 128, .G = 1,
                                .norm_groups = 1, .seed = 37});
  const MixerResult a = RunGpu(d, {d.zx});
  const MixerResult b = RunGpu(d, {d.zx});
  EXPECT_EQ(a.g, b.g);
  EXPECT_EQ(a.ssm_states, b.ssm_states);
}

}  // namespace
}  // namespace ramba::kernels::testing
