// Checkpoint names and shapes: prefix variants are accepted, every missing or mis-shaped tensor
// is an InvalidArgument naming it.
#include "model/weights.h"

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "model/ramba_model.h"
#include "tests/testing/test_util.h"

namespace ramba {
namespace {

class WeightsTest : public ::testing::Test {
 protected:
  std::unique_ptr<kernels::Backend> backend_ = kernels::CreateCpuBackend();
  ModelConfig config_ = testing::SmallConfig();
};

TEST_F(WeightsTest, CanonicalNames) {
  EXPECT_EQ(CanonicalTensorName("backbone.layers.3.norm.weight"), "layers.3.norm.weight");
  EXPECT_EQ(CanonicalTensorName("module.backbone.embedding.weight"), "embeddings.weight");
  EXPECT_EQ(CanonicalTensorName("embeddings.weight"), "embeddings.weight");
  EXPECT_EQ(CanonicalTensorName("lm_head.weight"), "lm_head.weight");
}

TEST_F(WeightsTest, AcceptsPrefixVariantsWithSameResult) {
  const TensorMap hf = RandomTensors(config_, 3);
  TensorMap variant;
  for (const auto& [name, t] : hf) {
    std::string n = name;
    if (n == "backbone.embeddings.weight") n = "backbone.embedding.weight";
    variant["module." + n] = t;
  }
  auto a = RambaModel::Create(config_, hf, backend_.get());
  auto b = RambaModel::Create(config_, variant, backend_.get());
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  const auto tokens = testing::RandomTokens(80, config_.vocab_size, 1);
  std::vector<float> la, lb;
  auto sa = (*a)->NewSession();
  auto sb = (*b)->NewSession();
  ASSERT_TRUE((*a)->Prefill(sa->get(), tokens, &la).ok());
  ASSERT_TRUE((*b)->Prefill(sb->get(), tokens, &lb).ok());
  EXPECT_EQ(la, lb);
}

TEST_F(WeightsTest, ExplicitLmHeadIsUsed) {
  TensorMap tied = RandomTensors(config_, 3);
  TensorMap untied = tied;
  std::vector<float> head = tied["backbone.embeddings.weight"].ToFloat();
  for (float& v : head) v = -v;  // negated head: negated logits
  untied["lm_head.weight"] = MakeF32Tensor({config_.vocab_size, config_.hidden_size}, head);
  auto a = RambaModel::Create(config_, tied, backend_.get());
  auto b = RambaModel::Create(config_, untied, backend_.get());
  ASSERT_TRUE(a.ok() && b.ok());
  const auto tokens = testing::RandomTokens(5, config_.vocab_size, 2);
  std::vector<float> la, lb;
  auto sa = (*a)->NewSession();
  auto sb = (*b)->NewSession();
  ASSERT_TRUE((*a)->Prefill(sa->get(), tokens, &la).ok());
  ASSERT_TRUE((*b)->Prefill(sb->get(), tokens, &lb).ok());
  for (size_t i = 0; i < la.size(); ++i) ASSERT_NEAR(la[i], -lb[i], 1e-5f);

  ModelConfig untied_config = config_;
  untied_config.tie_word_embeddings = false;
  auto c = RambaModel::Create(untied_config, tied, backend_.get());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("lm_head.weight"), std::string::npos);
}

TEST_F(WeightsTest, MissingTensorIsNamed) {
  for (const std::string name :
       {"backbone.layers.1.mixer.A_log", "backbone.layers.2.encoder.layers.0.self_attn.q_norm.weight",
        "backbone.layers.3.ln.weight", "backbone.layers.7.q_proj.weight", "backbone.norm_f.weight",
        "backbone.layers.2.lmk_ln.weight"}) {
    TensorMap t = RandomTensors(config_, 3);
    ASSERT_EQ(t.erase(name), 1u) << name;
    auto m = RambaModel::Create(config_, t, backend_.get());
    ASSERT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << name;
    EXPECT_NE(m.status().message().find(name.substr(9)), std::string::npos) << m.status();
    EXPECT_NE(m.status().message().find("missing"), std::string::npos) << m.status();
  }
}

TEST_F(WeightsTest, MisShapedTensorIsNamed) {
  TensorMap t = RandomTensors(config_, 3);
  t["backbone.layers.0.mixer.in_proj.weight"] = MakeF32Tensor({10, 64}, std::vector<float>(640));
  auto m = RambaModel::Create(config_, t, backend_.get());
  ASSERT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(m.status().message().find("layers.0.mixer.in_proj.weight"), std::string::npos);
  EXPECT_NE(m.status().message().find("[10, 64]"), std::string::npos) << m.status();
}

TEST_F(WeightsTest, ClsPresenceFollowsCheckpoint) {
  auto with = RambaModel::Create(config_, RandomTensors(config_, 3, true), backend_.get());
  auto without = RambaModel::Create(config_, RandomTensors(config_, 3, false), backend_.get());
  ASSERT_TRUE(with.ok() && without.ok());
  EXPECT_TRUE((*with)->config().has_cls);
  EXPECT_FALSE((*without)->config().has_cls);
}

}  // namespace
}  // namespace ramba
