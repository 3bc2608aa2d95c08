// The gRPC service over real gRPC on loopback (port 0), a real RocksDB store in a temp dir and
// the byte-level fixture model: the session life cycle, streaming generation and error codes.
#include "server/service.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <functional>
#include <set>
#include <thread>
#include <tuple>

#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "tests/testing/test_util.h"

namespace ramba::server {
namespace {

namespace fs = std::filesystem;
namespace v1 = ::ramba::v1;

class ServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("ramba_svc_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    backend_ = kernels::CreateCpuBackend();
    const std::string model_dir = testing::FixtureDir() + "/tiny_byte";
    model_ = std::move(*RambaModel::Load(model_dir, backend_.get()));
    tokenizer_ = std::move(*LoadTokenizer(model_dir, model_->config().vocab_size));
    store::StoreOptions so;
    so.path = dir_.string();
    store_ = std::move(*store::SessionStore::Open(so));
    engine_ = std::make_unique<Engine>(model_.get(), EngineOptions{});
    sessions_ = std::make_unique<SessionManager>(model_.get(), store_.get(), SessionManagerOptions{});
    metrics_ = std::move(*Metrics::Create(""));
    ServiceOptions opts;
    opts.model_name = "tiny_byte";
    opts.device = "cpu";
    opts.limits.max_request_input_tokens = 5000;
    opts.limits.max_session_tokens = 100;
    // Commits and stream writes off the engine thread, as on a GPU (the server processes of
    // other tests run the CPU default: both on the engine thread).
    committer_ = std::make_unique<TaskPool>(2);
    writer_ = std::make_unique<TaskPool>(2);
    service_ = std::make_unique<RambaService>(model_.get(), tokenizer_.get(), engine_.get(),
                                              sessions_.get(), metrics_.get(), opts,
                                              committer_.get(), writer_.get());
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_GT(port, 0);
    stub_ = v1::RambaService::NewStub(
        grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    // A bounded shutdown: a reactor that never finished would show up as a failure, not a hang.
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(10));
    engine_->Stop();
    server_.reset();
    committer_.reset();
    writer_.reset();
    engine_.reset();
    sessions_.reset();
    store_.reset();
    fs::remove_all(dir_);
  }

  v1::Session Create(const std::string& id, const std::string& text) {
    grpc::ClientContext ctx;
    v1::CreateSessionRequest req;
    v1::CreateSessionResponse resp;
    req.set_session_id(id);
    if (!text.empty()) req.mutable_initial_input()->set_text(text);
    const grpc::Status s = stub_->CreateSession(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp.session();
  }

  struct Streamed {
    grpc::Status status;
    std::vector<int32_t> ids;
    std::vector<float> logprobs;  // NaN where the token came without one
    std::vector<std::vector<v1::TopLogprob>> top;  // one list per token
    std::string text;
    v1::Final final;
    bool has_final = false;
  };
  // A session made from `text`, with sampling defaults when given.
  void CreateWithDefaults(const std::string& id, const std::string& text,
                          const v1::SamplingParams* defaults) {
    grpc::ClientContext ctx;
    v1::CreateSessionRequest req;
    v1::CreateSessionResponse resp;
    req.set_session_id(id);
    req.mutable_initial_input()->set_text(text);
    if (defaults != nullptr) *req.mutable_default_sampling() = *defaults;
    EXPECT_TRUE(stub_->CreateSession(&ctx, req, &resp).ok());
  }
  // The ids of max_tokens tokens generated on session `id` (end of sequence ignored).
  std::vector<int32_t> GenerateIds(const std::string& id, const v1::SamplingParams& sampling,
                                   int max_tokens, bool commit = true) {
    v1::GenerateRequest g;
    g.set_session_id(id);
    g.mutable_stopping()->set_max_tokens(max_tokens);
    g.mutable_stopping()->set_ignore_eos(true);
    g.set_commit_generated(commit);
    *g.mutable_sampling() = sampling;
    Streamed out = Generate(g);
    EXPECT_TRUE(out.status.ok()) << out.status.error_message();
    return out.ids;
  }
  // The raw distribution's logprobs (log softmax in double) before each of `ids`, generated
  // after `prompt`, from the same model on the host.
  std::vector<std::vector<double>> RawLogprobs(const std::string& prompt,
                                               const std::vector<int32_t>& ids) {
    auto state = std::move(*model_->NewSession());
    std::vector<float> logits;
    EXPECT_TRUE(model_->Prefill(state.get(), tokenizer_->Encode(prompt), &logits).ok());
    SessionState* st[] = {state.get()};
    std::vector<std::vector<double>> out;
    for (int32_t id : ids) {
      double max = -INFINITY, sum = 0.0;
      for (float x : logits) max = std::max<double>(max, x);
      for (float x : logits) sum += std::exp(x - max);
      out.emplace_back();
      for (float x : logits) out.back().push_back(x - max - std::log(sum));
      const int32_t in[] = {id};
      EXPECT_TRUE(model_->Decode(st, in, &logits).ok());
    }
    return out;
  }
  Streamed Generate(const v1::GenerateRequest& req) {
    grpc::ClientContext ctx;
    auto reader = stub_->Generate(&ctx, req);
    Streamed out;
    v1::GenerateResponse msg;
    while (reader->Read(&msg)) {
      if (msg.has_tokens()) {
        for (const auto& t : msg.tokens().tokens()) {
          out.ids.push_back(t.id());
          out.logprobs.push_back(t.has_logprob() ? t.logprob() : NAN);
          out.top.emplace_back(t.top_logprobs().begin(), t.top_logprobs().end());
          out.text += t.text();
        }
      } else if (msg.has_final()) {
        out.final = msg.final();
        out.has_final = true;
      }
    }
    out.status = reader->Finish();
    return out;
  }

  fs::path dir_;
  std::unique_ptr<kernels::Backend> backend_;
  std::unique_ptr<RambaModel> model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<store::SessionStore> store_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<SessionManager> sessions_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<TaskPool> committer_;
  std::unique_ptr<TaskPool> writer_;
  std::unique_ptr<RambaService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::RambaService::Stub> stub_;
};

TEST_F(ServiceTest, CreateAppendGenerate) {
  v1::Session s = Create("chat", "Once upon a time");
  EXPECT_EQ(s.position(), 16);
  {
    grpc::ClientContext ctx;
    v1::AppendRequest req;
    v1::AppendResponse resp;
    req.set_session_id("chat");
    req.mutable_input()->set_text(", in a land far away,");
    req.set_expected_position(16);
    ASSERT_TRUE(stub_->Append(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.appended_tokens(), 21);
    EXPECT_EQ(resp.session().position(), 37);
  }
  v1::GenerateRequest g;
  g.set_session_id("chat");
  g.mutable_stopping()->set_max_tokens(20);
  g.mutable_stopping()->set_ignore_eos(true);
  g.mutable_sampling()->set_temperature(0);
  Streamed out = Generate(g);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  ASSERT_TRUE(out.has_final);
  EXPECT_EQ(out.ids.size(), 20u);
  EXPECT_EQ(out.final.finish_reason(), v1::FINISH_REASON_MAX_TOKENS);
  EXPECT_EQ(out.final.position(), 57);
  EXPECT_EQ(out.final.usage().generated_tokens(), 20);
  for (float lp : out.logprobs) EXPECT_TRUE(std::isnan(lp)) << "logprob sent unasked";

  // Greedy generation is what the model gives for the same history, token for token.
  auto state = std::move(*model_->NewSession());
  std::vector<int32_t> history = tokenizer_->Encode("Once upon a time, in a land far away,");
  std::vector<float> logits;
  ASSERT_TRUE(model_->Prefill(state.get(), history, &logits).ok());
  SessionState* st[] = {state.get()};
  for (int i = 0; i < 20; ++i) {
    const int32_t t = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    ASSERT_EQ(t, out.ids[i]) << "token " << i;
    const int32_t in[] = {t};
    ASSERT_TRUE(model_->Decode(st, in, &logits).ok());
  }

  grpc::ClientContext ctx;
  v1::GetSessionRequest gr;
  v1::GetSessionResponse gresp;
  gr.set_session_id("chat");
  ASSERT_TRUE(stub_->GetSession(&ctx, gr, &gresp).ok());
  EXPECT_EQ(gresp.session().position(), 57);
}

// include_logprobs: every token carries the log of its probability under the model's raw
// distribution (before temperature), as the model gives it for the same history.
TEST_F(ServiceTest, LogprobsOfSampledTokens) {
  Create("lp", "Once upon a time");
  v1::GenerateRequest g;
  g.set_session_id("lp");
  g.mutable_stopping()->set_max_tokens(8);
  g.mutable_stopping()->set_ignore_eos(true);
  g.mutable_sampling()->set_temperature(0.7f);
  g.mutable_sampling()->set_seed(5);
  g.mutable_output()->set_include_logprobs(true);
  Streamed out = Generate(g);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  ASSERT_EQ(out.ids.size(), 8u);

  const auto want = RawLogprobs("Once upon a time", out.ids);
  for (int i = 0; i < 8; ++i) EXPECT_NEAR(out.logprobs[i], want[i][out.ids[i]], 1e-4) << i;
}

// top_logprobs: each token carries the n most likely tokens of the same raw distribution, with
// their bytes, most likely first; the logprob comes with them; out of range: INVALID_ARGUMENT.
TEST_F(ServiceTest, TopLogprobsOfEachToken) {
  Create("top", "Once upon a time");
  v1::GenerateRequest g;
  g.set_session_id("top");
  g.mutable_stopping()->set_max_tokens(6);
  g.mutable_stopping()->set_ignore_eos(true);
  g.mutable_sampling()->set_temperature(0);
  g.mutable_output()->set_top_logprobs(3);
  Streamed out = Generate(g);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  ASSERT_EQ(out.ids.size(), 6u);
  const auto raw = RawLogprobs("Once upon a time", out.ids);
  for (int i = 0; i < 6; ++i) {
    ASSERT_EQ(out.top[i].size(), 3u) << i;
    EXPECT_FALSE(std::isnan(out.logprobs[i]));
    EXPECT_EQ(out.top[i][0].id(), out.ids[i]);  // greedy
    EXPECT_EQ(out.top[i][0].logprob(), out.logprobs[i]);
    const std::vector<double>& want = raw[i];
    for (int j = 0; j < 3; ++j) {
      const v1::TopLogprob& t = out.top[i][j];
      EXPECT_NEAR(t.logprob(), want[t.id()], 1e-4) << i << " " << j;
      EXPECT_EQ(t.token(), *tokenizer_->DecodeToken(t.id()));
      if (j > 0) EXPECT_LE(t.logprob(), out.top[i][j - 1].logprob());
    }
  }
  for (int bad : {-1, 21}) {
    g.mutable_output()->set_top_logprobs(bad);
    Streamed b = Generate(g);
    EXPECT_EQ(b.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_NE(b.status.error_message().find("top_logprobs"), std::string::npos);
  }
}

// min_p = 1 keeps only the most likely token, so even a hot temperature then samples what
// greedy decoding gives; from the session's defaults (kept in the store) or the request.
TEST_F(ServiceTest, MinPFromSessionDefaultsOrRequest) {
  const std::string prompt = "Once upon a time";
  auto run = [&](const std::string& id, const v1::SamplingParams* defaults,
                 const v1::SamplingParams& sampling) {
    CreateWithDefaults(id, prompt, defaults);
    return GenerateIds(id, sampling, 12);
  };
  v1::SamplingParams greedy;
  greedy.set_temperature(0);
  const std::vector<int32_t> want = run("g", nullptr, greedy);
  ASSERT_EQ(want.size(), 12u);

  v1::SamplingParams hot;
  hot.set_temperature(3.0f);
  hot.set_seed(11);
  EXPECT_NE(run("hot", nullptr, hot), want) << "temperature 3 alone should leave greedy";
  v1::SamplingParams hot_min_p = hot;
  hot_min_p.set_min_p(1.0f);
  EXPECT_EQ(run("req", nullptr, hot_min_p), want);
  v1::SamplingParams seed_only;
  seed_only.set_seed(11);
  EXPECT_EQ(run("def", &hot_min_p, seed_only), want);

  grpc::ClientContext ctx;
  v1::GetSessionRequest gr;
  v1::GetSessionResponse gresp;
  gr.set_session_id("def");
  ASSERT_TRUE(stub_->GetSession(&ctx, gr, &gresp).ok());
  EXPECT_EQ(gresp.session().default_sampling().min_p(), 1.0f);
}

TEST_F(ServiceTest, PenaltiesFromSessionDefaultsOrRequestCountEachGeneration) {
  const std::string prompt = "Once upon a time";
  auto create = [&](const std::string& id, const v1::SamplingParams* defaults) {
    CreateWithDefaults(id, prompt, defaults);
  };
  // 24 tokens, left uncommitted so that the session can run them again.
  auto run = [&](const std::string& id, const v1::SamplingParams& sampling) {
    return GenerateIds(id, sampling, 24, /*commit=*/false);
  };
  v1::SamplingParams greedy;
  greedy.set_temperature(0);
  create("plain", nullptr);
  const std::vector<int32_t> plain = run("plain", greedy);
  ASSERT_EQ(plain.size(), 24u);
  const std::set<int32_t> plain_distinct(plain.begin(), plain.end());
  ASSERT_LT(plain_distinct.size(), plain.size()) << "greedy output should repeat tokens";

  v1::SamplingParams penalised = greedy;
  penalised.set_frequency_penalty(2.0f);
  penalised.set_presence_penalty(2.0f);
  penalised.set_repetition_penalty(3.0f);
  create("req", nullptr);
  const std::vector<int32_t> want = run("req", penalised);
  ASSERT_EQ(want.size(), 24u);
  EXPECT_NE(want, plain);
  EXPECT_GT(std::set<int32_t>(want.begin(), want.end()).size(), plain_distinct.size());
  // Each generation counts from zero: the same request again gives the same tokens, and a
  // session's second generation gives what a fork of it (fresh counts) gives.
  EXPECT_EQ(run("req", penalised), want);
  auto run_committed = [&](const std::string& id) { return GenerateIds(id, penalised, 24); };
  EXPECT_EQ(run_committed("req"), want);
  {
    grpc::ClientContext ctx;
    v1::ForkSessionRequest f;
    v1::ForkSessionResponse fr;
    f.set_session_id("req");
    f.set_new_session_id("req-fork");
    ASSERT_TRUE(stub_->ForkSession(&ctx, f, &fr).ok());
  }
  const std::vector<int32_t> second = run_committed("req");
  EXPECT_EQ(run_committed("req-fork"), second);
  // From the session's defaults (the request sets only the temperature).
  create("def", &penalised);
  EXPECT_EQ(run("def", greedy), want);
  // A request's value overrides the default: penalties off again.
  v1::SamplingParams off = greedy;
  off.set_frequency_penalty(0.0f);
  off.set_presence_penalty(0.0f);
  off.set_repetition_penalty(1.0f);
  EXPECT_EQ(run("def", off), plain);

  grpc::ClientContext ctx;
  v1::GetSessionRequest gr;
  v1::GetSessionResponse gresp;
  gr.set_session_id("def");
  ASSERT_TRUE(stub_->GetSession(&ctx, gr, &gresp).ok());
  EXPECT_EQ(gresp.session().default_sampling().repetition_penalty(), 3.0f);
  EXPECT_EQ(gresp.session().default_sampling().frequency_penalty(), 2.0f);

  // Out of range: INVALID_ARGUMENT naming the field, nothing generated.
  for (const auto& [field, set] :
       std::vector<std::pair<std::string, std::function<void(v1::SamplingParams*)>>>{
           {"presence_penalty", [](v1::SamplingParams* p) { p->set_presence_penalty(2.5f); }},
           {"frequency_penalty", [](v1::SamplingParams* p) { p->set_frequency_penalty(-3.0f); }},
           {"repetition_penalty",
            [](v1::SamplingParams* p) { p->set_repetition_penalty(0.0f); }}}) {
    v1::GenerateRequest g;
    g.set_session_id("req");
    g.mutable_stopping()->set_max_tokens(4);
    set(g.mutable_sampling());
    Streamed out = Generate(g);
    EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << field;
    EXPECT_NE(out.status.error_message().find(field), std::string::npos)
        << out.status.error_message();
    EXPECT_TRUE(out.ids.empty());
  }
}

// A logit bias from the request or from the session's defaults (stored with the session; a
// request's map replaces the session's); min_tokens holds EOS and stop ids back and lets only
// stop sequences ending in token min_tokens or later stop; bad values name their field.
TEST_F(ServiceTest, LogitBiasAndMinTokens) {
  const std::string prompt = "Once upon a time";
  v1::SamplingParams greedy;
  greedy.set_temperature(0);
  CreateWithDefaults("s", prompt, nullptr);
  const std::vector<int32_t> plain = GenerateIds("s", greedy, 8, /*commit=*/false);
  ASSERT_EQ(plain.size(), 8u);
  const std::vector<int32_t> q = tokenizer_->Encode("Q");
  ASSERT_EQ(q.size(), 1u);
  const int32_t forced = q[0];
  ASSERT_EQ(std::find(plain.begin(), plain.end(), forced), plain.end());
  v1::SamplingParams biased = greedy;
  (*biased.mutable_logit_bias())[forced] = 100.0f;
  (*biased.mutable_logit_bias())[plain[0]] = -1.0f;
  EXPECT_EQ(GenerateIds("s", biased, 5, false), std::vector<int32_t>(5, forced));

  CreateWithDefaults("def", prompt, &biased);
  EXPECT_EQ(GenerateIds("def", greedy, 5, false), std::vector<int32_t>(5, forced));
  v1::SamplingParams unbiased = greedy;
  (*unbiased.mutable_logit_bias())[forced] = 0.0f;
  EXPECT_EQ(GenerateIds("def", unbiased, 8, false), plain);
  {
    grpc::ClientContext ctx;
    v1::GetSessionRequest gr;
    v1::GetSessionResponse gresp;
    gr.set_session_id("def");
    ASSERT_TRUE(stub_->GetSession(&ctx, gr, &gresp).ok());
    EXPECT_EQ(gresp.session().default_sampling().logit_bias().at(forced), 100.0f);
    EXPECT_EQ(gresp.session().default_sampling().logit_bias().size(), 2u);
  }

  auto generate = [&](int min_tokens, auto&& stop) {
    v1::GenerateRequest g;
    g.set_session_id("s");
    g.set_commit_generated(false);
    g.mutable_stopping()->set_max_tokens(10);
    g.mutable_stopping()->set_min_tokens(min_tokens);
    *g.mutable_sampling() = biased;
    stop(g.mutable_stopping());
    return Generate(g);
  };
  std::vector<int32_t> want(plain.begin(), plain.begin() + 3);
  want.push_back(forced);
  // The forced token as a stop id: three tokens of the plain greedy run (plain[0]'s small bias
  // aside, which changes nothing there), then the stop token.
  Streamed out = generate(3, [&](v1::StoppingCriteria* s) { s->add_stop_token_ids(forced); });
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(out.ids, want);
  EXPECT_EQ(out.final.finish_reason(), v1::FINISH_REASON_STOP_TOKEN);
  // The end-of-sequence token, forced the same way.
  const int32_t eos = model_->config().eos_token_id;
  (*biased.mutable_logit_bias())[eos] = 100.0f;
  (*biased.mutable_logit_bias())[forced] = 0.0f;
  want.back() = eos;
  out = generate(3, [](v1::StoppingCriteria*) {});
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(out.ids, want);
  EXPECT_EQ(out.final.finish_reason(), v1::FINISH_REASON_EOS);
  // A stop sequence in every token counts from token min_tokens on.
  (*biased.mutable_logit_bias())[eos] = 0.0f;
  (*biased.mutable_logit_bias())[forced] = 100.0f;
  for (const int min_tokens : {0, 1, 3}) {
    out = generate(min_tokens, [](v1::StoppingCriteria* s) { s->add_stop_sequences("Q"); });
    ASSERT_TRUE(out.status.ok()) << out.status.error_message();
    EXPECT_EQ(out.ids, std::vector<int32_t>(std::max(min_tokens, 1), forced));
    EXPECT_EQ(out.text, std::string(std::max(min_tokens - 1, 0), 'Q'));
    EXPECT_EQ(out.final.finish_reason(), v1::FINISH_REASON_STOP_SEQUENCE);
  }

  // Errors name the field, in requests and in session defaults.
  const int32_t vocab = static_cast<int32_t>(model_->config().vocab_size);
  for (const auto& [key, value, field] :
       std::vector<std::tuple<int32_t, float, std::string>>{{forced, 100.5f, "sampling.logit_bias"},
                                                            {vocab, 1.0f, "sampling.logit_bias"},
                                                            {-1, 1.0f, "sampling.logit_bias"}}) {
    v1::SamplingParams bad = greedy;
    (*bad.mutable_logit_bias())[key] = value;
    v1::GenerateRequest g;
    g.set_session_id("s");
    *g.mutable_sampling() = bad;
    const Streamed e = Generate(g);
    EXPECT_EQ(e.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(e.status.error_message().find(field), std::string::npos) << e.status.error_message();
    grpc::ClientContext ctx;
    v1::CreateSessionRequest req;
    v1::CreateSessionResponse resp;
    req.set_session_id("bad");
    *req.mutable_default_sampling() = bad;
    const grpc::Status s = stub_->CreateSession(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("default_sampling.logit_bias"), std::string::npos)
        << s.error_message();
  }
  for (const int min_tokens : {-1, 11}) {
    const Streamed e = generate(min_tokens, [](v1::StoppingCriteria*) {});
    EXPECT_EQ(e.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(e.status.error_message().find("stopping.min_tokens"), std::string::npos)
        << e.status.error_message();
  }
}

TEST_F(ServiceTest, CommitGeneratedFalseLeavesSessionAsItWas) {
  Create("s", "abcdef");
  v1::GenerateRequest g;
  g.set_session_id("s");
  g.mutable_stopping()->set_max_tokens(5);
  g.mutable_stopping()->set_ignore_eos(true);
  g.mutable_sampling()->set_temperature(0);
  g.set_commit_generated(false);
  g.mutable_input()->set_text("gh");
  Streamed a = Generate(g);
  ASSERT_TRUE(a.status.ok()) << a.status.error_message();
  EXPECT_EQ(a.final.position(), 8);  // the input joined, the generated tokens did not
  Streamed b = Generate(g);  // same again from position 10 now
  ASSERT_TRUE(b.status.ok());
  EXPECT_EQ(b.final.position(), 10);
}

TEST_F(ServiceTest, ErrorsNameTheProblem) {
  Create("e", "hello");
  {
    grpc::ClientContext ctx;
    v1::AppendRequest req;
    v1::AppendResponse resp;
    req.set_session_id("missing");
    req.mutable_input()->set_text("x");
    EXPECT_EQ(stub_->Append(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  {
    grpc::ClientContext ctx;
    v1::AppendRequest req;
    v1::AppendResponse resp;
    req.set_session_id("e");
    req.mutable_input()->set_text("x");
    req.set_expected_position(3);
    const grpc::Status s = stub_->Append(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_NE(s.error_message().find("expected_position"), std::string::npos);
    const auto& trailers = ctx.GetServerTrailingMetadata();
    auto it = trailers.find("ramba-session-position");
    ASSERT_NE(it, trailers.end());
    EXPECT_EQ(std::string(it->second.data(), it->second.size()), "5");
  }
  {
    grpc::ClientContext ctx;
    v1::AppendRequest req;
    v1::AppendResponse resp;
    req.set_session_id("e");
    req.mutable_input()->mutable_tokens()->add_ids(256);
    const grpc::Status s = stub_->Append(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("input.tokens.ids[0]"), std::string::npos) << s.error_message();
  }
  {
    grpc::ClientContext ctx;
    v1::AppendRequest req;
    v1::AppendResponse resp;
    req.set_session_id("e");
    req.mutable_input()->set_text(std::string(6000, 'a'));
    EXPECT_EQ(stub_->Append(&ctx, req, &resp).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  }
  v1::GenerateRequest g;
  g.set_session_id("e");
  g.mutable_sampling()->set_top_p(1.5f);
  Streamed bad = Generate(g);
  EXPECT_EQ(bad.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(bad.status.error_message().find("top_p"), std::string::npos);
  EXPECT_FALSE(bad.has_final);
  g.mutable_sampling()->clear_top_p();
  g.mutable_sampling()->set_min_p(-0.5f);
  bad = Generate(g);
  EXPECT_EQ(bad.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(bad.status.error_message().find("min_p"), std::string::npos)
      << bad.status.error_message();
  g.mutable_sampling()->clear_min_p();
  g.mutable_stopping()->set_max_tokens(0);
  EXPECT_EQ(Generate(g).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // Nothing above changed the session.
  grpc::ClientContext ctx;
  v1::GetSessionRequest gr;
  v1::GetSessionResponse gresp;
  gr.set_session_id("e");
  ASSERT_TRUE(stub_->GetSession(&ctx, gr, &gresp).ok());
  EXPECT_EQ(gresp.session().position(), 5);
}

TEST_F(ServiceTest, StopSequenceAndGenerateOnce) {
  v1::GenerateOnceRequest once;
  once.mutable_input()->set_text("The passkey is 7243. ");
  once.mutable_stopping()->set_max_tokens(12);
  once.mutable_stopping()->set_ignore_eos(true);
  once.mutable_sampling()->set_temperature(0);
  grpc::ClientContext ctx;
  auto reader = stub_->GenerateOnce(&ctx, once);
  v1::GenerateResponse msg;
  std::string text;
  std::vector<int32_t> ids;
  bool final = false;
  while (reader->Read(&msg)) {
    if (msg.has_final()) {
      final = true;
      EXPECT_FALSE(msg.final().has_position());
    }
    for (const auto& t : msg.tokens().tokens()) {
      ids.push_back(t.id());
      text += t.text();
    }
  }
  ASSERT_TRUE(reader->Finish().ok());
  ASSERT_TRUE(final);
  ASSERT_EQ(ids.size(), 12u);
  // Use a piece of that output as a stop sequence: generation must stop there and not leak it.
  const std::string stop = text.substr(4, 2);
  Create("st", "The passkey is 7243. ");
  v1::GenerateRequest g;
  g.set_session_id("st");
  g.mutable_stopping()->set_max_tokens(12);
  g.mutable_stopping()->set_ignore_eos(true);
  g.mutable_stopping()->add_stop_sequences(stop);
  g.mutable_sampling()->set_temperature(0);
  Streamed out = Generate(g);
  ASSERT_TRUE(out.status.ok());
  EXPECT_EQ(out.final.finish_reason(), v1::FINISH_REASON_STOP_SEQUENCE);
  EXPECT_EQ(out.final.stop_sequence(), stop);
  EXPECT_EQ(out.text, text.substr(0, text.find(stop)));
}

// A generation that ends on a stop token leaves that token fed, whether the engine's pipelined
// decode had fed it already or not: the store holds it as history, not pending, so the session
// needs input to go on, and goes on as the model does over the whole history.
// A client that cancels mid-stream while tokens are queued for the stream-writer pool: the call
// ends CANCELLED without committing, nothing hangs or is written after the call is gone, and the
// session goes on from where it was.
TEST_F(ServiceTest, CancelledStreamWithQueuedWrites) {
  const int64_t p0 = Create("cx", "Once upon a time").position();
  // Within the fixture's 100-token session limit even when every round completes.
  for (int round = 0; round < 3; ++round) {
    grpc::ClientContext ctx;
    v1::GenerateRequest g;
    g.set_session_id("cx");
    g.mutable_stopping()->set_max_tokens(25);
    g.mutable_stopping()->set_ignore_eos(true);
    auto reader = stub_->Generate(&ctx, g);
    v1::GenerateResponse msg;
    int tokens = 0;
    while (tokens < 3 && reader->Read(&msg)) tokens += msg.tokens().tokens_size();
    ctx.TryCancel();
    while (reader->Read(&msg)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  // The engine may still be ending the last cancelled request (it holds the session until then).
  Streamed out;
  for (int attempt = 0; attempt < 100; ++attempt) {
    v1::GenerateRequest g;
    g.set_session_id("cx");
    g.mutable_stopping()->set_max_tokens(4);
    g.mutable_stopping()->set_ignore_eos(true);
    out = Generate(g);
    if (out.status.error_code() != grpc::StatusCode::ABORTED &&
        out.status.error_code() != grpc::StatusCode::FAILED_PRECONDITION) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(out.ids.size(), 4u);
  // A round the server finished before the cancel reached it committed its 25 tokens (the client
  // sees CANCELLED either way); a cancelled one committed nothing.
  EXPECT_EQ((out.final.position() - p0 - 4) % 25, 0) << out.final.position();
  grpc::ClientContext ctx;
  v1::GetSessionRequest get;
  v1::GetSessionResponse got;
  get.set_session_id("cx");
  ASSERT_TRUE(stub_->GetSession(&ctx, get, &got).ok());
  EXPECT_EQ(got.session().position(), out.final.position());
}

TEST_F(ServiceTest, StopTokenIsFedHistory) {
  // Greedy continuation by hand from `history`, n tokens.
  auto greedy = [&](const std::vector<int32_t>& history, int n) {
    std::vector<int32_t> out;
    auto state = std::move(*model_->NewSession());
    std::vector<float> logits;
    EXPECT_TRUE(model_->Prefill(state.get(), history, &logits).ok());
    SessionState* st[] = {state.get()};
    for (int i = 0; i < n; ++i) {
      out.push_back(
          static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin()));
      const int32_t in[] = {out.back()};
      EXPECT_TRUE(model_->Decode(st, in, &logits).ok());
    }
    return out;
  };
  const std::string prompt = "Once upon a time";
  std::vector<int32_t> history = tokenizer_->Encode(prompt);
  const std::vector<int32_t> first = greedy(history, 20);
  // The first token from the 5th on that did not occur before it: generation stops right there.
  size_t k = 4;
  while (k < first.size() &&
         std::find(first.begin(), first.begin() + k, first[k]) != first.begin() + k) {
    ++k;
  }
  ASSERT_LT(k, first.size()) << "no usable stop token in the greedy output";
  const int64_t p0 = Create("st", prompt).position();
  v1::GenerateRequest g;
  g.set_session_id("st");
  g.mutable_stopping()->set_max_tokens(30);
  g.mutable_stopping()->set_ignore_eos(true);
  g.mutable_stopping()->add_stop_token_ids(first[k]);
  g.mutable_sampling()->set_temperature(0);
  Streamed out = Generate(g);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(out.final.finish_reason(), v1::FINISH_REASON_STOP_TOKEN);
  EXPECT_EQ(out.ids, std::vector<int32_t>(first.begin(), first.begin() + k + 1));
  const int64_t after = p0 + static_cast<int64_t>(k) + 1;
  EXPECT_EQ(out.final.position(), after);
  {
    // What the store holds: every token fed, none pending.
    SessionManager other(model_.get(), store_.get(), SessionManagerOptions{});
    auto lease = other.Acquire("st");
    ASSERT_TRUE(lease.ok()) << lease.status();
    EXPECT_EQ(lease->position(), after);
    EXPECT_EQ(lease->state()->position(), after);
    EXPECT_FALSE(lease->meta().pending_token.has_value());
  }
  // Nothing pending: generating needs input, and says so.
  v1::GenerateRequest bare;
  bare.set_session_id("st");
  bare.mutable_stopping()->set_max_tokens(3);
  Streamed refused = Generate(bare);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(refused.status.error_message().find("stop token"), std::string::npos)
      << refused.status.error_message();
  // With input the session goes on as the model does over the whole history.
  v1::GenerateRequest more = g;
  more.mutable_stopping()->clear_stop_token_ids();
  more.mutable_stopping()->set_max_tokens(5);
  more.mutable_input()->set_text(" The end");
  Streamed next = Generate(more);
  ASSERT_TRUE(next.status.ok()) << next.status.error_message();
  history.insert(history.end(), out.ids.begin(), out.ids.end());
  const std::vector<int32_t> input = tokenizer_->Encode(" The end");
  history.insert(history.end(), input.begin(), input.end());
  EXPECT_EQ(next.ids, greedy(history, 5));
  EXPECT_EQ(next.final.position(), after + static_cast<int64_t>(input.size()) + 5);
}

TEST_F(ServiceTest, ForkListDelete) {
  Create("p", "shared history");
  grpc::ClientContext c1;
  v1::ForkSessionRequest f;
  v1::ForkSessionResponse fr;
  f.set_session_id("p");
  f.set_new_session_id("c");
  ASSERT_TRUE(stub_->ForkSession(&c1, f, &fr).ok());
  EXPECT_EQ(fr.session().position(), 14);
  EXPECT_EQ(fr.session().parent_id(), "p");
  grpc::ClientContext c2;
  v1::ListSessionsRequest l;
  v1::ListSessionsResponse lr;
  ASSERT_TRUE(stub_->ListSessions(&c2, l, &lr).ok());
  EXPECT_EQ(lr.sessions_size(), 2);
  grpc::ClientContext c3;
  v1::DeleteSessionRequest d;
  v1::DeleteSessionResponse dr;
  d.set_session_id("p");
  ASSERT_TRUE(stub_->DeleteSession(&c3, d, &dr).ok());
  v1::GenerateRequest g;
  g.set_session_id("c");
  g.mutable_stopping()->set_max_tokens(3);
  Streamed out = Generate(g);
  EXPECT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(out.final.position(), 17);
}

TEST_F(ServiceTest, SessionLimit) {
  Create("lim", std::string(90, 'a'));
  {
    grpc::ClientContext ctx;
    v1::AppendRequest req;
    v1::AppendResponse resp;
    req.set_session_id("lim");
    req.mutable_input()->set_text(std::string(20, 'b'));
    const grpc::Status s = stub_->Append(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_NE(s.error_message().find("max_session_tokens"), std::string::npos);
  }
  v1::GenerateRequest g;
  g.set_session_id("lim");
  g.mutable_stopping()->set_max_tokens(50);
  g.mutable_stopping()->set_ignore_eos(true);
  Streamed out = Generate(g);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(out.final.finish_reason(), v1::FINISH_REASON_SESSION_LIMIT);
  EXPECT_EQ(out.final.position(), 100);
  EXPECT_EQ(out.ids.size(), 10u);
  EXPECT_EQ(Generate(g).status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
}

TEST_F(ServiceTest, ModelInfoAndTokenize) {
  grpc::ClientContext c1;
  v1::GetModelInfoRequest req;
  v1::GetModelInfoResponse resp;
  ASSERT_TRUE(stub_->GetModelInfo(&c1, req, &resp).ok());
  EXPECT_EQ(resp.model().vocab_size(), 256);
  EXPECT_EQ(resp.model().chunk_size(), 64);
  EXPECT_EQ(resp.model().tokenizer(), v1::TOKENIZER_KIND_BYTE);
  EXPECT_EQ(resp.limits().max_logit_bias(), kMaxLogitBiasEntries);
  EXPECT_EQ(resp.limits().default_sampling().repetition_penalty(), 1.0f);
  grpc::ClientContext c2;
  v1::TokenizeRequest t;
  v1::TokenizeResponse tr;
  t.set_text("hi");
  ASSERT_TRUE(stub_->Tokenize(&c2, t, &tr).ok());
  ASSERT_EQ(tr.ids_size(), 2);
  EXPECT_EQ(tr.ids(0), 'h');
}

}  // namespace
}  // namespace ramba::server
