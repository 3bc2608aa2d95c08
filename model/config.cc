#include "model/config.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"

namespace ramba {
namespace {

using json = nlohmann::json;

constexpr float kInf = std::numeric_limits<float>::infinity();

// nlohmann's lexer rejects the non-standard literals that Python's json module writes for
// non-finite floats. They are rewritten, outside strings, into sentinel strings that do not occur
// anywhere in the original text, and mapped back when a float key is read.
struct Sentinels {
  std::string pos_inf, neg_inf, nan;
};

struct Preprocessed {
  std::string text;
  Sentinels sentinels;
  // (position in `text`, cumulative growth of `text` over the original up to that position),
  // one entry per rewrite, to report parse errors at their original position.
  std::vector<std::pair<size_t, int64_t>> shifts;

  size_t OriginalPos(size_t pos) const {
    int64_t shift = 0;
    for (const auto& [at, s] : shifts) {
      if (at > pos) break;
      shift = s;
    }
    return static_cast<size_t>(std::max<int64_t>(0, static_cast<int64_t>(pos) - shift));
  }
};

bool IsIdentChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

Preprocessed RewriteNonFiniteLiterals(std::string_view in) {
  Preprocessed out;
  std::string tag = "__ramba_nonfinite";
  while (in.find(tag) != std::string_view::npos) tag += "_";
  out.sentinels = {tag + "_inf__", tag + "_neginf__", tag + "_nan__"};
  const std::pair<std::string_view, const std::string*> literals[] = {
      {"-Infinity", &out.sentinels.neg_inf},
      {"Infinity", &out.sentinels.pos_inf},
      {"NaN", &out.sentinels.nan},
  };
  out.text.reserve(in.size() + 64);
  bool in_string = false;
  for (size_t i = 0; i < in.size();) {
    const char c = in[i];
    if (in_string) {
      out.text += c;
      if (c == '\\' && i + 1 < in.size()) {
        out.text += in[i + 1];
        i += 2;
        continue;
      }
      if (c == '"') in_string = false;
      ++i;
      continue;
    }
    if (c == '"') {
      in_string = true;
      out.text += c;
      ++i;
      continue;
    }
    bool replaced = false;
    const bool boundary_before = i == 0 || !IsIdentChar(in[i - 1]);
    for (const auto& [lit, sentinel] : literals) {
      if (!boundary_before || in.substr(i, lit.size()) != lit) continue;
      const size_t end = i + lit.size();
      if (end < in.size() && IsIdentChar(in[end])) continue;
      out.text += '"';
      out.text += *sentinel;
      out.text += '"';
      const int64_t growth = static_cast<int64_t>(sentinel->size() + 2) -
                             static_cast<int64_t>(lit.size());
      const int64_t prev = out.shifts.empty() ? 0 : out.shifts.back().second;
      out.shifts.emplace_back(out.text.size(), prev + growth);
      i = end;
      replaced = true;
      break;
    }
    if (!replaced) {
      out.text += c;
      ++i;
    }
  }
  return out;
}

std::string LineColumn(std::string_view text, size_t pos) {
  pos = std::min(pos, text.size());
  int64_t line = 1, col = 1;
  for (size_t i = 0; i < pos; ++i) {
    if (text[i] == '\n') {
      ++line;
      col = 1;
    } else {
      ++col;
    }
  }
  return absl::StrCat("line ", line, ", column ", col, " (byte ", pos, ")");
}

std::string TypeName(const json& v) {
  if (v.is_number_integer()) return "integer";
  if (v.is_number_float()) return "number";
  return v.type_name();
}

absl::Status KeyError(absl::string_view key, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("config key '", key, "' ", what));
}

// Reads the typed keys of one config object; absent or null keys leave the target untouched.
class Reader {
 public:
  Reader(const json& root, const Sentinels& sentinels) : root_(root), s_(sentinels) {}

  const json* Find(absl::string_view key) const {
    auto it = root_.find(std::string(key));
    if (it == root_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  absl::Status Int(absl::string_view key, int64_t* out) const {
    const json* v = Find(key);
    if (v == nullptr) return absl::OkStatus();
    if (v->is_number_unsigned()) {
      if (v->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return KeyError(key, "is out of range");
      }
      *out = static_cast<int64_t>(v->get<uint64_t>());
      return absl::OkStatus();
    }
    if (v->is_number_integer()) {
      *out = v->get<int64_t>();
      return absl::OkStatus();
    }
    return KeyError(key, absl::StrCat("must be an integer, got ", Describe(*v)));
  }

  absl::Status Bool(absl::string_view key, bool* out) const {
    const json* v = Find(key);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_boolean()) {
      return KeyError(key, absl::StrCat("must be a boolean, got ", Describe(*v)));
    }
    *out = v->get<bool>();
    return absl::OkStatus();
  }

  absl::Status Float(absl::string_view key, float* out) const {
    const json* v = Find(key);
    if (v == nullptr) return absl::OkStatus();
    return FloatValue(key, *v, out);
  }

  absl::Status FloatValue(absl::string_view key, const json& v, float* out) const {
    if (v.is_number()) {
      *out = static_cast<float>(v.get<double>());
      return absl::OkStatus();
    }
    if (v.is_string()) {
      const std::string& str = v.get_ref<const std::string&>();
      if (str == s_.pos_inf) {
        *out = kInf;
        return absl::OkStatus();
      }
      if (str == s_.neg_inf) {
        *out = -kInf;
        return absl::OkStatus();
      }
      if (str == s_.nan) {
        *out = std::numeric_limits<float>::quiet_NaN();
        return absl::OkStatus();
      }
    }
    return KeyError(key, absl::StrCat("must be a number, got ", Describe(v)));
  }

  // The value as the user wrote it, for error messages.
  std::string Describe(const json& v) const {
    if (v.is_string()) {
      const std::string& str = v.get_ref<const std::string&>();
      if (str == s_.pos_inf) return "Infinity";
      if (str == s_.neg_inf) return "-Infinity";
      if (str == s_.nan) return "NaN";
    }
    std::string dumped = v.dump();
    if (dumped.size() > 40) dumped = dumped.substr(0, 40) + "...";
    return absl::StrCat(TypeName(v), " ", dumped);
  }

 private:
  const json& root_;
  const Sentinels& s_;
};

// Writes a float as the shortest decimal that reads back to the same float, so that 1e-5f is
// written as 1e-05 rather than as the double nearest to it.
nlohmann::ordered_json FloatJson(float f) {
  for (int precision = 1; precision <= 9; ++precision) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.*g", precision, static_cast<double>(f));
    const double d = std::strtod(buf, nullptr);
    if (static_cast<float>(d) == f) return d;
  }
  return static_cast<double>(f);
}

constexpr const char* kSentinelPosInf = "__ramba_write_inf__";
constexpr const char* kSentinelNegInf = "__ramba_write_neginf__";
constexpr const char* kSentinelNan = "__ramba_write_nan__";

nlohmann::ordered_json FloatOrLiteral(float f) {
  if (std::isnan(f)) return kSentinelNan;
  if (std::isinf(f)) return f > 0 ? kSentinelPosInf : kSentinelNegInf;
  return FloatJson(f);
}

absl::Status Positive(absl::string_view key, int64_t v) {
  if (v <= 0) return KeyError(key, absl::StrCat("must be positive, got ", v));
  return absl::OkStatus();
}

absl::Status PositiveFinite(absl::string_view key, float v) {
  if (!(v > 0) || !std::isfinite(v)) {
    return KeyError(key, absl::StrCat("must be a positive finite number, got ", v));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ModelConfig::Validate() const {
  RETURN_IF_ERROR(Positive("hidden_size", hidden_size));
  RETURN_IF_ERROR(Positive("vocab_size", vocab_size));
  if (num_lower_layers < 0) {
    return KeyError("num_lower_layers", absl::StrCat("must be >= 0, got ", num_lower_layers));
  }
  RETURN_IF_ERROR(Positive("num_upper_layers", num_upper_layers));
  RETURN_IF_ERROR(Positive("num_upper_groups", num_upper_groups));
  if (num_upper_groups != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config key 'num_upper_groups': num_upper_groups=", num_upper_groups,
        " is not supported yet (only 1)"));
  }
  RETURN_IF_ERROR(Positive("num_mamba_per_gca", num_mamba_per_gca));
  if (num_upper_layers % num_mamba_per_gca != 0) {
    return KeyError("num_upper_layers",
                    absl::StrCat("(", num_upper_layers, ") must be divisible by num_mamba_per_gca (",
                                 num_mamba_per_gca, ")"));
  }

  // Mamba-2 mixer.
  RETURN_IF_ERROR(Positive("state_size", state_size));
  RETURN_IF_ERROR(Positive("head_dim", head_dim));
  RETURN_IF_ERROR(Positive("expand", expand));
  RETURN_IF_ERROR(Positive("n_groups", n_groups));
  RETURN_IF_ERROR(Positive("num_heads", num_heads));
  if (conv_kernel < 2) {
    return KeyError("conv_kernel", absl::StrCat("must be >= 2, got ", conv_kernel));
  }
  RETURN_IF_ERROR(Positive("mamba_chunk_size", mamba_chunk_size));
  if (d_inner() % head_dim != 0) {
    return KeyError("head_dim", absl::StrCat("(", head_dim, ") must divide d_inner = expand * ",
                                             "hidden_size (", d_inner(), ")"));
  }
  if (num_heads != d_inner() / head_dim) {
    return KeyError("num_heads",
                    absl::StrCat("(", num_heads, ") must equal expand * hidden_size / head_dim (",
                                 d_inner() / head_dim, ")"));
  }
  if (num_heads % n_groups != 0) {
    return KeyError("n_groups", absl::StrCat("(", n_groups, ") must divide num_heads (",
                                             num_heads, ")"));
  }
  if (use_bias) return KeyError("use_bias", "= true is not supported (in_proj/out_proj bias)");
  if (std::isnan(time_step_min_limit) || std::isnan(time_step_max_limit) ||
      time_step_min_limit < 0 || time_step_min_limit > time_step_max_limit) {
    return KeyError("time_step_limit",
                    absl::StrCat("must be [min, max] with 0 <= min <= max, got [",
                                 time_step_min_limit, ", ", time_step_max_limit, "]"));
  }
  RETURN_IF_ERROR(PositiveFinite("layer_norm_epsilon", layer_norm_epsilon));

  // Chunk memory, retrieval and HSA.
  RETURN_IF_ERROR(Positive("chunk_size", chunk_size));
  RETURN_IF_ERROR(Positive("chunk_topk", chunk_topk));
  RETURN_IF_ERROR(Positive("retrieval_dim", retrieval_dim));
  if (encoder_layers < 0) {
    return KeyError("encoder_layers", absl::StrCat("must be >= 0, got ", encoder_layers));
  }
  RETURN_IF_ERROR(Positive("num_attention_heads", num_attention_heads));
  if (hidden_size % num_attention_heads != 0) {
    return KeyError("num_attention_heads",
                    absl::StrCat("(", num_attention_heads, ") must divide hidden_size (",
                                 hidden_size, ")"));
  }
  RETURN_IF_ERROR(Positive("num_kv_heads", num_kv_heads));
  if (num_attention_heads % num_kv_heads != 0) {
    return KeyError("num_kv_heads", absl::StrCat("(", num_kv_heads,
                                                 ") must divide num_attention_heads (",
                                                 num_attention_heads, ")"));
  }
  if (retrieval_dim % retrieval_heads() != 0) {
    return KeyError("retrieval_dim",
                    absl::StrCat("(", retrieval_dim, ") must be divisible by the number of ",
                                 "retrieval heads (", retrieval_heads(), ")"));
  }
  if (encoder_layers > 0) {
    RETURN_IF_ERROR(Positive("num_key_value_heads", num_key_value_heads));
    if (num_attention_heads % num_key_value_heads != 0) {
      return KeyError("num_key_value_heads",
                      absl::StrCat("(", num_key_value_heads, ") must divide num_attention_heads (",
                                   num_attention_heads, ")"));
    }
    if (attn_head_dim() % 2 != 0) {
      return KeyError("num_attention_heads",
                      absl::StrCat("gives an odd head dim ", attn_head_dim(),
                                   ", which the encoder's RoPE cannot rotate"));
    }
    if (encoder_intermediate_size() <= 0) {
      return KeyError("hidden_size", absl::StrCat("(", hidden_size, ") is too small for the ",
                                                  "encoder MLP (width hidden_size*8/3 // 64 * 64)"));
    }
    RETURN_IF_ERROR(PositiveFinite("encoder_rms_norm_eps", encoder_rms_norm_eps));
    RETURN_IF_ERROR(PositiveFinite("encoder_rope_theta", encoder_rope_theta));
  }
  RETURN_IF_ERROR(PositiveFinite("hsa_norm_eps", hsa_norm_eps));
  for (const auto& [key, id] : {std::pair<const char*, int64_t>{"bos_token_id", bos_token_id},
                                {"eos_token_id", eos_token_id}}) {
    if (id < 0 || id >= vocab_size) {
      return KeyError(key, absl::StrCat("(", id, ") must be in [0, vocab_size = ", vocab_size,
                                        ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text) {
  const Preprocessed pre = RewriteNonFiniteLiterals(json_text);
  json root;
  try {
    root = json::parse(pre.text);
  } catch (const json::parse_error& e) {
    // e.byte counts from 1 and points just past the offending character.
    const size_t pos = pre.OriginalPos(e.byte > 0 ? e.byte - 1 : 0);
    std::string what = e.what();
    // Drop nlohmann's own "[json.exception.parse_error.101] parse error at line 1, column 2:".
    if (const size_t colon = what.find(": "); colon != std::string::npos) {
      what = what.substr(colon + 2);
    }
    return absl::InvalidArgumentError(absl::StrCat("config is not valid JSON at ",
                                                   LineColumn(json_text, pos), ": ", what));
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("config is not valid JSON: ", e.what()));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config must be a JSON object, got ", TypeName(root)));
  }

  const Reader r(root, pre.sentinels);
  ModelConfig c;

  // hidden_size may be spelled d_model (the Mamba name); when both are present they must agree.
  if (r.Find("hidden_size") == nullptr && r.Find("d_model") == nullptr) {
    return absl::InvalidArgumentError("config is missing required key 'hidden_size'");
  }
  for (const char* key : {"vocab_size", "num_lower_layers", "num_upper_layers",
                          "num_attention_heads", "retrieval_dim"}) {
    if (r.Find(key) == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("config is missing required key '", key, "'"));
    }
  }
  RETURN_IF_ERROR(r.Int("hidden_size", &c.hidden_size));
  if (r.Find("d_model") != nullptr) {
    int64_t d_model = 0;
    RETURN_IF_ERROR(r.Int("d_model", &d_model));
    if (r.Find("hidden_size") != nullptr && d_model != c.hidden_size) {
      return KeyError("d_model", absl::StrCat("(", d_model, ") disagrees with hidden_size (",
                                              c.hidden_size, ")"));
    }
    c.hidden_size = d_model;
  }

  struct IntKey {
    const char* key;
    int64_t* field;
  };
  const IntKey int_keys[] = {
      {"vocab_size", &c.vocab_size},
      {"num_lower_layers", &c.num_lower_layers},
      {"num_upper_layers", &c.num_upper_layers},
      {"num_upper_groups", &c.num_upper_groups},
      {"num_mamba_per_gca", &c.num_mamba_per_gca},
      {"state_size", &c.state_size},
      {"head_dim", &c.head_dim},
      {"expand", &c.expand},
      {"n_groups", &c.n_groups},
      {"conv_kernel", &c.conv_kernel},
      {"mamba_chunk_size", &c.mamba_chunk_size},
      {"chunk_size", &c.chunk_size},
      {"chunk_topk", &c.chunk_topk},
      {"retrieval_dim", &c.retrieval_dim},
      {"encoder_layers", &c.encoder_layers},
      {"num_attention_heads", &c.num_attention_heads},
      {"num_kv_heads", &c.num_kv_heads},
      {"bos_token_id", &c.bos_token_id},
      {"eos_token_id", &c.eos_token_id},
      {"pad_token_id", &c.pad_token_id},
  };
  for (const IntKey& k : int_keys) RETURN_IF_ERROR(r.Int(k.key, k.field));

  // Derived defaults, as the reference computes them.
  c.num_heads = c.head_dim != 0 ? c.expand * c.hidden_size / c.head_dim : 0;
  RETURN_IF_ERROR(r.Int("num_heads", &c.num_heads));
  c.num_key_value_heads = c.num_attention_heads;
  RETURN_IF_ERROR(r.Int("num_key_value_heads", &c.num_key_value_heads));

  RETURN_IF_ERROR(r.Bool("use_conv_bias", &c.use_conv_bias));
  RETURN_IF_ERROR(r.Bool("use_bias", &c.use_bias));
  RETURN_IF_ERROR(r.Bool("singlehead_retrieval", &c.singlehead_retrieval));
  RETURN_IF_ERROR(r.Bool("tie_word_embeddings", &c.tie_word_embeddings));
  c.has_cls = c.encoder_layers > 0;
  RETURN_IF_ERROR(r.Bool("enable_enc_cls", &c.has_cls));

  RETURN_IF_ERROR(r.Float("layer_norm_epsilon", &c.layer_norm_epsilon));
  RETURN_IF_ERROR(r.Float("encoder_rms_norm_eps", &c.encoder_rms_norm_eps));
  RETURN_IF_ERROR(r.Float("encoder_rope_theta", &c.encoder_rope_theta));
  RETURN_IF_ERROR(r.Float("hsa_norm_eps", &c.hsa_norm_eps));
  if (const json* limit = r.Find("time_step_limit")) {
    if (!limit->is_array() || limit->size() != 2) {
      return KeyError("time_step_limit",
                      absl::StrCat("must be an array [min, max], got ", r.Describe(*limit)));
    }
    RETURN_IF_ERROR(r.FloatValue("time_step_limit", (*limit)[0], &c.time_step_min_limit));
    RETURN_IF_ERROR(r.FloatValue("time_step_limit", (*limit)[1], &c.time_step_max_limit));
  }

  // Feature switches of the reference that the engine does not implement: accepted only off.
  struct Switch {
    const char* key;
    bool unsupported_value;
  };
  for (const Switch& s : {Switch{"enable_softmax", true}, Switch{"enable_qk_norm", true},
                          Switch{"enable_lmk_norm", true}, Switch{"enc_prenorm", true},
                          Switch{"mask_slide_window", true}, Switch{"enable_pos_decay", true},
                          Switch{"enable_softmax1", true}, Switch{"insert_lmk", true},
                          Switch{"hsa_only", false}}) {
    bool value = !s.unsupported_value;
    RETURN_IF_ERROR(r.Bool(s.key, &value));
    if (value == s.unsupported_value) {
      return KeyError(s.key, absl::StrCat("= ", value ? "true" : "false",
                                          " is not supported by this engine"));
    }
  }

  RETURN_IF_ERROR(c.Validate());
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    const int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::ErrnoToStatus(err, absl::StrCat("cannot open ", path));
  }
  std::string text;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) text.append(buf, n);
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  if (failed) return absl::DataLossError(absl::StrCat("error reading ", path));
  absl::StatusOr<ModelConfig> config = ParseModelConfig(text);
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat(path, ": ", config.status().message()));
  }
  return config;
}

std::string ModelConfigToJson(const ModelConfig& c) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  j["hidden_size"] = c.hidden_size;
  j["vocab_size"] = c.vocab_size;
  j["num_lower_layers"] = c.num_lower_layers;
  j["num_upper_layers"] = c.num_upper_layers;
  j["num_upper_groups"] = c.num_upper_groups;
  j["num_mamba_per_gca"] = c.num_mamba_per_gca;
  j["state_size"] = c.state_size;
  j["head_dim"] = c.head_dim;
  j["num_heads"] = c.num_heads;
  j["expand"] = c.expand;
  j["n_groups"] = c.n_groups;
  j["conv_kernel"] = c.conv_kernel;
  j["mamba_chunk_size"] = c.mamba_chunk_size;
  j["use_conv_bias"] = c.use_conv_bias;
  j["use_bias"] = c.use_bias;
  j["time_step_limit"] = nlohmann::ordered_json::array(
      {FloatOrLiteral(c.time_step_min_limit), FloatOrLiteral(c.time_step_max_limit)});
  j["layer_norm_epsilon"] = FloatOrLiteral(c.layer_norm_epsilon);
  j["chunk_size"] = c.chunk_size;
  j["chunk_topk"] = c.chunk_topk;
  j["retrieval_dim"] = c.retrieval_dim;
  j["encoder_layers"] = c.encoder_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["num_kv_heads"] = c.num_kv_heads;
  j["singlehead_retrieval"] = c.singlehead_retrieval;
  j["enable_enc_cls"] = c.has_cls;
  j["encoder_rms_norm_eps"] = FloatOrLiteral(c.encoder_rms_norm_eps);
  j["encoder_rope_theta"] = FloatOrLiteral(c.encoder_rope_theta);
  j["hsa_norm_eps"] = FloatOrLiteral(c.hsa_norm_eps);
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["bos_token_id"] = c.bos_token_id;
  j["eos_token_id"] = c.eos_token_id;
  j["pad_token_id"] = c.pad_token_id;
  std::string text = j.dump(2);
  // The only strings in `j` are the sentinels, so a plain textual replacement is exact.
  return absl::StrReplaceAll(text, {{absl::StrCat("\"", kSentinelPosInf, "\""), "Infinity"},
                                    {absl::StrCat("\"", kSentinelNegInf, "\""), "-Infinity"},
                                    {absl::StrCat("\"", kSentinelNan, "\""), "NaN"}}) +
         "\n";
}

ModelConfig Reference370MConfig() {
  ModelConfig c;
  c.hidden_size = 1024;
  c.vocab_size = 50280;
  c.num_lower_layers = 24;
  c.num_upper_layers = 24;
  c.num_mamba_per_gca = 8;
  c.state_size = 128;
  c.head_dim = 64;
  c.expand = 2;
  c.num_heads = 32;
  c.n_groups = 1;
  c.conv_kernel = 4;
  c.mamba_chunk_size = 256;
  c.chunk_size = 64;
  c.chunk_topk = 8;
  c.retrieval_dim = 1024;
  c.encoder_layers = 1;
  c.num_attention_heads = 16;
  c.num_key_value_heads = 16;
  c.num_kv_heads = 1;
  return c;
}

}  // namespace ramba
