// Selection statistics and the selections file (tools/selection_stats.h) that selection-reuse
// writes and bench-ops reads.
#include "tools/selection_stats.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace ramba::tools {
namespace {

class SelectionFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ramba_selection_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::system(("rm -rf " + dir_).c_str()); }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  std::string dir_;
};

TEST(CountReuseTest, PicksPerDistinctChunkInAlignedBlocks) {
  // 4 rows x 2 picks. Rows 0-1 name {3, 5} twice; rows 2-3 name 3, 7, 9 and one unused slot.
  const std::vector<int32_t> sel = {3, 5, 5, 3, 3, 7, -1, 9};
  ReuseCount one, two, four;
  CountReuse(sel.data(), 4, 2, 1, &one);
  CountReuse(sel.data(), 4, 2, 2, &two);
  CountReuse(sel.data(), 4, 2, 4, &four);
  EXPECT_EQ(one.picks, 7);
  EXPECT_EQ(one.distinct, 7);
  EXPECT_DOUBLE_EQ(one.Ratio(), 1.0);
  EXPECT_EQ(two.distinct, 2 + 3);
  EXPECT_DOUBLE_EQ(two.Ratio(), 7.0 / 5.0);
  EXPECT_EQ(four.distinct, 4);  // 3, 5, 7, 9
  // A partial last block counts too.
  ReuseCount three;
  CountReuse(sel.data(), 4, 2, 3, &three);
  EXPECT_EQ(three.picks, 7);
  EXPECT_EQ(three.distinct, 3 + 1);  // {3, 5, 7} then {9}
  EXPECT_DOUBLE_EQ(ReuseCount{}.Ratio(), 1.0);
}

TEST_F(SelectionFileTest, RoundTrip) {
  Selections s;
  s.per_row = 3;
  for (int32_t i = 0; i < 3 * 70; ++i) s.indices.push_back(i % 5 == 0 ? -1 : i / 3 % 2);
  ASSERT_TRUE(WriteSelections(Path("a.bin"), s).ok());
  auto back = ReadSelections(Path("a.bin"));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->per_row, 3);
  EXPECT_EQ(back->rows(), 70);
  EXPECT_EQ(back->indices, s.indices);
}

TEST_F(SelectionFileTest, BadFilesAreRefusedWithTheReason) {
  EXPECT_EQ(ReadSelections(Path("missing.bin")).status().code(), absl::StatusCode::kNotFound);
  {
    std::ofstream f(Path("text.bin"));
    f << "not a selections file at all, just some text";
  }
  auto text = ReadSelections(Path("text.bin"));
  EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(text.status().message().find("not a selections file"), std::string::npos);

  Selections s;
  s.per_row = 8;
  s.indices.assign(8 * 100, -1);
  ASSERT_TRUE(WriteSelections(Path("whole.bin"), s).ok());
  ASSERT_EQ(truncate(Path("whole.bin").c_str(), 24 + 8 * 4 * 50), 0);  // half the rows
  auto cut = ReadSelections(Path("whole.bin"));
  EXPECT_EQ(cut.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(cut.status().message().find("truncated"), std::string::npos);
}

TEST(CheckSelectionsTest, CausalBoundDuplicatesAndLength) {
  constexpr int64_t kChunk = 4;
  Selections s;
  s.per_row = 2;
  // Rows 0-3 see nothing; row 4 may pick chunk 0; row 8 chunks 0-1.
  s.indices = {-1, -1, -1, -1, -1, -1, -1, -1, 0, -1, 0, -1, -1, 0, -1, -1, 1, 0};
  EXPECT_TRUE(CheckSelections(s, 9, 3, kChunk).ok());
  EXPECT_TRUE(CheckSelections(s, 5, 3, kChunk).ok());  // a prefix
  EXPECT_EQ(CheckSelections(s, 10, 3, kChunk).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckSelections(s, 9, 1, kChunk).code(), absl::StatusCode::kInvalidArgument);

  Selections early = s;
  early.indices[2 * 3] = 0;  // row 3 picks chunk 0 (tokens 0-3): not wholly before it
  const absl::Status st = CheckSelections(early, 9, 3, kChunk);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("row 3 picks chunk 0"), std::string::npos) << st;

  Selections twice = s;
  twice.indices[2 * 8 + 1] = 1;  // row 8: chunk 1 in both slots
  EXPECT_NE(CheckSelections(twice, 9, 3, kChunk).message().find("twice"), std::string::npos);

  Selections negative = s;
  negative.indices[0] = -2;
  EXPECT_FALSE(CheckSelections(negative, 9, 3, kChunk).ok());
}

}  // namespace
}  // namespace ramba::tools
