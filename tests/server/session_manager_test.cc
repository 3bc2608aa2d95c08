// Session manager over a real RocksDB store in a temp dir: paging, leases, commits, eviction,
// forks.
#include "server/session_manager.h"

#include <filesystem>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "model/weights.h"
#include "server/metrics.h"
#include "tests/testing/test_util.h"

namespace ramba::server {
namespace {

namespace fs = std::filesystem;

class SessionManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("ramba_sm_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    backend_ = kernels::CreateCpuBackend();
    config_ = testing::SmallConfig();
    model_ = std::move(*RambaModel::Create(config_, RandomTensors(config_, 5), backend_.get()));
    Reopen();
  }
  void TearDown() override {
    manager_.reset();
    store_.reset();
    fs::remove_all(dir_);
  }
  void Reopen(int64_t max_resident = 8, int64_t max_resident_bytes = 0,
              int64_t max_resident_host_bytes = 0, Metrics* metrics = nullptr) {
    manager_.reset();
    store_.reset();
    store::StoreOptions o;
    o.path = dir_.string();
    auto s = store::SessionStore::Open(o);
    ASSERT_TRUE(s.ok()) << s.status();
    store_ = std::move(*s);
    SessionManagerOptions mo;
    mo.max_resident_sessions = max_resident;
    mo.max_resident_bytes = max_resident_bytes;
    mo.max_resident_host_bytes = max_resident_host_bytes;
    mo.metrics = metrics;
    manager_ = std::make_unique<SessionManager>(model_.get(), store_.get(), mo);
  }
  // Feeds tokens to a leased session, keeping the last one pending as the server does.
  void Feed(SessionLease& lease, std::vector<int32_t> tokens) {
    if (lease.meta().pending_token) tokens.insert(tokens.begin(), *lease.meta().pending_token);
    lease.meta().pending_token = tokens.back();
    tokens.pop_back();
    ASSERT_TRUE(model_->Prefill(lease.state(), tokens, nullptr).ok());
  }
  std::vector<float> NextLogits(SessionLease& lease) {
    // Logits after the pending token, computed on a throwaway fork.
    auto f = std::move(*lease.state()->Fork());
    std::vector<float> logits;
    const int32_t t[] = {*lease.meta().pending_token};
    EXPECT_TRUE(model_->Prefill(f.get(), t, &logits).ok());
    return logits;
  }

  fs::path dir_;
  std::unique_ptr<kernels::Backend> backend_;
  ModelConfig config_;
  std::unique_ptr<RambaModel> model_;
  std::unique_ptr<store::SessionStore> store_;
  std::unique_ptr<SessionManager> manager_;
};

TEST_F(SessionManagerTest, CommitSurvivesReopen) {
  SessionMeta meta;
  meta.labels = {{"user", "ada"}};
  meta.default_sampling.temperature = 0.5f;
  auto v = manager_->Create("conv-1", meta);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->position, 0);
  std::vector<float> before;
  {
    auto lease = manager_->Acquire("conv-1");
    ASSERT_TRUE(lease.ok()) << lease.status();
    Feed(*lease, testing::RandomTokens(200, config_.vocab_size, 1));
    Feed(*lease, testing::RandomTokens(77, config_.vocab_size, 2));
    ASSERT_TRUE(lease->Commit().ok());
    EXPECT_EQ(lease->position(), 277);
    before = NextLogits(*lease);
  }
  Reopen();
  auto got = manager_->Get("conv-1");
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->position, 277);
  EXPECT_EQ(got->num_chunks, 276 / 64);
  EXPECT_EQ(got->meta.labels.at("user"), "ada");
  EXPECT_FLOAT_EQ(*got->meta.default_sampling.temperature, 0.5f);
  EXPECT_FALSE(got->meta.default_sampling.top_k.has_value());
  auto lease = manager_->Acquire("conv-1");
  ASSERT_TRUE(lease.ok()) << lease.status();
  EXPECT_EQ(lease->position(), 277);
  EXPECT_EQ(NextLogits(*lease), before);  // bitwise: the restored state is the committed one
}

// With a device chunk window, a session paged in from the store puts its older chunks straight
// into the host tier, and answers as before.
TEST_F(SessionManagerTest, PageInPutsOldChunksInTheHostTier) {
  model_->set_device_chunk_window(1);
  ASSERT_TRUE(manager_->Create("long", {}).ok());
  std::vector<float> before;
  {
    auto lease = manager_->Acquire("long");
    ASSERT_TRUE(lease.ok()) << lease.status();
    Feed(*lease, testing::RandomTokens(300, config_.vocab_size, 3));
    EXPECT_EQ(lease->state()->host_chunks(), 299 / 64 - 1);  // moved as they completed
    ASSERT_TRUE(lease->Commit().ok());
    before = NextLogits(*lease);
  }
  Reopen();
  auto lease = manager_->Acquire("long");
  ASSERT_TRUE(lease.ok()) << lease.status();
  EXPECT_EQ(lease->state()->num_chunks(), 299 / 64);
  EXPECT_EQ(lease->state()->host_chunks(), 299 / 64 - 1);
  EXPECT_EQ(NextLogits(*lease), before);
}

// Chunks moved to the host tier have a budget of their own: idle sessions go, LRU first, once
// the host tier holds more.
TEST_F(SessionManagerTest, IdleSessionsAreEvictedToTheHostTierBudget) {
  model_->set_device_chunk_window(1);
  const int64_t chunk_bytes = config_.chunk_kv_floats() * sizeof(float);
  const int64_t per_session = (299 / 64 - 1) * chunk_bytes;  // 300 tokens: 4 chunks, 3 moved
  Reopen(/*max_resident=*/8, /*max_resident_bytes=*/0,
         /*max_resident_host_bytes=*/5 * per_session / 2);
  const int64_t base = backend_->host_held_bytes();
  std::vector<std::vector<float>> logits;
  for (int i = 0; i < 3; ++i) {
    const std::string id = "h" + std::to_string(i);
    ASSERT_TRUE(manager_->Create(id, {}).ok());
    auto lease = manager_->Acquire(id);
    ASSERT_TRUE(lease.ok());
    Feed(*lease, testing::RandomTokens(300, config_.vocab_size, 30 + i));
    EXPECT_EQ(backend_->host_held_bytes() - base, (i + 1) * per_session);  // evicted at release
    ASSERT_TRUE(lease->Commit().ok());
    logits.push_back(NextLogits(*lease));
  }
  EXPECT_EQ(manager_->ResidentSessions(), 2);
  EXPECT_EQ(backend_->host_held_bytes() - base, 2 * per_session);
  for (int i = 0; i < 3; ++i) {
    auto lease = manager_->Acquire("h" + std::to_string(i));
    ASSERT_TRUE(lease.ok()) << lease.status();
    EXPECT_EQ(NextLogits(*lease), logits[i]);
  }
}

TEST_F(SessionManagerTest, OneWriterAtATime) {
  ASSERT_TRUE(manager_->Create("a", {}).ok());
  auto first = manager_->Acquire("a");
  ASSERT_TRUE(first.ok());
  auto second = manager_->Acquire("a");
  EXPECT_EQ(second.status().code(), absl::StatusCode::kAborted);
  EXPECT_EQ(manager_->Delete("a", std::nullopt).code(), absl::StatusCode::kAborted);
  { auto released = std::move(*first); }
  EXPECT_TRUE(manager_->Acquire("a").ok());
}

TEST_F(SessionManagerTest, UncommittedChangesAreDropped) {
  ASSERT_TRUE(manager_->Create("a", {}).ok());
  {
    auto lease = manager_->Acquire("a");
    Feed(*lease, testing::RandomTokens(100, config_.vocab_size, 3));
    ASSERT_TRUE(lease->Commit().ok());
  }
  {
    auto lease = manager_->Acquire("a");
    Feed(*lease, testing::RandomTokens(100, config_.vocab_size, 4));  // no commit
  }
  auto lease = manager_->Acquire("a");
  ASSERT_TRUE(lease.ok());
  EXPECT_EQ(lease->position(), 100);
  EXPECT_EQ(lease->state()->position(), 99);
}

TEST_F(SessionManagerTest, MemoryLimitIsResourceExhaustedNotACrash) {
  Reopen(/*max_resident=*/2);
  for (const char* id : {"x", "y", "z"}) ASSERT_TRUE(manager_->Create(id, {}).ok());
  auto x = manager_->Acquire("x");
  auto y = manager_->Acquire("y");
  ASSERT_TRUE(x.ok() && y.ok());
  auto z = manager_->Acquire("z");
  EXPECT_EQ(z.status().code(), absl::StatusCode::kResourceExhausted);
  { auto done = std::move(*x); }
  EXPECT_TRUE(manager_->Acquire("z").ok());  // the idle one was evicted
  EXPECT_LE(manager_->ResidentSessions(), 2);
}

TEST_F(SessionManagerTest, HitsMissesAndEvictionsAreCounted) {
  auto metrics = std::move(*Metrics::Create(""));
  Reopen(/*max_resident=*/2, 0, 0, metrics.get());
  auto count = [](prometheus::Counter* c) { return c->Value(); };
  for (const char* id : {"a", "b"}) ASSERT_TRUE(manager_->Create(id, {}).ok());
  {
    auto a = manager_->Acquire("a");  // resident since its creation: a hit
    ASSERT_TRUE(a.ok());
    Feed(*a, testing::RandomTokens(10, config_.vocab_size, 1));
    ASSERT_TRUE(a->Commit().ok());
  }
  {
    auto b = manager_->Acquire("b");  // a hit, then changed and dropped uncommitted
    ASSERT_TRUE(b.ok());
    Feed(*b, testing::RandomTokens(10, config_.vocab_size, 2));
  }
  ASSERT_TRUE(manager_->Acquire("b").ok());  // paged in again: a miss; unchanged, kept
  EXPECT_EQ(count(metrics->session_evictions), 0);
  ASSERT_TRUE(manager_->Create("c", {}).ok());  // evicts a, the least recently used
  EXPECT_EQ(count(metrics->session_evictions), 1);
  {
    auto a = manager_->Acquire("a");  // a miss; makes room by evicting b
    ASSERT_TRUE(a.ok());
  }
  // An unknown id is neither a miss nor a reason to evict an idle session.
  EXPECT_EQ(manager_->Acquire("nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(manager_->ResidentSessions(), 2);
  EXPECT_EQ(count(metrics->session_cache_hits), 2);
  EXPECT_EQ(count(metrics->session_cache_misses), 2);
  EXPECT_EQ(count(metrics->session_evictions), 2);
  // Refused leases: a busy session, then every slot leased.
  auto c = manager_->Acquire("c");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(manager_->Acquire("c").status().code(), absl::StatusCode::kAborted);
  auto a = manager_->Acquire("a");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(manager_->Acquire("b").status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(count(metrics->session_leases_busy), 1);
  EXPECT_EQ(count(metrics->session_leases_full), 1);
  const auto page_ins = metrics->session_page_in_latency->Collect().histogram;
  EXPECT_EQ(page_ins.sample_count, 2u);
  EXPECT_GT(page_ins.sample_sum, 0.0);
}

TEST_F(SessionManagerTest, IdleSessionsAreEvictedToTheByteBudget) {
  auto fill = [&](const std::string& id, uint64_t seed) {
    ASSERT_TRUE(manager_->Create(id, {}).ok());
    auto lease = manager_->Acquire(id);
    ASSERT_TRUE(lease.ok());
    Feed(*lease, testing::RandomTokens(300, config_.vocab_size, seed));
    ASSERT_TRUE(lease->Commit().ok());
  };
  // The model's workspace grows on its first prefill and stays; then one 300-token session's
  // own bytes, measured.
  fill("warm", 8);
  ASSERT_TRUE(manager_->Delete("warm", std::nullopt).ok());
  const int64_t base = backend_->held_bytes();
  fill("probe", 9);
  const int64_t per_session = backend_->held_bytes() - base;
  ASSERT_GT(per_session, 0);
  ASSERT_TRUE(manager_->Delete("probe", std::nullopt).ok());
  EXPECT_EQ(backend_->held_bytes(), base);

  // Room for two and a half such sessions: the third evicts the least recently used.
  Reopen(/*max_resident=*/8, /*max_resident_bytes=*/base + 5 * per_session / 2);
  std::vector<std::vector<float>> logits;
  for (int i = 0; i < 3; ++i) {
    const std::string id = "s" + std::to_string(i);
    ASSERT_TRUE(manager_->Create(id, {}).ok());
    auto lease = manager_->Acquire(id);
    ASSERT_TRUE(lease.ok());
    Feed(*lease, testing::RandomTokens(300, config_.vocab_size, 10 + i));
    ASSERT_TRUE(lease->Commit().ok());
    logits.push_back(NextLogits(*lease));
  }
  EXPECT_EQ(manager_->ResidentSessions(), 2);
  EXPECT_LE(backend_->held_bytes(), base + 5 * per_session / 2);
  // Evicted or not, every session comes back as committed (s0 is paged in again).
  for (int i = 0; i < 3; ++i) {
    auto lease = manager_->Acquire("s" + std::to_string(i));
    ASSERT_TRUE(lease.ok()) << lease.status();
    EXPECT_EQ(lease->position(), 300);
    EXPECT_EQ(NextLogits(*lease), logits[i]);
  }
  // A leased session is never evicted, even beyond the budget.
  Reopen(/*max_resident=*/8, /*max_resident_bytes=*/1);
  auto held = manager_->Acquire("s1");
  ASSERT_TRUE(held.ok());
  EXPECT_EQ(held->position(), 300);
  EXPECT_EQ(manager_->ResidentSessions(), 1);
}

TEST_F(SessionManagerTest, ForkSharesHistoryAndDivergesIndependently) {
  ASSERT_TRUE(manager_->Create("parent", {}).ok());
  {
    auto lease = manager_->Acquire("parent");
    Feed(*lease, testing::RandomTokens(260, config_.vocab_size, 5));
    ASSERT_TRUE(lease->Commit().ok());
  }
  auto child = manager_->Fork("parent", "child", {{"branch", "b"}});
  ASSERT_TRUE(child.ok()) << child.status();
  EXPECT_EQ(child->position, 260);
  EXPECT_EQ(child->meta.parent_id, "parent");
  EXPECT_EQ(child->meta.fork_position, 260);
  EXPECT_EQ(manager_->Fork("parent", "c2", {}, 1).status().code(),
            absl::StatusCode::kFailedPrecondition);
  std::vector<float> parent_next;
  {
    auto lease = manager_->Acquire("parent");
    parent_next = NextLogits(*lease);
    Feed(*lease, {1, 2, 3});
    ASSERT_TRUE(lease->Commit().ok());
  }
  EXPECT_EQ(manager_->Delete("parent", 5).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(manager_->Delete("parent", std::nullopt).ok());
  EXPECT_EQ(manager_->Get("parent").status().code(), absl::StatusCode::kNotFound);
  auto lease = manager_->Acquire("child");
  ASSERT_TRUE(lease.ok()) << lease.status();
  EXPECT_EQ(lease->position(), 260);
  EXPECT_EQ(NextLogits(*lease), parent_next);
}

TEST_F(SessionManagerTest, ListAndErrors) {
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(manager_->Create("s" + std::to_string(i), {}).ok());
  auto page = manager_->List("", 3);
  ASSERT_TRUE(page.ok());
  EXPECT_EQ(page->first.size(), 3u);
  EXPECT_FALSE(page->second.empty());
  auto rest = manager_->List(page->second, 3);
  ASSERT_TRUE(rest.ok());
  EXPECT_EQ(rest->first.size(), 2u);
  EXPECT_EQ(manager_->Create("s1", {}).status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(manager_->Acquire("nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(manager_->Acquire("bad id!").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(manager_->Create(std::string(129, 'a'), {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto generated = manager_->Create("", {});
  ASSERT_TRUE(generated.ok());
  EXPECT_TRUE(SessionManager::ValidateId(generated->id).ok());
}

TEST(SessionMetaTest, JsonRoundTrip) {
  SessionMeta m;
  m.labels = {{"k", "v"}, {"é", "ü"}};
  m.default_sampling.temperature = 0.7f;
  m.default_sampling.seed = 123456789012345ull;
  m.default_sampling.min_p = 0.05f;
  m.default_sampling.presence_penalty = -0.5f;
  m.default_sampling.repetition_penalty = 1.25f;
  m.default_sampling.logit_bias = {{3, -100.0f}, {70, 2.5f}};
  m.pending_token = 42;
  m.parent_id = "p";
  auto back = SessionMeta::FromJson(m.ToJson());
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->labels, m.labels);
  EXPECT_EQ(back->default_sampling.seed, m.default_sampling.seed);
  EXPECT_FALSE(back->default_sampling.top_p.has_value());
  EXPECT_EQ(back->default_sampling.min_p, 0.05f);
  EXPECT_EQ(back->default_sampling.presence_penalty, -0.5f);
  EXPECT_FALSE(back->default_sampling.frequency_penalty.has_value());
  EXPECT_EQ(back->default_sampling.repetition_penalty, 1.25f);
  ASSERT_EQ(back->default_sampling.logit_bias.size(), 2u);
  EXPECT_EQ(back->default_sampling.logit_bias[1].id, 70);
  EXPECT_EQ(back->default_sampling.logit_bias[1].bias, 2.5f);
  EXPECT_EQ(back->default_sampling.logit_bias[0].bias, -100.0f);
  EXPECT_EQ(back->pending_token, 42);
  EXPECT_EQ(back->parent_id, "p");
  EXPECT_EQ(SessionMeta::FromJson("{").status().code(), absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace ramba::server
