// Chunk K/V tiers on the CPU backend (whose host memory is its memory, so only the bookkeeping
// is exercised: which chunks moved, pointer tables, restore, forks); cuda_model_test.cc runs the
// same checks on a GPU, where moved chunks are read over PCIe.
#include "tests/model/chunk_tiers.h"

#include "kernels/backend.h"

namespace ramba {
namespace {

TEST(ChunkTiersTest, MovingChunksToTheHostChangesNoResultOnCpu) {
  auto cpu = kernels::CreateCpuBackend(2);
  for (const char* name : {"tiny_enc1_cls_k3", "tiny_enc2_nocls_g2"}) {
    SCOPED_TRACE(name);
    testing::ExpectChunkTiersChangeNoResult(cpu.get(), testing::FixtureDir() + "/" + name, 0);
  }
}

TEST(ChunkTiersTest, PrefillStagingBeyondItsBoundChangesNoResultOnCpu) {
  auto cpu = kernels::CreateCpuBackend(2);
  for (int64_t chunks : {0, 1, 3}) {
    SCOPED_TRACE(chunks);
    testing::ExpectChunkTiersChangeNoResult(cpu.get(), testing::FixtureDir() + "/tiny_enc1_cls_k3",
                                            0, chunks);
  }
}

TEST(ChunkTiersTest, SelectionsAreCountedByTierOnCpu) {
  auto cpu = kernels::CreateCpuBackend(2);
  testing::ExpectTierSelectionsCounted(cpu.get(), testing::FixtureDir() + "/tiny_enc1_cls_k3");
}

TEST(ChunkTiersTest, WindowOfZeroMovesNothing) {
  auto cpu = kernels::CreateCpuBackend(2);
  auto model = RambaModel::Load(testing::FixtureDir() + "/tiny_enc1_cls_k3", cpu.get());
  ASSERT_TRUE(model.ok());
  auto s = (*model)->NewSession();
  ASSERT_TRUE(s.ok());
  const auto tokens = testing::RandomTokens(300, (*model)->config().vocab_size, 4);
  std::vector<float> last;
  ASSERT_TRUE((*model)->Prefill(s->get(), tokens, &last).ok());
  EXPECT_EQ((*s)->host_chunks(), 0);
  ASSERT_TRUE((*s)->KeepChunksOnDevice(0).ok());
  EXPECT_EQ((*s)->host_chunks(), 0);
  ASSERT_TRUE((*s)->KeepChunksOnDevice(3).ok());
  EXPECT_EQ((*s)->host_chunks(), (*s)->num_chunks() - 3);
  const int64_t moved = (*s)->host_chunks();
  ASSERT_TRUE((*s)->KeepChunksOnDevice(100).ok());  // a larger window moves nothing back
  EXPECT_EQ((*s)->host_chunks(), moved);
}

}  // namespace
}  // namespace ramba
