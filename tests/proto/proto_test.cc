// Tests the generated ramba.v1 library: messages round-trip through the wire format with the
// presence semantics the API documents (unset != zero), and the service exposes every method with
// the streaming kind clients are written against.
#include <iterator>
#include <memory>
#include <string>

#include "google/protobuf/descriptor.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "ramba/v1/ramba.grpc.pb.h"
#include "ramba/v1/ramba.pb.h"

namespace ramba::v1 {
namespace {

using google::protobuf::util::MessageDifferencer;

template <typename M>
M RoundTrip(const M& message) {
  std::string wire;
  EXPECT_TRUE(message.SerializeToString(&wire));
  M parsed;
  EXPECT_TRUE(parsed.ParseFromString(wire));
  return parsed;
}

TEST(ProtoTest, GenerateRequestRoundTripsAndKeepsPresence) {
  GenerateRequest request;
  request.set_session_id("chat-42");
  request.mutable_input()->set_text("Hello");
  request.set_expected_position(0);  // set to zero: must stay distinguishable from unset
  request.mutable_sampling()->set_temperature(0.0f);
  request.mutable_sampling()->set_seed(7);
  request.mutable_stopping()->set_max_tokens(16);
  request.mutable_stopping()->add_stop_sequences("\nUser:");
  request.mutable_stopping()->add_stop_token_ids(0);
  request.set_commit_generated(false);

  const GenerateRequest parsed = RoundTrip(request);
  EXPECT_TRUE(MessageDifferencer::Equals(parsed, request));
  EXPECT_EQ(parsed.input().kind_case(), Input::kText);
  ASSERT_TRUE(parsed.has_expected_position());
  EXPECT_EQ(parsed.expected_position(), 0);
  ASSERT_TRUE(parsed.sampling().has_temperature());
  EXPECT_EQ(parsed.sampling().temperature(), 0.0f);
  EXPECT_FALSE(parsed.sampling().has_top_k());
  EXPECT_FALSE(parsed.sampling().has_top_p());
  ASSERT_TRUE(parsed.has_commit_generated());
  EXPECT_FALSE(parsed.commit_generated());
  EXPECT_FALSE(parsed.has_commit_input());
  EXPECT_FALSE(parsed.output().has_include_token_text());

  GenerateRequest bare;
  bare.set_session_id("chat-42");
  const GenerateRequest bare_parsed = RoundTrip(bare);
  EXPECT_FALSE(bare_parsed.has_input());
  EXPECT_FALSE(bare_parsed.has_expected_position());
  EXPECT_FALSE(bare_parsed.stopping().has_max_tokens());
}

TEST(ProtoTest, TokenInputRoundTrips) {
  AppendRequest request;
  request.set_session_id("s");
  for (int id : {0, 1, 255, 50276}) request.mutable_input()->mutable_tokens()->add_ids(id);
  const AppendRequest parsed = RoundTrip(request);
  ASSERT_EQ(parsed.input().kind_case(), Input::kTokens);
  ASSERT_EQ(parsed.input().tokens().ids_size(), 4);
  EXPECT_EQ(parsed.input().tokens().ids(3), 50276);
  EXPECT_FALSE(parsed.has_expected_position());
}

TEST(ProtoTest, GenerateResponseStreamMessagesRoundTrip) {
  GenerateResponse tokens;
  Token* token = tokens.mutable_tokens()->add_tokens();
  token->set_id(42);
  token->set_text("é");
  token->set_logprob(-0.25f);
  tokens.mutable_tokens()->add_tokens()->set_id(43);  // text held back, no logprob

  const GenerateResponse parsed_tokens = RoundTrip(tokens);
  ASSERT_EQ(parsed_tokens.kind_case(), GenerateResponse::kTokens);
  ASSERT_EQ(parsed_tokens.tokens().tokens_size(), 2);
  EXPECT_EQ(parsed_tokens.tokens().tokens(0).text(), "é");
  EXPECT_TRUE(parsed_tokens.tokens().tokens(0).has_logprob());
  EXPECT_FALSE(parsed_tokens.tokens().tokens(1).has_logprob());

  GenerateResponse final_message;
  Final* final_part = final_message.mutable_final();
  final_part->set_finish_reason(FINISH_REASON_STOP_SEQUENCE);
  final_part->set_stop_sequence("\nUser:");
  final_part->set_position(1234);
  final_part->mutable_usage()->set_prompt_tokens(5);
  final_part->mutable_usage()->set_generated_tokens(2);
  final_part->mutable_usage()->set_time_to_first_token_ms(12.5);

  const GenerateResponse parsed_final = RoundTrip(final_message);
  ASSERT_EQ(parsed_final.kind_case(), GenerateResponse::kFinal);
  EXPECT_EQ(parsed_final.final().finish_reason(), FINISH_REASON_STOP_SEQUENCE);
  EXPECT_EQ(parsed_final.final().stop_sequence(), "\nUser:");
  EXPECT_FALSE(parsed_final.final().has_stop_token_id());
  EXPECT_FALSE(parsed_final.final().has_seed());
  EXPECT_EQ(parsed_final.final().position(), 1234);
  EXPECT_DOUBLE_EQ(parsed_final.final().usage().time_to_first_token_ms(), 12.5);
}

TEST(ProtoTest, SessionRoundTripsWithLabelsAndTimestamps) {
  CreateSessionResponse response;
  Session* session = response.mutable_session();
  session->set_id("doc.v2_x-1");
  session->set_position(130);
  session->set_num_chunks(2);
  session->mutable_create_time()->set_seconds(1700000000);
  session->mutable_update_time()->set_seconds(1700000100);
  session->mutable_update_time()->set_nanos(5);
  (*session->mutable_labels())["owner"] = "alice";
  session->mutable_default_sampling()->set_top_p(0.9f);
  session->set_parent_id("doc");
  session->set_fork_position(128);

  const CreateSessionResponse parsed = RoundTrip(response);
  EXPECT_TRUE(MessageDifferencer::Equals(parsed, response));
  EXPECT_EQ(parsed.session().labels().at("owner"), "alice");
  EXPECT_EQ(parsed.session().update_time().nanos(), 5);
  EXPECT_TRUE(parsed.session().has_fork_position());
  EXPECT_FALSE(parsed.session().default_sampling().has_temperature());
}

TEST(ProtoTest, ForkDefaultSamplingPresence) {
  ForkSessionRequest request;
  request.set_session_id("parent");
  EXPECT_FALSE(RoundTrip(request).has_default_sampling());  // unset: copy the parent's
  request.mutable_default_sampling();                        // set but empty: no defaults
  EXPECT_TRUE(RoundTrip(request).has_default_sampling());
}

TEST(ProtoTest, ServiceHasEveryMethodWithItsStreamingKind) {
  EXPECT_STREQ(RambaService::service_full_name(), "ramba.v1.RambaService");
  const google::protobuf::ServiceDescriptor* service =
      google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
          RambaService::service_full_name());
  ASSERT_NE(service, nullptr);

  struct Expected {
    const char* name;
    const char* input;
    const char* output;
    bool client_streaming;
    bool server_streaming;
  };
  const Expected expected[] = {
      {"CreateSession", "CreateSessionRequest", "CreateSessionResponse", false, false},
      {"GetSession", "GetSessionRequest", "GetSessionResponse", false, false},
      {"ListSessions", "ListSessionsRequest", "ListSessionsResponse", false, false},
      {"DeleteSession", "DeleteSessionRequest", "DeleteSessionResponse", false, false},
      {"ForkSession", "ForkSessionRequest", "ForkSessionResponse", false, false},
      {"Append", "AppendRequest", "AppendResponse", false, false},
      {"AppendStream", "AppendStreamRequest", "AppendResponse", true, false},
      {"Generate", "GenerateRequest", "GenerateResponse", false, true},
      {"GenerateOnce", "GenerateOnceRequest", "GenerateResponse", false, true},
      {"Tokenize", "TokenizeRequest", "TokenizeResponse", false, false},
      {"Detokenize", "DetokenizeRequest", "DetokenizeResponse", false, false},
      {"GetModelInfo", "GetModelInfoRequest", "GetModelInfoResponse", false, false},
  };
  EXPECT_EQ(service->method_count(), static_cast<int>(std::size(expected)));
  for (const Expected& e : expected) {
    SCOPED_TRACE(e.name);
    const google::protobuf::MethodDescriptor* method = service->FindMethodByName(e.name);
    ASSERT_NE(method, nullptr);
    EXPECT_EQ(method->input_type()->full_name(), std::string("ramba.v1.") + e.input);
    EXPECT_EQ(method->output_type()->full_name(), std::string("ramba.v1.") + e.output);
    EXPECT_EQ(method->client_streaming(), e.client_streaming);
    EXPECT_EQ(method->server_streaming(), e.server_streaming);
  }

  // The generated stub has the calling shape of each streaming kind (a compile-time check that
  // the gRPC plugin ran on this service).
  using Stub = RambaService::Stub;
  std::unique_ptr<grpc::ClientWriter<AppendStreamRequest>> (Stub::*append_stream)(
      grpc::ClientContext*, AppendResponse*) = &Stub::AppendStream;
  std::unique_ptr<grpc::ClientReader<GenerateResponse>> (Stub::*generate)(
      grpc::ClientContext*, const GenerateRequest&) = &Stub::Generate;
  std::unique_ptr<grpc::ClientReader<GenerateResponse>> (Stub::*generate_once)(
      grpc::ClientContext*, const GenerateOnceRequest&) = &Stub::GenerateOnce;
  grpc::Status (Stub::*append)(grpc::ClientContext*, const AppendRequest&, AppendResponse*) =
      &Stub::Append;
  EXPECT_NE(append_stream, nullptr);
  EXPECT_NE(generate, nullptr);
  EXPECT_NE(generate_once, nullptr);
  EXPECT_NE(append, nullptr);
}

TEST(ProtoTest, OptionalFieldsHavePresence) {
  // The API distinguishes unset from zero for these fields; a regression to plain proto3 scalars
  // would silently change defaults (e.g. temperature 0 = greedy instead of "the default").
  const char* const fields[][2] = {
      {"ramba.v1.SamplingParams", "temperature"},
      {"ramba.v1.SamplingParams", "top_k"},
      {"ramba.v1.SamplingParams", "top_p"},
      {"ramba.v1.SamplingParams", "min_p"},
      {"ramba.v1.SamplingParams", "presence_penalty"},
      {"ramba.v1.SamplingParams", "frequency_penalty"},
      {"ramba.v1.SamplingParams", "repetition_penalty"},
      {"ramba.v1.SamplingParams", "seed"},
      {"ramba.v1.AppendRequest", "expected_position"},
      {"ramba.v1.AppendStreamRequest", "expected_position"},
      {"ramba.v1.GenerateRequest", "expected_position"},
      {"ramba.v1.GenerateRequest", "commit_input"},
      {"ramba.v1.GenerateRequest", "commit_generated"},
      {"ramba.v1.DeleteSessionRequest", "expected_position"},
      {"ramba.v1.ForkSessionRequest", "expected_position"},
      {"ramba.v1.ForkSessionRequest", "default_sampling"},
      {"ramba.v1.StoppingCriteria", "max_tokens"},
      {"ramba.v1.OutputOptions", "include_token_text"},
      {"ramba.v1.Token", "logprob"},
      {"ramba.v1.Session", "fork_position"},
      {"ramba.v1.Final", "position"},
  };
  const google::protobuf::DescriptorPool* pool = google::protobuf::DescriptorPool::generated_pool();
  for (const auto& f : fields) {
    SCOPED_TRACE(std::string(f[0]) + "." + f[1]);
    const google::protobuf::Descriptor* message = pool->FindMessageTypeByName(f[0]);
    ASSERT_NE(message, nullptr);
    const google::protobuf::FieldDescriptor* field = message->FindFieldByName(f[1]);
    ASSERT_NE(field, nullptr);
    EXPECT_TRUE(field->has_presence());
  }
}

}  // namespace
}  // namespace ramba::v1
