// The real ramba-server binary as a child process (fork/exec, free ports, a temporary data
// directory, the byte-level fixture model), driven over gRPC and HTTP: crash recovery after
// SIGKILL mid-stream, concurrent sessions, client cancellation and deadlines, every bad-input
// error code, /metrics, and the SIGTERM drain.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "ramba/v1/ramba.grpc.pb.h"
#include "tests/testing/http.h"
#include "tests/testing/test_util.h"

#ifndef RAMBA_SERVER_BIN
#error "RAMBA_SERVER_BIN (the ramba-server binary) must be defined by the build"
#endif

namespace ramba {
namespace {

namespace fs = std::filesystem;
namespace v1 = ::ramba::v1;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// A fresh directory under the system temp dir, removed at destruction.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "ramba_proc_XXXXXX").string();
    path_ = ::mkdtemp(tmpl.data()) != nullptr ? tmpl : "";
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// One ramba-server child process. Start() waits for its "listening on port P, metrics on port M"
// line; the destructor SIGKILLs it if it still runs.
class ServerProcess {
 public:
  ~ServerProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (out_ >= 0) ::close(out_);
  }

  // Returns an error message, or "" when the server is up.
  std::string Start(const std::string& data_dir, const std::vector<std::string>& extra = {}) {
    std::vector<std::string> args = {RAMBA_SERVER_BIN,
                                     "--model", testing::FixtureDir() + "/tiny_byte",
                                     "--data_dir", data_dir,
                                     "--host", "127.0.0.1",
                                     "--port", "0",
                                     "--metrics_port", "0",
                                     "--threads", "1"};
    args.insert(args.end(), extra.begin(), extra.end());
    int fds[2];
    if (::pipe(fds) != 0) return "pipe failed";
    const pid_t pid = ::fork();
    if (pid < 0) return "fork failed";
    if (pid == 0) {
      ::dup2(fds[1], STDOUT_FILENO);
      ::close(fds[0]);
      ::close(fds[1]);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    ::close(fds[1]);
    pid_ = pid;
    out_ = fds[0];
    // Read the first line (30 s at most).
    std::string line;
    const auto deadline = Clock::now() + 30s;
    while (line.find('\n') == std::string::npos) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) return "timed out waiting for the server's first line";
      pollfd p{out_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      char c;
      if (::read(out_, &c, 1) != 1) return "the server exited before listening: '" + line + "'";
      line.push_back(c);
    }
    std::smatch m;
    if (!std::regex_search(line, m, std::regex("listening on port (\\d+), metrics on port (-?\\d+)"))) {
      return "unexpected first line: " + line;
    }
    port_ = std::stoi(m[1]);
    metrics_port_ = std::stoi(m[2]);
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(port_),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::RambaService::NewStub(channel_);
    return "";
  }

  void Signal(int sig) { ::kill(pid_, sig); }

  // Waits for the process to exit (up to `timeout`); returns its wait status, or nullopt.
  std::optional<int> Wait(std::chrono::milliseconds timeout) {
    const auto deadline = Clock::now() + timeout;
    while (Clock::now() < deadline) {
      int status = 0;
      const pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        pid_ = -1;
        return status;
      }
      std::this_thread::sleep_for(20ms);
    }
    return std::nullopt;
  }

  v1::RambaService::Stub* stub() { return stub_.get(); }
  int metrics_port() const { return metrics_port_; }

 private:
  pid_t pid_ = -1;
  int out_ = -1;
  int port_ = 0;
  int metrics_port_ = 0;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::RambaService::Stub> stub_;
};

// Client helpers.

grpc::Status CreateSession(v1::RambaService::Stub* stub, const std::string& id,
                           v1::Session* out = nullptr) {
  grpc::ClientContext ctx;
  v1::CreateSessionRequest req;
  v1::CreateSessionResponse resp;
  req.set_session_id(id);
  const grpc::Status s = stub->CreateSession(&ctx, req, &resp);
  if (out != nullptr) *out = resp.session();
  return s;
}

grpc::Status AppendText(v1::RambaService::Stub* stub, const std::string& id,
                        const std::string& text, int64_t* position = nullptr) {
  grpc::ClientContext ctx;
  v1::AppendRequest req;
  v1::AppendResponse resp;
  req.set_session_id(id);
  req.mutable_input()->set_text(text);
  const grpc::Status s = stub->Append(&ctx, req, &resp);
  if (position != nullptr) *position = resp.session().position();
  return s;
}

int64_t Position(v1::RambaService::Stub* stub, const std::string& id) {
  grpc::ClientContext ctx;
  v1::GetSessionRequest req;
  v1::GetSessionResponse resp;
  req.set_session_id(id);
  const grpc::Status s = stub->GetSession(&ctx, req, &resp);
  EXPECT_TRUE(s.ok()) << id << ": " << s.error_message();
  return s.ok() ? resp.session().position() : -1;
}

v1::GenerateRequest Greedy(const std::string& id, int32_t max_tokens) {
  v1::GenerateRequest req;
  req.set_session_id(id);
  req.mutable_sampling()->set_temperature(0);
  req.mutable_stopping()->set_max_tokens(max_tokens);
  req.mutable_stopping()->set_ignore_eos(true);
  return req;
}

struct Streamed {
  grpc::Status status;
  std::vector<int32_t> ids;
  std::optional<v1::Final> final;
};

// Runs a Generate to the end. `on_tokens(count)` runs after each received message and may act
// on the call (cancel it, signal the server).
template <typename F>
Streamed RunGenerate(v1::RambaService::Stub* stub, const v1::GenerateRequest& req,
                     grpc::ClientContext* ctx, F on_tokens) {
  Streamed out;
  auto reader = stub->Generate(ctx, req);
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    if (msg.has_tokens()) {
      for (const auto& t : msg.tokens().tokens()) out.ids.push_back(t.id());
      on_tokens(out.ids.size());
    } else if (msg.has_final()) {
      out.final = msg.final();
    }
  }
  out.status = reader->Finish();
  return out;
}

Streamed RunGenerate(v1::RambaService::Stub* stub, const v1::GenerateRequest& req) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 60s);
  return RunGenerate(stub, req, &ctx, [](size_t) {});
}

// Retries a Generate while the session is still held by a call the server is finishing (ABORTED),
// for up to 5 s.
Streamed GenerateWhenFree(v1::RambaService::Stub* stub, const v1::GenerateRequest& req) {
  const auto deadline = Clock::now() + 5s;
  while (true) {
    Streamed out = RunGenerate(stub, req);
    if (out.status.error_code() != grpc::StatusCode::ABORTED || Clock::now() > deadline) return out;
    std::this_thread::sleep_for(20ms);
  }
}

// The create/append/generate sequence both runs of a comparison go through.
std::vector<int32_t> CreateAppendGenerate(v1::RambaService::Stub* stub, const std::string& id,
                                          const std::string& text, int32_t n) {
  EXPECT_TRUE(CreateSession(stub, id).ok());
  EXPECT_TRUE(AppendText(stub, id, text).ok());
  Streamed out = RunGenerate(stub, Greedy(id, n));
  EXPECT_TRUE(out.status.ok()) << out.status.error_message();
  return out.ids;
}

// Waits (up to 10 s) until the server's engine has a request queued or running, as its
// ramba_engine_queue_depth gauge (refreshed every 200 ms) shows.
bool WaitForEngineWork(const ServerProcess& server) {
  for (auto t0 = Clock::now(); Clock::now() - t0 < 10s; std::this_thread::sleep_for(20ms)) {
    auto m = testing::ParsePrometheusText(testing::HttpGet(server.metrics_port(), "/metrics"));
    if (m["ramba_engine_queue_depth"] >= 1) return true;
  }
  return false;
}

#define START_OR_FAIL(server, ...)                      \
  do {                                                  \
    const std::string err = (server).Start(__VA_ARGS__); \
    ASSERT_EQ(err, "");                                 \
  } while (0)

const std::string kText = "The quick brown fox jumps over the lazy dog. RAMba remembers: 7243";

// a) A server killed with SIGKILL in the middle of a Generate restarts with the session at its
// last committed position, and generation from there equals an uninterrupted run.
TEST(ServerProcessTest, SigkillMidStreamKeepsLastCommittedState) {
  TempDir dir;
  int64_t before = 0;
  {
    ServerProcess server;
    START_OR_FAIL(server, dir.path());
    ASSERT_TRUE(CreateSession(server.stub(), "s").ok());
    ASSERT_TRUE(AppendText(server.stub(), "s", kText, &before).ok());
    ASSERT_EQ(before, static_cast<int64_t>(kText.size()));  // byte-level tokenizer
    // Far more tokens than can be generated before the kill lands, so it lands mid-stream.
    grpc::ClientContext ctx;
    bool killed = false;
    Streamed out = RunGenerate(server.stub(), Greedy("s", 20000), &ctx, [&](size_t n) {
      if (n >= 20 && !killed) {
        server.Signal(SIGKILL);
        killed = true;
      }
    });
    EXPECT_TRUE(killed);
    EXPECT_FALSE(out.status.ok());
    EXPECT_FALSE(out.final.has_value());
    EXPECT_LT(out.ids.size(), 20000u);
    ASSERT_TRUE(server.Wait(10s).has_value());
  }
  ServerProcess server;
  START_OR_FAIL(server, dir.path());
  EXPECT_EQ(Position(server.stub(), "s"), before);
  ASSERT_TRUE(CreateSession(server.stub(), "reference").ok());
  ASSERT_TRUE(AppendText(server.stub(), "reference", kText).ok());
  // Seeded sampling is as deterministic as greedy decoding and far more sensitive to the state
  // (greedy output of the random-weight fixture soon repeats one token): a read-only query.
  auto sampled = [&](const std::string& id) {
    v1::GenerateRequest req = Greedy(id, 30);
    req.mutable_sampling()->set_temperature(5);  // the fixture's logits are very peaked
    req.mutable_sampling()->set_seed(7);
    req.set_commit_input(false);
    Streamed out = RunGenerate(server.stub(), req);
    EXPECT_TRUE(out.status.ok()) << out.status.error_message();
    return out.ids;
  };
  const std::vector<int32_t> sampled_resumed = sampled("s");
  EXPECT_GT(std::set<int32_t>(sampled_resumed.begin(), sampled_resumed.end()).size(), 5u);
  EXPECT_EQ(sampled_resumed, sampled("reference"));
  // Greedy, committed: the same tokens as an uninterrupted run.
  Streamed resumed = RunGenerate(server.stub(), Greedy("s", 30));
  ASSERT_TRUE(resumed.status.ok()) << resumed.status.error_message();
  ASSERT_TRUE(resumed.final.has_value());
  EXPECT_EQ(resumed.final->position(), before + 30);
  Streamed reference = RunGenerate(server.stub(), Greedy("reference", 30));
  ASSERT_TRUE(reference.status.ok()) << reference.status.error_message();
  EXPECT_EQ(resumed.ids, reference.ids);
}

// b) 32 clients at once, each on its own session: every call succeeds, and each session's tokens
// equal those of the same session run alone.
TEST(ServerProcessTest, ThirtyTwoConcurrentSessions) {
  TempDir dir;
  ServerProcess server;
  START_OR_FAIL(server, dir.path());
  constexpr int kSessions = 32;
  constexpr int kTokens = 16;
  // Texts that end differently, so that the sessions' outputs differ.
  auto text = [](int i) {
    return kText + " / session " + std::to_string(i) + ": " + std::string(1 + i % 3, 'A' + i);
  };
  std::vector<std::vector<int32_t>> tokens(kSessions);
  std::vector<grpc::Status> status(kSessions);
  std::vector<int64_t> positions(kSessions, -1);
  std::vector<std::thread> threads;
  for (int i = 0; i < kSessions; ++i) {
    threads.emplace_back([&, i] {
      const std::string id = "c" + std::to_string(i);
      status[i] = CreateSession(server.stub(), id);
      if (status[i].ok()) status[i] = AppendText(server.stub(), id, text(i));
      if (!status[i].ok()) return;
      Streamed out = RunGenerate(server.stub(), Greedy(id, kTokens));
      status[i] = out.status;
      tokens[i] = out.ids;
      if (out.final) positions[i] = out.final->position();
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kSessions; ++i) {
    ASSERT_TRUE(status[i].ok()) << "session " << i << ": " << status[i].error_message();
    const int64_t expected = static_cast<int64_t>(text(i).size()) + kTokens;
    EXPECT_EQ(tokens[i].size(), static_cast<size_t>(kTokens)) << i;
    EXPECT_EQ(positions[i], expected) << i;
    EXPECT_EQ(Position(server.stub(), "c" + std::to_string(i)), expected) << i;
  }
  // Different inputs give different outputs (the sessions did not share state).
  std::set<std::vector<int32_t>> distinct(tokens.begin(), tokens.end());
  EXPECT_GT(distinct.size(), 8u);
  for (int i : {0, 13, kSessions - 1}) {
    EXPECT_EQ(tokens[i], CreateAppendGenerate(server.stub(), "alone" + std::to_string(i), text(i),
                                              kTokens))
        << "session " << i;
  }
}

// c) A client that cancels mid-stream gets CANCELLED, the session is unchanged, and the next
// Generate works once the server has let go of the session.
TEST(ServerProcessTest, CancelMidStreamLeavesSessionUnchanged) {
  TempDir dir;
  ServerProcess server;
  START_OR_FAIL(server, dir.path());
  int64_t before = 0;
  ASSERT_TRUE(CreateSession(server.stub(), "s").ok());
  ASSERT_TRUE(AppendText(server.stub(), "s", kText, &before).ok());
  grpc::ClientContext ctx;
  bool cancelled = false;
  Streamed out = RunGenerate(server.stub(), Greedy("s", 10000), &ctx, [&](size_t n) {
    if (n >= 10 && !cancelled) {
      ctx.TryCancel();
      cancelled = true;
    }
  });
  EXPECT_TRUE(cancelled);
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::CANCELLED) << out.status.error_message();
  EXPECT_FALSE(out.final.has_value());
  EXPECT_EQ(Position(server.stub(), "s"), before);
  Streamed next = GenerateWhenFree(server.stub(), Greedy("s", 5));
  ASSERT_TRUE(next.status.ok()) << next.status.error_message();
  EXPECT_EQ(next.final->position(), before + 5);
}

// d) A deadline that passes mid-generation ends the call with DEADLINE_EXCEEDED and changes
// nothing.
TEST(ServerProcessTest, DeadlineLeavesSessionUnchanged) {
  TempDir dir;
  ServerProcess server;
  START_OR_FAIL(server, dir.path(), {"--max_generate_tokens", "200000"});
  int64_t before = 0;
  ASSERT_TRUE(CreateSession(server.stub(), "s").ok());
  ASSERT_TRUE(AppendText(server.stub(), "s", kText, &before).ok());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 200ms);
  const auto t0 = Clock::now();
  Streamed out = RunGenerate(server.stub(), Greedy("s", 100000), &ctx, [](size_t) {});
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED)
      << out.status.error_message();
  EXPECT_LT(Clock::now() - t0, 5s);
  EXPECT_FALSE(out.final.has_value());
  EXPECT_EQ(Position(server.stub(), "s"), before);
  Streamed next = GenerateWhenFree(server.stub(), Greedy("s", 3));
  ASSERT_TRUE(next.status.ok()) << next.status.error_message();
  EXPECT_EQ(next.final->position(), before + 3);
}

// e) Every kind of bad input fails with its documented code and a message naming the field.
TEST(ServerProcessTest, BadInputsGetTheirErrorCodes) {
  TempDir dir;
  ServerProcess server;
  START_OR_FAIL(server, dir.path(), {"--max_request_tokens", "1000", "--max_message_bytes", "100000"});
  auto* stub = server.stub();
  int64_t position = 0;
  ASSERT_TRUE(CreateSession(stub, "s").ok());
  ASSERT_TRUE(AppendText(stub, "s", kText, &position).ok());

  auto append = [&](const v1::AppendRequest& req, grpc::ClientContext* ctx) {
    v1::AppendResponse resp;
    return stub->Append(ctx, req, &resp);
  };
  auto expect = [](const grpc::Status& s, grpc::StatusCode code, const std::string& needle,
                   const std::string& what) {
    EXPECT_EQ(s.error_code(), code) << what << ": " << s.error_message();
    EXPECT_NE(s.error_message().find(needle), std::string::npos)
        << what << ": '" << s.error_message() << "' does not mention '" << needle << "'";
  };

  {  // Unknown session.
    grpc::ClientContext ctx;
    v1::GetSessionRequest req;
    v1::GetSessionResponse resp;
    req.set_session_id("missing");
    expect(stub->GetSession(&ctx, req, &resp), grpc::StatusCode::NOT_FOUND, "missing", "get");
    grpc::ClientContext ctx2;
    v1::AppendRequest a;
    a.set_session_id("missing");
    a.mutable_input()->set_text("x");
    expect(append(a, &ctx2), grpc::StatusCode::NOT_FOUND, "missing", "append");
    Streamed g = RunGenerate(stub, Greedy("missing", 4));
    expect(g.status, grpc::StatusCode::NOT_FOUND, "missing", "generate");
  }
  {  // expected_position mismatch, with the actual position in the trailer.
    grpc::ClientContext ctx;
    v1::AppendRequest a;
    a.set_session_id("s");
    a.mutable_input()->set_text("x");
    a.set_expected_position(position + 7);
    expect(append(a, &ctx), grpc::StatusCode::FAILED_PRECONDITION, "expected_position", "append");
    auto it = ctx.GetServerTrailingMetadata().find("ramba-session-position");
    ASSERT_NE(it, ctx.GetServerTrailingMetadata().end());
    EXPECT_EQ(std::string(it->second.data(), it->second.size()), std::to_string(position));
    v1::GenerateRequest g = Greedy("s", 4);
    g.set_expected_position(position - 1);
    expect(RunGenerate(stub, g).status, grpc::StatusCode::FAILED_PRECONDITION, "expected_position",
           "generate");
  }
  {  // Token id outside the vocabulary (256 for the byte-level model).
    grpc::ClientContext ctx;
    v1::AppendRequest a;
    a.set_session_id("s");
    a.mutable_input()->mutable_tokens()->add_ids(65);
    a.mutable_input()->mutable_tokens()->add_ids(256);
    expect(append(a, &ctx), grpc::StatusCode::INVALID_ARGUMENT, "input.tokens.ids[1]", "oov");
    v1::GenerateRequest g = Greedy("s", 4);
    g.mutable_input()->mutable_tokens()->add_ids(-1);
    expect(RunGenerate(stub, g).status, grpc::StatusCode::INVALID_ARGUMENT, "input.tokens.ids[0]",
           "generate oov");
  }
  {  // Append without input.
    grpc::ClientContext ctx;
    v1::AppendRequest a;
    a.set_session_id("s");
    expect(append(a, &ctx), grpc::StatusCode::INVALID_ARGUMENT, "input", "no input");
  }
  {  // Sampling values out of range.
    v1::GenerateRequest g = Greedy("s", 4);
    g.mutable_sampling()->set_temperature(-1);
    expect(RunGenerate(stub, g).status, grpc::StatusCode::INVALID_ARGUMENT, "temperature", "temp");
    g = Greedy("s", 4);
    g.mutable_sampling()->set_temperature(1);
    g.mutable_sampling()->set_top_p(0);
    expect(RunGenerate(stub, g).status, grpc::StatusCode::INVALID_ARGUMENT, "top_p", "top_p");
    g = Greedy("s", 4);
    g.mutable_sampling()->set_temperature(1);
    g.mutable_sampling()->set_top_k(-1);
    expect(RunGenerate(stub, g).status, grpc::StatusCode::INVALID_ARGUMENT, "top_k", "top_k");
    g = Greedy("s", 0);
    expect(RunGenerate(stub, g).status, grpc::StatusCode::INVALID_ARGUMENT, "max_tokens",
           "max_tokens");
  }
  {  // More input tokens than --max_request_tokens (2000 > 1000).
    grpc::ClientContext ctx;
    v1::AppendRequest a;
    a.set_session_id("s");
    for (int i = 0; i < 2000; ++i) a.mutable_input()->mutable_tokens()->add_ids(i % 256);
    expect(append(a, &ctx), grpc::StatusCode::RESOURCE_EXHAUSTED, "input", "too many tokens");
  }
  {  // A message over --max_message_bytes (200 KB > 100000 bytes): rejected by gRPC itself.
    grpc::ClientContext ctx;
    v1::AppendRequest a;
    a.set_session_id("s");
    a.mutable_input()->set_text(std::string(200000, 'a'));
    const grpc::Status s = append(a, &ctx);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  }
  {  // Bad ids.
    grpc::ClientContext ctx;
    v1::CreateSessionResponse resp;
    v1::CreateSessionRequest c;
    c.set_session_id("bad id!");
    const grpc::Status s = stub->CreateSession(&ctx, c, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  }
  // None of the failed calls changed the session.
  EXPECT_EQ(Position(stub, "s"), position);
}

// f) /metrics over HTTP before and after one Generate.
TEST(ServerProcessTest, MetricsCountAGenerate) {
  TempDir dir;
  ServerProcess server;
  START_OR_FAIL(server, dir.path());
  ASSERT_GT(server.metrics_port(), 0);
  for (const char* id : {"m1", "m2", "m3"}) ASSERT_TRUE(CreateSession(server.stub(), id).ok());
  ASSERT_TRUE(AppendText(server.stub(), "m1", kText).ok());
  auto scrape = [&] {
    return testing::ParsePrometheusText(testing::HttpGet(server.metrics_port(), "/metrics"));
  };
  const std::string kGenerated = "ramba_tokens_total{kind=\"generated\"}";
  const std::string kOk = "ramba_requests_total{outcome=\"ok\"}";
  const std::string kTtft = "ramba_time_to_first_token_seconds_count";
  const std::string kStepTokens = "ramba_engine_step_tokens_sum";
  const std::string kSteps = "ramba_engine_step_sequences_count";
  const std::string kIterations = "ramba_engine_iteration_duration_seconds_count";
  const std::string kHits = "ramba_session_cache_lookups_total{result=\"hit\"}";
  const std::string kMisses = "ramba_session_cache_lookups_total{result=\"miss\"}";
  auto before = scrape();
  for (const std::string& name : {kGenerated, kOk, kTtft, kStepTokens, kSteps, kIterations, kHits,
                                  kMisses, std::string("ramba_engine_requests{state=\"running\"}"),
                                  std::string("ramba_engine_requests{state=\"waiting\"}"),
                                  std::string("ramba_session_page_in_duration_seconds_count"),
                                  std::string("ramba_session_evictions_total")}) {
    ASSERT_TRUE(before.count(name)) << "no " << name;
  }
  Streamed out = RunGenerate(server.stub(), Greedy("m1", 12));
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  ASSERT_EQ(out.ids.size(), 12u);
  auto after = scrape();
  EXPECT_EQ(after[kGenerated] - before[kGenerated], 12);
  EXPECT_EQ(after[kOk] - before[kOk], 1);
  EXPECT_EQ(after[kTtft] - before[kTtft], 1);
  // Twelve one-token steps: the pending token of the append, then 11 of the 12 generated (the
  // last stays pending); the session was resident.
  EXPECT_EQ(after[kStepTokens] - before[kStepTokens], 12);
  EXPECT_EQ(after[kSteps] - before[kSteps], 12);
  EXPECT_GE(after[kIterations] - before[kIterations], 12);
  EXPECT_EQ(after[kHits] - before[kHits], 1);
  EXPECT_EQ(after[kMisses] - before[kMisses], 0);
  // The level gauges refresh every 200 ms.
  double stored = -1;
  for (auto t0 = Clock::now(); Clock::now() - t0 < 2s; std::this_thread::sleep_for(50ms)) {
    stored = scrape()["ramba_sessions_stored"];
    if (stored == 3) break;
  }
  EXPECT_EQ(stored, 3);
}

// g) SIGTERM: a Generate in flight completes, then the server exits 0; its tokens were committed.
TEST(ServerProcessTest, SigtermDrainsInFlightGenerate) {
  TempDir dir;
  int64_t before = 0;
  constexpr int32_t kTokens = 30;
  {
    ServerProcess server;
    START_OR_FAIL(server, dir.path());
    ASSERT_TRUE(CreateSession(server.stub(), "s").ok());
    ASSERT_TRUE(AppendText(server.stub(), "s", kText, &before).ok());
    // A long prompt (prefill takes about a second on one thread) keeps the call in flight when
    // the signal arrives; the signal is sent once the engine runs the request.
    v1::GenerateRequest req = Greedy("s", kTokens);
    std::string prompt;
    while (prompt.size() < 30000) prompt += kText;
    req.mutable_input()->set_text(prompt);
    std::atomic<bool> started{false};
    Streamed out;
    std::thread client([&] {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + 60s);
      started = true;
      out = RunGenerate(server.stub(), req, &ctx, [](size_t) {});
    });
    while (!started) std::this_thread::sleep_for(1ms);
    EXPECT_TRUE(WaitForEngineWork(server));  // the server is running the Generate
    server.Signal(SIGTERM);
    client.join();
    ASSERT_TRUE(out.status.ok()) << out.status.error_message();
    ASSERT_TRUE(out.final.has_value());
    EXPECT_EQ(out.ids.size(), static_cast<size_t>(kTokens));
    EXPECT_EQ(out.final->finish_reason(), v1::FINISH_REASON_MAX_TOKENS);
    // The call outlived the signal by more than the server's 200 ms signal poll, so the drain
    // started while it ran.
    EXPECT_GT(out.final->usage().total_time_ms(), 400) << "the Generate ended before the drain";
    before += static_cast<int64_t>(prompt.size()) + kTokens;
    EXPECT_EQ(out.final->position(), before);
    const std::optional<int> status = server.Wait(20s);
    ASSERT_TRUE(status.has_value()) << "the server did not exit after SIGTERM";
    EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "wait status " << *status;
  }
  ServerProcess server;
  START_OR_FAIL(server, dir.path());
  EXPECT_EQ(Position(server.stub(), "s"), before);
}

// h) SIGTERM while a long Append is still being prefilled: the server stops it when the drain
// period (--drain_seconds 1) ends instead of waiting for it, exits 0, and the cancelled Append
// left nothing behind.
TEST(ServerProcessTest, SigtermDrainPeriodBoundsALongAppend) {
  TempDir dir;
  int64_t before = 0;
  {
    ServerProcess server;
    START_OR_FAIL(server, dir.path(), {"--drain_seconds", "1"});
    ASSERT_TRUE(CreateSession(server.stub(), "s").ok());
    ASSERT_TRUE(AppendText(server.stub(), "s", kText, &before).ok());
    // ~300k tokens: tens of seconds of prefill on one thread.
    std::string big;
    while (big.size() < 300000) big += kText;
    std::atomic<bool> started{false};
    grpc::Status status;
    std::thread client([&] {
      started = true;
      status = AppendText(server.stub(), "s", big);
    });
    while (!started) std::this_thread::sleep_for(1ms);
    EXPECT_TRUE(WaitForEngineWork(server));  // the Append is running on the engine
    const auto t0 = Clock::now();
    server.Signal(SIGTERM);
    const std::optional<int> exit_status = server.Wait(15s);
    client.join();
    ASSERT_TRUE(exit_status.has_value()) << "the server ignored its drain period";
    EXPECT_LT(Clock::now() - t0, 10s);
    EXPECT_TRUE(WIFEXITED(*exit_status) && WEXITSTATUS(*exit_status) == 0)
        << "wait status " << *exit_status;
    EXPECT_FALSE(status.ok());
  }
  ServerProcess server;
  START_OR_FAIL(server, dir.path());
  EXPECT_EQ(Position(server.stub(), "s"), before);
}

}  // namespace
}  // namespace ramba
