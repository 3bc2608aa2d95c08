// The shipped model finds a passkey in a 16K-token haystack on the CPU, through the C++ engine
// and the evaluation tool's own haystack generator (not the trainer's).
#include <filesystem>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "model/ramba_model.h"
#include "model/tokenizer.h"
#include "tests/testing/test_util.h"
#include "tools/passkey.h"

namespace ramba::eval {
namespace {

TEST(RambaTinyPasskeyTest, Finds16KPasskeyAtThreeDepths) {
  const std::string dir = testing::SourceDir() + "/models/ramba-tiny";
  ASSERT_TRUE(std::filesystem::exists(dir + "/model.safetensors")) << "models/ramba-tiny is missing";
  auto backend = kernels::CreateCpuBackend();
  auto model = RambaModel::Load(dir, backend.get());
  ASSERT_TRUE(model.ok()) << model.status();
  auto tok = LoadTokenizer(dir, (*model)->config().vocab_size);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EvalOptions o;
  o.lengths = {16384};
  o.depths = {0.1, 0.5, 0.9};
  o.trials = 1;
  o.seed = 2026;
  auto cells = RunPasskeyEval(**model, **tok, o);
  ASSERT_TRUE(cells.ok()) << cells.status();
  for (const CellResult& c : *cells) {
    EXPECT_EQ(c.correct, c.trials) << "depth " << c.depth << ": "
                                   << (c.misses.empty() ? "" : c.misses[0]);
  }
}

}  // namespace
}  // namespace ramba::eval
