#include <cmath>
#include <cstring>
#include <filesystem>

#include "common/fp16.h"
#include "engine/model/hf_loader.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/model/hf_test_util.h"

namespace morphserve::engine {
namespace {

using morphserve::testing::TempDir;
using morphserve::testing::TinyConfigJson;
using morphserve::testing::TinySpec;
using morphserve::testing::WriteFile;
using ::testing::HasSubstr;

constexpr char kQwenConfig[] = R"({
  "architectures": ["Qwen2ForCausalLM"], "hidden_size": 128, "intermediate_size": 320,
  "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
  "vocab_size": 3000, "max_position_embeddings": 512, "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0, "tie_word_embeddings": false})";

std::unique_ptr<Model> LoadDummy(const std::string& path, int64_t layers, uint64_t seed) {
  absl::StatusOr<std::unique_ptr<Model>> m = LoadDummyModel(path, layers, seed);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? *std::move(m) : nullptr;
}

bool SameBytes(const Matrix& a, const Matrix& b) {
  return a.dtype == b.dtype && a.rows == b.rows && a.cols == b.cols &&
         std::memcmp(a.data, b.data, a.rows * a.row_bytes) == 0;
}

void ExpectShape(const Matrix& m, int64_t rows, int64_t cols) {
  EXPECT_EQ(m.dtype, DType::kBF16);
  EXPECT_EQ(m.rows, rows);
  EXPECT_EQ(m.cols, cols);
  EXPECT_EQ(m.row_bytes, static_cast<size_t>(cols * 2));
  EXPECT_NE(m.data, nullptr);
}

class DummyWeightsTest : public ::testing::Test {
 protected:
  void SetUp() override { WriteFile(config_, std::string_view(kQwenConfig)); }
  TempDir tmp_;
  std::string config_ = tmp_.path() + "/config.json";
};

TEST_F(DummyWeightsTest, ShapesFollowTheConfig) {
  std::unique_ptr<Model> m = LoadDummy(tmp_.path(), 0, 1);  // the directory works too
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->format, "dummy");
  EXPECT_EQ(m->tokenizer, nullptr);  // no tokenizer.json: token ids only
  const ModelConfig& c = m->config;
  ASSERT_EQ(m->weights.layers.size(), 4u);
  ExpectShape(m->weights.token_embedding, 3000, 128);
  ExpectShape(m->weights.output, 3000, 128);
  EXPECT_NE(m->weights.output.data, m->weights.token_embedding.data);
  for (const LayerWeights& l : m->weights.layers) {
    ExpectShape(l.wq, 128, 128);
    ExpectShape(l.wk, 32, 128);
    ExpectShape(l.wv, 32, 128);
    ExpectShape(l.wo, 128, 128);
    ExpectShape(l.w_gate, 320, 128);
    ExpectShape(l.w_up, 320, 128);
    ExpectShape(l.w_down, 128, 320);
    ASSERT_NE(l.bq, nullptr);  // Qwen2 biases
    ASSERT_NE(l.bv, nullptr);
    for (int64_t i = 0; i < c.hidden_size; ++i) {
      ASSERT_EQ(l.attn_norm[i], 1.0f);
      ASSERT_EQ(l.ffn_norm[i], 1.0f);
    }
  }
  EXPECT_EQ(m->weights.output_norm[0], 1.0f);
}

TEST_F(DummyWeightsTest, ValuesAreSmallAndCentered) {
  std::unique_ptr<Model> m = LoadDummy(config_, 0, 1);
  ASSERT_NE(m, nullptr);
  const Matrix& e = m->weights.token_embedding;
  const auto* bits = static_cast<const uint16_t*>(e.data);
  double sum = 0, sum_sq = 0;
  const int64_t n = e.rows * e.cols;
  for (int64_t i = 0; i < n; ++i) {
    const double v = BF16ToFloat(bits[i]);
    ASSERT_LE(std::abs(v), 0.035);
    sum += v;
    sum_sq += v * v;
  }
  EXPECT_NEAR(sum / n, 0.0, 1e-3);
  EXPECT_NEAR(std::sqrt(sum_sq / n), 0.02, 1e-3);
}

TEST_F(DummyWeightsTest, DeterministicPerSeed) {
  std::unique_ptr<Model> a = LoadDummy(config_, 0, 7);
  std::unique_ptr<Model> b = LoadDummy(config_, 0, 7);
  std::unique_ptr<Model> other = LoadDummy(config_, 0, 8);
  ASSERT_TRUE(a && b && other);
  EXPECT_TRUE(SameBytes(a->weights.token_embedding, b->weights.token_embedding));
  EXPECT_TRUE(SameBytes(a->weights.output, b->weights.output));
  for (size_t i = 0; i < a->weights.layers.size(); ++i) {
    const LayerWeights& la = a->weights.layers[i];
    const LayerWeights& lb = b->weights.layers[i];
    EXPECT_TRUE(SameBytes(la.wq, lb.wq) && SameBytes(la.wk, lb.wk) && SameBytes(la.wv, lb.wv) &&
                SameBytes(la.wo, lb.wo) && SameBytes(la.w_gate, lb.w_gate) &&
                SameBytes(la.w_up, lb.w_up) && SameBytes(la.w_down, lb.w_down))
        << "layer " << i;
    EXPECT_EQ(std::memcmp(la.bq, lb.bq, 128 * sizeof(float)), 0);
    EXPECT_FALSE(SameBytes(la.wq, other->weights.layers[i].wq));
  }
  EXPECT_FALSE(SameBytes(a->weights.token_embedding, other->weights.token_embedding));
  // Each tensor has its own stream.
  EXPECT_FALSE(SameBytes(a->weights.layers[0].w_gate, a->weights.layers[0].w_up));
  EXPECT_FALSE(SameBytes(a->weights.layers[0].wq, a->weights.layers[1].wq));
}

TEST_F(DummyWeightsTest, LayerOverrideKeepsTheFirstLayers) {
  std::unique_ptr<Model> full = LoadDummy(config_, 0, 3);
  std::unique_ptr<Model> two = LoadDummy(config_, 2, 3);
  ASSERT_TRUE(full && two);
  EXPECT_EQ(two->config.num_layers, 2);
  ASSERT_EQ(two->weights.layers.size(), 2u);
  EXPECT_TRUE(SameBytes(full->weights.layers[1].w_down, two->weights.layers[1].w_down));
  EXPECT_TRUE(SameBytes(full->weights.token_embedding, two->weights.token_embedding));
  EXPECT_FALSE(LoadDummyModel(config_, -1, 3).ok());
}

TEST_F(DummyWeightsTest, ForwardGivesSaneLogits) {
  std::unique_ptr<Model> m = LoadDummy(config_, 0, 5);
  ASSERT_NE(m, nullptr);
  const std::vector<float> logits = morphserve::testing::RunForward(*m, {{1, 2, 3, 2999, 0}});
  ASSERT_EQ(logits.size(), 5u * 3000u);
  float max_abs = 0;
  for (float v : logits) {
    ASSERT_TRUE(std::isfinite(v));
    max_abs = std::max(max_abs, std::abs(v));
  }
  EXPECT_GT(max_abs, 1e-3f);
  EXPECT_LT(max_abs, 100.0f);
}

TEST_F(DummyWeightsTest, TiedEmbeddingsAndTokenizerBesideConfig) {
  TinySpec spec;
  spec.tied = true;
  const std::string dir = tmp_.Subdir("tiny");
  WriteFile(dir + "/config.json", TinyConfigJson(spec, "LlamaForCausalLM"));
  WriteFile(dir + "/tokenizer.json", morphserve::testing::TinyTokenizerJson());
  std::unique_ptr<Model> m = LoadDummy(dir + "/config.json", 0, 0);
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->weights.output.data, m->weights.token_embedding.data);
  ASSERT_NE(m->tokenizer, nullptr);
  EXPECT_EQ(m->tokenizer->vocab_size(), spec.vocab);
  EXPECT_EQ(m->weights.layers[0].bq, nullptr);
}

TEST_F(DummyWeightsTest, ThroughLoadModel) {
  ModelLoadOptions options;
  options.path = tmp_.path();
  options.format = LoadFormat::kDummy;
  options.num_layers_override = 1;
  options.dummy_seed = 9;
  absl::StatusOr<std::unique_ptr<Model>> m = LoadModel(options);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->weights.layers.size(), 1u);
}

TEST_F(DummyWeightsTest, Errors) {
  const absl::Status missing = LoadDummyModel(tmp_.Subdir("empty"), 0, 0).status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.message()), HasSubstr("empty/config.json"));
  WriteFile(config_, std::string_view(R"({"architectures": ["BertModel"]})"));
  const absl::Status arch = LoadDummyModel(config_, 0, 0).status();
  EXPECT_THAT(std::string(arch.message()), HasSubstr("architecture 'BertModel' is not supported"));
  EXPECT_THAT(std::string(arch.message()), HasSubstr(config_));
}

}  // namespace
}  // namespace morphserve::engine
