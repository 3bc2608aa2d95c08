// The reference 370M configuration's shape (random weights built here, no file) runs a few tokens,
// past the first chunk so retrieval and HSA are exercised, and decode agrees with prefill.
#include <cmath>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "model/ramba_model.h"
#include "model/weights.h"
#include "tests/testing/test_util.h"

namespace ramba {
namespace {

TEST(Model370MTest, RunsAFewTokens) {
  auto backend = kernels::CreateCpuBackend();
  const ModelConfig config = testing::Config370M();
  ASSERT_TRUE(config.Validate().ok()) << config.Validate();
  std::unique_ptr<RambaModel> model;
  {
    const TensorMap tensors = RandomTensors(config, 370);
    auto m = RambaModel::Create(config, tensors, backend.get());
    ASSERT_TRUE(m.ok()) << m.status();
    model = std::move(*m);
  }
  EXPECT_EQ(model->config().num_mamba_layers(), 48);
  EXPECT_EQ(model->config().num_hsa_layers(), 3);
  EXPECT_TRUE(model->config().has_cls);

  // 130 prompt tokens: two chunks complete, so the last tokens retrieve.
  const auto prompt = testing::RandomTokens(130, config.vocab_size, 9);
  auto a = model->NewSession();
  auto b = model->NewSession();
  ASSERT_TRUE(a.ok() && b.ok());
  std::vector<float> prefill_logits;
  ASSERT_TRUE(model->Prefill(a->get(), prompt, &prefill_logits, 64).ok());
  ASSERT_EQ(static_cast<int64_t>(prefill_logits.size()), config.vocab_size);
  for (float v : prefill_logits) ASSERT_TRUE(std::isfinite(v));
  EXPECT_EQ((*a)->num_chunks(), 2);

  // Same prompt: all but the last token prefilled, the last one decoded.
  ASSERT_TRUE(model->Prefill(b->get(), absl::MakeConstSpan(prompt).first(129), nullptr).ok());
  SessionState* st[] = {b->get()};
  const int32_t last[] = {prompt.back()};
  std::vector<float> decode_logits;
  ASSERT_TRUE(model->Decode(st, last, &decode_logits).ok());
  EXPECT_LE(testing::MaxRowRelError(decode_logits, prefill_logits, config.vocab_size), 1e-5);

  // Three more greedy decode steps.
  for (int i = 0; i < 3; ++i) {
    const int32_t next = static_cast<int32_t>(
        std::max_element(decode_logits.begin(), decode_logits.end()) - decode_logits.begin());
    const int32_t in[] = {next};
    ASSERT_TRUE(model->Decode(st, in, &decode_logits).ok());
  }
  EXPECT_EQ((*b)->position(), 133);
}

}  // namespace
}  // namespace ramba
