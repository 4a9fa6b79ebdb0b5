#include "tests/engine/model/hf_test_util.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "common/fp16.h"
#include "common/thread_pool.h"
#include "engine/kv/paged_kv_cache.h"
#include "engine/model/llama_forward.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace morphserve::testing {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

constexpr char kEndOfText[] = "<|endoftext|>";
constexpr int32_t kEndOfTextId = 260;
// (left, right) pairs merged in this order; the results get ids 256..259.
constexpr std::pair<std::string_view, std::string_view> kMerges[] = {
    {"Ġ", "t"}, {"h", "e"}, {"l", "l"}, {"Ġt", "he"}};

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to
// U+0100 onwards, so every byte is a visible character.
std::string ByteToken(int byte) {
  const bool printable = (byte >= '!' && byte <= '~') || (byte >= 0xA1 && byte <= 0xAC) ||
                         (byte >= 0xAE && byte <= 0xFF);
  int cp = byte;
  if (!printable) {
    int n = 0;
    for (int b = 0; b < byte; ++b) {
      if (!((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF))) ++n;
    }
    cp = 256 + n;
  }
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

std::vector<std::string> TinyVocab() {
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) tokens.push_back(ByteToken(b));
  for (const auto& [left, right] : kMerges)
    tokens.push_back(std::string(left) + std::string(right));
  tokens.push_back(kEndOfText);
  return tokens;
}

std::vector<float> Random(std::mt19937& rng, size_t n, float center, float half_width) {
  std::uniform_real_distribution<float> dist(center - half_width, center + half_width);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// llama.cpp convert_hf_to_gguf's permute(): per head, rows (j * half + i)
// move to (2 * i + j), turning half-split rotary into adjacent-pair rotary.
std::vector<float> PermuteRows(const FloatTensor& t, int64_t n_head) {
  const int64_t rows = t.shape[0], cols = t.shape[1];
  const int64_t head_dim = rows / n_head, half = head_dim / 2;
  std::vector<float> out(t.values.size());
  for (int64_t h = 0; h < n_head; ++h) {
    for (int64_t j = 0; j < 2; ++j) {
      for (int64_t i = 0; i < half; ++i) {
        const int64_t from = h * head_dim + j * half + i;
        const int64_t to = h * head_dim + 2 * i + j;
        std::copy_n(t.values.begin() + from * cols, cols, out.begin() + to * cols);
      }
    }
  }
  return out;
}

}  // namespace

TempDir::TempDir() {
  static std::atomic<int> counter{0};
  path_ = (fs::path(::testing::TempDir()) /
           ("morphserve_hf_" + std::to_string(::getpid()) + "_" + std::to_string(counter++)))
              .string();
  fs::remove_all(path_);
  fs::create_directories(path_);
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

std::string TempDir::Subdir(std::string_view name) const {
  const std::string dir = path_ + "/" + std::string(name);
  fs::create_directories(dir);
  return dir;
}

void WriteFile(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

void WriteFile(const std::string& path, const std::vector<uint8_t>& bytes) {
  WriteFile(path, std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
}

std::vector<uint8_t> SafetensorsBytes(std::string_view header, const std::vector<uint8_t>& data) {
  const uint64_t len = header.size();
  std::string out(reinterpret_cast<const char*>(&len), 8);
  out += header;
  out.append(reinterpret_cast<const char*>(data.data()), data.size());
  return {out.begin(), out.end()};
}

std::vector<uint8_t> SafetensorsBytes(const std::vector<RawTensor>& tensors) {
  Json header = Json::object();
  header["__metadata__"] = {{"format", "pt"}};
  std::vector<uint8_t> data;
  for (const RawTensor& t : tensors) {
    header[t.name] = {{"dtype", t.dtype},
                      {"shape", t.shape},
                      {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data.insert(data.end(), t.bytes.begin(), t.bytes.end());
  }
  // Padded with spaces to 8 bytes, as the reference writer does.
  std::string text = header.dump();
  text.resize((text.size() + 7) / 8 * 8, ' ');
  return SafetensorsBytes(text, data);
}

std::vector<uint8_t> EncodeFloats(const std::vector<float>& values, std::string_view dtype) {
  std::vector<uint8_t> out;
  if (dtype == "F32") {
    out.resize(values.size() * 4);
    std::memcpy(out.data(), values.data(), out.size());
    return out;
  }
  out.resize(values.size() * 2);
  for (size_t i = 0; i < values.size(); ++i) {
    const uint16_t h = dtype == "F16" ? FloatToHalf(values[i]) : FloatToBF16(values[i]);
    std::memcpy(out.data() + 2 * i, &h, 2);
  }
  return out;
}

TensorMap RandomTinyWeights(const TinySpec& s, uint32_t seed) {
  std::mt19937 rng(seed);
  TensorMap m;
  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols) {
    // ~1/sqrt(cols) keeps activations of order one through the layers.
    const float w = 1.7f / std::sqrt(static_cast<float>(cols));
    m[name] = {{rows, cols}, Random(rng, rows * cols, 0.0f, w)};
  };
  auto vector = [&](const std::string& name, int64_t n, float center) {
    m[name] = {{n}, Random(rng, n, center, 0.2f)};
  };
  const int64_t q = s.heads * s.head_dim, kv = s.kv_heads * s.head_dim;
  m["model.embed_tokens.weight"] = {{s.vocab, s.hidden}, Random(rng, s.vocab * s.hidden, 0, 1)};
  vector("model.norm.weight", s.hidden, 1.0f);
  if (!s.tied) matrix("lm_head.weight", s.vocab, s.hidden);
  for (int64_t i = 0; i < s.layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    vector(p + "input_layernorm.weight", s.hidden, 1.0f);
    vector(p + "post_attention_layernorm.weight", s.hidden, 1.0f);
    matrix(p + "self_attn.q_proj.weight", q, s.hidden);
    matrix(p + "self_attn.k_proj.weight", kv, s.hidden);
    matrix(p + "self_attn.v_proj.weight", kv, s.hidden);
    matrix(p + "self_attn.o_proj.weight", s.hidden, q);
    if (s.qwen2) {
      vector(p + "self_attn.q_proj.bias", q, 0.0f);
      vector(p + "self_attn.k_proj.bias", kv, 0.0f);
      vector(p + "self_attn.v_proj.bias", kv, 0.0f);
    }
    matrix(p + "mlp.gate_proj.weight", s.ffn, s.hidden);
    matrix(p + "mlp.up_proj.weight", s.ffn, s.hidden);
    matrix(p + "mlp.down_proj.weight", s.hidden, s.ffn);
  }
  return m;
}

TensorMap FuseLikePhi3(const TinySpec& s, const TensorMap& tensors) {
  TensorMap out = tensors;
  auto fuse = [&](const std::string& fused, std::vector<std::string> parts) {
    FloatTensor t{{0, s.hidden}, {}};
    for (const std::string& name : parts) {
      const FloatTensor& part = out.at(name);
      t.shape[0] += part.shape[0];
      t.values.insert(t.values.end(), part.values.begin(), part.values.end());
      out.erase(name);
    }
    out[fused] = std::move(t);
  };
  for (int64_t i = 0; i < s.layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    fuse(p + "self_attn.qkv_proj.weight",
         {p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
          p + "self_attn.v_proj.weight"});
    fuse(p + "mlp.gate_up_proj.weight", {p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"});
  }
  return out;
}

std::string TinyConfigJson(const TinySpec& s, std::string_view architecture) {
  Json c = {{"architectures", {architecture}},
            {"hidden_size", s.hidden},
            {"num_hidden_layers", s.layers},
            {"num_attention_heads", s.heads},
            {"num_key_value_heads", s.kv_heads},
            {"head_dim", s.head_dim},
            {"intermediate_size", s.ffn},
            {"vocab_size", s.vocab},
            {"max_position_embeddings", s.context},
            {"rms_norm_eps", s.rms_eps},
            {"rope_theta", s.rope_theta},
            {"rope_scaling", nullptr},
            {"tie_word_embeddings", s.tied},
            {"hidden_act", "silu"},
            {"torch_dtype", "float32"},
            {"bos_token_id", kEndOfTextId},
            {"eos_token_id", kEndOfTextId}};
  return c.dump(2);
}

std::string TinyTokenizerJson() {
  Json vocab = Json::object();
  const std::vector<std::string> tokens = TinyVocab();
  for (size_t i = 0; i < tokens.size(); ++i) vocab[tokens[i]] = i;
  Json merges = Json::array();
  for (const auto& [left, right] : kMerges)
    merges.push_back(std::string(left) + " " + std::string(right));
  const Json byte_level = {{"type", "ByteLevel"},
                           {"add_prefix_space", false},
                           {"trim_offsets", true},
                           {"use_regex", true}};
  Json t = {{"version", "1.0"},
            {"truncation", nullptr},
            {"padding", nullptr},
            {"added_tokens",
             {{{"id", kEndOfTextId},
               {"content", kEndOfText},
               {"single_word", false},
               {"lstrip", false},
               {"rstrip", false},
               {"normalized", false},
               {"special", true}}}},
            {"normalizer", nullptr},
            {"pre_tokenizer", byte_level},
            {"post_processor", byte_level},
            {"decoder", byte_level},
            {"model",
             {{"type", "BPE"},
              {"dropout", nullptr},
              {"unk_token", nullptr},
              {"continuing_subword_prefix", ""},
              {"end_of_word_suffix", ""},
              {"fuse_unk", false},
              {"byte_fallback", false},
              {"vocab", vocab},
              {"merges", merges}}}};
  return t.dump();
}

void AddTinyTokenizerMetadata(GgufBuilder& b) {
  std::vector<int32_t> types(kEndOfTextId + 1, 1);  // normal
  types[kEndOfTextId] = 3;                          // control
  std::vector<std::string> merges;
  for (const auto& [left, right] : kMerges)
    merges.push_back(std::string(left) + " " + std::string(right));
  b.SetString("tokenizer.ggml.model", "gpt2")
      .SetString("tokenizer.ggml.pre", "gpt-2")
      .SetStringArray("tokenizer.ggml.tokens", TinyVocab())
      .SetI32Array("tokenizer.ggml.token_type", types)
      .SetStringArray("tokenizer.ggml.merges", merges)
      .SetU32("tokenizer.ggml.bos_token_id", kEndOfTextId)
      .SetU32("tokenizer.ggml.eos_token_id", kEndOfTextId);
}

void WriteHfCheckpoint(const std::string& dir, std::string_view config_json,
                       const TensorMap& tensors, std::string_view dtype, int shards) {
  fs::create_directories(dir);
  WriteFile(dir + "/config.json", config_json);
  WriteFile(dir + "/tokenizer.json", TinyTokenizerJson());
  WriteFile(dir + "/tokenizer_config.json",
            std::string_view(R"({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                 "add_bos_token": false, "tokenizer_class": "GPT2Tokenizer"})"));
  auto file_name = [shards](int i) {
    return shards == 1 ? std::string("model.safetensors")
                       : "model-0000" + std::to_string(i + 1) + "-of-0000" +
                             std::to_string(shards) + ".safetensors";
  };
  std::vector<std::vector<RawTensor>> files(shards);
  Json weight_map = Json::object();
  int next = 0;
  for (const auto& [name, t] : tensors) {
    files[next].push_back({name, std::string(dtype), t.shape, EncodeFloats(t.values, dtype)});
    weight_map[name] = file_name(next);
    next = (next + 1) % shards;
  }
  for (int i = 0; i < shards; ++i) WriteFile(dir + "/" + file_name(i), SafetensorsBytes(files[i]));
  if (shards == 1) return;
  const Json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}};
  WriteFile(dir + "/model.safetensors.index.json", index.dump(2));
}

void WriteTinyGguf(const std::string& path, const TinySpec& s, const TensorMap& tensors,
                   uint32_t ggml_type, bool permute_qk) {
  const std::string arch = s.qwen2 ? "qwen2" : "llama";
  GgufBuilder b;
  b.SetString("general.architecture", arch)
      .SetString("general.name", "tiny")
      .SetU32(arch + ".context_length", static_cast<uint32_t>(s.context))
      .SetU32(arch + ".embedding_length", static_cast<uint32_t>(s.hidden))
      .SetU32(arch + ".block_count", static_cast<uint32_t>(s.layers))
      .SetU32(arch + ".feed_forward_length", static_cast<uint32_t>(s.ffn))
      .SetU32(arch + ".attention.head_count", static_cast<uint32_t>(s.heads))
      .SetU32(arch + ".attention.head_count_kv", static_cast<uint32_t>(s.kv_heads))
      .SetU32(arch + ".attention.key_length", static_cast<uint32_t>(s.head_dim))
      .SetU32(arch + ".attention.value_length", static_cast<uint32_t>(s.head_dim))
      .SetU32(arch + ".rope.dimension_count", static_cast<uint32_t>(s.head_dim))
      .SetF32(arch + ".attention.layer_norm_rms_epsilon", s.rms_eps)
      .SetF32(arch + ".rope.freq_base", s.rope_theta);
  AddTinyTokenizerMetadata(b);
  const std::string_view dtype = ggml_type == 0 ? "F32" : "BF16";
  auto add = [&](const std::string& gguf_name, const std::vector<int64_t>& shape,
                 const std::vector<float>& values) {
    // GGUF lists dims innermost first: [in, out] for an [out, in] matrix.
    std::vector<uint64_t> dims(shape.rbegin(), shape.rend());
    b.AddTensor(gguf_name, dims, ggml_type, EncodeFloats(values, dtype));
  };
  auto copy = [&](const std::string& gguf_name, const std::string& hf_name) {
    const FloatTensor& t = tensors.at(hf_name);
    add(gguf_name, t.shape, t.values);
  };
  copy("token_embd.weight", "model.embed_tokens.weight");
  copy("output_norm.weight", "model.norm.weight");
  if (!s.tied) copy("output.weight", "lm_head.weight");
  const bool permute = permute_qk && !s.qwen2;
  for (int64_t i = 0; i < s.layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    const std::string g = "blk." + std::to_string(i) + ".";
    copy(g + "attn_norm.weight", p + "input_layernorm.weight");
    copy(g + "ffn_norm.weight", p + "post_attention_layernorm.weight");
    const FloatTensor& q = tensors.at(p + "self_attn.q_proj.weight");
    const FloatTensor& k = tensors.at(p + "self_attn.k_proj.weight");
    add(g + "attn_q.weight", q.shape, permute ? PermuteRows(q, s.heads) : q.values);
    add(g + "attn_k.weight", k.shape, permute ? PermuteRows(k, s.kv_heads) : k.values);
    copy(g + "attn_v.weight", p + "self_attn.v_proj.weight");
    copy(g + "attn_output.weight", p + "self_attn.o_proj.weight");
    if (s.qwen2) {
      copy(g + "attn_q.bias", p + "self_attn.q_proj.bias");
      copy(g + "attn_k.bias", p + "self_attn.k_proj.bias");
      copy(g + "attn_v.bias", p + "self_attn.v_proj.bias");
    }
    copy(g + "ffn_gate.weight", p + "mlp.gate_proj.weight");
    copy(g + "ffn_up.weight", p + "mlp.up_proj.weight");
    copy(g + "ffn_down.weight", p + "mlp.down_proj.weight");
  }
  b.WriteTo(path);
}

std::vector<float> RunForward(const engine::Model& model,
                              const std::vector<std::vector<int32_t>>& sequences) {
  constexpr int64_t kBlockSize = 16;
  const engine::ModelConfig& c = model.config;
  std::vector<int32_t> tokens;
  std::vector<std::vector<int32_t>> tables;
  int32_t next_block = 0;
  for (const std::vector<int32_t>& seq : sequences) {
    tokens.insert(tokens.end(), seq.begin(), seq.end());
    std::vector<int32_t>& table = tables.emplace_back();
    for (size_t n = 0; n < seq.size(); n += kBlockSize) table.push_back(next_block++);
  }
  std::vector<engine::SequenceInput> inputs;
  int64_t offset = 0;
  for (size_t i = 0; i < sequences.size(); ++i) {
    const auto n = static_cast<int64_t>(sequences[i].size());
    inputs.push_back({offset, n, 0, tables[i]});
    offset += n;
  }
  engine::PagedKvCache cache({c.num_layers, c.num_kv_heads, c.head_dim, kBlockSize, next_block});
  ThreadPool pool(2);
  engine::LlamaForward forward(model, &pool);
  std::vector<float> logits;
  const absl::Status status =
      forward.Forward(engine::ForwardBatch{tokens, inputs, /*all_logits=*/true}, cache, &logits);
  EXPECT_TRUE(status.ok()) << status;
  return logits;
}

double RelativeDifference(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double scale = 0, diff = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    scale = std::max(scale, std::abs(static_cast<double>(a[i])));
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - b[i]));
  }
  return scale == 0 ? diff : diff / scale;
}

}  // namespace morphserve::testing
