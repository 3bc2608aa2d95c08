// The load generator's statistics: nearest-rank percentiles, by hand.
#include "loadtest/load_generator.h"

#include "gtest/gtest.h"

namespace ramba::loadtest {
namespace {

TEST(SummarizeTest, NearestRankPercentiles) {
  std::vector<double> v;
  for (int i = 100; i >= 1; --i) v.push_back(i);  // 1..100, unsorted
  const LatencyStats s = Summarize(v);
  EXPECT_EQ(s.count, 100);
  EXPECT_DOUBLE_EQ(s.mean, 50.5);
  EXPECT_DOUBLE_EQ(s.p50, 50);
  EXPECT_DOUBLE_EQ(s.p90, 90);
  EXPECT_DOUBLE_EQ(s.p99, 99);
  EXPECT_DOUBLE_EQ(s.max, 100);
}

TEST(SummarizeTest, SmallAndEmptySamples) {
  const LatencyStats one = Summarize({7.5});
  EXPECT_EQ(one.count, 1);
  EXPECT_DOUBLE_EQ(one.p50, 7.5);
  EXPECT_DOUBLE_EQ(one.p99, 7.5);
  const LatencyStats three = Summarize({3, 1, 2});
  EXPECT_DOUBLE_EQ(three.p50, 2);  // ceil(1.5) = 2nd of 3
  EXPECT_DOUBLE_EQ(three.p90, 3);
  const LatencyStats none = Summarize({});
  EXPECT_EQ(none.count, 0);
  EXPECT_DOUBLE_EQ(none.max, 0);
}

TEST(RunLoadTest, RejectsBadOptionsAndUnreachableServers) {
  LoadOptions o;
  o.sessions = 0;
  EXPECT_EQ(RunLoad(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = LoadOptions();
  o.request_rate = -1;
  EXPECT_EQ(RunLoad(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = LoadOptions();
  o.server = "127.0.0.1:1";
  o.timeout_seconds = 5;
  const absl::Status s = RunLoad(o).status();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("GetModelInfo on 127.0.0.1:1"), std::string::npos) << s;
}

}  // namespace
}  // namespace ramba::loadtest
