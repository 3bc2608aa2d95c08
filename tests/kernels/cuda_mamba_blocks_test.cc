// Backend::MambaBlocks on the CUDA backend against the CPU backend (label gpu; skipped without a
// GPU): runs of Mamba decoder blocks over a few one-token sequences, several steps in a row on
// the states each step leaves. Decode shapes take the persistent kernel
// (kernels/cuda/mamba_blocks.cu) and its thread-block-cluster variant, mostly called directly
// so that a silent fallback cannot pass for them:
// the 370M shape (also past 24 layers, two launches), odd shapes with two B/C groups and two
// norm groups, no conv bias, bitwise determinism, and the grid barrier's counters back at zero
// between launches (every step is a launch). Shapes it does not take (5 rows, a conv width of 3)
// go through Backend::MambaBlocks' per-block path and must match too.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/cuda_test_util.h"
#ifdef RAMBA_HAVE_CUDA
#include "kernels/cuda/ops.h"
#endif

namespace ramba::kernels::testing {
namespace {

struct BlocksCase {
  int64_t rows = 1, layers = 2;
  int64_t d = 1024, H = 32, P = 64, N = 128, G = 1, norm_groups = 1;
  int64_t conv_kernel = 4;
  bool conv_bias = true;
  int steps = 3;
  uint32_t seed = 1;
};

// Two B/C groups, two norm groups, no conv bias, sizes that are no power of two.
BlocksCase OddShapes() {
  return {.rows = 3,
          .layers = 5,
          .d = 200,
          .H = 6,
          .P = 48,
          .N = 40,
          .G = 2,
          .norm_groups = 2,
          .conv_bias = false,
          .seed = 7};
}

// Everything one side (CPU or GPU) needs to run the blocks: its own copies of the states.
struct Side {
  std::vector<MambaBlockArgs> blocks;
  float* h = nullptr;
  std::vector<float*> conv, ssm;  // [layer * rows + r]
};

class CudaMambaBlocksTest : public CudaOpTest {
 protected:
  struct Layer {
    Weights in_proj, out_proj;
    std::vector<float> norm_w, conv_w, conv_b, A_log, D, dt_bias, gnorm_w;
  };

  void Build(const BlocksCase& c) {
    c_ = c;
    d_inner_ = c.H * c.P;
    conv_dim_ = d_inner_ + 2 * c.G * c.N;
    in_dim_ = 2 * d_inner_ + 2 * c.G * c.N + c.H;
    layers_.clear();
    for (int64_t l = 0; l < c.layers; ++l) {
      const uint32_t s = c.seed + 100 * static_cast<uint32_t>(l);
      Layer L;
      L.in_proj = RandomWeights(in_dim_, c.d, s, 1.0f / std::sqrt(static_cast<float>(c.d)));
      L.out_proj =
          RandomWeights(c.d, d_inner_, s + 1, 0.5f / std::sqrt(static_cast<float>(d_inner_)));
      L.norm_w = RandomVec(c.d, s + 2, 0.5f, 1.5f);
      L.conv_w = RandomVec(conv_dim_ * c.conv_kernel, s + 3, -0.7f, 0.7f);
      L.conv_b = RandomVec(conv_dim_, s + 4);
      L.A_log = RandomVec(c.H, s + 5, -1.0f, 1.5f);
      L.D = RandomVec(c.H, s + 6);
      L.dt_bias = RandomVec(c.H, s + 7, -3.0f, 0.5f);
      L.gnorm_w = RandomVec(d_inner_, s + 8, 0.5f, 1.5f);
      layers_.push_back(std::move(L));
    }
    offsets_.clear();
    for (int64_t r = 0; r <= c.rows; ++r) offsets_.push_back(r);
  }

  std::vector<float> ConvState(int64_t l, int64_t r) const {
    return RandomVec((c_.conv_kernel - 1) * conv_dim_,
                     c_.seed + 7000 + static_cast<uint32_t>(l * c_.rows + r), -2.0f, 2.0f);
  }
  std::vector<float> SsmState(int64_t l, int64_t r) const {
    return RandomVec(c_.H * c_.P * c_.N, c_.seed + 9000 + static_cast<uint32_t>(l * c_.rows + r),
                     -1.0f, 1.0f);
  }
  std::vector<float> Input(int step) const {
    return RandomVec(c_.rows * c_.d, c_.seed + 50 + static_cast<uint32_t>(step), -1.0f, 1.0f);
  }

  // The blocks' arguments on one side; `gpu` places everything on the device.
  Side MakeSide(bool gpu) {
    Side s;
    auto put = [&](const std::vector<float>& v, std::vector<float>* keep) -> float* {
      if (gpu) return ToGpu(v);
      keep->assign(v.begin(), v.end());
      return keep->data();
    };
    auto keep = [&]() {
      host_keep_.emplace_back();
      return &host_keep_.back();
    };
    const int64_t rows = c_.rows;
    s.h = put(std::vector<float>(rows * c_.d), keep());
    float* zx = put(std::vector<float>(rows * in_dim_), keep());
    float* xbc = put(std::vector<float>(rows * conv_dim_), keep());
    float* y = put(std::vector<float>(rows * d_inner_), keep());
    float* g = put(std::vector<float>(rows * d_inner_), keep());
    float* xn = put(std::vector<float>(rows * c_.d), keep());
    const int64_t* offs = gpu ? ToGpu(offsets_) : offsets_.data();
    for (int64_t l = 0; l < c_.layers; ++l) {
      for (int64_t r = 0; r < rows; ++r) {
        s.conv.push_back(put(ConvState(l, r), keep()));
        s.ssm.push_back(put(SsmState(l, r), keep()));
      }
    }
    std::vector<float*> conv_ptrs = s.conv, ssm_ptrs = s.ssm;
    float* const* conv_arr = gpu ? ToGpu(conv_ptrs) : nullptr;
    float* const* ssm_arr = gpu ? ToGpu(ssm_ptrs) : nullptr;
    if (!gpu) {
      ptr_keep_.push_back(conv_ptrs);
      conv_arr = ptr_keep_.back().data();
      ptr_keep_.push_back(ssm_ptrs);
      ssm_arr = ptr_keep_.back().data();
    }
    for (int64_t l = 0; l < c_.layers; ++l) {
      const Layer& L = layers_[l];
      MambaBlockArgs b;
      b.norm_weight = put(L.norm_w, keep());
      b.eps = 1e-5f;
      b.in_proj = gpu ? L.in_proj.gpu : L.in_proj.cpu;
      b.xn = xn;
      MambaMixerArgs& m = b.mixer;
      m.zxbcdt = zx;
      m.ld = in_dim_;
      m.seq_offsets = offs;
      m.host_seq_offsets = offsets_.data();
      m.num_seqs = rows;
      m.conv_states = conv_arr + l * rows;
      m.conv_weight = put(L.conv_w, keep());
      m.conv_bias = c_.conv_bias ? put(L.conv_b, keep()) : nullptr;
      m.conv_kernel = c_.conv_kernel;
      m.ssm_states = ssm_arr + l * rows;
      m.ssm.A_log = put(L.A_log, keep());
      m.ssm.D = put(L.D, keep());
      m.ssm.dt_bias = put(L.dt_bias, keep());
      m.ssm.nheads = c_.H;
      m.ssm.headdim = c_.P;
      m.ssm.d_state = c_.N;
      m.ssm.ngroups = c_.G;
      m.ssm.dt_min = 0.0f;
      m.ssm.dt_max = INFINITY;
      m.norm_weight = put(L.gnorm_w, keep());
      m.norm_group_size = d_inner_ / c_.norm_groups;
      m.eps = 1e-5f;
      m.xbc = xbc;
      m.y = y;
      m.g = g;
      m.out_proj = gpu ? L.out_proj.gpu : L.out_proj.cpu;
      m.out = s.h;
      m.ld_out = c_.d;
      s.blocks.push_back(b);
    }
    return s;
  }

  enum class GpuPath { kPersistent, kCluster, kBackend };

  // Runs c.steps steps on both sides, comparing h after every step and the states at the end.
  void Check(const BlocksCase& c, GpuPath path, double tol = 2e-4) {
    Build(c);
    Side cpu = MakeSide(false), gpu = MakeSide(true);
    for (int step = 0; step < c.steps; ++step) {
      const std::vector<float> in = Input(step);
      std::copy(in.begin(), in.end(), cpu.h);
      ASSERT_TRUE(gpu_->Upload(gpu.h, in.data(), in.size() * sizeof(float)).ok());
      ASSERT_TRUE(cpu_->MambaBlocks(cpu.blocks.data(), c.layers).ok());
      if (path != GpuPath::kBackend) {
#ifdef RAMBA_HAVE_CUDA
        auto* ctx = dynamic_cast<cuda::Context*>(gpu_.get());
        ASSERT_NE(ctx, nullptr);
        auto done = path == GpuPath::kCluster
                        ? cuda::ClusterMambaBlocks(*ctx, gpu.blocks.data(), c.layers)
                        : cuda::PersistentMambaBlocks(*ctx, gpu.blocks.data(), c.layers);
        ASSERT_TRUE(done.ok()) << done.status();
        ASSERT_TRUE(*done) << "the persistent kernel declined a shape it should take";
#endif
      } else {
        const absl::Status st = gpu_->MambaBlocks(gpu.blocks.data(), c.layers);
        ASSERT_TRUE(st.ok()) << st;
      }
      const std::vector<float> want(cpu.h, cpu.h + c.rows * c.d);
      EXPECT_LE(NormRelError(FromGpu(gpu.h, c.rows * c.d), want), tol) << "h after step " << step;
    }
    for (size_t i = 0; i < cpu.conv.size(); ++i) {
      const int64_t nconv = (c.conv_kernel - 1) * conv_dim_, nssm = c.H * c.P * c.N;
      const std::vector<float> conv_want(cpu.conv[i], cpu.conv[i] + nconv);
      const std::vector<float> ssm_want(cpu.ssm[i], cpu.ssm[i] + nssm);
      EXPECT_LE(NormRelError(FromGpu(gpu.conv[i], nconv), conv_want), tol) << "conv state " << i;
      EXPECT_LE(NormRelError(FromGpu(gpu.ssm[i], nssm), ssm_want), tol) << "ssm state " << i;
    }
  }

  BlocksCase c_;
  int64_t d_inner_ = 0, conv_dim_ = 0, in_dim_ = 0;
  std::vector<Layer> layers_;
  std::vector<int64_t> offsets_;
  std::vector<std::vector<float>> host_keep_;
  std::vector<std::vector<float*>> ptr_keep_;
};

TEST_F(CudaMambaBlocksTest, Reference370MShapeOneRow) {
  Check({.rows = 1, .layers = 3}, GpuPath::kPersistent);
}

TEST_F(CudaMambaBlocksTest, Reference370MShapeFourRowsPastOneLaunch) {
  // 26 layers: two launches of the kernel per step (24 + 2).
  Check({.rows = 4, .layers = 26, .steps = 2}, GpuPath::kPersistent);
}

TEST_F(CudaMambaBlocksTest, OneRowReducePastOneLaunch) {
  // One row and one norm group take the two-phase variant (out_proj partials summed in fixed
  // point). 25 layers: a launch of 24 and one of a single layer, each of which must leave its
  // sums at zero for the next launch and the next step.
  Check({.rows = 1, .layers = 25, .steps = 2, .seed = 23}, GpuPath::kPersistent);
  Check({.rows = 1, .layers = 4, .d = 256, .H = 8, .P = 64, .N = 64, .seed = 25},
        GpuPath::kPersistent);
}

TEST_F(CudaMambaBlocksTest, OneRowThreePhasesWhenReduceSwitchedOff) {
  ScopedEnv off("RAMBA_CUDA_MAMBA_REDUCE", "0");
  Check({.rows = 1, .layers = 25, .steps = 2, .seed = 23}, GpuPath::kPersistent);
}

TEST_F(CudaMambaBlocksTest, OddShapesGroupsNoBias) { Check(OddShapes(), GpuPath::kPersistent); }

TEST_F(CudaMambaBlocksTest, TinyShape) {
  Check({.rows = 2, .layers = 4, .d = 256, .H = 8, .P = 64, .N = 64, .seed = 3},
        GpuPath::kPersistent);
}

TEST_F(CudaMambaBlocksTest, ClusterKernel370MShapeOneAndTwoRows) {
  Check({.rows = 1, .layers = 3}, GpuPath::kCluster);
  Check({.rows = 2, .layers = 3, .seed = 21}, GpuPath::kCluster);
}

TEST_F(CudaMambaBlocksTest, ClusterKernelPastOneLaunch) {
  Check({.rows = 2, .layers = 26, .steps = 2}, GpuPath::kCluster);
}

TEST_F(CudaMambaBlocksTest, ClusterKernelOddShapesGroupsNoBias) {
  Check(OddShapes(), GpuPath::kCluster);
}

TEST_F(CudaMambaBlocksTest, ClusterKernelTinyShape) {
  Check({.rows = 2, .layers = 4, .d = 256, .H = 8, .P = 64, .N = 64, .seed = 3}, GpuPath::kCluster);
}

TEST_F(CudaMambaBlocksTest, BackendTakesThePersistentKernelWhenSwitchedOn) {
  ScopedEnv on("RAMBA_CUDA_PERSISTENT_MAMBA", "1");
  Check({.rows = 2, .layers = 2, .seed = 5}, GpuPath::kBackend);
}

TEST_F(CudaMambaBlocksTest, FiveRowsFallBackToBlockByBlock) {
  ScopedEnv on("RAMBA_CUDA_PERSISTENT_MAMBA", "1");
  Check({.rows = 5, .layers = 2, .d = 256, .H = 8, .P = 64, .N = 64, .seed = 9}, GpuPath::kBackend);
}

TEST_F(CudaMambaBlocksTest, ConvWidthThreeFallsBack) {
  ScopedEnv on("RAMBA_CUDA_PERSISTENT_MAMBA", "1");
  Check({.rows = 1, .layers = 2, .d = 256, .H = 8, .P = 64, .N = 64, .conv_kernel = 3, .seed = 11},
        GpuPath::kBackend);
}

TEST_F(CudaMambaBlocksTest, BlockByBlockWhenSwitchedOffMatchesToo) {
  ScopedEnv off("RAMBA_CUDA_PERSISTENT_MAMBA", "0");
  Check({.rows = 1, .layers = 2, .seed = 13}, GpuPath::kBackend);
}

TEST_F(CudaMambaBlocksTest, DefaultPathMatchesAtOneTwoAndThreeRows) {
  // Unset: the persistent kernel at 1 row, the cluster kernel at 2, block by block above
  // (cuda_backend.cc).
  for (int rows : {1, 2, 3}) Check({.rows = rows, .layers = 2, .seed = 17}, GpuPath::kBackend);
}

#ifdef RAMBA_HAVE_CUDA
TEST_F(CudaMambaBlocksTest, BitwiseDeterministic) {
  // Two runs from the same states and input give the same bits.
  std::vector<std::vector<float>> outs;
  // The persistent kernel at 3 rows and at 1 (its fixed-point variant), then the cluster kernel,
  // twice each.
  for (int run = 0; run < 6; ++run) {
    Build({.rows = run < 2 ? 3 : (run < 4 ? 1 : 2), .layers = 4, .seed = 17});
    Side gpu = MakeSide(true);
    const std::vector<float> in = Input(0);
    ASSERT_TRUE(gpu_->Upload(gpu.h, in.data(), in.size() * sizeof(float)).ok());
    auto* ctx = dynamic_cast<cuda::Context*>(gpu_.get());
    ASSERT_NE(ctx, nullptr);
    auto done = run < 4 ? cuda::PersistentMambaBlocks(*ctx, gpu.blocks.data(), 4)
                        : cuda::ClusterMambaBlocks(*ctx, gpu.blocks.data(), 4);
    ASSERT_TRUE(done.ok() && *done);
    outs.push_back(FromGpu(gpu.h, c_.rows * c_.d));
  }
  EXPECT_EQ(outs[0], outs[1]);
  EXPECT_EQ(outs[2], outs[3]);
  EXPECT_EQ(outs[4], outs[5]);
}
#endif

}  // namespace
}  // namespace ramba::kernels::testing
