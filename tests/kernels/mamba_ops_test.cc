// CausalConv1dSilu and SsmScan: double references, ragged batches, state continuation across
// segments and token by token, determinism across thread counts.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/kernel_test_util.h"

namespace ramba::kernels {
namespace {

using testing::RandomVec;
using testing::RelError;

// ---------------- CausalConv1dSilu ----------------

struct ConvSetup {
  int64_t channels = 45, kernel = 4, ldx = 50;
  std::vector<float> weight, bias;
  ConvSetup() : weight(RandomVec(45 * 4, 1)), bias(RandomVec(45, 2)) {}
};

// One sequence: returns y rows and updates `state` (double reference).
std::vector<double> ConvRef(const ConvSetup& c, std::vector<double>* state, const float* x,
                            int64_t T) {
  const int64_t hist = c.kernel - 1, C = c.channels;
  std::vector<double> in(*state);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t ch = 0; ch < C; ++ch) in.push_back(x[t * c.ldx + ch]);
  }
  std::vector<double> y(T * C);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t ch = 0; ch < C; ++ch) {
      double acc = c.bias[ch];
      for (int64_t j = 0; j < c.kernel; ++j) acc += c.weight[ch * c.kernel + j] * in[(t + j) * C + ch];
      y[t * C + ch] = testing::SiluD(acc);
    }
  }
  state->assign(in.end() - hist * C, in.end());
  return y;
}

TEST(CausalConv1dTest, RaggedBatchMatchesReference) {
  auto be = testing::Cpu();
  ConvSetup c;
  const std::vector<int64_t> lens = {7, 1, 0, 2, 12};
  std::vector<int64_t> offs = {0};
  for (int64_t l : lens) offs.push_back(offs.back() + l);
  const int64_t rows = offs.back(), hist = c.kernel - 1;
  const auto x = RandomVec(rows * c.ldx, 3, -2, 2);
  std::vector<std::vector<float>> states;
  std::vector<std::vector<double>> ref_states;
  for (size_t s = 0; s < lens.size(); ++s) {
    states.push_back(RandomVec(hist * c.channels, 10 + s));
    ref_states.emplace_back(states.back().begin(), states.back().end());
  }
  std::vector<float*> ptrs;
  for (auto& s : states) ptrs.push_back(s.data());
  std::vector<float> y(rows * c.channels);
  ASSERT_TRUE(be->CausalConv1dSilu(x.data(), c.ldx, offs.data(), lens.size(), ptrs.data(),
                                   c.weight.data(), c.bias.data(), c.channels, c.kernel, y.data())
                  .ok());
  for (size_t s = 0; s < lens.size(); ++s) {
    auto want = ConvRef(c, &ref_states[s], x.data() + offs[s] * c.ldx, lens[s]);
    std::vector<float> got(y.begin() + offs[s] * c.channels, y.begin() + offs[s + 1] * c.channels);
    EXPECT_LT(RelError(got, want), 1e-5) << s;
    EXPECT_LT(RelError(states[s], ref_states[s]), 1e-7) << s;  // states are copies of inputs
  }
}

// Runs one sequence through the op in the given segment lengths; returns y, updates state.
std::vector<float> ConvInSegments(Backend* be, const ConvSetup& c, const std::vector<float>& x,
                                  const std::vector<int64_t>& segs, std::vector<float>* state,
                                  bool no_bias = false) {
  std::vector<float> y;
  int64_t start = 0;
  for (int64_t len : segs) {
    const int64_t offs[] = {0, len};
    float* ptrs[] = {state->data()};
    std::vector<float> part(len * c.channels);
    EXPECT_TRUE(be->CausalConv1dSilu(x.data() + start * c.ldx, c.ldx, offs, 1, ptrs,
                                     c.weight.data(), no_bias ? nullptr : c.bias.data(),
                                     c.channels, c.kernel, part.data())
                    .ok());
    y.insert(y.end(), part.begin(), part.end());
    start += len;
  }
  return y;
}

TEST(CausalConv1dTest, SegmentsAndTokenByTokenEqualOnePass) {
  auto be = testing::Cpu();
  ConvSetup c;
  const int64_t T = 23;
  const auto x = RandomVec(T * c.ldx, 4);
  const auto init = RandomVec((c.kernel - 1) * c.channels, 5);
  for (bool no_bias : {false, true}) {
    auto s1 = init, s2 = init, s3 = init;
    const auto one = ConvInSegments(be.get(), c, x, {T}, &s1, no_bias);
    const auto segs = ConvInSegments(be.get(), c, x, {1, 2, 0, 5, 3, 12}, &s2, no_bias);
    const auto tok = ConvInSegments(be.get(), c, x, std::vector<int64_t>(T, 1), &s3, no_bias);
    EXPECT_EQ(one, segs);
    EXPECT_EQ(one, tok);
    EXPECT_EQ(s1, s2);
    EXPECT_EQ(s1, s3);
  }
}

// ---------------- SsmScan ----------------

struct SsmSetup {
  SsmParams p;
  int64_t width, ldxbc, lddt;
  std::vector<float> A_log, D, dt_bias;
  explicit SsmSetup(int64_t nheads = 6, int64_t headdim = 20, int64_t d_state = 13,
                    int64_t ngroups = 2) {
    p.nheads = nheads;
    p.headdim = headdim;
    p.d_state = d_state;
    p.ngroups = ngroups;
    p.dt_min = 0.0f;
    p.dt_max = INFINITY;
    width = nheads * headdim + 2 * ngroups * d_state;
    ldxbc = width + 9;
    lddt = nheads + 3;
    A_log = RandomVec(nheads, 1, -1.0f, 1.5f);
    D = RandomVec(nheads, 2);
    dt_bias = RandomVec(nheads, 3, -3.0f, 0.5f);
    p.A_log = A_log.data();
    p.D = D.data();
    p.dt_bias = dt_bias.data();
  }
  int64_t state_size() const { return p.nheads * p.headdim * p.d_state; }
};

std::vector<double> SsmRef(const SsmSetup& s, std::vector<double>* S, const float* xbc,
                           const float* dt_raw, int64_t T) {
  const SsmParams& p = s.p;
  const int64_t H = p.nheads, P = p.headdim, N = p.d_state, G = p.ngroups;
  std::vector<double> y(T * H * P);
  for (int64_t t = 0; t < T; ++t) {
    const float* row = xbc + t * s.ldxbc;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / (H / G);
      double dt = testing::SoftplusD(double(dt_raw[t * s.lddt + h]) + p.dt_bias[h]);
      dt = std::min(std::max(dt, double(p.dt_min)), double(p.dt_max));
      const double dA = std::exp(dt * -std::exp(double(p.A_log[h])));
      for (int64_t i = 0; i < P; ++i) {
        const double x = row[h * P + i];
        double acc = 0;
        for (int64_t n = 0; n < N; ++n) {
          double& st = (*S)[(h * P + i) * N + n];
          st = dA * st + dt * x * row[H * P + g * N + n];
          acc += st * row[H * P + G * N + g * N + n];
        }
        y[t * H * P + h * P + i] = acc + p.D[h] * x;
      }
    }
  }
  return y;
}

TEST(SsmScanTest, RaggedBatchMatchesReference) {
  auto be = testing::Cpu();
  SsmSetup s;
  const std::vector<int64_t> lens = {9, 1, 0, 31, 2};
  std::vector<int64_t> offs = {0};
  for (int64_t l : lens) offs.push_back(offs.back() + l);
  const int64_t rows = offs.back(), HP = s.p.nheads * s.p.headdim;
  const auto xbc = RandomVec(rows * s.ldxbc, 4, -2, 2);
  const auto dt = RandomVec(rows * s.lddt, 5, -3, 3);
  std::vector<std::vector<float>> states;
  std::vector<std::vector<double>> ref;
  for (size_t i = 0; i < lens.size(); ++i) {
    states.push_back(RandomVec(s.state_size(), 20 + i));
    ref.emplace_back(states.back().begin(), states.back().end());
  }
  std::vector<float*> ptrs;
  for (auto& st : states) ptrs.push_back(st.data());
  std::vector<float> y(rows * HP);
  ASSERT_TRUE(be->SsmScan(xbc.data(), s.ldxbc, dt.data(), s.lddt, offs.data(), lens.size(),
                          ptrs.data(), s.p, y.data())
                  .ok());
  for (size_t i = 0; i < lens.size(); ++i) {
    const auto want = SsmRef(s, &ref[i], xbc.data() + offs[i] * s.ldxbc,
                             dt.data() + offs[i] * s.lddt, lens[i]);
    std::vector<float> got(y.begin() + offs[i] * HP, y.begin() + offs[i + 1] * HP);
    EXPECT_LT(RelError(got, want), 1e-5) << i;
    EXPECT_LT(RelError(states[i], ref[i]), 1e-5) << i;
  }
}

TEST(SsmScanTest, DtClampAndSingleGroup) {
  auto be = testing::Cpu();
  SsmSetup s(4, 7, 16, 1);
  s.p.dt_min = 0.05f;
  s.p.dt_max = 0.3f;
  const int64_t T = 17, HP = s.p.nheads * s.p.headdim;
  const auto xbc = RandomVec(T * s.ldxbc, 6);
  const auto dt = RandomVec(T * s.lddt, 7, -6, 6);
  auto state = RandomVec(s.state_size(), 8);
  std::vector<double> ref(state.begin(), state.end());
  const int64_t offs[] = {0, T};
  float* ptrs[] = {state.data()};
  std::vector<float> y(T * HP);
  ASSERT_TRUE(
      be->SsmScan(xbc.data(), s.ldxbc, dt.data(), s.lddt, offs, 1, ptrs, s.p, y.data()).ok());
  EXPECT_LT(RelError(y, SsmRef(s, &ref, xbc.data(), dt.data(), T)), 1e-5);
  EXPECT_LT(RelError(state, ref), 1e-5);
}

std::vector<float> SsmInSegments(Backend* be, const SsmSetup& s, const std::vector<float>& xbc,
                                 const std::vector<float>& dt, const std::vector<int64_t>& segs,
                                 std::vector<float>* state) {
  const int64_t HP = s.p.nheads * s.p.headdim;
  std::vector<float> y;
  int64_t start = 0;
  for (int64_t len : segs) {
    const int64_t offs[] = {0, len};
    float* ptrs[] = {state->data()};
    std::vector<float> part(len * HP);
    EXPECT_TRUE(be->SsmScan(xbc.data() + start * s.ldxbc, s.ldxbc, dt.data() + start * s.lddt,
                            s.lddt, offs, 1, ptrs, s.p, part.data())
                    .ok());
    y.insert(y.end(), part.begin(), part.end());
    start += len;
  }
  return y;
}

TEST(SsmScanTest, SegmentsAndTokenByTokenEqualOnePass) {
  auto be = testing::Cpu();
  SsmSetup s;
  const int64_t T = 41;
  const auto xbc = RandomVec(T * s.ldxbc, 9);
  const auto dt = RandomVec(T * s.lddt, 10, -3, 3);
  const auto init = RandomVec(s.state_size(), 11);
  auto s1 = init, s2 = init, s3 = init;
  const auto one = SsmInSegments(be.get(), s, xbc, dt, {T}, &s1);
  const auto segs = SsmInSegments(be.get(), s, xbc, dt, {3, 0, 1, 20, 17}, &s2);
  const auto tok = SsmInSegments(be.get(), s, xbc, dt, std::vector<int64_t>(T, 1), &s3);
  EXPECT_EQ(one, segs);
  EXPECT_EQ(one, tok);
  EXPECT_EQ(s1, s2);
  EXPECT_EQ(s1, s3);
}

TEST(SsmScanTest, BitwiseEqualAcrossThreadCounts) {
  SsmSetup s(8, 64, 32, 1);
  const int64_t T = 50;
  const auto xbc = RandomVec(T * s.ldxbc, 12);
  const auto dt = RandomVec(T * s.lddt, 13, -3, 3);
  const auto init = RandomVec(s.state_size(), 14);
  std::vector<float> y_ref, st_ref;
  for (int threads : {1, 2, 3}) {
    auto be = CreateCpuBackend(threads);
    auto st = init;
    const auto y = SsmInSegments(be.get(), s, xbc, dt, {T}, &st);
    if (y_ref.empty()) {
      y_ref = y;
      st_ref = st;
    } else {
      EXPECT_EQ(y, y_ref) << threads;
      EXPECT_EQ(st, st_ref) << threads;
    }
  }
}

// ---------------- MambaMixer ----------------

// With out_proj set, the mixer ends with out += g * out_proj^T: equal to the mixer alone followed
// by Matmul, for a ragged batch starting past row 0. A projection of the wrong width is an error.
TEST(MambaMixerTest, OutProjectionEqualsMixerThenMatmul) {
  auto be = testing::Cpu();
  SsmSetup s(4, 8, 6, 2);
  const int64_t d_inner = 32, conv_dim = s.width, ld = d_inner + conv_dim + 4 + 5;
  const int64_t offs[] = {2, 5, 5, 11}, rows_end = 11, n = 9, ld_out = n + 1;
  const auto zx = RandomVec(rows_end * ld, 20, -2, 2);
  const auto conv_w = RandomVec(conv_dim * 4, 21);
  const auto norm_w = RandomVec(d_inner, 22, 0.5f, 1.5f);
  const auto out_w = RandomVec(n * d_inner, 23);
  const auto out0 = RandomVec(rows_end * ld_out, 24);
  struct Run {
    std::vector<std::vector<float>> conv, ssm;
    std::vector<float> g, out;
  };
  // project: pass out_proj (with `cols` columns) to the op; otherwise Matmul after it.
  auto run = [&](bool project, int64_t cols, absl::Status* status) {
    Run r;
    std::vector<float*> cp, sp;
    for (int i = 0; i < 3; ++i) {
      r.conv.push_back(RandomVec(3 * conv_dim, 30 + i));
      r.ssm.push_back(RandomVec(s.state_size(), 40 + i));
    }
    for (auto& v : r.conv) cp.push_back(v.data());
    for (auto& v : r.ssm) sp.push_back(v.data());
    std::vector<float> xbc(rows_end * conv_dim), y(rows_end * d_inner);
    r.g.assign(rows_end * d_inner, 0.0f);
    r.out = out0;
    MambaMixerArgs a;
    a.zxbcdt = zx.data();
    a.ld = ld;
    a.seq_offsets = offs;
    a.host_seq_offsets = offs;
    a.num_seqs = 3;
    a.conv_states = cp.data();
    a.conv_weight = conv_w.data();
    a.conv_kernel = 4;
    a.ssm_states = sp.data();
    a.ssm = s.p;
    a.norm_weight = norm_w.data();
    a.norm_group_size = d_inner / 2;
    a.eps = 1e-5f;
    a.xbc = xbc.data();
    a.y = y.data();
    a.g = r.g.data();
    const MatrixView w{out_w.data(), DType::kF32, n, d_inner};
    if (project) {
      a.out_proj = MatrixView{out_w.data(), DType::kF32, n, cols};
      a.out = r.out.data();
      a.ld_out = ld_out;
    }
    const absl::Status st = be->MambaMixer(a);
    if (status != nullptr) {
      *status = st;
      return r;
    }
    EXPECT_TRUE(st.ok()) << st;
    if (!project) {
      EXPECT_TRUE(be->Matmul(r.g.data() + 2 * d_inner, d_inner, rows_end - 2, w, nullptr,
                             r.out.data() + 2 * ld_out, ld_out, true)
                      .ok());
    }
    return r;
  };
  const Run fused = run(true, d_inner, nullptr), separate = run(false, d_inner, nullptr);
  EXPECT_EQ(fused.out, separate.out);
  EXPECT_NE(fused.out, out0);
  EXPECT_EQ(fused.ssm, separate.ssm);
  EXPECT_EQ(fused.conv, separate.conv);

  // A projection of the wrong width is rejected before anything is written.
  absl::Status st;
  const Run bad = run(true, d_inner - 1, &st);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_EQ(bad.out, out0);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(bad.ssm[i], RandomVec(s.state_size(), 40 + i));
}

}  // namespace
}  // namespace ramba::kernels
