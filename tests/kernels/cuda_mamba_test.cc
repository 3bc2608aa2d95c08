// CausalConv1dSilu and SsmScan on the CUDA backend against the CPU backend (label gpu; skipped
// without a GPU): ragged batches with empty and one-row sequences, batches that start past row 0,
// long prefill, decode batches, odd shapes, the 370M shape, state continuation across calls, and
// every scan path: chunk-parallel (the default for long sequences), the sequential tiled kernel
// (RAMBA_CUDA_SSM_KERNEL=sequential) and the plain one (RAMBA_CUDA_SSM_KERNEL=simple).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/cuda_test_util.h"

namespace ramba::kernels::testing {
namespace {

constexpr double kTol = 1e-4;
// The chunked scan weighs each chunk's rows by exp(A * sum dt) instead of step by step; a CPU
// emulation of its arithmetic on these tests' cases stays below 4e-6 of the recurrence (worst:
// states with slowly decaying dt), and a wrong chunk boundary or carry errs by O(1).
constexpr double kChunkTol = 1e-5;
// The default chunked path computes the outputs of headdim-64, d_state 64/128 heads by the SSD
// form on tensor cores (3-product bf16, kernels/cuda/mamba_ssd.cu): ~1e-5 of the recurrence,
// where one bf16 product would err ~4e-3.
constexpr double kSsdTol = 5e-5;
constexpr int64_t kChunkRows = 256;  // L in kernels/cuda/mamba.cu; sequences > 2 L are chunked

std::vector<int64_t> Offsets(int64_t base, const std::vector<int64_t>& lens) {
  std::vector<int64_t> offs = {base};
  for (int64_t l : lens) offs.push_back(offs.back() + l);
  return offs;
}

// True when every float of v[begin, end) still has the 0xFF poison pattern.
bool StillPoisoned(const std::vector<float>& v, size_t begin, size_t end) {
  for (size_t i = begin; i < end; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &v[i], sizeof(bits));
    if (bits != 0xFFFFFFFFu) return false;
  }
  return true;
}

std::vector<float> Slice(const std::vector<float>& v, int64_t begin, int64_t end) {
  return std::vector<float>(v.begin() + begin, v.begin() + end);
}

// Selects a scan path (RAMBA_CUDA_SSM_KERNEL) for the lifetime of the object; null: the default.
class ScopedScanKernel {
 public:
  explicit ScopedScanKernel(const char* kernel) : on_(kernel != nullptr) {
    if (on_) setenv("RAMBA_CUDA_SSM_KERNEL", kernel, 1);
  }
  ~ScopedScanKernel() {
    if (on_) unsetenv("RAMBA_CUDA_SSM_KERNEL");
  }

 private:
  bool on_;
};

// The scan paths; "default" is chunked for sequences longer than 2 kChunkRows, with the SSD
// outputs where they take the shape; "chunked_f32" is chunked with the f32 recurrence's outputs.
const char* const kScanKernels[] = {nullptr, "chunked_f32", "sequential", "simple"};
const std::vector<const char*> kChunkedKernels = {nullptr, "chunked_f32", "sequential"};

// The default path may use the SSD outputs: its tolerance is at least kSsdTol.
double TolFor(const char* kernel, double tol) {
  return kernel == nullptr ? std::max(tol, kSsdTol) : tol;
}
std::string KernelName(const char* kernel) { return kernel != nullptr ? kernel : "default"; }

// ---------------- CausalConv1dSilu ----------------

struct ConvCase {
  std::vector<int64_t> lens;
  int64_t base = 0;  // first row of the batch; rows before it must stay untouched
  int64_t channels = 45;
  int64_t kernel = 4;
  int64_t ldx = 50;
  bool bias = true;
  uint32_t seed = 1;
};

struct ConvData {
  std::vector<int64_t> offs;
  std::vector<float> x, weight, bias;
  std::vector<std::vector<float>> states;  // [kernel - 1, channels] each (one float if kernel 1)
};

ConvData MakeConv(const ConvCase& c) {
  ConvData d;
  d.offs = Offsets(c.base, c.lens);
  d.x = RandomVec(d.offs.back() * c.ldx, c.seed, -2.0f, 2.0f);
  d.weight = RandomVec(c.channels * c.kernel, c.seed + 1);
  if (c.bias) d.bias = RandomVec(c.channels, c.seed + 2);
  for (size_t s = 0; s < c.lens.size(); ++s) {
    d.states.push_back(RandomVec(std::max<int64_t>(1, (c.kernel - 1) * c.channels),
                                 c.seed + 10 + static_cast<uint32_t>(s), -2.0f, 2.0f));
  }
  return d;
}

class CudaMambaTest : public CudaOpTest {
 protected:
  // CPU reference: y over all rows (rows before base are zero) and the updated states.
  void ConvCpu(const ConvCase& c, const ConvData& d, std::vector<float>* y,
               std::vector<std::vector<float>>* states) {
    *states = d.states;
    std::vector<float*> ptrs;
    for (auto& s : *states) ptrs.push_back(s.data());
    y->assign(d.offs.back() * c.channels, 0.0f);
    ASSERT_TRUE(cpu_->CausalConv1dSilu(d.x.data(), c.ldx, d.offs.data(), c.lens.size(),
                                       ptrs.data(), d.weight.data(),
                                       c.bias ? d.bias.data() : nullptr, c.channels, c.kernel,
                                       y->data(), d.offs.data())
                    .ok());
  }

  // Device copies of the states and of the pointer array to them.
  float* const* StatesToGpu(const std::vector<std::vector<float>>& states,
                            std::vector<float*>* dev) {
    dev->clear();
    for (const auto& s : states) dev->push_back(ToGpu(s));
    return ToGpu(*dev);
  }
  std::vector<std::vector<float>> StatesFromGpu(const std::vector<float*>& dev,
                                                const std::vector<std::vector<float>>& like) {
    std::vector<std::vector<float>> out;
    for (size_t s = 0; s < dev.size(); ++s) out.push_back(FromGpu(dev[s], like[s].size()));
    return out;
  }

  void ConvGpu(const ConvCase& c, const ConvData& d, std::vector<float>* y,
               std::vector<std::vector<float>>* states) {
    std::vector<float*> dev_states;
    float* const* d_ptrs = StatesToGpu(d.states, &dev_states);
    const int64_t n = d.offs.back() * c.channels;
    float* d_y = Poisoned<float>(n);
    const absl::Status st = gpu_->CausalConv1dSilu(
        ToGpu(d.x), c.ldx, ToGpu(d.offs), c.lens.size(), d_ptrs, ToGpu(d.weight),
        c.bias ? ToGpu(d.bias) : nullptr, c.channels, c.kernel, d_y, d.offs.data());
    ASSERT_TRUE(st.ok()) << st;
    *y = FromGpu(d_y, n);
    *states = StatesFromGpu(dev_states, d.states);
  }

  void CheckConv(const ConvCase& c) {
    SCOPED_TRACE(::testing::Message() << "channels " << c.channels << " kernel " << c.kernel
                                      << " ldx " << c.ldx << " bias " << c.bias << " base "
                                      << c.base << " seqs " << c.lens.size());
    const ConvData d = MakeConv(c);
    std::vector<float> y_cpu, y_gpu;
    std::vector<std::vector<float>> s_cpu, s_gpu;
    ConvCpu(c, d, &y_cpu, &s_cpu);
    ConvGpu(c, d, &y_gpu, &s_gpu);
    const int64_t b = c.base * c.channels, e = d.offs.back() * c.channels;
    EXPECT_TRUE(StillPoisoned(y_gpu, 0, b)) << "rows before the batch were written";
    EXPECT_LE(NormRelError(Slice(y_gpu, b, e), Slice(y_cpu, b, e)), kTol);
    for (size_t s = 0; s < c.lens.size(); ++s) {
      // States are copies of inputs: exact.
      if (c.kernel > 1) EXPECT_EQ(s_gpu[s], s_cpu[s]) << "state " << s;
    }
  }
};

TEST_F(CudaMambaTest, ConvRaggedBatchesMatchCpu) {
  for (int64_t kernel : {2, 3, 4}) {
    for (bool bias : {true, false}) {
      ConvCase c;
      c.lens = {0, 1, 2, 3, 5, 37, 700, 0};
      c.kernel = kernel;
      c.bias = bias;
      c.seed = static_cast<uint32_t>(100 + kernel * 2 + bias);
      CheckConv(c);
      // More channels than one block, odd; the batch starts at row 3.
      c.channels = 301;
      c.ldx = 320;
      c.base = 3;
      c.lens = {2, 0, 1, 37, 3};
      CheckConv(c);
    }
  }
}

TEST_F(CudaMambaTest, ConvKernelOneHasNoState) {
  ConvCase c;
  c.lens = {3, 0, 9};
  c.kernel = 1;
  CheckConv(c);
}

TEST_F(CudaMambaTest, ConvLongPrefillAndDecodeBatch) {
  ConvCase prefill;  // 370M shape: 2048 + 2 * 128 channels inside the in_proj output
  prefill.lens = {5000};
  prefill.channels = 2304;
  prefill.ldx = 4384;
  CheckConv(prefill);
  ConvCase decode = prefill;
  decode.lens.assign(256, 1);
  decode.seed = 7;
  CheckConv(decode);
  decode.lens.assign(256, 2);  // shorter than the state: old and new rows mix
  decode.seed = 8;
  CheckConv(decode);
}

TEST_F(CudaMambaTest, ConvTwoCallsEqualOneCall) {
  ConvCase c;
  c.lens = {777};
  c.channels = 640;  // tiny model: 512 + 2 * 64
  c.ldx = 700;
  const ConvData d = MakeConv(c);
  std::vector<float> y_one, y_cpu;
  std::vector<std::vector<float>> s_one, s_cpu;
  ConvGpu(c, d, &y_one, &s_one);
  ConvCpu(c, d, &y_cpu, &s_cpu);
  EXPECT_LE(NormRelError(y_one, y_cpu), kTol);
  EXPECT_EQ(s_one, s_cpu);
  // Rows [0, 300) then [300, 777), the second call addressing its rows by absolute offsets, and
  // splits inside the state window.
  for (int64_t split : {300, 1, 2, 776}) {
    std::vector<float*> dev_states;
    float* const* d_ptrs = StatesToGpu(d.states, &dev_states);
    float* d_x = ToGpu(d.x);
    float* d_w = ToGpu(d.weight);
    float* d_b = ToGpu(d.bias);
    float* d_y = Poisoned<float>(777 * c.channels);
    for (const std::vector<int64_t>& offs :
         {std::vector<int64_t>{0, split}, std::vector<int64_t>{split, 777}}) {
      ASSERT_TRUE(gpu_->CausalConv1dSilu(d_x, c.ldx, ToGpu(offs), 1, d_ptrs, d_w, d_b,
                                         c.channels, c.kernel, d_y, offs.data())
                      .ok());
    }
    EXPECT_EQ(FromGpu(d_y, 777 * c.channels), y_one) << split;
    EXPECT_EQ(StatesFromGpu(dev_states, d.states), s_one) << split;
  }
}

// ---------------- SsmScan ----------------

struct SsmCase {
  int64_t H = 6, P = 24, N = 16, G = 2;
  std::vector<int64_t> lens;
  int64_t base = 0;
  bool clamp = false;
  bool long_memory = false;  // dt clamped to [0.001, 0.01]: states carry across many chunks
  int64_t ld_pad = 5;        // ldxbc - width; a multiple of 4 aligns rows to 16 bytes
  uint32_t seed = 1;
};

struct SsmData {
  SsmParams p;  // host pointers (CPU backend)
  std::vector<float> A_log, D, dt_bias;
  int64_t ldxbc = 0, lddt = 0, hp = 0;
  std::vector<int64_t> offs;
  std::vector<float> xbc, dt;
  std::vector<std::vector<float>> states;
};

SsmData MakeSsm(const SsmCase& c) {
  SsmData d;
  d.p.nheads = c.H;
  d.p.headdim = c.P;
  d.p.d_state = c.N;
  d.p.ngroups = c.G;
  d.p.dt_min = c.long_memory ? 0.001f : c.clamp ? 0.01f : 0.0f;
  d.p.dt_max = c.long_memory ? 0.01f : c.clamp ? 0.2f : INFINITY;
  d.hp = c.H * c.P;
  d.ldxbc = d.hp + 2 * c.G * c.N + c.ld_pad;
  d.lddt = c.H + 3;
  d.A_log = RandomVec(c.H, c.seed, -1.0f, 1.5f);
  d.D = RandomVec(c.H, c.seed + 1);
  d.dt_bias = RandomVec(c.H, c.seed + 2, -3.0f, 0.5f);
  d.p.A_log = d.A_log.data();
  d.p.D = d.D.data();
  d.p.dt_bias = d.dt_bias.data();
  d.offs = Offsets(c.base, c.lens);
  d.xbc = RandomVec(d.offs.back() * d.ldxbc, c.seed + 3, -2.0f, 2.0f);
  d.dt = RandomVec(d.offs.back() * d.lddt, c.seed + 4, -4.0f, 4.0f);
  for (size_t s = 0; s < c.lens.size(); ++s) {
    d.states.push_back(RandomVec(c.H * c.P * c.N, c.seed + 10 + static_cast<uint32_t>(s)));
  }
  return d;
}

class CudaSsmTest : public CudaMambaTest {
 protected:
  void SsmCpu(const SsmData& d, std::vector<float>* y, std::vector<std::vector<float>>* states) {
    *states = d.states;
    std::vector<float*> ptrs;
    for (auto& s : *states) ptrs.push_back(s.data());
    y->assign(d.offs.back() * d.hp, 0.0f);
    ASSERT_TRUE(cpu_->SsmScan(d.xbc.data(), d.ldxbc, d.dt.data(), d.lddt, d.offs.data(),
                              d.states.size(), ptrs.data(), d.p, y->data(), d.offs.data())
                    .ok());
  }

  SsmParams GpuParams(const SsmData& d) {
    SsmParams p = d.p;
    p.A_log = ToGpu(d.A_log);
    p.D = ToGpu(d.D);
    p.dt_bias = ToGpu(d.dt_bias);
    return p;
  }

  void SsmGpu(const SsmData& d, std::vector<float>* y, std::vector<std::vector<float>>* states) {
    std::vector<float*> dev_states;
    float* const* d_ptrs = StatesToGpu(d.states, &dev_states);
    const int64_t n = d.offs.back() * d.hp;
    float* d_y = Poisoned<float>(n);
    const absl::Status st =
        gpu_->SsmScan(ToGpu(d.xbc), d.ldxbc, ToGpu(d.dt), d.lddt, ToGpu(d.offs), d.states.size(),
                      d_ptrs, GpuParams(d), d_y, d.offs.data());
    ASSERT_TRUE(st.ok()) << st;
    *y = FromGpu(d_y, n);
    *states = StatesFromGpu(dev_states, d.states);
  }

  // The given GPU scan paths (default: all three) against the CPU backend: outputs of the whole
  // batch and each sequence's own rows, and every state.
  void CheckSsm(const SsmCase& c, double tol = kTol,
                std::vector<const char*> kernels = {std::begin(kScanKernels),
                                                    std::end(kScanKernels)}) {
    const SsmData d = MakeSsm(c);
    std::vector<float> y_cpu;
    std::vector<std::vector<float>> s_cpu;
    SsmCpu(d, &y_cpu, &s_cpu);
    for (const char* kernel : kernels) {
      SCOPED_TRACE(::testing::Message()
                   << "H " << c.H << " P " << c.P << " N " << c.N << " G " << c.G << " seqs "
                   << c.lens.size() << " base " << c.base << " clamp " << c.clamp
                   << " long_memory " << c.long_memory << " kernel " << KernelName(kernel));
      ScopedScanKernel force(kernel);
      const double ktol = TolFor(kernel, tol);
      std::vector<float> y_gpu;
      std::vector<std::vector<float>> s_gpu;
      SsmGpu(d, &y_gpu, &s_gpu);
      const int64_t b = c.base * d.hp, e = d.offs.back() * d.hp;
      EXPECT_TRUE(StillPoisoned(y_gpu, 0, b)) << "rows before the batch were written";
      EXPECT_LE(NormRelError(Slice(y_gpu, b, e), Slice(y_cpu, b, e)), ktol);
      for (size_t s = 0; s < c.lens.size(); ++s) {
        if (c.lens[s] == 0) {
          EXPECT_EQ(s_gpu[s], d.states[s]) << "empty sequence " << s << " changed its state";
          continue;
        }
        // Per sequence too: a small sequence's error must not hide behind a long one's norm.
        const int64_t sb = d.offs[s] * d.hp, se = d.offs[s + 1] * d.hp;
        EXPECT_LE(NormRelError(Slice(y_gpu, sb, se), Slice(y_cpu, sb, se)), ktol) << "y of " << s;
        EXPECT_LE(NormRelError(s_gpu[s], s_cpu[s]), ktol) << "state " << s;
      }
    }
  }
};

TEST_F(CudaSsmTest, RaggedBatchesMatchCpu) {
  const std::vector<int64_t> lens = {0, 1, 2, 3, 5, 37, 700};
  // (H, P, N, G): the odd test shape, d_state not a multiple of 32, headdim below one warp's
  // channels, d_state up to 256 (8 per lane), and above 256 (plain kernel only).
  const std::vector<std::vector<int64_t>> shapes = {
      {6, 24, 16, 2}, {6, 20, 13, 2}, {4, 7, 16, 1}, {3, 10, 200, 3}, {2, 9, 300, 1},
      {8, 64, 64, 1}};
  uint32_t seed = 1;
  for (const auto& sh : shapes) {
    for (bool clamp : {false, true}) {
      SsmCase c;
      c.H = sh[0];
      c.P = sh[1];
      c.N = sh[2];
      c.G = sh[3];
      c.lens = lens;
      c.clamp = clamp;
      c.seed = seed++;
      CheckSsm(c);
    }
  }
}

TEST_F(CudaSsmTest, BatchStartingPastRowZero) {
  SsmCase c;
  c.lens = {4, 0, 33, 1};
  c.base = 5;
  CheckSsm(c);
}

TEST_F(CudaSsmTest, LongPrefill) {
  SsmCase big;  // 370M: 32 heads x 64 x 128, one group
  big.H = 32;
  big.P = 64;
  big.N = 128;
  big.G = 1;
  big.lens = {5000};
  CheckSsm(big);
  SsmCase tiny = big;  // ramba-tiny: 8 heads x 64 x 64
  tiny.H = 8;
  tiny.N = 64;
  tiny.lens = {5000};
  tiny.clamp = true;
  CheckSsm(tiny);
  SsmCase odd;
  odd.lens = {5000};
  CheckSsm(odd);
}

TEST_F(CudaSsmTest, DecodeBatch) {
  SsmCase c;  // 256 sequences of one row each, 370M shape
  c.H = 32;
  c.P = 64;
  c.N = 128;
  c.G = 1;
  c.lens.assign(256, 1);
  c.clamp = true;
  CheckSsm(c);
  SsmCase tiny = c;
  tiny.H = 8;
  tiny.N = 64;
  tiny.lens.assign(3, 1);  // few sequences: fewer channels per warp
  tiny.clamp = false;
  CheckSsm(tiny);
}

TEST_F(CudaSsmTest, TwoCallsEqualOneCall) {
  SsmCase c;
  c.H = 32;
  c.P = 64;
  c.N = 128;
  c.G = 1;
  const int64_t T = 1500;
  c.lens = {T};
  const SsmData d = MakeSsm(c);
  for (const char* kernel : kScanKernels) {
    ScopedScanKernel force(kernel);
    // The sequential kernels do the same arithmetic however the rows are split. The chunked
    // path's chunk boundaries move with the split (333: sequential then chunked; 700: chunked
    // twice), which changes rounding only.
    const double tol = kernel == nullptr                           ? kSsdTol
                       : std::strcmp(kernel, "chunked_f32") == 0 ? kChunkTol
                                                                 : 1e-6;
    std::vector<float> y_one;
    std::vector<std::vector<float>> s_one;
    SsmGpu(d, &y_one, &s_one);
    for (int64_t split : {333, 1, 32, 700, 1499}) {
      SCOPED_TRACE(::testing::Message() << "split " << split << " kernel " << KernelName(kernel));
      std::vector<float*> dev_states;
      float* const* d_ptrs = StatesToGpu(d.states, &dev_states);
      const float* d_xbc = ToGpu(d.xbc);
      const float* d_dt = ToGpu(d.dt);
      const SsmParams p = GpuParams(d);
      float* d_y = Poisoned<float>(T * d.hp);
      // The second call addresses its rows by absolute offsets [split, T).
      for (const std::vector<int64_t>& offs :
           {std::vector<int64_t>{0, split}, std::vector<int64_t>{split, T}}) {
        const absl::Status st = gpu_->SsmScan(d_xbc, d.ldxbc, d_dt, d.lddt, ToGpu(offs), 1,
                                              d_ptrs, p, d_y, offs.data());
        ASSERT_TRUE(st.ok()) << st;
      }
      EXPECT_LE(NormRelError(FromGpu(d_y, T * d.hp), y_one), tol);
      EXPECT_LE(NormRelError(StatesFromGpu(dev_states, d.states)[0], s_one[0]), tol);
    }
  }
}

// ---- Chunk-parallel scan (sequences longer than 2 * kChunkRows) ----

// Single long sequences: a partial last chunk (3 L + 17 rows: 4 chunks, the last of 17 rows) and
// ~5000 rows, from random non-zero states, on odd shapes (headdim below a warp's channels,
// d_state not a multiple of 32, one group or one group per head, d_state up to 256) and real ones.
TEST_F(CudaSsmTest, ChunkedLongSequenceMatchesCpu) {
  const std::vector<std::vector<int64_t>> shapes = {
      {3, 5, 33, 1}, {3, 5, 33, 3}, {6, 24, 16, 2}, {4, 40, 100, 2}, {3, 10, 200, 3},
      {8, 64, 64, 1}, {32, 64, 128, 1}};
  uint32_t seed = 300;
  for (const auto& sh : shapes) {
    for (int64_t len : {3 * kChunkRows + 17, int64_t{4999}}) {
      for (int regime : {0, 1, 2}) {  // dt unclamped (fast decay), clamped, long memory
        SsmCase c;
        c.H = sh[0];
        c.P = sh[1];
        c.N = sh[2];
        c.G = sh[3];
        c.lens = {len};
        c.clamp = regime == 1;
        c.long_memory = regime == 2;
        c.seed = seed++;
        CheckSsm(c, kChunkTol, kChunkedKernels);
      }
    }
  }
}

// Long, short, empty and one-row sequences in one call, starting past row 0: chunked and
// sequential work items share the output launch. 512 = 2 L is the longest unchunked length;
// 513 gives a last chunk of one row.
TEST_F(CudaSsmTest, ChunkedRaggedBatchMatchesCpu) {
  const std::vector<std::vector<int64_t>> shapes = {
      {6, 24, 16, 2}, {3, 5, 33, 3}, {32, 64, 128, 1}};
  uint32_t seed = 400;
  for (const auto& sh : shapes) {
    for (bool long_memory : {false, true}) {
      SsmCase c;
      c.H = sh[0];
      c.P = sh[1];
      c.N = sh[2];
      c.G = sh[3];
      c.lens = {0, 2 * kChunkRows + 1, 1, 0, 3 * kChunkRows + 17, 37, 2 * kChunkRows, 2000, 5, 0};
      c.base = 3;
      c.long_memory = long_memory;
      c.seed = seed++;
      CheckSsm(c, kChunkTol, kChunkedKernels);
    }
  }
}

// The 370M prefill shape at 8192 rows: the chunked path, with its SSD outputs (default) and with
// the f32 recurrence's (chunked_f32), against the sequential tiled kernel on the GPU, outputs and
// state.
TEST_F(CudaSsmTest, ChunkedMatchesSequential370MPrefill) {
  for (bool long_memory : {false, true}) {
    SCOPED_TRACE(::testing::Message() << "long_memory " << long_memory);
    SsmCase c;  // 370M: 32 heads x 64 x 128, one group
    c.H = 32;
    c.P = 64;
    c.N = 128;
    c.G = 1;
    c.lens = {8192};
    c.long_memory = long_memory;
    c.ld_pad = long_memory ? 5 : 0;  // rows 16-byte aligned (the model's case) and not
    c.seed = 500 + long_memory;
    const SsmData d = MakeSsm(c);
    std::vector<float> y_ssd, y_f32, y_seq;
    std::vector<std::vector<float>> s_ssd, s_f32, s_seq;
    SsmGpu(d, &y_ssd, &s_ssd);
    {
      ScopedScanKernel force("chunked_f32");
      SsmGpu(d, &y_f32, &s_f32);
    }
    {
      ScopedScanKernel force("sequential");
      SsmGpu(d, &y_seq, &s_seq);
    }
    EXPECT_LE(NormRelError(y_ssd, y_seq), kSsdTol);
    EXPECT_LE(NormRelError(s_ssd[0], s_seq[0]), kSsdTol);
    EXPECT_LE(NormRelError(y_f32, y_seq), kChunkTol);
    EXPECT_LE(NormRelError(s_f32[0], s_seq[0]), kChunkTol);
    // Rounding differs, so equal bits would mean a path was not taken.
    EXPECT_NE(s_f32[0], s_seq[0]);
    EXPECT_NE(y_ssd, y_f32);
  }
}

TEST_F(CudaSsmTest, NoRowsLeavesStatesAlone) {
  SsmCase c;
  c.lens = {0, 0};
  const SsmData d = MakeSsm(c);
  std::vector<float> y;
  std::vector<std::vector<float>> s;
  SsmGpu(d, &y, &s);
  EXPECT_EQ(s, d.states);
}

}  // namespace
}  // namespace ramba::kernels::testing
