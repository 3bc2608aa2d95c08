// The ramba.v1.RambaService gRPC service (callback API). Handlers parse and validate requests
// into plain C++ values, take the session through the SessionManager, and run model work on the
// Engine; streaming reactors never block (one write in flight, tokens coalesced meanwhile).
#ifndef RAMBA_SERVER_SERVICE_H_
#define RAMBA_SERVER_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <string>

#include "grpcpp/grpcpp.h"
#include "model/ramba_model.h"
#include "model/tokenizer.h"
#include "ramba/v1/ramba.grpc.pb.h"
#include "server/engine.h"
#include "server/metrics.h"
#include "server/session_manager.h"
#include "server/task_pool.h"

namespace ramba::server {

// The one place where absl::Status becomes grpc::Status.
grpc::Status ToGrpcStatus(const absl::Status& status);

struct ServiceLimits {
  int64_t max_message_bytes = 16 << 20;
  int64_t max_request_input_tokens = 1 << 22;
  int32_t max_generate_tokens = 1 << 16;
  int32_t default_max_tokens = 256;
  int32_t max_stop_sequences = 16;
  int32_t max_stop_sequence_bytes = 256;
  int32_t max_stop_token_ids = 64;
  int32_t max_labels = 64;
  int64_t max_sessions = 1000000;
  int64_t max_session_tokens = int64_t{1} << 40;
  int32_t default_page_size = 50;
  int32_t max_page_size = 1000;
};

struct ServiceOptions {
  std::string model_name;
  std::string device;  // "cpu" or "cuda"
  ServiceLimits limits;
};

class RambaService final : public ramba::v1::RambaService::CallbackService {
 public:
  // `committer` (optional): where store commits are written, off the engine thread; without
  // one the engine thread writes them. `writer` (optional): where Generate's stream writes start
  // when a token or the final message comes from the engine or a commit; without one they start
  // on that thread. Both must outlive the calls (task_pool.h).
  RambaService(RambaModel* model, const Tokenizer* tokenizer, Engine* engine,
               SessionManager* sessions, Metrics* metrics, ServiceOptions options,
               TaskPool* committer = nullptr, TaskPool* writer = nullptr);

  // From now on calls fail with UNAVAILABLE; running calls go on.
  void StartDraining() { draining_ = true; }

  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* ctx,
                                          const ramba::v1::CreateSessionRequest* req,
                                          ramba::v1::CreateSessionResponse* resp) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* ctx,
                                       const ramba::v1::GetSessionRequest* req,
                                       ramba::v1::GetSessionResponse* resp) override;
  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* ctx,
                                         const ramba::v1::ListSessionsRequest* req,
                                         ramba::v1::ListSessionsResponse* resp) override;
  grpc::ServerUnaryReactor* DeleteSession(grpc::CallbackServerContext* ctx,
                                          const ramba::v1::DeleteSessionRequest* req,
                                          ramba::v1::DeleteSessionResponse* resp) override;
  grpc::ServerUnaryReactor* ForkSession(grpc::CallbackServerContext* ctx,
                                        const ramba::v1::ForkSessionRequest* req,
                                        ramba::v1::ForkSessionResponse* resp) override;
  grpc::ServerUnaryReactor* Append(grpc::CallbackServerContext* ctx,
                                   const ramba::v1::AppendRequest* req,
                                   ramba::v1::AppendResponse* resp) override;
  grpc::ServerReadReactor<ramba::v1::AppendStreamRequest>* AppendStream(
      grpc::CallbackServerContext* ctx, ramba::v1::AppendResponse* resp) override;
  grpc::ServerWriteReactor<ramba::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* ctx, const ramba::v1::GenerateRequest* req) override;
  grpc::ServerWriteReactor<ramba::v1::GenerateResponse>* GenerateOnce(
      grpc::CallbackServerContext* ctx, const ramba::v1::GenerateOnceRequest* req) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx,
                                     const ramba::v1::TokenizeRequest* req,
                                     ramba::v1::TokenizeResponse* resp) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* ctx,
                                       const ramba::v1::DetokenizeRequest* req,
                                       ramba::v1::DetokenizeResponse* resp) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* ctx,
                                         const ramba::v1::GetModelInfoRequest* req,
                                         ramba::v1::GetModelInfoResponse* resp) override;

  // Internal pieces shared by the handlers (public for the reactors in service.cc).
  struct Deps {
    RambaModel* model;
    const Tokenizer* tokenizer;
    Engine* engine;
    SessionManager* sessions;
    Metrics* metrics;
    ServiceOptions options;
    TaskPool* committer;
    TaskPool* writer;
  };

 private:
  Deps deps_;
  std::atomic<bool> draining_{false};
};

}  // namespace ramba::server

#endif  // RAMBA_SERVER_SERVICE_H_
