// Writes small Hugging Face checkpoints (config.json, tokenizer.json,
// safetensors, shards) and the equivalent llama.cpp-style GGUF files for the
// loader tests, and runs the forward pass over them.
#ifndef MORPHSERVE_TESTS_ENGINE_MODEL_HF_TEST_UTIL_H_
#define MORPHSERVE_TESTS_ENGINE_MODEL_HF_TEST_UTIL_H_

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "engine/model/model.h"
#include "tests/testing/gguf_builder.h"

namespace morphserve::testing {

// A fresh directory under the test temp dir, removed on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  // path() + "/" + name, creating the subdirectory `name`.
  std::string Subdir(std::string_view name) const;

 private:
  std::string path_;
};

void WriteFile(const std::string& path, std::string_view bytes);
void WriteFile(const std::string& path, const std::vector<uint8_t>& bytes);

// One tensor of a safetensors file, with its bytes already encoded.
struct RawTensor {
  std::string name;
  std::string dtype;  // "F32", "BF16", "I32", ...
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

// A safetensors file: header length, JSON header padded to 8 bytes, data.
std::vector<uint8_t> SafetensorsBytes(const std::vector<RawTensor>& tensors);
// The same layout around an arbitrary header text (unpadded) and data.
std::vector<uint8_t> SafetensorsBytes(std::string_view header, const std::vector<uint8_t>& data);

// `values` as "F32", "F16" or "BF16" little-endian bytes.
std::vector<uint8_t> EncodeFloats(const std::vector<float>& values, std::string_view dtype);

struct FloatTensor {
  std::vector<int64_t> shape;
  std::vector<float> values;
};
// By Hugging Face name.
using TensorMap = std::map<std::string, FloatTensor>;

// The shape of a tiny test model; the vocabulary is that of TinyTokenizerJson.
struct TinySpec {
  bool qwen2 = false;  // q/k/v biases, GGUF architecture qwen2 (no Q/K permutation)
  int64_t hidden = 64;
  int64_t layers = 2;
  int64_t heads = 4;
  int64_t kv_heads = 2;
  int64_t head_dim = 16;
  int64_t ffn = 96;
  int64_t vocab = 261;
  int64_t context = 256;
  bool tied = false;
  float rms_eps = 1e-5f;
  float rope_theta = 10000.0f;
};

// Random weights with Hugging Face names and shapes (unfused projections).
TensorMap RandomTinyWeights(const TinySpec& spec, uint32_t seed);
// Phi3's layout of the same weights: qkv_proj and gate_up_proj fused.
TensorMap FuseLikePhi3(const TinySpec& spec, const TensorMap& tensors);

// config.json for `spec` with the given `architectures` entry.
std::string TinyConfigJson(const TinySpec& spec, std::string_view architecture);

// A byte-level BPE tokenizer.json: 256 byte tokens, 4 merges, <|endoftext|>
// (261 tokens), and the tokenizer.ggml.* metadata of the same vocabulary.
std::string TinyTokenizerJson();
void AddTinyTokenizerMetadata(GgufBuilder& builder);

// Writes config.json, tokenizer files and the weights as `dtype` into `dir`,
// in one model.safetensors or `shards` files with an index.
void WriteHfCheckpoint(const std::string& dir, std::string_view config_json,
                       const TensorMap& tensors, std::string_view dtype, int shards = 1);

// The same weights as llama.cpp's converter writes them: GGUF names, dims
// [in, out], and for llama Q/K rows permuted for adjacent-pair rotary unless
// `permute_qk` is false. `ggml_type` is 0 (F32) or 30 (BF16).
void WriteTinyGguf(const std::string& path, const TinySpec& spec, const TensorMap& tensors,
                   uint32_t ggml_type, bool permute_qk = true);

// Logits of every token of each sequence, sequences run together in one
// batch from position 0. Fails the current test on error.
std::vector<float> RunForward(const engine::Model& model,
                              const std::vector<std::vector<int32_t>>& sequences);

// max |a - b| / max |a|; the sizes must match.
double RelativeDifference(const std::vector<float>& a, const std::vector<float>& b);

}  // namespace morphserve::testing

#endif  // MORPHSERVE_TESTS_ENGINE_MODEL_HF_TEST_UTIL_H_
