// config.json parsing: the reference's own configs, its Infinity literal, derived sizes, and one
// rejection per invalid key.
#include "model/config.h"

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace ramba {
namespace {

using json = nlohmann::json;

// configs/inference/ramba_370_wo_offload.json of RamstorageAI/long-context-modeling, verbatim.
constexpr char kInference370M[] = R"json({
  "_name_or_path": "configs/ramba-370M/config_enc1_4096.json",
  "architectures": [
    "Mamba2ForCausalLM"
  ],
  "block_q": 1,
  "bos_token_id": 0,
  "chunk_size": 64,
  "chunk_topk": 8,
  "conv_kernel": 4,
  "dt_rank": "auto",
  "encoder_layers": 1,
  "eos_token_id": 0,
  "expand": 2,
  "fused_add_norm": true,
  "head_dim": 64,
  "hidden_act": "silu",
  "hidden_size": 1024,
  "initializer_range": 0.02,
  "intermediate_size": 2048,
  "layer_norm_epsilon": 1e-05,
  "lmk_token_id": 50279,
  "mamba_chunk_size": 256,
  "model_type": "mamba2",
  "n_groups": 1,
  "num_attention_heads": 16,
  "num_heads": 32,
  "num_hidden_layers": 64,
  "num_kv_heads": 1,
  "num_lower_layers": 24,
  "num_mamba_per_gca": 8,
  "num_upper_groups": 1,
  "num_upper_layers": 24,
  "pad_token_id": 0,
  "pad_vocab_size_multiple": 8,
  "rescale_prenorm_residual": false,
  "residual_in_fp32": true,
  "retrieval_dim": 1024,
  "rms_norm": true,
  "segment_size": 4096,
  "ssm_cfg": {},
  "state_size": 128,
  "tie_word_embeddings": true,
  "time_step_floor": 0.0001,
  "time_step_init_scheme": "random",
  "time_step_limit": [
    0.0,
    Infinity
  ],
  "time_step_max": 0.1,
  "time_step_min": 0.001,
  "time_step_rank": 160,
  "time_step_scale": 1.0,
  "torch_dtype": "float32",
  "transformers_version": "4.48.3",
  "use_bias": false,
  "use_cache": false,
  "use_conv_bias": true,
  "vocab_size": 50280,
  "inference_segment": 1024
})json";

// configs/ramba-370M/config_enc1_4096.json of the same repository, verbatim (no time_step_limit,
// explicit num_key_value_heads).
constexpr char kTrain370M[] = R"json({
  "architectures": [
    "Mamba2ForCausalLM"
  ],
  "bos_token_id": 0,
  "conv_kernel": 4,
  "dt_rank": "auto",
  "eos_token_id": 0,
  "expand": 2,
  "fused_add_norm": true,
  "hidden_act": "silu",
  "hidden_size": 1024,
  "head_dim": 64,
  "num_heads": 32,
  "initializer_range": 0.02,
  "intermediate_size": 2048,
  "layer_norm_epsilon": 1e-05,
  "model_type": "mamba2",
  "pad_token_id": 0,
  "pad_vocab_size_multiple": 8,
  "rescale_prenorm_residual": false,
  "residual_in_fp32": true,
  "rms_norm": true,
  "ssm_cfg": {},
  "state_size": 128,
  "time_step_floor": 0.0001,
  "time_step_init_scheme": "random",
  "time_step_max": 0.1,
  "time_step_min": 0.001,
  "time_step_rank": 160,
  "time_step_scale": 1.0,
  "torch_dtype": "float32",
  "transformers_version": "4.39.0.dev0",
  "use_bias": false,
  "use_cache": false,
  "use_conv_bias": true,
  "vocab_size": 50280,
  "tie_word_embeddings": true,
  "num_lower_layers": 24,
  "num_upper_layers": 24,
  "num_upper_groups": 1,
  "num_mamba_per_gca": 8,
  "n_groups": 1,
  "block_q": 1,
  "chunk_topk": 8,
  "retrieval_dim": 1024,
  "mamba_chunk_size": 256,
  "chunk_size": 64,
  "encoder_layers": 1,
  "num_attention_heads": 16,
  "num_key_value_heads":16,
  "num_kv_heads": 1,
  "lmk_token_id": 50279,
  "segment_size": 4096,
  "inference_segment": -1
})json";

void Expect370M(const ModelConfig& c) {
  EXPECT_EQ(c.hidden_size, 1024);
  EXPECT_EQ(c.vocab_size, 50280);
  EXPECT_EQ(c.num_lower_layers, 24);
  EXPECT_EQ(c.num_upper_layers, 24);
  EXPECT_EQ(c.num_upper_groups, 1);
  EXPECT_EQ(c.num_mamba_per_gca, 8);
  EXPECT_EQ(c.state_size, 128);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.num_heads, 32);
  EXPECT_EQ(c.expand, 2);
  EXPECT_EQ(c.n_groups, 1);
  EXPECT_EQ(c.conv_kernel, 4);
  EXPECT_EQ(c.mamba_chunk_size, 256);
  EXPECT_TRUE(c.use_conv_bias);
  EXPECT_FALSE(c.use_bias);
  EXPECT_FLOAT_EQ(c.layer_norm_epsilon, 1e-5f);
  EXPECT_EQ(c.chunk_size, 64);
  EXPECT_EQ(c.chunk_topk, 8);
  EXPECT_EQ(c.retrieval_dim, 1024);
  EXPECT_EQ(c.encoder_layers, 1);
  EXPECT_EQ(c.num_attention_heads, 16);
  EXPECT_EQ(c.num_key_value_heads, 16);
  EXPECT_EQ(c.num_kv_heads, 1);
  EXPECT_FALSE(c.singlehead_retrieval);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.bos_token_id, 0);
  EXPECT_EQ(c.eos_token_id, 0);
  EXPECT_EQ(c.pad_token_id, 0);
  EXPECT_EQ(c.time_step_min_limit, 0.0f);
  EXPECT_TRUE(std::isinf(c.time_step_max_limit) && c.time_step_max_limit > 0);
  EXPECT_TRUE(c.has_cls);  // enable_enc_cls defaults to "has an encoder", as in the reference
  EXPECT_TRUE(c.Validate().ok()) << c.Validate();

  // Derived sizes and the reference module layout (spec section 7).
  EXPECT_EQ(c.d_inner(), 2048);
  EXPECT_EQ(c.conv_dim(), 2304);
  EXPECT_EQ(c.in_proj_dim(), 4384);
  EXPECT_EQ(c.attn_head_dim(), 64);
  EXPECT_EQ(c.kv_dim(), 64);
  EXPECT_EQ(c.encoder_intermediate_size(), 2688);
  EXPECT_EQ(c.retrieval_heads(), 1);
  EXPECT_EQ(c.num_hsa_layers(), 3);
  EXPECT_EQ(c.num_mamba_layers(), 48);
  EXPECT_EQ(c.chunking_layer_index(), 24);
  EXPECT_EQ(c.retrieval_layer_index(), 25);
  EXPECT_EQ(c.hsa_layer_index(0), 26);
  EXPECT_EQ(c.hsa_layer_index(1), 35);
  EXPECT_EQ(c.hsa_layer_index(2), 44);
  EXPECT_EQ(c.upper_mamba_index(0, 0), 27);
  EXPECT_EQ(c.upper_mamba_index(0, 7), 34);
  EXPECT_EQ(c.upper_mamba_index(1, 0), 36);
  EXPECT_EQ(c.upper_mamba_index(2, 7), 52);
}

TEST(ConfigTest, ParsesReferenceInferenceConfigWithInfinity) {
  auto c = ParseModelConfig(kInference370M);
  ASSERT_TRUE(c.ok()) << c.status();
  Expect370M(*c);
}

TEST(ConfigTest, ParsesReferenceTrainingConfig) {
  auto c = ParseModelConfig(kTrain370M);
  ASSERT_TRUE(c.ok()) << c.status();
  Expect370M(*c);
}

TEST(ConfigTest, DefaultTimeStepLimitIsUnclamped) {
  ModelConfig c;
  EXPECT_EQ(c.time_step_min_limit, 0.0f);
  EXPECT_TRUE(std::isinf(c.time_step_max_limit) && c.time_step_max_limit > 0);
}

// The reference 370M config as a json object, for building variants.
json Base() {
  json j = json::parse(kTrain370M);
  return j;
}

absl::StatusOr<ModelConfig> ParseJson(const json& j) { return ParseModelConfig(j.dump()); }

TEST(ConfigTest, NonFiniteLiteralsOutsideStringsOnly) {
  // -Infinity, NaN, whitespace variants; "Infinity" inside a string stays a string.
  std::string text = Base().dump();
  text.pop_back();
  text += R"(, "time_step_limit": [ 0.5 ,Infinity ], "note": "Infinity NaN -Infinity \"Infinity",
             "xs": [-Infinity, NaN, Infinity])" "}";
  auto c = ParseModelConfig(text);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->time_step_min_limit, 0.5f);
  EXPECT_TRUE(std::isinf(c->time_step_max_limit));

  // A sentinel-looking string in the input must not be taken for Infinity.
  json j = Base();
  j["time_step_limit"] = {0.0, "__ramba_nonfinite_inf__"};
  auto bad = ParseJson(j);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("time_step_limit"), std::string::npos) << bad.status();

  // -Infinity as the lower limit is rejected (min must be >= 0), naming the key.
  text = Base().dump();
  text.pop_back();
  text += R"(, "time_step_limit": [-Infinity, Infinity]})";
  auto neg = ParseModelConfig(text);
  ASSERT_FALSE(neg.ok());
  EXPECT_NE(neg.status().message().find("time_step_limit"), std::string::npos) << neg.status();

  // A bare identifier that merely starts with a literal is still a JSON error.
  text = Base().dump();
  text.pop_back();
  text += R"(, "x": Infinityx})";
  EXPECT_EQ(ParseModelConfig(text).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ConfigTest, RoundTripThroughJson) {
  auto c = ParseModelConfig(kInference370M);
  ASSERT_TRUE(c.ok()) << c.status();
  c->singlehead_retrieval = true;
  c->time_step_min_limit = 0.001f;
  c->layer_norm_epsilon = 1e-6f;
  c->has_cls = false;
  const std::string text = ModelConfigToJson(*c);
  // Written the way the reference (Python's json) reads it.
  EXPECT_NE(text.find("Infinity"), std::string::npos) << text;
  EXPECT_NE(text.find("\"time_step_limit\""), std::string::npos);
  EXPECT_NE(text.find("1e-06"), std::string::npos) << text;
  auto back = ParseModelConfig(text);
  ASSERT_TRUE(back.ok()) << back.status() << "\n" << text;
  EXPECT_EQ(back->hidden_size, c->hidden_size);
  EXPECT_EQ(back->num_heads, c->num_heads);
  EXPECT_EQ(back->num_key_value_heads, c->num_key_value_heads);
  EXPECT_TRUE(back->singlehead_retrieval);
  EXPECT_FALSE(back->has_cls);
  EXPECT_EQ(back->time_step_min_limit, 0.001f);
  EXPECT_TRUE(std::isinf(back->time_step_max_limit));
  EXPECT_EQ(back->layer_norm_epsilon, 1e-6f);
  EXPECT_EQ(ModelConfigToJson(*back), text);
}

TEST(ConfigTest, AliasesAndDerivedDefaults) {
  json j = Base();
  j.erase("hidden_size");
  j["d_model"] = 1024;
  j.erase("num_heads");
  j.erase("num_key_value_heads");
  auto c = ParseJson(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 1024);
  EXPECT_EQ(c->num_heads, 32);              // expand * hidden / head_dim
  EXPECT_EQ(c->num_key_value_heads, 16);    // = num_attention_heads
  // Null means "absent".
  j["num_kv_heads"] = nullptr;
  c = ParseJson(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_kv_heads, 1);
  // Switches off are fine; enable_enc_cls false presets has_cls.
  j["enable_softmax"] = false;
  j["hsa_only"] = true;
  j["enable_enc_cls"] = false;
  c = ParseJson(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->has_cls);
}

TEST(ConfigTest, SmallConfigsWithoutEncoderNeedNoEncoderHeads) {
  json j = Base();
  j["encoder_layers"] = 0;
  j["num_key_value_heads"] = 0;
  auto c = ParseJson(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->has_cls);
}

struct BadCase {
  const char* key;     // key to set (or erase when value is null and erase is true)
  json value;
  const char* expect;  // substring of the message (the key it names)
  bool erase = false;
};

TEST(ConfigTest, RejectsInvalidValuesNamingTheKey) {
  const std::vector<BadCase> cases = {
      // Wrong JSON types.
      {"hidden_size", "1024", "hidden_size"},
      {"hidden_size", 1024.5, "hidden_size"},
      {"vocab_size", true, "vocab_size"},
      {"use_conv_bias", 1, "use_conv_bias"},
      {"layer_norm_epsilon", "1e-5", "layer_norm_epsilon"},
      {"time_step_limit", 0.0, "time_step_limit"},
      {"time_step_limit", json::array({0.0}), "time_step_limit"},
      {"time_step_limit", json::array({0.0, "x"}), "time_step_limit"},
      {"time_step_limit", json::array({1.0, 0.5}), "time_step_limit"},
      {"d_model", 512, "d_model"},
      // Missing required keys.
      {"vocab_size", nullptr, "vocab_size", true},
      {"retrieval_dim", nullptr, "retrieval_dim", true},
      {"num_attention_heads", nullptr, "num_attention_heads", true},
      // Non-positive sizes.
      {"hidden_size", 0, "hidden_size"},
      {"vocab_size", -5, "vocab_size"},
      {"num_upper_layers", 0, "num_upper_layers"},
      {"num_lower_layers", -1, "num_lower_layers"},
      {"state_size", 0, "state_size"},
      {"expand", 0, "expand"},
      {"n_groups", 0, "n_groups"},
      {"num_mamba_per_gca", 0, "num_mamba_per_gca"},
      {"mamba_chunk_size", 0, "mamba_chunk_size"},
      {"retrieval_dim", 0, "retrieval_dim"},
      {"num_kv_heads", 0, "num_kv_heads"},
      {"encoder_layers", -1, "encoder_layers"},
      {"layer_norm_epsilon", 0.0, "layer_norm_epsilon"},
      {"chunk_size", 0, "chunk_size"},
      {"chunk_topk", 0, "chunk_topk"},
      {"conv_kernel", 1, "conv_kernel"},
      // Structure.
      {"num_upper_groups", 2, "num_upper_groups=2 is not supported yet"},
      {"num_upper_layers", 20, "num_mamba_per_gca"},
      {"num_attention_heads", 15, "num_attention_heads"},
      {"num_kv_heads", 3, "num_kv_heads"},
      {"num_key_value_heads", 5, "num_key_value_heads"},
      {"head_dim", 48, "head_dim"},
      {"num_heads", 16, "num_heads"},
      {"n_groups", 3, "n_groups"},
      {"eos_token_id", 50280, "eos_token_id"},
      {"use_bias", true, "use_bias"},
      // Features the engine does not implement.
      {"enable_softmax", true, "enable_softmax"},
      {"enable_qk_norm", true, "enable_qk_norm"},
      {"enable_lmk_norm", true, "enable_lmk_norm"},
      {"enc_prenorm", true, "enc_prenorm"},
      {"mask_slide_window", true, "mask_slide_window"},
      {"enable_pos_decay", true, "enable_pos_decay"},
      {"enable_softmax1", true, "enable_softmax1"},
      {"insert_lmk", true, "insert_lmk"},
      {"hsa_only", false, "hsa_only"},
      {"enable_softmax", "yes", "enable_softmax"},
  };
  for (const BadCase& bc : cases) {
    json j = Base();
    if (bc.erase) {
      j.erase(bc.key);
    } else {
      j[bc.key] = bc.value;
    }
    auto c = ParseJson(j);
    ASSERT_FALSE(c.ok()) << bc.key << " = " << bc.value.dump() << " was accepted";
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
    EXPECT_NE(c.status().message().find(bc.expect), std::string::npos)
        << bc.key << " = " << bc.value.dump() << ": " << c.status();
  }
}

TEST(ConfigTest, RetrievalDimMustSplitIntoRetrievalHeads) {
  json j = Base();
  j["num_kv_heads"] = 4;
  j["retrieval_dim"] = 1022;
  auto c = ParseJson(j);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("retrieval_dim"), std::string::npos) << c.status();
  j["singlehead_retrieval"] = true;  // one retrieval head: any positive width
  c = ParseJson(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->retrieval_heads(), 1);
  EXPECT_EQ(c->kv_dim(), 256);
}

TEST(ConfigTest, NotJsonReportsPosition) {
  const char* texts[] = {"", "not json", "{\"hidden_size\": 1024,\n  \"vocab_size\": }",
                         "[1, 2]", "{\"a\": Infinity,\n \"b\" 3}"};
  for (const char* t : texts) {
    auto c = ParseModelConfig(t);
    ASSERT_FALSE(c.ok()) << t;
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << t;
  }
  auto c = ParseModelConfig("{\"hidden_size\": 1024,\n  \"vocab_size\": }");
  EXPECT_NE(c.status().message().find("line 2"), std::string::npos) << c.status();
  // The position is in the original text even after an Infinity was rewritten before it.
  c = ParseModelConfig("{\"a\": Infinity, \"b\" 3}");
  EXPECT_NE(c.status().message().find("column 21"), std::string::npos) << c.status();
  EXPECT_NE(ParseModelConfig("[1, 2]").status().message().find("object"), std::string::npos);
}

TEST(ConfigTest, LoadFromFile) {
  EXPECT_EQ(LoadModelConfig("/nonexistent/ramba/config.json").status().code(),
            absl::StatusCode::kNotFound);
  const std::string path = ::testing::TempDir() + "/ramba_config_test.json";
  std::FILE* f = std::fopen(path.c_str(), "w");
  ASSERT_NE(f, nullptr);
  std::fputs(kInference370M, f);
  std::fclose(f);
  auto c = LoadModelConfig(path);
  ASSERT_TRUE(c.ok()) << c.status();
  Expect370M(*c);
  f = std::fopen(path.c_str(), "w");
  std::fputs("{\"hidden_size\": 0}", f);
  std::fclose(f);
  c = LoadModelConfig(path);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find(path), std::string::npos) << c.status();
  std::remove(path.c_str());
}

}  // namespace
}  // namespace ramba
