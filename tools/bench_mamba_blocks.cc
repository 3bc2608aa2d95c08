// bench-mamba-blocks: a decode step's run of Mamba blocks (Backend::MambaBlocks, 370M shapes,
// random weights) at a few batch sizes, side by side: the persistent kernel
// (kernels/cuda/mamba_blocks.cu, RAMBA_CUDA_PERSISTENT_MAMBA=1), its cluster variant (=2) and
// block by block (=0), each in a CUDA graph, against the bytes floor (weights + states read and
// written). With --trace, where both persistent kernels' time goes: each phase's clock cycles
// per layer, averaged over blocks and layers, and the slowest block's.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "kernels/backend.h"
#include "tools/bench_util.h"
#ifdef RAMBA_HAVE_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/ops.h"
#endif

ABSL_FLAG(std::string, device, "cuda", "cpu, cuda or auto");
ABSL_FLAG(int32_t, layers, 24, "Mamba blocks in the run (370M: 24 lower, then runs of 8)");
ABSL_FLAG(std::string, batches, "1,2,4", "Comma-separated batch sizes (one token per sequence)");
ABSL_FLAG(int32_t, reps, 20, "Timed repetitions");
ABSL_FLAG(bool, trace, false, "Print the persistent kernel's phase breakdown (CUDA)");
ABSL_FLAG(std::string, gemv_probe, "",
          "COLSxK,... : time one GEMV phase alone per shape (CUDA; e.g. 55x1024,64x288) and exit");

namespace {

using ramba::kernels::Backend;
using ramba::kernels::Buffer;
using ramba::kernels::DType;
using ramba::kernels::MambaBlockArgs;
using ramba::kernels::MatrixView;

// 370M shapes (model/config.cc Reference370MConfig).
constexpr int64_t kD = 1024, kH = 32, kP = 64, kN = 128, kDInner = kH * kP;
constexpr int64_t kConvDim = kDInner + 2 * kN, kInDim = 2 * kDInner + 2 * kN + kH;

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "bench-mamba-blocks: %s\n", std::string(s.message()).c_str());
  return 1;
}

class Arena {
 public:
  explicit Arena(Backend* be) : be_(be) {}
  // A device copy of v that lives as long as the arena (null, and ok() false, on failure).
  template <class T>
  T* Put(const std::vector<T>& v) {
    auto b = ramba::bench::Put(be_, v);
    if (!b.ok()) {
      ok_ = false;
      return nullptr;
    }
    T* p = b->template as<T>();
    keep_.push_back(*std::move(b));
    return p;
  }
  bool ok() const { return ok_; }

 private:
  Backend* be_;
  std::vector<Buffer> keep_;
  bool ok_ = true;
};

std::vector<float> Uniform(int64_t n, uint32_t seed, float lo, float hi) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

std::vector<uint16_t> Bf16(const std::vector<float>& v) {
  std::vector<uint16_t> h(v.size());
  for (size_t i = 0; i < v.size(); ++i) h[i] = ramba::kernels::F32ToBf16(v[i]);
  return h;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  auto backend = ramba::kernels::CreateBackend(absl::GetFlag(FLAGS_device));
  if (!backend.ok()) return Fail(backend.status());
  Backend* be = backend->get();
  const int64_t layers = absl::GetFlag(FLAGS_layers);
  const int reps = absl::GetFlag(FLAGS_reps);
  if (layers < 1 || reps < 1) return Fail(absl::InvalidArgumentError("--layers, --reps >= 1"));
  std::vector<int64_t> batches;
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_batches), ',')) {
    int64_t b = 0;
    if (!absl::SimpleAtoi(part, &b) || b < 1) return Fail(absl::InvalidArgumentError("--batches"));
    batches.push_back(b);
  }
  const double bw = ramba::bench::MeasureCopyBandwidth(be);
  std::printf("device=%s copy bandwidth %.0f GB/s; %lld Mamba blocks of the 370M shape\n",
              std::string(be->name()).c_str(), bw, static_cast<long long>(layers));

#ifdef RAMBA_HAVE_CUDA
  if (!absl::GetFlag(FLAGS_gemv_probe).empty() && be->name() == "cuda") {
    auto* ctx = dynamic_cast<ramba::kernels::cuda::Context*>(be);
    int khz = 0;
    cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, ctx->device);
    for (absl::string_view shape : absl::StrSplit(absl::GetFlag(FLAGS_gemv_probe), ',')) {
      std::vector<absl::string_view> ck = absl::StrSplit(shape, 'x');
      int cols = 0, k = 0;
      if (ck.size() != 2 || !absl::SimpleAtoi(ck[0], &cols) || !absl::SimpleAtoi(ck[1], &k)) {
        return Fail(absl::InvalidArgumentError("--gemv_probe: COLSxK,..."));
      }
      auto c = ramba::kernels::cuda::ProbeMambaGemv(*ctx, cols, k);
      if (!c.ok()) return Fail(c.status());
      static const char* kVariants[5] = {"kernels' GEMV", "two FMA chains", "loads only",
                                         "k in 2 parts", "k in 4 parts"};
      for (int v = 0; v < 5; ++v) {
        std::printf("gemv %3d x %4d  %-15s warp 0 %6.0f cycles, block %6.0f (%.2f us)\n", cols, k,
                    kVariants[v], (*c)[2 * v], (*c)[2 * v + 1], (*c)[2 * v + 1] / (khz / 1e3));
      }
    }
    return 0;
  }
#endif
  Arena arena(be);
  struct Layer {
    MatrixView in_proj, out_proj;
    float *norm, *conv_w, *conv_b, *A_log, *D, *dt_bias, *gnorm;
  };
  std::vector<Layer> w(layers);
  for (int64_t l = 0; l < layers; ++l) {
    const uint32_t s = 1000 * static_cast<uint32_t>(l);
    const float si = 1.0f / std::sqrt(static_cast<float>(kD));
    const float so = 0.5f / std::sqrt(static_cast<float>(kDInner));
    w[l].in_proj = {arena.Put(Bf16(Uniform(kInDim * kD, s, -si, si))), DType::kBF16, kInDim, kD};
    w[l].out_proj = {arena.Put(Bf16(Uniform(kD * kDInner, s + 1, -so, so))), DType::kBF16, kD,
                     kDInner};
    w[l].norm = arena.Put(Uniform(kD, s + 2, 0.5f, 1.5f));
    w[l].conv_w = arena.Put(Uniform(kConvDim * 4, s + 3, -0.7f, 0.7f));
    w[l].conv_b = arena.Put(Uniform(kConvDim, s + 4, -1.0f, 1.0f));
    w[l].A_log = arena.Put(Uniform(kH, s + 5, -1.0f, 1.5f));
    w[l].D = arena.Put(Uniform(kH, s + 6, -1.0f, 1.0f));
    w[l].dt_bias = arena.Put(Uniform(kH, s + 7, -3.0f, 0.5f));
    w[l].gnorm = arena.Put(Uniform(kDInner, s + 8, 0.5f, 1.5f));
  }
  if (!arena.ok()) return Fail(absl::ResourceExhaustedError("weights"));
  const double weight_bytes = layers * (kInDim * kD + kD * kDInner) * 2.0;

  for (int64_t rows : batches) {
    std::vector<int64_t> offsets(rows + 1);
    for (int64_t r = 0; r <= rows; ++r) offsets[r] = r;
    std::vector<float*> conv, ssm;
    for (int64_t i = 0; i < layers * rows; ++i) {
      conv.push_back(arena.Put(Uniform(3 * kConvDim, 7 + static_cast<uint32_t>(i), -1, 1)));
      ssm.push_back(arena.Put(std::vector<float>(kH * kP * kN, 0.01f)));
    }
    float* const* conv_arr = arena.Put(conv);
    float* const* ssm_arr = arena.Put(ssm);
    const int64_t* d_offsets = arena.Put(offsets);
    float* h = arena.Put(Uniform(rows * kD, 3, -1, 1));
    float* zx = arena.Put(std::vector<float>(rows * kInDim));
    float* xbc = arena.Put(std::vector<float>(rows * kConvDim));
    float* y = arena.Put(std::vector<float>(rows * kDInner));
    float* g = arena.Put(std::vector<float>(rows * kDInner));
    float* xn = arena.Put(std::vector<float>(rows * kD));
    if (!arena.ok()) return Fail(absl::ResourceExhaustedError("states"));
    std::vector<MambaBlockArgs> blocks(layers);
    for (int64_t l = 0; l < layers; ++l) {
      MambaBlockArgs& b = blocks[l];
      b.norm_weight = w[l].norm;
      b.eps = 1e-5f;
      b.in_proj = w[l].in_proj;
      b.xn = xn;
      auto& m = b.mixer;
      m.zxbcdt = zx;
      m.ld = kInDim;
      m.seq_offsets = d_offsets;
      m.host_seq_offsets = offsets.data();
      m.num_seqs = rows;
      m.conv_states = conv_arr + l * rows;
      m.conv_weight = w[l].conv_w;
      m.conv_bias = w[l].conv_b;
      m.conv_kernel = 4;
      m.ssm_states = ssm_arr + l * rows;
      m.ssm = {w[l].A_log, w[l].D, w[l].dt_bias, kH, kP, kN, 1, 0.0f, INFINITY};
      m.norm_weight = w[l].gnorm;
      m.norm_group_size = kDInner;
      m.eps = 1e-5f;
      m.xbc = xbc;
      m.y = y;
      m.g = g;
      m.out_proj = w[l].out_proj;
      m.out = h;
      m.ld_out = kD;
    }
    auto run = [&] { return be->MambaBlocks(blocks.data(), layers); };
    constexpr int kGraphSteps = 8;
    auto time = [&] {  // in a graph where the backend has them
      const double t = ramba::bench::InGraphSeconds(be, reps, kGraphSteps, run);
      return std::isnan(t) ? ramba::bench::MedianSeconds(be, reps, run) : t;
    };
    setenv("RAMBA_CUDA_PERSISTENT_MAMBA", "2", 1);
    const double t_cluster = time();
    setenv("RAMBA_CUDA_PERSISTENT_MAMBA", "1", 1);
    const double t_persistent = time();
    setenv("RAMBA_CUDA_PERSISTENT_MAMBA", "0", 1);
    const double t_blocks = time();
    unsetenv("RAMBA_CUDA_PERSISTENT_MAMBA");
    // Floor: weights once, each row's SSM and conv states read and written.
    const double state_bytes = 2.0 * layers * rows * (kH * kP * kN + 3 * kConvDim) * 4.0;
    const double floor = (weight_bytes + state_bytes) / (bw * 1e9);
    std::printf(
        "batch %3lld: persistent %7.1f us (%.2f us/layer, %.2fx floor) | block by block %7.1f us "
        "(%.2f us/layer, %.2fx) | floor %.1f us (%.1f MB) | persistent %.2fx faster\n",
        static_cast<long long>(rows), 1e6 * t_persistent, 1e6 * t_persistent / layers,
        t_persistent / floor, 1e6 * t_blocks, 1e6 * t_blocks / layers, t_blocks / floor,
        1e6 * floor, (weight_bytes + state_bytes) / 1e6, t_blocks / t_persistent);
    std::printf("           cluster %7.1f us (%.2f us/layer, %.2fx floor)\n", 1e6 * t_cluster,
                1e6 * t_cluster / layers, t_cluster / floor);

#ifdef RAMBA_HAVE_CUDA
    if (absl::GetFlag(FLAGS_trace) && be->name() == "cuda" && layers <= 24) {
      auto* ctx = dynamic_cast<ramba::kernels::cuda::Context*>(be);
      constexpr int P = ramba::kernels::cuda::kMambaBlocksTracePoints;
      const int64_t G = ctx->num_sms, n = layers * P * G;
      auto buf = be->Allocate(n * sizeof(long long));
      if (!buf.ok()) return Fail(buf.status());
      std::vector<long long> t(n);
      for (int variant = 0; variant < 2; ++variant) {
        for (int rep = 0; rep < 3; ++rep) {  // the last of three launches
          if (auto s = be->Zero(buf->data(), n * sizeof(long long)); !s.ok()) return Fail(s);
          auto done = variant == 0 ? ramba::kernels::cuda::PersistentMambaBlocks(
                                         *ctx, blocks.data(), layers, buf->as<long long>())
                                   : ramba::kernels::cuda::ClusterMambaBlocks(
                                         *ctx, blocks.data(), layers, buf->as<long long>());
          if (!done.ok()) return Fail(done.status());
          if (!*done) return Fail(absl::InternalError("the persistent kernel declined"));
          if (auto s = be->Download(t.data(), buf->data(), n * sizeof(long long)); !s.ok()) {
            return Fail(s);
          }
        }
        int khz = 0;
        cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, ctx->device);
        static const char* kNames[P] = {"   (layer start)",
                                        "A  poll h",
                                        "A  squares, wait in_proj tile",
                                        "A  GEMV",
                                        "A  reduce, conv, hand over, load next conv inputs",
                                        "B  poll inputs",
                                        "B  dt, wait state tiles",
                                        "B  SSM update, hand over",
                                        "C  poll g, sums",
                                        "C  norm scales, wait tile",
                                        "C  GEMV",
                                        "C  reduce, hand over h",
                                        "   (next layer)"};
        static const char* kClusterNames[P] = {
            "A  wait in_proj tile",       "A  squares",
            "A  wait conv inputs, sync",  "A  GEMV (warp 0)",
            "A  GEMV sync, prefetch",     "A  reduce, conv, push, next inputs",
            "A  cluster barrier",         "B  dt, wait states",
            "B  SSM update, push g",      "B  cluster barrier",
            "C  wait tile, group scales", "C  GEMV, post partials",
            "C  poll partials, push h",   "C  cluster barrier",
            "C  B/C conv states",         "   (next layer)"};
        std::printf("  %s kernel\n", variant == 0 ? "persistent" : "cluster");
        std::printf(
            "  phase (cycles per layer; layers 1..%lld; clock %d MHz)   mean    slowest  fastest"
            " block\n",
            static_cast<long long>(layers - 1), khz / 1000);
        // The grid-wide kernel records 13 points, the cluster kernel all P.
        const int points = variant == 0 ? 13 : P;
        double total = 0;
        for (int k = 0; k < points; ++k) {
          double sum = 0, worst_sum = 0, best_sum = 0;
          int64_t count = 0, worst_count = 0;
          for (int64_t l = 1; l + (k == points - 1 ? 1 : 0) < layers; ++l) {
            double worst = 0, best = 1e30;
            bool any = false;
            for (int64_t b = 0; b < G; ++b) {
              const long long t0 = t[(l * P + k) * G + b];
              const long long t1 =
                  k + 1 < points ? t[(l * P + k + 1) * G + b] : t[((l + 1) * P) * G + b];
              if (t0 == 0 || t1 == 0) continue;  // a block without phase-B items skips some
              sum += static_cast<double>(t1 - t0);
              ++count;
              worst = std::max(worst, static_cast<double>(t1 - t0));
              best = std::min(best, static_cast<double>(t1 - t0));
              any = true;
            }
            if (any) {
              worst_sum += worst;
              best_sum += best;
              ++worst_count;
            }
          }
          const double mean = count > 0 ? sum / count : 0;
          total += mean;
          std::printf("  %-34s %8.0f (%5.2f us) %8.0f %8.0f\n",
                      variant == 0 ? kNames[k] : kClusterNames[k], mean, mean / (khz / 1e3),
                      worst_count > 0 ? worst_sum / worst_count : 0,
                      worst_count > 0 ? best_sum / worst_count : 0);
        }
        std::printf("  sum of means: %.0f cycles = %.2f us per layer\n", total,
                    total / (khz / 1e3));
      }
    }
#endif
  }
  return 0;
}
