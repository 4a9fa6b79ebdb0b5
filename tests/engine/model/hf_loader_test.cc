// The Hugging Face loader against the GGUF loader: the same weights written
// both ways (GGUF the way llama.cpp's converter writes them) must give the
// same logits.
#include "engine/model/hf_loader.h"

#include <filesystem>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/model/hf_test_util.h"

namespace morphserve::engine {
namespace {

using ::testing::HasSubstr;
using namespace morphserve::testing;  // NOLINT(build/namespaces): test helpers

std::vector<std::vector<int32_t>> RandomSequences(int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(vocab) - 1);
  std::vector<std::vector<int32_t>> seqs;
  for (int len : {1, 7, 23, 40}) {  // 23 and 40 span several 16-slot blocks
    std::vector<int32_t>& s = seqs.emplace_back(len);
    for (int32_t& t : s) t = token(rng);
  }
  return seqs;
}

std::unique_ptr<Model> Load(const std::string& path, LoadFormat format = LoadFormat::kAuto) {
  ModelLoadOptions options;
  options.path = path;
  options.format = format;
  absl::StatusOr<std::unique_ptr<Model>> model = LoadModel(options);
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? *std::move(model) : nullptr;
}

std::string Message(const absl::Status& s) { return std::string(s.message()); }

// Loads `hf_dir` and `gguf_path` and checks that their logits agree within
// `tolerance` of the logit scale.
void ExpectSameLogits(const std::string& hf_dir, const std::string& gguf_path, double tolerance) {
  std::unique_ptr<Model> hf = Load(hf_dir);
  std::unique_ptr<Model> gguf = Load(gguf_path);
  ASSERT_NE(hf, nullptr);
  ASSERT_NE(gguf, nullptr);
  EXPECT_EQ(hf->format, "safetensors");
  EXPECT_EQ(hf->config.rope_style, kernels::RopeStyle::kHalf);
  EXPECT_EQ(hf->config.vocab_size, gguf->config.vocab_size);
  EXPECT_EQ(hf->config.qkv_bias, gguf->config.qkv_bias);
  EXPECT_EQ(hf->config.tie_embeddings, gguf->config.tie_embeddings);
  const auto seqs = RandomSequences(hf->config.vocab_size, 7);
  const std::vector<float> a = RunForward(*hf, seqs);
  const std::vector<float> b = RunForward(*gguf, seqs);
  EXPECT_GT(RelativeDifference(a, std::vector<float>(a.size(), 0.0f)), 0.0);
  EXPECT_LE(RelativeDifference(a, b), tolerance);

  ASSERT_NE(hf->tokenizer, nullptr);
  ASSERT_NE(gguf->tokenizer, nullptr);
  EXPECT_EQ(hf->tokenizer->vocab_size(), gguf->tokenizer->vocab_size());
  const std::string text = "hello the world, hello<|endoftext|>";
  EXPECT_EQ(hf->tokenizer->Encode(text, false, true), gguf->tokenizer->Encode(text, false, true));
}

TEST(HfLoaderTest, LlamaF32MatchesGguf) {
  TempDir tmp;
  TinySpec spec;
  const TensorMap w = RandomTinyWeights(spec, 1);
  WriteHfCheckpoint(tmp.Subdir("hf"), TinyConfigJson(spec, "LlamaForCausalLM"), w, "F32");
  WriteTinyGguf(tmp.path() + "/tiny.gguf", spec, w, /*F32*/ 0);
  ExpectSameLogits(tmp.path() + "/hf", tmp.path() + "/tiny.gguf", 1e-4);
}

TEST(HfLoaderTest, GgufWithoutPermutationDiffers) {
  // Shows the comparison above can fail: without llama.cpp's Q/K permutation
  // the GGUF model rotates the wrong pairs.
  TempDir tmp;
  TinySpec spec;
  const TensorMap w = RandomTinyWeights(spec, 1);
  WriteHfCheckpoint(tmp.Subdir("hf"), TinyConfigJson(spec, "LlamaForCausalLM"), w, "F32");
  WriteTinyGguf(tmp.path() + "/tiny.gguf", spec, w, 0, /*permute_qk=*/false);
  std::unique_ptr<Model> hf = Load(tmp.path() + "/hf");
  std::unique_ptr<Model> gguf = Load(tmp.path() + "/tiny.gguf");
  ASSERT_NE(hf, nullptr);
  ASSERT_NE(gguf, nullptr);
  const auto seqs = RandomSequences(spec.vocab, 7);
  EXPECT_GT(RelativeDifference(RunForward(*hf, seqs), RunForward(*gguf, seqs)), 1e-3);
}

TEST(HfLoaderTest, LlamaBF16MatchesGguf) {
  TempDir tmp;
  TinySpec spec;
  spec.kv_heads = 4;  // no grouping this time
  const TensorMap w = RandomTinyWeights(spec, 2);
  WriteHfCheckpoint(tmp.Subdir("hf"), TinyConfigJson(spec, "MistralForCausalLM"), w, "BF16");
  WriteTinyGguf(tmp.path() + "/tiny.gguf", spec, w, /*BF16*/ 30);
  ExpectSameLogits(tmp.path() + "/hf", tmp.path() + "/tiny.gguf", 1e-4);
  std::unique_ptr<Model> hf = Load(tmp.path() + "/hf");
  ASSERT_NE(hf, nullptr);
  EXPECT_EQ(hf->weights.layers[0].wq.dtype, DType::kBF16);
  EXPECT_EQ(hf->config.architecture, "llama");
}

TEST(HfLoaderTest, Qwen2WithBiasAndTiedEmbeddingsMatchesGguf) {
  TempDir tmp;
  TinySpec spec;
  spec.qwen2 = true;
  spec.tied = true;
  spec.rope_theta = 1000000.0f;
  const TensorMap w = RandomTinyWeights(spec, 3);
  ASSERT_EQ(w.count("lm_head.weight"), 0u);
  WriteHfCheckpoint(tmp.Subdir("hf"), TinyConfigJson(spec, "Qwen2ForCausalLM"), w, "F32");
  WriteTinyGguf(tmp.path() + "/tiny.gguf", spec, w, 0);
  ExpectSameLogits(tmp.path() + "/hf", tmp.path() + "/tiny.gguf", 1e-4);
  std::unique_ptr<Model> hf = Load(tmp.path() + "/hf");
  ASSERT_NE(hf, nullptr);
  EXPECT_TRUE(hf->config.qkv_bias);
  EXPECT_NE(hf->weights.layers[1].bq, nullptr);
  EXPECT_EQ(hf->weights.output.data, hf->weights.token_embedding.data);
}

TEST(HfLoaderTest, ShardedCheckpointMatchesSingleFile) {
  TempDir tmp;
  TinySpec spec;
  const TensorMap w = RandomTinyWeights(spec, 4);
  const std::string config = TinyConfigJson(spec, "LlamaForCausalLM");
  WriteHfCheckpoint(tmp.Subdir("one"), config, w, "F32");
  WriteHfCheckpoint(tmp.Subdir("three"), config, w, "F32", /*shards=*/3);
  ASSERT_FALSE(std::filesystem::exists(tmp.path() + "/three/model.safetensors"));
  std::unique_ptr<Model> one = Load(tmp.path() + "/one");
  std::unique_ptr<Model> three = Load(tmp.path() + "/three", LoadFormat::kSafetensors);
  ASSERT_NE(one, nullptr);
  ASSERT_NE(three, nullptr);
  EXPECT_EQ(three->keep_alive.size(), 3u);
  const auto seqs = RandomSequences(spec.vocab, 8);
  EXPECT_EQ(RunForward(*one, seqs), RunForward(*three, seqs));
}

TEST(HfLoaderTest, F16CheckpointIsCloseToF32) {
  TempDir tmp;
  TinySpec spec;
  const TensorMap w = RandomTinyWeights(spec, 10);
  const std::string config = TinyConfigJson(spec, "LlamaForCausalLM");
  WriteHfCheckpoint(tmp.Subdir("f32"), config, w, "F32");
  WriteHfCheckpoint(tmp.Subdir("f16"), config, w, "F16");
  std::unique_ptr<Model> f32 = Load(tmp.path() + "/f32");
  std::unique_ptr<Model> f16 = Load(tmp.path() + "/f16");
  ASSERT_NE(f32, nullptr);
  ASSERT_NE(f16, nullptr);
  EXPECT_EQ(f16->weights.output.dtype, DType::kF16);
  const auto seqs = RandomSequences(spec.vocab, 11);
  // F16 keeps 11 significant bits: differences of order 1e-3 are expected.
  EXPECT_LE(RelativeDifference(RunForward(*f32, seqs), RunForward(*f16, seqs)), 1e-2);
}

TEST(HfLoaderTest, Phi3FusedMatchesUnfused) {
  TempDir tmp;
  TinySpec spec;
  const TensorMap w = RandomTinyWeights(spec, 5);
  WriteHfCheckpoint(tmp.Subdir("llama"), TinyConfigJson(spec, "LlamaForCausalLM"), w, "F32");
  WriteHfCheckpoint(tmp.Subdir("phi3"), TinyConfigJson(spec, "Phi3ForCausalLM"),
                    FuseLikePhi3(spec, w), "F32");
  std::unique_ptr<Model> llama = Load(tmp.path() + "/llama");
  std::unique_ptr<Model> phi3 = Load(tmp.path() + "/phi3");
  ASSERT_NE(llama, nullptr);
  ASSERT_NE(phi3, nullptr);
  EXPECT_EQ(phi3->config.architecture, "phi3");
  const LayerWeights& l = phi3->weights.layers[0];
  EXPECT_EQ(l.wk.data, l.wq.Row(spec.heads * spec.head_dim));
  EXPECT_EQ(l.w_up.data, l.w_gate.Row(spec.ffn));
  const auto seqs = RandomSequences(spec.vocab, 9);
  EXPECT_LE(RelativeDifference(RunForward(*llama, seqs), RunForward(*phi3, seqs)), 1e-6);
}

// Bad checkpoints: each must fail with a message naming what is wrong.
class HfLoaderErrorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = tmp_.Subdir("model");
    weights_ = RandomTinyWeights(spec_, 6);
    config_ = TinyConfigJson(spec_, "LlamaForCausalLM");
  }
  absl::Status Write() {
    WriteHfCheckpoint(dir_, config_, weights_, "F32");
    return LoadHfModel(dir_).status();
  }

  TempDir tmp_;
  TinySpec spec_;
  std::string dir_;
  TensorMap weights_;
  std::string config_;
};

TEST_F(HfLoaderErrorTest, ValidCheckpointLoads) { EXPECT_TRUE(Write().ok()); }

TEST_F(HfLoaderErrorTest, MissingTensor) {
  weights_.erase("model.layers.1.mlp.up_proj.weight");
  const absl::Status s = Write();
  EXPECT_THAT(Message(s), HasSubstr("missing tensor 'model.layers.1.mlp.up_proj.weight'"));
  EXPECT_THAT(Message(s), HasSubstr(dir_));
}

TEST_F(HfLoaderErrorTest, WrongShape) {
  weights_["model.layers.0.self_attn.k_proj.weight"].shape = {64, 32};
  const absl::Status s = Write();
  EXPECT_THAT(Message(s), HasSubstr("tensor 'model.layers.0.self_attn.k_proj.weight' has shape "
                                    "[64, 32], expected [32, 64]"));
  EXPECT_THAT(Message(s), HasSubstr("model.safetensors"));
}

TEST_F(HfLoaderErrorTest, UnsupportedDType) {
  WriteHfCheckpoint(dir_, config_, weights_, "F32");
  std::vector<RawTensor> raw;
  for (const auto& [name, t] : weights_) {
    const bool bad = name == "model.layers.0.self_attn.o_proj.weight";
    raw.push_back({name, bad ? "I32" : "F32", t.shape, EncodeFloats(t.values, "F32")});
  }
  WriteFile(dir_ + "/model.safetensors", SafetensorsBytes(raw));
  const absl::Status s = LoadHfModel(dir_).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(Message(s),
              HasSubstr("tensor 'model.layers.0.self_attn.o_proj.weight' has dtype I32"));
}

TEST_F(HfLoaderErrorTest, TruncatedSafetensors) {
  ASSERT_TRUE(Write().ok());
  std::filesystem::resize_file(dir_ + "/model.safetensors", 4000);
  const absl::Status s = LoadHfModel(dir_).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(s), HasSubstr(dir_ + "/model.safetensors: "));
  std::filesystem::resize_file(dir_ + "/model.safetensors", 0);
  EXPECT_THAT(Message(LoadHfModel(dir_).status()), HasSubstr("truncated file"));
}

TEST_F(HfLoaderErrorTest, MissingConfig) {
  ASSERT_TRUE(Write().ok());
  std::filesystem::remove(dir_ + "/config.json");
  const absl::Status s = LoadHfModel(dir_).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Message(s), HasSubstr("config.json"));
}

TEST_F(HfLoaderErrorTest, MissingWeights) {
  ASSERT_TRUE(Write().ok());
  std::filesystem::remove(dir_ + "/model.safetensors");
  EXPECT_THAT(Message(LoadHfModel(dir_).status()),
              HasSubstr("neither model.safetensors nor model.safetensors.index.json"));
}

TEST_F(HfLoaderErrorTest, UnknownArchitecture) {
  config_ = R"({"architectures": ["GPTNeoXForCausalLM"], "hidden_size": 64})";
  const absl::Status s = Write();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(Message(s), HasSubstr("architecture 'GPTNeoXForCausalLM' is not supported"));
  EXPECT_THAT(Message(s), HasSubstr("LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"));
  EXPECT_THAT(Message(s), HasSubstr("config.json"));
}

TEST_F(HfLoaderErrorTest, BadIndex) {
  WriteHfCheckpoint(dir_, config_, weights_, "F32", /*shards=*/2);
  const std::string index = dir_ + "/model.safetensors.index.json";
  WriteFile(index,
            std::string_view(R"({"weight_map": {"model.norm.weight": "../x.safetensors"}})"));
  EXPECT_THAT(Message(LoadHfModel(dir_).status()), HasSubstr("not a file name"));
  WriteFile(index, std::string_view(
                       R"({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                                          "lm_head.weight": "model-00002-of-00002.safetensors"}})"));
  // lm_head went to the first shard when writing.
  EXPECT_THAT(Message(LoadHfModel(dir_).status()),
              HasSubstr("tensor 'lm_head.weight' is mapped to model-00002-of-00002.safetensors, "
                        "which does not hold it"));
  WriteFile(index, std::string_view(R"({"weight_map": {"x": "gone.safetensors"}})"));
  EXPECT_THAT(Message(LoadHfModel(dir_).status()), HasSubstr("gone.safetensors"));
  WriteFile(index, std::string_view("{not json"));
  EXPECT_THAT(Message(LoadHfModel(dir_).status()), HasSubstr("index.json: not valid JSON"));
}

TEST_F(HfLoaderErrorTest, BadTokenizerNamesTheDirectory) {
  ASSERT_TRUE(Write().ok());
  WriteFile(dir_ + "/tokenizer.json", std::string_view("{}"));
  const absl::Status s = LoadHfModel(dir_).status();
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(Message(s), ::testing::StartsWith(dir_));
}

TEST_F(HfLoaderErrorTest, NotADirectory) {
  ASSERT_TRUE(Write().ok());
  EXPECT_THAT(Message(LoadHfModel(dir_ + "/config.json").status()), HasSubstr("not a directory"));
}

}  // namespace
}  // namespace morphserve::engine
