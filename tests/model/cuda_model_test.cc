// The whole model on the GPU (label gpu; skipped without one): logits against the CPU backend and
// the PyTorch fixtures, decode == prefill on the GPU, and session state moving GPU -> CPU -> GPU
// through the serialised parts. Two weight precisions:
//  - f32 weights on the GPU must match the CPU per row to 1e-3 (max |diff| / max |row|): this
//    checks every kernel at model scale without rounding noise;
//  - bf16 weights (serving) must match a CPU model holding the same bf16-rounded weights to 1e-2
//    in ||gpu - cpu|| / ||cpu|| over all logits (issue 5's bound). A per-row bound does not fit
//    rounded arithmetic: flipping one near-tie in the top-K chunk selection changes that row's
//    logits by design. The distance to the unrounded reference is printed, not bounded: it is
//    the weight rounding itself.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "model/ramba_model.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "nlohmann/json.hpp"
#include "tests/model/chunk_tiers.h"
#include "tests/model/pipelined_decode.h"
#include "tests/model/session_snapshot.h"
#include "tests/testing/test_util.h"

namespace ramba {
namespace {

namespace fs = std::filesystem;
using testing::MaxRowRelError;

constexpr double kF32RowTolerance = 1e-3;
constexpr double kBf16NormTolerance = 1e-2;

// ||a - b|| / ||b|| over all elements.
double NormRelError(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size() || a.empty()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

// The tensors the GPU stores as bf16 matrices (every 2-D tensor), rounded to bf16 and back.
TensorMap RoundMatricesToBf16(TensorMap tensors) {
  for (auto& [name, t] : tensors) {
    if (t.shape.size() != 2) continue;
    std::vector<float> f = t.ToFloat();
    for (float& v : f) v = kernels::Bf16ToF32(kernels::F32ToBf16(v));
    t.dtype = kernels::DType::kF32;
    t.bytes.assign(reinterpret_cast<const char*>(f.data()), f.size() * sizeof(float));
  }
  return tensors;
}

std::unique_ptr<kernels::Backend> GpuOrSkip(kernels::DType weights) {
  if (!kernels::CudaAvailable()) return nullptr;
  auto b = kernels::CreateCudaBackend(weights);
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? std::move(*b) : nullptr;
}

std::vector<float> RunAll(RambaModel* model, SessionState* state, absl::Span<const int32_t> tokens) {
  std::vector<float> logits;
  SessionState* st[] = {state};
  absl::Span<const int32_t> tk[] = {tokens};
  EXPECT_TRUE(model->Forward(st, tk, LogitsMode::kAll, &logits).ok());
  return logits;
}

// Moves a state to another backend through its serialised parts (what the store keeps).
std::unique_ptr<SessionState> Transfer(const SessionState& from, const ModelConfig& config,
                                       kernels::Backend* to) {
  auto states = from.SerializeStates();
  EXPECT_TRUE(states.ok()) << states.status();
  std::vector<std::string> chunks;
  for (int64_t i = 0; i < from.num_chunks(); ++i) {
    auto c = from.SerializeChunk(i);
    EXPECT_TRUE(c.ok()) << c.status();
    chunks.push_back(*c);
  }
  auto lm = from.SerializeLandmarks(0, from.num_chunks());
  EXPECT_TRUE(lm.ok()) << lm.status();
  std::vector<std::string_view> chunk_views(chunks.begin(), chunks.end());
  std::vector<std::string_view> lm_views = {*lm};
  auto s = SessionState::Deserialize(config, to, *states, chunk_views, lm_views);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? std::move(*s) : nullptr;
}

class CudaModelFixtureTest : public ::testing::TestWithParam<std::string> {
 protected:
  // Logits of the full pass, the fixture's segmentation and token-by-token decode on `be`.
  struct Runs {
    std::vector<float> full, segmented, decoded;
  };
  Runs RunAllWays(kernels::Backend* be, bool round_weights = false) {
    Runs r;
    auto config = LoadModelConfig(dir_ + "/config.json");
    auto tensors = ReadSafetensors(dir_ + "/model.safetensors");
    EXPECT_TRUE(config.ok() && tensors.ok());
    if (!config.ok() || !tensors.ok()) return r;
    auto model = RambaModel::Create(
        *config, round_weights ? RoundMatricesToBf16(std::move(*tensors)) : *tensors, be);
    EXPECT_TRUE(model.ok()) << model.status();
    if (!model.ok()) return r;
    auto full = (*model)->NewSession();
    auto seg = (*model)->NewSession();
    auto dec = (*model)->NewSession();
    EXPECT_TRUE(full.ok() && seg.ok() && dec.ok());
    r.full = RunAll(model->get(), full->get(), tokens_);
    EXPECT_EQ((*full)->num_chunks(), static_cast<int64_t>(tokens_.size()) / 64);
    int64_t begin = 0;
    for (int64_t n : segments_) {
      auto part = RunAll(model->get(), seg->get(), absl::MakeConstSpan(tokens_).subspan(begin, n));
      r.segmented.insert(r.segmented.end(), part.begin(), part.end());
      begin += n;
    }
    r.decoded = testing::DecodeTokens(model->get(), dec->get(), tokens_);
    return r;
  }
  void SetUp() override {
    dir_ = testing::FixtureDir() + "/" + GetParam();
    std::ifstream in(dir_ + "/inputs.json");
    std::stringstream ss;
    ss << in.rdbuf();
    const auto j = nlohmann::json::parse(ss.str());
    tokens_ = j.at("tokens").get<std::vector<int32_t>>();
    segments_ = j.at("segments").get<std::vector<int64_t>>();
    auto config = LoadModelConfig(dir_ + "/config.json");
    ASSERT_TRUE(config.ok());
    vocab_ = config->vocab_size;
  }
  std::string dir_;
  std::vector<int32_t> tokens_;
  std::vector<int64_t> segments_;
  int64_t vocab_ = 0;
};

TEST_P(CudaModelFixtureTest, F32WeightsMatchCpuPerRow) {
  auto gpu = GpuOrSkip(kernels::DType::kF32);
  if (gpu == nullptr) GTEST_SKIP() << "no CUDA GPU";
  auto cpu = kernels::CreateCpuBackend();
  const Runs c = RunAllWays(cpu.get());
  const Runs g = RunAllWays(gpu.get());
  const double full = MaxRowRelError(g.full, c.full, vocab_);
  const double seg = MaxRowRelError(g.segmented, c.segmented, vocab_);
  const double dec = MaxRowRelError(g.decoded, c.decoded, vocab_);
  EXPECT_LE(full, kF32RowTolerance) << "full pass";
  EXPECT_LE(seg, kF32RowTolerance) << "segmented";
  EXPECT_LE(dec, kF32RowTolerance) << "decode";
  std::printf("%s f32 weights, GPU vs CPU max row error: full %.2e segmented %.2e decode %.2e\n",
              GetParam().c_str(), full, seg, dec);
}

TEST_P(CudaModelFixtureTest, Bf16WeightsMatchCpuAndReference) {
  auto gpu = GpuOrSkip(kernels::DType::kBF16);
  if (gpu == nullptr) GTEST_SKIP() << "no CUDA GPU";
  auto cpu = kernels::CreateCpuBackend();
  const Runs c = RunAllWays(cpu.get(), /*round_weights=*/true);
  const Runs g = RunAllWays(gpu.get());
  auto expected_t = ReadSafetensors(dir_ + "/expected.safetensors");
  ASSERT_TRUE(expected_t.ok());
  const std::vector<float> expected = expected_t->at("logits").ToFloat();
  const double full = NormRelError(g.full, c.full);
  const double ref = NormRelError(g.full, expected);
  const double seg = NormRelError(g.segmented, g.full);
  const double dec = NormRelError(g.decoded, g.full);
  EXPECT_LE(full, kBf16NormTolerance) << "GPU full pass vs CPU";
  EXPECT_LE(seg, kBf16NormTolerance) << "GPU segmented vs GPU full";
  EXPECT_LE(dec, kBf16NormTolerance) << "GPU decode vs GPU full";
  std::printf("%s bf16 weights, norm error: GPU vs CPU (same weights) %.2e, vs unrounded reference "
              "%.2e; segmented vs full "
              "%.2e; decode vs full %.2e (max row vs CPU %.2e)\n",
              GetParam().c_str(), full, ref, seg, dec, MaxRowRelError(g.full, c.full, vocab_));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaModelFixtureTest, ::testing::ValuesIn(testing::FixtureNames()),
                         [](const auto& info) { return info.param; });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(CudaModelFixtureTest);

// The tiny_enc1_cls_k3 fixture on the CPU and on a GPU holding f32 weights (so the two agree
// per row); gpu is null without a GPU.
struct F32OnBoth {
  std::unique_ptr<kernels::Backend> cpu, gpu;
  absl::StatusOr<std::unique_ptr<RambaModel>> cpu_model, gpu_model;
};
F32OnBoth LoadF32OnBoth() {
  F32OnBoth b;
  b.gpu = GpuOrSkip(kernels::DType::kF32);
  if (b.gpu == nullptr) return b;
  const std::string dir = testing::FixtureDir() + "/tiny_enc1_cls_k3";
  b.cpu = kernels::CreateCpuBackend();
  b.cpu_model = RambaModel::Load(dir, b.cpu.get());
  b.gpu_model = RambaModel::Load(dir, b.gpu.get());
  return b;
}

TEST(CudaModelTest, StateMovesBetweenGpuAndCpu) {
  F32OnBoth both = LoadF32OnBoth();
  if (both.gpu == nullptr) GTEST_SKIP() << "no CUDA GPU";
  auto& [cpu, gpu, cpu_model, gpu_model] = both;
  ASSERT_TRUE(cpu_model.ok() && gpu_model.ok());
  const ModelConfig& config = (*gpu_model)->config();
  const auto tokens = testing::RandomTokens(900, config.vocab_size, 5);
  const auto head = absl::MakeConstSpan(tokens).first(650);  // ends mid-chunk
  const auto tail = absl::MakeConstSpan(tokens).subspan(650);

  // Reference: the whole sequence on each backend.
  auto ca = (*cpu_model)->NewSession();
  ASSERT_TRUE(ca.ok());
  RunAll(cpu_model->get(), ca->get(), head);
  const std::vector<float> cpu_tail = RunAll(cpu_model->get(), ca->get(), tail);

  // GPU prefix -> CPU -> continue.
  auto ga = (*gpu_model)->NewSession();
  ASSERT_TRUE(ga.ok());
  RunAll(gpu_model->get(), ga->get(), head);
  auto on_cpu = Transfer(**ga, config, cpu.get());
  ASSERT_NE(on_cpu, nullptr);
  EXPECT_EQ(on_cpu->position(), 650);
  EXPECT_EQ(on_cpu->num_chunks(), 10);
  const std::vector<float> gpu_then_cpu = RunAll(cpu_model->get(), on_cpu.get(), tail);
  EXPECT_LE(MaxRowRelError(gpu_then_cpu, cpu_tail, config.vocab_size), kF32RowTolerance);

  // CPU prefix -> GPU -> continue, compared with the GPU continuing its own state.
  auto cb = (*cpu_model)->NewSession();
  ASSERT_TRUE(cb.ok());
  RunAll(cpu_model->get(), cb->get(), head);
  auto on_gpu = Transfer(**cb, config, gpu.get());
  ASSERT_NE(on_gpu, nullptr);
  const std::vector<float> cpu_then_gpu = RunAll(gpu_model->get(), on_gpu.get(), tail);
  const std::vector<float> gpu_tail = RunAll(gpu_model->get(), ga->get(), tail);
  EXPECT_LE(MaxRowRelError(cpu_then_gpu, cpu_tail, config.vocab_size), kF32RowTolerance);
  EXPECT_LE(MaxRowRelError(cpu_then_gpu, gpu_tail, config.vocab_size), kF32RowTolerance);

  // A GPU round trip through the parts is exact.
  auto again = Transfer(**ga, config, gpu.get());
  ASSERT_NE(again, nullptr);
  EXPECT_EQ(*again->SerializeStates(), *(*ga)->SerializeStates());
}

TEST(CudaModelTest, BatchedDecodeMatchesSingleSessions) {
  auto gpu = GpuOrSkip(kernels::DType::kBF16);
  if (gpu == nullptr) GTEST_SKIP() << "no CUDA GPU";
  auto model = RambaModel::Load(testing::FixtureDir() + "/tiny_enc2_nocls_g2", gpu.get());
  ASSERT_TRUE(model.ok());
  const int64_t V = (*model)->config().vocab_size;
  // Sessions at different positions (some about to complete a chunk) decode together.
  const std::vector<int64_t> prompt_lens = {0, 1, 63, 64, 127, 200, 511};
  std::vector<std::unique_ptr<SessionState>> batched, single;
  std::vector<int32_t> next;
  for (size_t i = 0; i < prompt_lens.size(); ++i) {
    const auto p = testing::RandomTokens(prompt_lens[i] + 1, V, 100 + i);
    for (auto* v : {&batched, &single}) {
      auto s = (*model)->NewSession();
      ASSERT_TRUE(s.ok());
      if (prompt_lens[i] > 0) RunAll(model->get(), s->get(), absl::MakeConstSpan(p).first(prompt_lens[i]));
      v->push_back(std::move(*s));
    }
    next.push_back(p.back());
  }
  for (int step = 0; step < 3; ++step) {
    std::vector<SessionState*> ptrs;
    for (auto& s : batched) ptrs.push_back(s.get());
    std::vector<float> logits;
    ASSERT_TRUE((*model)->Decode(ptrs, next, &logits).ok());
    for (size_t i = 0; i < single.size(); ++i) {
      SessionState* one[] = {single[i].get()};
      const int32_t in[] = {next[i]};
      std::vector<float> l;
      ASSERT_TRUE((*model)->Decode(one, in, &l).ok());
      std::vector<float> row(logits.begin() + i * V, logits.begin() + (i + 1) * V);
      EXPECT_LE(MaxRowRelError(row, l, V), 1e-5) << "session " << i << " step " << step;
    }
    for (size_t i = 0; i < next.size(); ++i) next[i] = (next[i] * 31 + step + 7) % V;
  }
}

// Launched steps queue on the stream; the later one's input is copied from the earlier one's
// sampled tokens on the device.
TEST(CudaModelTest, PipelinedDecodeMatchesSteps) {
  auto gpu = GpuOrSkip(kernels::DType::kBF16);
  if (gpu == nullptr) GTEST_SKIP() << "no CUDA GPU";
  for (const char* name : {"tiny_enc1_cls_k3", "tiny_enc2_nocls_g2"}) {
    SCOPED_TRACE(name);
    auto model = RambaModel::Load(testing::FixtureDir() + "/" + name, gpu.get());
    ASSERT_TRUE(model.ok()) << model.status();
    testing::ExpectPipelinedDecodeMatchesSteps(model->get(), 70);
    testing::ExpectCarriedRowsMatchSteps(model->get(), 40);
    testing::ExpectPipelinedDecodeMisuseRefused(model->get());
    testing::ExpectPenaltiesMatchHostReference(model->get(), 70);
  }
}

// Chunks beyond the window are read over PCIe from pinned host memory: the same bytes, so the
// same results (to rounding: the block-shared attention's slot order may differ between runs).
TEST(CudaModelTest, MovingChunksToTheHostChangesNoResult) {
  auto gpu = GpuOrSkip(kernels::DType::kBF16);
  if (gpu == nullptr) GTEST_SKIP() << "no CUDA GPU";
  for (const char* name : {"tiny_enc1_cls_k3", "tiny_enc2_nocls_g2"}) {
    SCOPED_TRACE(name);
    testing::ExpectChunkTiersChangeNoResult(gpu.get(), testing::FixtureDir() + "/" + name, 1e-5);
  }
  for (int64_t chunks : {0, 1, 3}) {  // prefill staging beyond its bound: the rest in place
    SCOPED_TRACE(chunks);
    testing::ExpectChunkTiersChangeNoResult(gpu.get(), testing::FixtureDir() + "/tiny_enc1_cls_k3",
                                            1e-5, chunks);
  }
}

// Decode steps count in their staging kernel, prefills in the pick count
// (tests/model/chunk_tiers.h).
TEST(CudaModelTest, SelectionsAreCountedByTier) {
  auto gpu = GpuOrSkip(kernels::DType::kBF16);
  if (gpu == nullptr) GTEST_SKIP() << "no CUDA GPU";
  testing::ExpectTierSelectionsCounted(gpu.get(), testing::FixtureDir() + "/tiny_enc1_cls_k3");
}

// The chunk cache on the GPU (AssignCachedChunksKernel): as on the CPU (chunk_tiers_test.cc).
TEST(CudaModelTest, ChunkCacheChangesNoResult) {
  auto gpu = GpuOrSkip(kernels::DType::kBF16);
  if (gpu == nullptr) GTEST_SKIP() << "no CUDA GPU";
  for (int64_t slots : {1, 16}) {
    SCOPED_TRACE(slots);
    testing::ExpectChunkTiersChangeNoResult(gpu.get(), testing::FixtureDir() + "/tiny_enc1_cls_k3",
                                            1e-5, -1, slots);
  }
  testing::ExpectTierSelectionsCounted(gpu.get(), testing::FixtureDir() + "/tiny_enc1_cls_k3", 16);
}

TEST(CudaModelTest, SnapshotHoldsThePartsAsTheyWereWhenTaken) {
  auto gpu = GpuOrSkip(kernels::DType::kBF16);
  if (gpu == nullptr) GTEST_SKIP() << "no CUDA GPU";
  auto model = RambaModel::Load(testing::FixtureDir() + "/tiny_enc1_cls_k3", gpu.get());
  ASSERT_TRUE(model.ok()) << model.status();
  testing::ExpectSnapshotHoldsThePast(model->get());
}

// With no GPU memory left for the snapshot's copies, the parts are serialised at once (waiting
// for the device) and come out the same.
TEST(CudaModelTest, SnapshotWithoutMemoryLeftSerialisesAtOnce) {
  auto gpu = GpuOrSkip(kernels::DType::kBF16);
  if (gpu == nullptr) GTEST_SKIP() << "no CUDA GPU";
  auto model = RambaModel::Load(testing::FixtureDir() + "/tiny_enc1_cls_k3", gpu.get());
  ASSERT_TRUE(model.ok()) << model.status();
  const int64_t S = (*model)->config().chunk_size;
  auto s = (*model)->NewSession();
  ASSERT_TRUE(s.ok());
  std::vector<float> logits;
  const auto tokens = testing::RandomTokens(2 * S + 9, (*model)->config().vocab_size, 5);
  const absl::Status prefilled = (*model)->Prefill(s->get(), tokens, &logits);
  ASSERT_TRUE(prefilled.ok()) << prefilled;
  SessionState* st = s->get();
  const std::string states = *st->SerializeStates();
  const std::string chunk1 = *st->SerializeChunk(1);
  const std::string landmarks = *st->SerializeLandmarks(1, 2);
  std::vector<kernels::Buffer> hog;  // every byte the pool will give, largest pieces first
  for (size_t bytes = size_t{1} << 32; bytes >= 256; bytes /= 2) {
    while (true) {
      auto b = gpu->Allocate(bytes);
      if (!b.ok()) break;
      hog.push_back(*std::move(b));
    }
  }
  EXPECT_EQ(gpu->Allocate(states.size()).status().code(), absl::StatusCode::kResourceExhausted);
  auto snap = st->Snapshot(1);
  ASSERT_TRUE(snap.ok()) << snap.status();
  hog.clear();
  auto parts = (*snap)->Finish();
  ASSERT_TRUE(parts.ok()) << parts.status();
  EXPECT_EQ(parts->states, states);
  ASSERT_EQ(parts->chunks.size(), 1u);
  EXPECT_EQ(parts->chunks[0].second, chunk1);
  EXPECT_EQ(parts->landmarks, landmarks);
}

TEST(CudaModelTest, WarmupThenDecodeMatchesCpu) {
  // The warm-up records the batch-1 decode graph on its own throwaway session; a later session's
  // first decode step replays it (no eager run of its own) and must still match the CPU.
  F32OnBoth both = LoadF32OnBoth();
  if (both.gpu == nullptr) GTEST_SKIP() << "no CUDA GPU";
  auto& [cpu, gpu, cpu_model, gpu_model] = both;
  ASSERT_TRUE(cpu_model.ok() && gpu_model.ok());
  ASSERT_TRUE((*gpu_model)->Warmup().ok());
  const ModelConfig& config = (*gpu_model)->config();
  const auto tokens = testing::RandomTokens(200, config.vocab_size, 9);
  const auto head = absl::MakeConstSpan(tokens).first(100);
  const auto tail = absl::MakeConstSpan(tokens).subspan(100);  // crosses position 128
  auto c = (*cpu_model)->NewSession();
  auto g = (*gpu_model)->NewSession();
  ASSERT_TRUE(c.ok() && g.ok());
  RunAll(cpu_model->get(), c->get(), head);
  RunAll(gpu_model->get(), g->get(), head);
  const std::vector<float> want = testing::DecodeTokens(cpu_model->get(), c->get(), tail);
  const std::vector<float> got = testing::DecodeTokens(gpu_model->get(), g->get(), tail);
  EXPECT_LE(MaxRowRelError(got, want, config.vocab_size), kF32RowTolerance);
  EXPECT_EQ((*g)->num_chunks(), 3);
}

TEST(CudaModelTest, Config370MMatchesCpu) {
  auto gpu = GpuOrSkip(kernels::DType::kBF16);
  if (gpu == nullptr) GTEST_SKIP() << "no CUDA GPU";
  auto cpu = kernels::CreateCpuBackend();
  const ModelConfig config = testing::Config370M();
  const TensorMap tensors = RandomTensors(config, 370);
  auto cpu_model = RambaModel::Create(config, RoundMatricesToBf16(tensors), cpu.get());
  auto gpu_model = RambaModel::Create(config, tensors, gpu.get());
  ASSERT_TRUE(cpu_model.ok() && gpu_model.ok()) << gpu_model.status();
  const auto prompt = testing::RandomTokens(300, config.vocab_size, 9);
  auto cs = (*cpu_model)->NewSession();
  auto gs = (*gpu_model)->NewSession();
  ASSERT_TRUE(cs.ok() && gs.ok());
  std::vector<float> cl, gl;
  ASSERT_TRUE((*cpu_model)->Prefill(cs->get(), prompt, &cl, 128).ok());
  ASSERT_TRUE((*gpu_model)->Prefill(gs->get(), prompt, &gl, 128).ok());
  EXPECT_LE(NormRelError(gl, cl), kBf16NormTolerance);
  std::printf("370M random bf16 weights, prefill logits GPU vs CPU: norm error %.2e, max row %.2e\n",
              NormRelError(gl, cl), MaxRowRelError(gl, cl, config.vocab_size));
  // The one-GEMM hi + lo product forced for every shape (by default from m >= k, which 300 rows
  // of the 370M config reach only for the 1024-wide projections), on a second GPU model so that
  // its decode graphs are recorded with it; one 300-row segment takes the many-row paths, where
  // the norms write the GEMM input.
  auto with_fusions = [](bool on) {
    if (on) {
      setenv("RAMBA_CUDA_STACKED_GEMM", "1", 1);
    } else {
      unsetenv("RAMBA_CUDA_STACKED_GEMM");
    }
  };
  auto fused_model = RambaModel::Create(config, tensors, gpu.get());
  ASSERT_TRUE(fused_model.ok()) << fused_model.status();
  auto fs = (*fused_model)->NewSession();
  ASSERT_TRUE(fs.ok());
  std::vector<float> fl;
  with_fusions(true);
  ASSERT_TRUE((*fused_model)->Prefill(fs->get(), prompt, &fl, 300).ok());
  with_fusions(false);
  EXPECT_LE(NormRelError(fl, cl), kBf16NormTolerance);
  std::printf("  with RAMBA_CUDA_STACKED_GEMM=1, one segment: %.2e\n", NormRelError(fl, cl));
  // Decode a few steps on all three from the same tokens.
  for (int i = 0; i < 4; ++i) {
    const int32_t t[] = {prompt[i]};
    SessionState* c1[] = {cs->get()};
    SessionState* g1[] = {gs->get()};
    SessionState* f1[] = {fs->get()};
    ASSERT_TRUE((*cpu_model)->Decode(c1, t, &cl).ok());
    ASSERT_TRUE((*gpu_model)->Decode(g1, t, &gl).ok());
    with_fusions(true);
    ASSERT_TRUE((*fused_model)->Decode(f1, t, &fl).ok());
    with_fusions(false);
    EXPECT_LE(NormRelError(gl, cl), kBf16NormTolerance) << "decode step " << i;
    EXPECT_LE(NormRelError(fl, cl), kBf16NormTolerance) << "fused decode step " << i;
  }
}

}  // namespace
}  // namespace ramba
