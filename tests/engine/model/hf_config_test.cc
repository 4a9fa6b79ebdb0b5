#include "engine/model/hf_loader.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace morphserve::engine {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::json;

// A Llama-3.1-8B-shaped config.json, the base the tests modify.
Json Llama31() {
  return Json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": false, "hidden_act": "silu", "attention_bias": false,
    "mlp_bias": false, "torch_dtype": "bfloat16", "bos_token_id": 128000
  })");
}

ModelConfig Parse(const Json& json) {
  absl::StatusOr<ModelConfig> c = ModelConfigFromHfJson(json.dump());
  EXPECT_TRUE(c.ok()) << c.status();
  return c.value_or(ModelConfig{});
}

std::string Error(const Json& json) {
  absl::StatusOr<ModelConfig> c = ModelConfigFromHfJson(json.dump());
  EXPECT_FALSE(c.ok());
  return std::string(c.status().message());
}

TEST(HfConfigTest, Llama31) {
  const ModelConfig c = Parse(Llama31());
  EXPECT_EQ(c.architecture, "llama");
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.num_layers, 32);
  EXPECT_EQ(c.num_heads, 32);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.rope_dim, 128);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.context_length, 131072);
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-5f);
  EXPECT_FLOAT_EQ(c.rope_theta, 500000.0f);
  EXPECT_EQ(c.rope_style, kernels::RopeStyle::kHalf);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_FALSE(c.tie_embeddings);
  EXPECT_FALSE(c.qkv_bias);
}

TEST(HfConfigTest, Defaults) {
  Json j = Llama31();
  for (const char* key : {"num_key_value_heads", "rope_theta", "tie_word_embeddings",
                          "rope_scaling", "rms_norm_eps"}) {
    j.erase(key);
  }
  j["head_dim"] = nullptr;
  const ModelConfig c = Parse(j);
  EXPECT_EQ(c.num_kv_heads, 32);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_FLOAT_EQ(c.rope_theta, 10000.0f);
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-6f);
  EXPECT_FALSE(c.tie_embeddings);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kNone);
}

TEST(HfConfigTest, ExplicitHeadDim) {
  Json j = Llama31();
  j["head_dim"] = 64;  // e.g. Qwen3-style wide attention: q_dim != hidden
  const ModelConfig c = Parse(j);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.rope_dim, 64);
  EXPECT_EQ(c.q_dim(), 2048);
}

TEST(HfConfigTest, Qwen2HasQkvBiasAndIgnoresDisabledWindow) {
  const ModelConfig c = Parse(Json::parse(R"({
    "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 4096, "use_sliding_window": false,
    "tie_word_embeddings": true, "rope_scaling": null})"));
  EXPECT_EQ(c.architecture, "qwen2");
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_TRUE(c.tie_embeddings);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.context_length, 32768);
}

TEST(HfConfigTest, MistralSlidingWindowCapsContext) {
  Json j = Llama31();
  j["architectures"] = {"MistralForCausalLM"};
  j["sliding_window"] = 4096;
  j["rope_scaling"] = nullptr;
  const ModelConfig c = Parse(j);
  EXPECT_EQ(c.architecture, "llama");
  EXPECT_EQ(c.context_length, 4096);
  j["sliding_window"] = nullptr;
  EXPECT_EQ(Parse(j).context_length, 131072);
}

TEST(HfConfigTest, Phi3PartialRotary) {
  Json j = Llama31();
  j["architectures"] = {"Phi3ForCausalLM"};
  j["rope_scaling"] = nullptr;
  j["partial_rotary_factor"] = 0.75;
  const ModelConfig c = Parse(j);
  EXPECT_EQ(c.architecture, "phi3");
  EXPECT_EQ(c.rope_dim, 96);
  EXPECT_EQ(RopeInverseFrequencies(c).size(), 48u);
}

TEST(HfConfigTest, ModelTypeWhenNoArchitectures) {
  Json j = Llama31();
  j.erase("architectures");
  j["model_type"] = "qwen2";
  EXPECT_EQ(Parse(j).architecture, "qwen2");
}

void ExpectInvFreq(const ModelConfig& c, const std::vector<std::pair<int, double>>& expected) {
  const std::vector<float> inv = RopeInverseFrequencies(c);
  for (const auto& [i, want] : expected) {
    ASSERT_LT(static_cast<size_t>(i), inv.size());
    EXPECT_NEAR(inv[i], want, want * 1e-6) << "pair " << i;
  }
}

TEST(HfConfigTest, Llama3RopeScalingFrequencies) {
  // Reference values: transformers' _compute_llama3_parameters in float64
  // (theta 500000, head_dim 128, factor 8, low 1, high 4, original 8192).
  // Pairs 0..28 keep their frequency, 29..34 are interpolated, 35.. divided.
  ExpectInvFreq(Parse(Llama31()), {{0, 1.0},
                                   {1, 0.8146172338565447},
                                   {16, 0.03760603093086393},
                                   {28, 0.0032114459947525913},
                                   {29, 0.002166570763503359},
                                   {31, 0.0008567514129196324},
                                   {34, 0.00017850781276799638},
                                   {35, 9.556212353964683e-05},
                                   {48, 6.647869871181236e-06},
                                   {63, 3.068925988914511e-07}});
}

TEST(HfConfigTest, LinearRopeScalingFrequencies) {
  Json j = Llama31();
  j["hidden_size"] = 2048;  // head_dim 64
  j["rope_theta"] = 10000.0;
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}};  // the older key
  const ModelConfig c = Parse(j);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLinear);
  // 10000^(-2i/64) / 4.
  ExpectInvFreq(c, {{0, 0.25},
                    {1, 0.18747355233311397},
                    {5, 0.059284342641541386},
                    {17, 0.0018747355233311397},
                    {31, 3.33380358040831e-05}});
}

TEST(HfConfigTest, DefaultRopeTypeAndRopeParameters) {
  Json j = Llama31();
  j["rope_scaling"] = {{"rope_type", "default"}};
  EXPECT_EQ(Parse(j).rope_scaling.type, RopeScaling::Type::kNone);
  // transformers 5 writes rope_theta and the scaling together.
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "linear"}, {"factor", 2.0}, {"rope_theta", 250000.0}};
  const ModelConfig c = Parse(j);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_FLOAT_EQ(c.rope_theta, 250000.0f);
}

TEST(HfConfigTest, UnsupportedRopeTypes) {
  for (const char* type : {"yarn", "longrope", "su", "dynamic"}) {
    Json j = Llama31();
    j["rope_scaling"] = {{"rope_type", type}, {"factor", 4.0}};
    const absl::StatusOr<ModelConfig> c = ModelConfigFromHfJson(j.dump());
    EXPECT_EQ(c.status().code(), absl::StatusCode::kUnimplemented) << type;
    EXPECT_THAT(std::string(c.status().message()),
                HasSubstr(std::string("rope scaling type '") + type + "' is not supported"));
  }
}

TEST(HfConfigTest, Errors) {
  EXPECT_THAT(std::string(ModelConfigFromHfJson("{").status().message()),
              HasSubstr("not valid JSON"));
  EXPECT_THAT(std::string(ModelConfigFromHfJson("[1]").status().message()),
              HasSubstr("not a JSON object"));

  Json j = Llama31();
  j["architectures"] = {"FalconForCausalLM"};
  EXPECT_THAT(Error(j), HasSubstr("architecture 'FalconForCausalLM' is not supported (supported: "
                                  "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
                                  "Phi3ForCausalLM)"));
  j = Llama31();
  j.erase("architectures");
  j.erase("model_type");
  EXPECT_THAT(Error(j), HasSubstr("no 'architectures'"));

  j = Llama31();
  j.erase("intermediate_size");
  EXPECT_THAT(Error(j), HasSubstr("'intermediate_size' is missing"));
  j = Llama31();
  j["hidden_size"] = "4096";
  EXPECT_THAT(Error(j), HasSubstr("'hidden_size' must be an integer"));
  j = Llama31();
  j["num_key_value_heads"] = 5;
  EXPECT_THAT(Error(j), HasSubstr("not a multiple of num_kv_heads"));
  j = Llama31();
  j["num_attention_heads"] = 0;
  EXPECT_THAT(Error(j), HasSubstr("must be positive"));
  j = Llama31();
  j["hidden_act"] = "gelu";
  EXPECT_THAT(Error(j), HasSubstr("hidden_act 'gelu' is not supported"));
  j = Llama31();
  j["attention_bias"] = true;
  EXPECT_THAT(Error(j), HasSubstr("'attention_bias: true' is not supported"));
  j = Llama31();
  j["rope_scaling"].erase("low_freq_factor");
  EXPECT_THAT(Error(j), HasSubstr("needs low_freq_factor"));
  j = Llama31();
  j["partial_rotary_factor"] = 0.36;  // 46.08 -> 46 dims: even, fine
  EXPECT_EQ(Parse(j).rope_dim, 46);
  j["partial_rotary_factor"] = 0.37;  // 47.36 -> 47: odd
  EXPECT_THAT(Error(j), HasSubstr("must be even"));
}

}  // namespace
}  // namespace morphserve::engine
