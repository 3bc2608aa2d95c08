// Metrics are scraped over real HTTP and parsed from the Prometheus text format.
#include "server/metrics.h"

#include "gtest/gtest.h"
#include "tests/testing/http.h"

namespace ramba::server {
namespace {

TEST(MetricsTest, ScrapedOverHttp) {
  auto m = Metrics::Create("127.0.0.1:0");
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_GT((*m)->port(), 0);
  (*m)->prompt_tokens->Increment(128);
  (*m)->generated_tokens->Increment(7);
  (*m)->time_to_first_token->Observe(0.02);
  (*m)->stored_sessions->Set(3);
  const auto samples = testing::ParsePrometheusText(testing::HttpGet((*m)->port(), "/metrics"));
  ASSERT_FALSE(samples.empty());
  EXPECT_EQ(samples.at("ramba_tokens_total{kind=\"prompt\"}"), 128);
  EXPECT_EQ(samples.at("ramba_tokens_total{kind=\"generated\"}"), 7);
  EXPECT_EQ(samples.at("ramba_time_to_first_token_seconds_count"), 1);
  EXPECT_EQ(samples.at("ramba_time_to_first_token_seconds_bucket{le=\"0.025\"}"), 1);
  EXPECT_EQ(samples.at("ramba_time_to_first_token_seconds_bucket{le=\"0.01\"}"), 0);
  EXPECT_EQ(samples.at("ramba_sessions_stored"), 3);
  EXPECT_TRUE(samples.count("ramba_engine_queue_depth"));
}

TEST(MetricsTest, BusyPortIsAnError) {
  auto a = Metrics::Create("127.0.0.1:0");
  ASSERT_TRUE(a.ok());
  auto b = Metrics::Create("127.0.0.1:" + std::to_string((*a)->port()));
  EXPECT_EQ(b.status().code(), absl::StatusCode::kUnavailable);
}

TEST(MetricsTest, AnyAddressAnyPortAndOtherPaths) {
  auto m = Metrics::Create("0.0.0.0:0");
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_GT((*m)->port(), 0);
  (*m)->generated_tokens->Increment(3);
  for (int i = 0; i < 3; ++i) {  // one connection per scrape, repeatedly
    const auto samples = testing::ParsePrometheusText(testing::HttpGet((*m)->port(), "/metrics"));
    EXPECT_EQ(samples.at("ramba_tokens_total{kind=\"generated\"}"), 3);
  }
  EXPECT_TRUE(testing::ParsePrometheusText(testing::HttpGet((*m)->port(), "/other")).empty());
}

TEST(MetricsTest, BadAddressIsAnError) {
  EXPECT_EQ(Metrics::Create("no-port").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Metrics::Create("127.0.0.1:99999").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(MetricsTest, NotServedWhenNoAddress) {
  auto m = Metrics::Create("");
  ASSERT_TRUE(m.ok());
  EXPECT_EQ((*m)->port(), 0);
}

}  // namespace
}  // namespace ramba::server
