// ramba: a command-line client of a running ramba-server (the ramba.v1 gRPC API). It talks to the
// server over the network only; it loads no model.
//
//   ramba create --id chat --text "You are a helpful assistant."
//   ramba append chat --file book.txt          # large inputs are streamed in ~1 MiB pieces
//   ramba generate chat --prompt "Summary:" --max_tokens 64 --temperature 0
//   ramba list
//
// `ramba --help` prints every subcommand and flag.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/grpcpp.h"
#include "ramba/v1/metadata.h"
#include "ramba/v1/ramba.grpc.pb.h"

ABSL_FLAG(std::string, server, "localhost:50051", "Server address host:port.");
ABSL_FLAG(double, timeout, 0, "Deadline of each call in seconds (0: none).");
ABSL_FLAG(std::string, route_key, "",
          "Sent as ramba-route-key metadata, which deploy/'s router hashes to pick the replica "
          "(default: the session's id; a fork's parent id). Give a fork's root id for its calls.");
ABSL_FLAG(std::string, id, "", "create: the new session's id; fork: the fork's id (default: server-generated).");
ABSL_FLAG(std::string, text, "", "Input text (create, append).");
ABSL_FLAG(std::string, file, "", "Input file (create, append).");
ABSL_FLAG(std::optional<std::string>, prompt, std::nullopt, "generate: text appended before generating.");
ABSL_FLAG(std::optional<int32_t>, max_tokens, std::nullopt, "generate: most tokens to generate (default: the server's).");
ABSL_FLAG(std::optional<float>, temperature, std::nullopt, "generate/create: sampling temperature (0: greedy).");
ABSL_FLAG(std::optional<int32_t>, top_k, std::nullopt, "generate/create: top-k filter (0: off).");
ABSL_FLAG(std::optional<float>, top_p, std::nullopt, "generate/create: nucleus filter in (0, 1].");
ABSL_FLAG(std::optional<float>, min_p, std::nullopt,
          "generate/create: min-p filter in [0, 1] (0: off).");
ABSL_FLAG(std::optional<float>, presence_penalty, std::nullopt,
          "generate/create: subtracted from generated tokens' logits, in [-2, 2] (0: off).");
ABSL_FLAG(std::optional<float>, frequency_penalty, std::nullopt,
          "generate/create: subtracted per time a token was generated, in [-2, 2] (0: off).");
ABSL_FLAG(std::optional<float>, repetition_penalty, std::nullopt,
          "generate/create: > 1 discourages repeating prompt and generated tokens (1: off).");
ABSL_FLAG(std::optional<uint64_t>, seed, std::nullopt, "generate/create: sampling seed.");
ABSL_FLAG(std::vector<std::string>, logit_bias, {},
          "generate/create: ID:BIAS,... added to those tokens' logits, BIAS in [-100, 100].");
ABSL_FLAG(int32_t, min_tokens, 0,
          "generate: tokens generated before end of sequence, a stop id or a stop sequence may "
          "end the generation.");
ABSL_FLAG(bool, ignore_eos, false, "generate: do not stop at the end-of-sequence token.");
ABSL_FLAG(bool, no_commit, false, "generate: leave the session unchanged (read-only query).");
ABSL_FLAG(bool, logprobs, false, "generate: report the generated tokens' total and mean logprob.");
ABSL_FLAG(int32_t, top_logprobs, 0,
          "generate: print each token's N most likely alternatives and their logprobs to stderr "
          "(N <= 20).");
ABSL_FLAG(std::optional<int64_t>, expected_position, std::nullopt,
          "append/generate/delete/fork: fail with FAILED_PRECONDITION unless the session is at this position.");
ABSL_FLAG(int32_t, page_size, 0, "list: sessions per page (0: the server's default).");
// Repeatable; collected from argv before absl parses it (absl keeps only the last occurrence and
// would split values at commas). Declared here so that `--label=...` is a known flag.
ABSL_FLAG(std::vector<std::string>, label, {}, "create/fork: a label k=v (repeatable); list: a filter.");
ABSL_FLAG(std::vector<std::string>, stop, {}, "generate: a stop sequence (repeatable).");

namespace {

namespace v1 = ::ramba::v1;

constexpr char kUsage[] = R"(ramba: command-line client of a ramba-server (ramba.v1 gRPC API)

usage: ramba [--server host:port] [--timeout SECONDS] COMMAND [ARGS]

commands:
  create [--id ID] [--label k=v]... [--text T | --file F | -]
         [--temperature T --top_k K --top_p P --min_p M --seed S
          --presence_penalty P --frequency_penalty F --repetition_penalty R
          --logit_bias ID:BIAS,...]   (the session's sampling defaults)
      Creates a session, optionally with an initial input; prints the session (JSON).
  append ID (--text T | --file F | -) [--expected_position N]
      Appends text ('-': standard input). Inputs larger than one piece (~1 MiB, or the server's
      message limit) are streamed with AppendStream. Prints the new position.
  generate ID [--prompt T] [--max_tokens N] [--temperature T --top_k K --top_p P --min_p M --seed S]
              [--presence_penalty P --frequency_penalty F --repetition_penalty R]
              [--logit_bias ID:BIAS,...] [--min_tokens N]
              [--stop S]... [--ignore_eos] [--no_commit] [--expected_position N] [--logprobs]
              [--top_logprobs N]
      Streams generated text to stdout as it arrives; the finish reason and usage go to stderr.
      --no_commit leaves the session unchanged (the prompt and the output are not kept).
  get ID                    Prints the session (JSON).
  list [--page_size N] [--label k=v]...
                            Lists every session (all pages): id, position, chunks, labels.
  delete ID [--expected_position N]
  fork ID [--id NEW] [--label k=v]...
                            Forks a session; prints the new session (JSON).
  info                      Prints the model and the server's limits (JSON).

global flags:
  --server host:port        default localhost:50051
  --timeout SECONDS         deadline of each call (default 0: none)
  --route_key KEY           ramba-route-key metadata for a router in front of several replicas
                            (default: the session's id; fork: the parent's; deploy/README.md)

Errors print the gRPC status code and the server's message on stderr; the exit status is 1 for
a failed call and 2 for a usage error.
)";

constexpr size_t kPieceBytes = 1 << 20;

int Usage(const std::string& msg) {
  std::fprintf(stderr, "ramba: %s\n(ramba --help for usage)\n", msg.c_str());
  return 2;
}

std::string CodeName(grpc::StatusCode code) {
  // gRPC and absl share the canonical code numbering.
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

int RpcError(const std::string& what, const grpc::Status& s, const grpc::ClientContext& ctx) {
  std::string extra;
  const auto& trailers = ctx.GetServerTrailingMetadata();
  auto it = trailers.find(v1::kSessionPositionMetadata);
  if (it != trailers.end()) {
    extra = absl::StrCat(" (session position ",
                         absl::string_view(it->second.data(), it->second.size()), ")");
  }
  std::fprintf(stderr, "ramba: %s failed: %s: %s%s\n", what.c_str(), CodeName(s.error_code()).c_str(),
               s.error_message().c_str(), extra.c_str());
  return 1;
}

class Client {
 public:
  explicit Client(const std::string& target)
      : stub_(v1::RambaService::NewStub(
            grpc::CreateChannel(target, grpc::InsecureChannelCredentials()))) {}

  // A fresh context with the --timeout deadline and the route key of `session` (--route_key
  // when given): a router in front of several replicas sends the call to the session's own.
  std::unique_ptr<grpc::ClientContext> Context(const std::string& session = "") const {
    auto ctx = std::make_unique<grpc::ClientContext>();
    const std::string flag = absl::GetFlag(FLAGS_route_key);
    const std::string& key = flag.empty() ? session : flag;
    if (!key.empty()) ctx->AddMetadata(v1::kRouteKeyMetadata, key);
    const double t = absl::GetFlag(FLAGS_timeout);
    if (t > 0) {
      ctx->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::microseconds(static_cast<int64_t>(t * 1e6)));
    }
    return ctx;
  }
  v1::RambaService::Stub* stub() { return stub_.get(); }

  // Largest text piece per message: ~1 MiB, below the server's message limit.
  size_t PieceBytes() {
    if (piece_bytes_ != 0) return piece_bytes_;
    piece_bytes_ = kPieceBytes;
    auto ctx = Context();
    v1::GetModelInfoResponse info;
    if (stub_->GetModelInfo(ctx.get(), v1::GetModelInfoRequest(), &info).ok()) {
      const int64_t limit = info.limits().max_message_bytes() - 4096;  // room for the envelope
      if (limit > 0 && static_cast<size_t>(limit) < piece_bytes_) piece_bytes_ = limit;
    }
    return piece_bytes_;
  }

 private:
  std::unique_ptr<v1::RambaService::Stub> stub_;
  size_t piece_bytes_ = 0;
};

// Where input text comes from: --text, --file or standard input ('-'). Hands it out in pieces
// that end at UTF-8 character boundaries (the API requires each piece to be valid on its own).
class InputSource {
 public:
  static std::optional<InputSource> FromFlags(bool dash, std::string* error) {
    const std::string text = absl::GetFlag(FLAGS_text), file = absl::GetFlag(FLAGS_file);
    const int n = (dash ? 1 : 0) + (text.empty() ? 0 : 1) + (file.empty() ? 0 : 1);
    if (n > 1) {
      *error = "give only one of --text, --file and -";
      return std::nullopt;
    }
    InputSource src;
    if (dash) {
      src.file_ = stdin;
      src.name_ = "standard input";
    } else if (!file.empty()) {
      src.file_ = std::fopen(file.c_str(), "rb");
      src.owned_ = true;
      src.name_ = file;
      if (src.file_ == nullptr) {
        *error = absl::StrCat("cannot open ", file, ": ", std::strerror(errno));
        return std::nullopt;
      }
    } else if (!text.empty()) {
      src.buffer_ = text;
    } else {
      src.none_ = true;
    }
    return src;
  }
  InputSource(InputSource&& o) noexcept { *this = std::move(o); }
  InputSource& operator=(InputSource&& o) noexcept {
    file_ = o.file_;
    owned_ = o.owned_;
    none_ = o.none_;
    name_ = std::move(o.name_);
    buffer_ = std::move(o.buffer_);
    o.file_ = nullptr;
    o.owned_ = false;
    return *this;
  }
  ~InputSource() {
    if (owned_ && file_ != nullptr) std::fclose(file_);
  }

  bool none() const { return none_; }

  // The next piece of at most `max_bytes` (more only for a lone character longer than that);
  // false at the end. A read error ends with *error set.
  bool Next(size_t max_bytes, std::string* piece, std::string* error) {
    if (file_ != nullptr && !eof_ && buffer_.size() < max_bytes) {
      const size_t old = buffer_.size(), want = max_bytes - old;
      buffer_.resize(old + want);
      size_t got = 0;
      while (got < want) {
        const size_t n = std::fread(&buffer_[old + got], 1, want - got, file_);
        if (n == 0) break;
        got += n;
      }
      buffer_.resize(old + got);
      if (std::ferror(file_)) {
        *error = absl::StrCat("cannot read ", name_, ": ", std::strerror(errno));
        return false;
      }
      if (got < want) eof_ = true;
    }
    if (buffer_.empty()) return false;
    size_t cut = std::min(buffer_.size(), max_bytes);
    if (cut < buffer_.size() || (file_ != nullptr && !eof_)) cut = CharBoundary(buffer_, cut);
    if (cut == 0) cut = std::min(buffer_.size(), size_t{4});  // a broken byte sequence: let it go
    piece->assign(buffer_, 0, cut);
    buffer_.erase(0, cut);
    return true;
  }

  // True once everything has been handed out.
  bool Done() const { return buffer_.empty() && (file_ == nullptr || eof_); }

 private:
  InputSource() = default;

  // The largest n' <= n such that s[0, n') ends at a character boundary.
  static size_t CharBoundary(const std::string& s, size_t n) {
    size_t i = n;
    // Step back over continuation bytes (at most 3) to the lead byte of the last character.
    while (i > 0 && n - i < 4 && (static_cast<unsigned char>(s[i - 1]) & 0xC0) == 0x80) --i;
    if (i == 0) return n;
    const unsigned char lead = static_cast<unsigned char>(s[i - 1]);
    const size_t len = lead < 0x80 ? 1 : (lead >> 5) == 0x6 ? 2 : (lead >> 4) == 0xE ? 3
                                      : (lead >> 3) == 0x1E ? 4 : 1;
    return (i - 1) + len <= n ? n : i - 1;
  }

  FILE* file_ = nullptr;
  bool owned_ = false;
  bool none_ = false;
  bool eof_ = false;
  std::string name_;
  std::string buffer_;
};

std::string ToJson(const google::protobuf::Message& m) {
  google::protobuf::util::JsonPrintOptions o;
  o.add_whitespace = true;
  o.preserve_proto_field_names = true;
  std::string out;
  if (!google::protobuf::util::MessageToJsonString(m, &out, o).ok()) return m.DebugString();
  return out;
}

bool ParseLabels(const std::vector<std::string>& labels,
                 google::protobuf::Map<std::string, std::string>* out, std::string* error) {
  for (const std::string& l : labels) {
    const size_t eq = l.find('=');
    if (eq == std::string::npos || eq == 0) {
      *error = absl::StrCat("--label wants k=v, got '", l, "'");
      return false;
    }
    (*out)[l.substr(0, eq)] = l.substr(eq + 1);
  }
  return true;
}

// Fills *p from the sampling flags; false with *error set when --logit_bias is malformed.
bool SamplingFromFlags(v1::SamplingParams* p, std::string* error) {
  for (const std::string& entry : absl::GetFlag(FLAGS_logit_bias)) {
    const size_t colon = entry.find(':');
    int32_t id = 0;
    float bias = 0.0f;
    if (colon == std::string::npos || !absl::SimpleAtoi(entry.substr(0, colon), &id) ||
        !absl::SimpleAtof(entry.substr(colon + 1), &bias)) {
      *error = "--logit_bias entries are ID:BIAS, got '" + entry + "'";
      return false;
    }
    (*p->mutable_logit_bias())[id] = bias;
  }
  if (auto v = absl::GetFlag(FLAGS_temperature)) p->set_temperature(*v);
  if (auto v = absl::GetFlag(FLAGS_top_k)) p->set_top_k(*v);
  if (auto v = absl::GetFlag(FLAGS_top_p)) p->set_top_p(*v);
  if (auto v = absl::GetFlag(FLAGS_min_p)) p->set_min_p(*v);
  if (auto v = absl::GetFlag(FLAGS_presence_penalty)) p->set_presence_penalty(*v);
  if (auto v = absl::GetFlag(FLAGS_frequency_penalty)) p->set_frequency_penalty(*v);
  if (auto v = absl::GetFlag(FLAGS_repetition_penalty)) p->set_repetition_penalty(*v);
  if (auto v = absl::GetFlag(FLAGS_seed)) p->set_seed(*v);
  return true;
}

// Appends everything left in `src` (whose first piece is `first`) to `id` with AppendStream,
// routed by `route` (the session's route key).
int StreamAppend(Client& c, const std::string& id, const std::string& route, std::string first,
                 InputSource& src, const std::string& what, v1::AppendResponse* resp) {
  auto ctx = c.Context(route);
  auto writer = c.stub()->AppendStream(ctx.get(), resp);
  v1::AppendStreamRequest msg;
  msg.set_session_id(id);
  if (auto e = absl::GetFlag(FLAGS_expected_position)) msg.set_expected_position(*e);
  msg.mutable_input()->set_text(std::move(first));
  std::string piece, error;
  bool ok = writer->Write(msg);
  while (ok) {
    if (!src.Next(c.PieceBytes(), &piece, &error)) break;
    msg.Clear();
    msg.mutable_input()->set_text(std::move(piece));
    ok = writer->Write(msg);
  }
  if (!error.empty()) {
    ctx->TryCancel();
    writer->Finish().IgnoreError();
    std::fprintf(stderr, "ramba: %s failed: %s (nothing was appended)\n", what.c_str(),
                 error.c_str());
    return 1;
  }
  if (ok) writer->WritesDone();
  const grpc::Status s = writer->Finish();
  if (!s.ok()) return RpcError(what, s, *ctx);
  return 0;
}

int Create(Client& c, const std::vector<std::string>& args) {
  if (args.size() > 1 || (args.size() == 1 && args[0] != "-")) {
    return Usage("create takes no positional argument (use --id ID)");
  }
  std::string error;
  auto src = InputSource::FromFlags(args.size() == 1, &error);
  if (!src) return Usage(error);
  v1::CreateSessionRequest req;
  req.set_session_id(absl::GetFlag(FLAGS_id));
  if (!ParseLabels(absl::GetFlag(FLAGS_label), req.mutable_labels(), &error)) return Usage(error);
  if (!SamplingFromFlags(req.mutable_default_sampling(), &error)) return Usage(error);
  std::string first;
  if (!src->none()) {
    src->Next(c.PieceBytes(), &first, &error);
    if (!error.empty()) return Usage(error);
    // A small input goes with the creation (atomic); a large one is streamed afterwards.
    if (src->Done()) req.mutable_initial_input()->set_text(first);
  }
  v1::CreateSessionResponse resp;
  // Later calls of this command go where the creation went (a generated id was not its key).
  const std::string route = req.session_id();
  auto ctx = c.Context(route);
  grpc::Status s = c.stub()->CreateSession(ctx.get(), req, &resp);
  if (!s.ok()) return RpcError("create", s, *ctx);
  v1::Session session = resp.session();
  if (!src->none() && !src->Done()) {
    v1::AppendResponse append;
    if (int rc = StreamAppend(c, session.id(), route, std::move(first), *src,
                              "create (streaming the input)", &append);
        rc != 0) {
      // All or nothing, as CreateSession with an initial input would be.
      auto dctx = c.Context(route);
      v1::DeleteSessionRequest del;
      del.set_session_id(session.id());
      v1::DeleteSessionResponse dresp;
      c.stub()->DeleteSession(dctx.get(), del, &dresp).IgnoreError();
      return rc;
    }
    session = append.session();
  }
  std::printf("%s\n", ToJson(session).c_str());
  return 0;
}

int Append(Client& c, const std::vector<std::string>& args) {
  if (args.empty() || args.size() > 2 || (args.size() == 2 && args[1] != "-")) {
    return Usage("usage: ramba append ID (--text T | --file F | -)");
  }
  const std::string& id = args[0];
  std::string error;
  auto src = InputSource::FromFlags(args.size() == 2, &error);
  if (!src) return Usage(error);
  if (src->none()) return Usage("append needs an input: --text T, --file F or - (standard input)");
  std::string first;
  src->Next(c.PieceBytes(), &first, &error);
  if (!error.empty()) return Usage(error);
  v1::AppendResponse resp;
  if (src->Done()) {
    v1::AppendRequest req;
    req.set_session_id(id);
    req.mutable_input()->set_text(std::move(first));
    if (auto e = absl::GetFlag(FLAGS_expected_position)) req.set_expected_position(*e);
    auto ctx = c.Context(id);
    const grpc::Status s = c.stub()->Append(ctx.get(), req, &resp);
    if (!s.ok()) return RpcError("append", s, *ctx);
  } else if (int rc = StreamAppend(c, id, id, std::move(first), *src, "append", &resp); rc != 0) {
    return rc;
  }
  std::printf("appended %lld tokens to %s, position %lld\n",
              static_cast<long long>(resp.appended_tokens()), resp.session().id().c_str(),
              static_cast<long long>(resp.session().position()));
  return 0;
}

int Generate(Client& c, const std::vector<std::string>& args) {
  if (args.size() != 1) return Usage("usage: ramba generate ID [--prompt T] [--max_tokens N] ...");
  v1::GenerateRequest req;
  req.set_session_id(args[0]);
  if (auto p = absl::GetFlag(FLAGS_prompt)) req.mutable_input()->set_text(*p);
  std::string error;
  if (!SamplingFromFlags(req.mutable_sampling(), &error)) return Usage(error);
  if (auto n = absl::GetFlag(FLAGS_max_tokens)) req.mutable_stopping()->set_max_tokens(*n);
  req.mutable_stopping()->set_min_tokens(absl::GetFlag(FLAGS_min_tokens));
  for (const std::string& s : absl::GetFlag(FLAGS_stop)) req.mutable_stopping()->add_stop_sequences(s);
  req.mutable_stopping()->set_ignore_eos(absl::GetFlag(FLAGS_ignore_eos));
  if (absl::GetFlag(FLAGS_no_commit)) req.set_commit_input(false);
  if (auto e = absl::GetFlag(FLAGS_expected_position)) req.set_expected_position(*e);
  if (absl::GetFlag(FLAGS_logprobs)) req.mutable_output()->set_include_logprobs(true);
  req.mutable_output()->set_top_logprobs(absl::GetFlag(FLAGS_top_logprobs));

  auto ctx = c.Context(args[0]);
  auto reader = c.stub()->Generate(ctx.get(), req);
  double logprob_sum = 0.0;
  int64_t logprob_count = 0;
  v1::GenerateResponse msg;
  std::optional<v1::Final> final;
  bool newline = true;
  int64_t streamed = 0;
  while (reader->Read(&msg)) {
    if (msg.has_tokens()) {
      for (const v1::Token& t : msg.tokens().tokens()) {
        std::fwrite(t.text().data(), 1, t.text().size(), stdout);
        if (!t.text().empty()) newline = t.text().back() == '\n';
        ++streamed;
        if (t.has_logprob()) logprob_sum += t.logprob(), ++logprob_count;
        if (t.top_logprobs_size() > 0) {
          std::string alts;
          for (const v1::TopLogprob& a : t.top_logprobs()) {
            absl::StrAppendFormat(&alts, " '%s' %d %.3f;", absl::CHexEscape(a.token()), a.id(),
                                  a.logprob());
          }
          std::fprintf(stderr, "[token %d %.3f:%s]\n", t.id(), t.logprob(), alts.c_str());
        }
      }
      std::fflush(stdout);
    } else if (msg.has_final()) {
      final = msg.final();
    }
  }
  const grpc::Status s = reader->Finish();
  if (!newline && isatty(STDOUT_FILENO)) std::fputc('\n', stdout), std::fflush(stdout);
  if (!s.ok()) {
    if (streamed > 0) {
      std::fprintf(stderr, "ramba: %lld tokens were streamed before the error; nothing was committed\n",
                   static_cast<long long>(streamed));
    }
    return RpcError("generate", s, *ctx);
  }
  if (!final) {
    std::fprintf(stderr, "ramba: generate: the stream ended without a Final message\n");
    return 1;
  }
  std::string reason = v1::FinishReason_Name(final->finish_reason());
  if (absl::StartsWith(reason, "FINISH_REASON_")) reason = reason.substr(14);
  std::string line = absl::StrCat("[", reason);
  if (final->has_stop_sequence()) absl::StrAppend(&line, " '", final->stop_sequence(), "'");
  if (final->has_stop_token_id()) absl::StrAppend(&line, " ", final->stop_token_id());
  const v1::Usage& u = final->usage();
  absl::StrAppend(&line, "; prompt ", u.prompt_tokens(), " tokens, generated ",
                  u.generated_tokens(), " tokens");
  if (final->has_position()) absl::StrAppend(&line, "; position ", final->position());
  if (absl::GetFlag(FLAGS_no_commit)) absl::StrAppend(&line, " (not committed)");
  if (u.has_time_to_first_token_ms()) {
    absl::StrAppend(&line, "; first token ", absl::StrFormat("%.1f", u.time_to_first_token_ms()), " ms");
  }
  absl::StrAppend(&line, "; total ", absl::StrFormat("%.1f", u.total_time_ms()), " ms");
  if (final->has_seed()) absl::StrAppend(&line, "; seed ", final->seed());
  if (logprob_count > 0) {
    absl::StrAppend(&line, absl::StrFormat("; logprob %.3f, mean %.4f per token", logprob_sum,
                                           logprob_sum / static_cast<double>(logprob_count)));
  }
  std::fprintf(stderr, "%s]\n", line.c_str());
  return 0;
}

int Get(Client& c, const std::vector<std::string>& args) {
  if (args.size() != 1) return Usage("usage: ramba get ID");
  v1::GetSessionRequest req;
  req.set_session_id(args[0]);
  v1::GetSessionResponse resp;
  auto ctx = c.Context(args[0]);
  const grpc::Status s = c.stub()->GetSession(ctx.get(), req, &resp);
  if (!s.ok()) return RpcError("get", s, *ctx);
  std::printf("%s\n", ToJson(resp.session()).c_str());
  return 0;
}

int List(Client& c, const std::vector<std::string>& args) {
  if (!args.empty()) return Usage("usage: ramba list [--page_size N] [--label k=v]...");
  v1::ListSessionsRequest req;
  req.set_page_size(absl::GetFlag(FLAGS_page_size));
  std::string error;
  if (!ParseLabels(absl::GetFlag(FLAGS_label), req.mutable_label_filter(), &error)) {
    return Usage(error);
  }
  const bool tty = isatty(STDOUT_FILENO);
  if (tty) std::printf("%-34s %12s %8s  %s\n", "ID", "POSITION", "CHUNKS", "LABELS");
  int64_t count = 0;
  do {
    v1::ListSessionsResponse resp;
    auto ctx = c.Context();
    const grpc::Status s = c.stub()->ListSessions(ctx.get(), req, &resp);
    if (!s.ok()) return RpcError("list", s, *ctx);
    for (const v1::Session& session : resp.sessions()) {
      std::map<std::string, std::string> sorted(session.labels().begin(), session.labels().end());
      const std::string labels = absl::StrJoin(sorted, ",", absl::PairFormatter("="));
      std::printf(tty ? "%-34s %12lld %8lld  %s\n" : "%s\t%lld\t%lld\t%s\n", session.id().c_str(),
                  static_cast<long long>(session.position()),
                  static_cast<long long>(session.num_chunks()), labels.c_str());
      ++count;
    }
    req.set_page_token(resp.next_page_token());
  } while (!req.page_token().empty());
  if (tty) std::fprintf(stderr, "%lld sessions\n", static_cast<long long>(count));
  return 0;
}

int Delete(Client& c, const std::vector<std::string>& args) {
  if (args.size() != 1) return Usage("usage: ramba delete ID");
  v1::DeleteSessionRequest req;
  req.set_session_id(args[0]);
  if (auto e = absl::GetFlag(FLAGS_expected_position)) req.set_expected_position(*e);
  v1::DeleteSessionResponse resp;
  auto ctx = c.Context(args[0]);
  const grpc::Status s = c.stub()->DeleteSession(ctx.get(), req, &resp);
  if (!s.ok()) return RpcError("delete", s, *ctx);
  std::printf("deleted %s\n", args[0].c_str());
  return 0;
}

int Fork(Client& c, const std::vector<std::string>& args) {
  if (args.size() != 1) return Usage("usage: ramba fork ID [--id NEW] [--label k=v]...");
  v1::ForkSessionRequest req;
  req.set_session_id(args[0]);
  req.set_new_session_id(absl::GetFlag(FLAGS_id));
  std::string error;
  if (!ParseLabels(absl::GetFlag(FLAGS_label), req.mutable_labels(), &error)) return Usage(error);
  if (auto e = absl::GetFlag(FLAGS_expected_position)) req.set_expected_position(*e);
  v1::SamplingParams sampling;
  if (!SamplingFromFlags(&sampling, &error)) return Usage(error);
  if (sampling.ByteSizeLong() > 0) *req.mutable_default_sampling() = sampling;  // any flag set
  v1::ForkSessionResponse resp;
  auto ctx = c.Context(args[0]);  // the fork is made where its parent lives
  const grpc::Status s = c.stub()->ForkSession(ctx.get(), req, &resp);
  if (!s.ok()) return RpcError("fork", s, *ctx);
  std::printf("%s\n", ToJson(resp.session()).c_str());
  return 0;
}

int Info(Client& c, const std::vector<std::string>& args) {
  if (!args.empty()) return Usage("usage: ramba info");
  v1::GetModelInfoResponse resp;
  auto ctx = c.Context();
  const grpc::Status s = c.stub()->GetModelInfo(ctx.get(), v1::GetModelInfoRequest(), &resp);
  if (!s.ok()) return RpcError("info", s, *ctx);
  std::printf("%s\n", ToJson(resp).c_str());
  return 0;
}

// Takes every occurrence of the repeatable flags --label and --stop out of argv (both
// `--flag=v` and `--flag v`, one or two dashes), stopping at `--`.
std::vector<char*> ExtractRepeated(int argc, char** argv,
                                   std::map<std::string, std::vector<std::string>>* values,
                                   std::string* error) {
  std::vector<char*> rest;
  bool flags_done = false;
  for (int i = 0; i < argc; ++i) {
    const absl::string_view a = argv[i];
    if (i == 0 || flags_done || a.size() < 2 || a[0] != '-') {
      rest.push_back(argv[i]);
      continue;
    }
    if (a == "--") {
      flags_done = true;
      rest.push_back(argv[i]);
      continue;
    }
    absl::string_view body = a.substr(a[1] == '-' ? 2 : 1);
    const size_t eq = body.find('=');
    const absl::string_view name = body.substr(0, eq);
    if (name != "label" && name != "stop") {
      rest.push_back(argv[i]);
      continue;
    }
    if (eq != absl::string_view::npos) {
      (*values)[std::string(name)].emplace_back(body.substr(eq + 1));
    } else if (i + 1 < argc) {
      (*values)[std::string(name)].emplace_back(argv[++i]);
    } else {
      *error = absl::StrCat("--", name, " needs a value");
    }
  }
  return rest;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const absl::string_view a = argv[i];
    if (a == "--") break;
    if (a == "--help" || a == "-help" || a == "-h" || (i == 1 && a == "help")) {
      std::fputs(kUsage, stdout);
      return 0;
    }
  }
  std::map<std::string, std::vector<std::string>> repeated;
  std::string error;
  std::vector<char*> rest = ExtractRepeated(argc, argv, &repeated, &error);
  if (!error.empty()) return Usage(error);
  absl::SetFlag(&FLAGS_label, repeated["label"]);
  absl::SetFlag(&FLAGS_stop, repeated["stop"]);
  std::vector<char*> positional =
      absl::ParseCommandLine(static_cast<int>(rest.size()), rest.data());
  if (positional.size() < 2) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  const std::string command = positional[1];
  std::vector<std::string> args(positional.begin() + 2, positional.end());
  Client client(absl::GetFlag(FLAGS_server));
  if (command == "create") return Create(client, args);
  if (command == "append") return Append(client, args);
  if (command == "generate") return Generate(client, args);
  if (command == "get") return Get(client, args);
  if (command == "list") return List(client, args);
  if (command == "delete") return Delete(client, args);
  if (command == "fork") return Fork(client, args);
  if (command == "info") return Info(client, args);
  return Usage(absl::StrCat("unknown command '", command, "'"));
}
