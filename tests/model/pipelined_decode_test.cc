// RambaModel::LaunchDecode / CollectDecode on the CPU backend (which runs each step inside
// LaunchDecode): the same tokens as ForwardAndSample step by step (rows carried between launches
// too), and misuse refused. The GPU,
// where steps really queue, runs the same checks in cuda_model_test.cc.
#include "tests/model/pipelined_decode.h"

#include "kernels/backend.h"

namespace ramba {
namespace {

TEST(PipelinedDecodeTest, MatchesStepByStepOnCpu) {
  auto cpu = kernels::CreateCpuBackend(2);
  for (const char* name : {"tiny_enc1_cls_k3", "tiny_enc2_nocls_g2"}) {
    SCOPED_TRACE(name);
    auto model = RambaModel::Load(testing::FixtureDir() + "/" + name, cpu.get());
    ASSERT_TRUE(model.ok()) << model.status();
    testing::ExpectPipelinedDecodeMatchesSteps(model->get(), 70);
  }
}

TEST(PipelinedDecodeTest, CarriedRowsMatchStepByStepOnCpu) {
  auto cpu = kernels::CreateCpuBackend(2);
  auto model = RambaModel::Load(testing::FixtureDir() + "/tiny_enc1_cls_k3", cpu.get());
  ASSERT_TRUE(model.ok()) << model.status();
  testing::ExpectCarriedRowsMatchSteps(model->get(), 40);
}

TEST(PipelinedDecodeTest, PenaltiesMatchHostReferenceOnCpu) {
  auto cpu = kernels::CreateCpuBackend(2);
  auto model = RambaModel::Load(testing::FixtureDir() + "/tiny_enc1_cls_k3", cpu.get());
  ASSERT_TRUE(model.ok()) << model.status();
  testing::ExpectPenaltiesMatchHostReference(model->get(), 70);
}

TEST(PipelinedDecodeTest, MisuseIsRefusedOnCpu) {
  auto cpu = kernels::CreateCpuBackend(2);
  auto model = RambaModel::Load(testing::FixtureDir() + "/tiny_enc1_cls_k3", cpu.get());
  ASSERT_TRUE(model.ok()) << model.status();
  testing::ExpectPipelinedDecodeMisuseRefused(model->get());
}

}  // namespace
}  // namespace ramba
