#include "engine/model/gguf_loader.h"

#include <cstring>

#include "common/strings.h"
#include "common/fp16.h"
#include "common/status.h"
#include "kernels/cpu/dequantize.h"

namespace morphserve::engine {
namespace {

// Reads `<arch>.<suffix>` as an integer; required keys error when absent.
absl::StatusOr<int64_t> ArchInt(const GgufFile& f, std::string_view arch, std::string_view suffix,
                                std::optional<int64_t> fallback = std::nullopt) {
  const std::string key = StrCat(arch, ".", suffix);
  ASSIGN_OR_RETURN(std::optional<int64_t> v, f.GetInt(key));
  if (v) return *v;
  if (fallback) return *fallback;
  return absl::InvalidArgumentError(StrCat("missing metadata '", key, "'"));
}

absl::StatusOr<const GgufTensor*> Require(const GgufFile& f, const std::string& name) {
  const GgufTensor* t = f.FindTensor(name);
  if (t == nullptr) return absl::InvalidArgumentError(StrCat("missing tensor '", name, "'"));
  return t;
}

absl::Status CheckShape(const GgufTensor& t, int64_t cols, int64_t rows) {
  const bool ok = rows == 1 ? (t.dims.size() == 1 && t.dims[0] == cols)
                            : (t.dims.size() == 2 && t.dims[0] == cols && t.dims[1] == rows);
  if (!ok) {
    std::string dims;
    for (int64_t d : t.dims) StrAppend(&dims, dims.empty() ? "" : ", ", d);
    return absl::InvalidArgumentError(StrCat("tensor '", t.name, "' has shape [", dims,
                                                   "], expected [", cols,
                                                   rows == 1 ? "" : StrCat(", ", rows),
                                                   "]"));
  }
  return absl::OkStatus();
}

absl::StatusOr<Matrix> LoadMatrix(const GgufFile& f, const std::string& name, int64_t rows,
                                  int64_t cols) {
  ASSIGN_OR_RETURN(const GgufTensor* t, Require(f, name));
  RETURN_IF_ERROR(CheckShape(*t, cols, rows));
  if (!kernels::IsSupportedWeightType(t->dtype)) {
    return absl::UnimplementedError(
        StrCat("tensor '", name, "': type ", DTypeName(t->dtype), " is not supported"));
  }
  return Matrix{t->dtype, t->data, rows, cols, RowBytes(t->dtype, cols)};
}

// Small vectors (norm weights, biases) become f32.
absl::StatusOr<const float*> LoadVector(const GgufFile& f, const std::string& name, int64_t n,
                                        LlamaWeights& w) {
  ASSIGN_OR_RETURN(const GgufTensor* t, Require(f, name));
  RETURN_IF_ERROR(CheckShape(*t, n, 1));
  if (!kernels::IsSupportedWeightType(t->dtype)) {
    return absl::UnimplementedError(
        StrCat("tensor '", name, "': type ", DTypeName(t->dtype), " is not supported"));
  }
  std::vector<float> v(n);
  kernels::DequantizeRow(t->dtype, t->data, v.data(), n);
  return w.Own(std::move(v));
}

}  // namespace

absl::StatusOr<ModelConfig> ModelConfigFromGguf(const GgufFile& f) {
  ModelConfig c;
  ASSIGN_OR_RETURN(std::optional<std::string_view> arch, f.GetString("general.architecture"));
  if (!arch) return absl::InvalidArgumentError("missing metadata 'general.architecture'");
  c.architecture = std::string(*arch);
  if (c.architecture != "llama" && c.architecture != "qwen2" && c.architecture != "phi3") {
    return absl::UnimplementedError(StrCat("architecture '", c.architecture,
                                                 "' is not supported (llama, qwen2, phi3)"));
  }
  ASSIGN_OR_RETURN(std::optional<std::string_view> name, f.GetString("general.name"));
  c.name = std::string(name.value_or(""));
  const std::string_view a = c.architecture;
  ASSIGN_OR_RETURN(c.hidden_size, ArchInt(f, a, "embedding_length"));
  ASSIGN_OR_RETURN(c.num_layers, ArchInt(f, a, "block_count"));
  ASSIGN_OR_RETURN(c.intermediate_size, ArchInt(f, a, "feed_forward_length"));
  ASSIGN_OR_RETURN(c.num_heads, ArchInt(f, a, "attention.head_count"));
  ASSIGN_OR_RETURN(c.num_kv_heads, ArchInt(f, a, "attention.head_count_kv", c.num_heads));
  ASSIGN_OR_RETURN(c.context_length, ArchInt(f, a, "context_length"));
  if (c.num_heads <= 0) return absl::InvalidArgumentError("attention.head_count must be positive");
  ASSIGN_OR_RETURN(c.head_dim, ArchInt(f, a, "attention.key_length", c.hidden_size / c.num_heads));
  ASSIGN_OR_RETURN(c.rope_dim, ArchInt(f, a, "rope.dimension_count", c.head_dim));

  ASSIGN_OR_RETURN(std::optional<double> eps,
                   f.GetReal(StrCat(a, ".attention.layer_norm_rms_epsilon")));
  if (!eps) return absl::InvalidArgumentError(StrCat("missing metadata '", a,
                                                           ".attention.layer_norm_rms_epsilon'"));
  c.rms_norm_eps = static_cast<float>(*eps);
  ASSIGN_OR_RETURN(std::optional<double> theta, f.GetReal(StrCat(a, ".rope.freq_base")));
  c.rope_theta = static_cast<float>(theta.value_or(10000.0));

  ASSIGN_OR_RETURN(std::optional<std::string_view> scaling,
                   f.GetString(StrCat(a, ".rope.scaling.type")));
  if (scaling && *scaling == "linear") {
    c.rope_scaling.type = RopeScaling::Type::kLinear;
    ASSIGN_OR_RETURN(std::optional<double> factor,
                     f.GetReal(StrCat(a, ".rope.scaling.factor")));
    c.rope_scaling.factor = static_cast<float>(factor.value_or(1.0));
  } else if (scaling && *scaling != "none") {
    return absl::UnimplementedError(StrCat("rope scaling '", *scaling, "' is not supported"));
  }
  if (const GgufTensor* freqs = f.FindTensor("rope_freqs.weight"); freqs != nullptr) {
    RETURN_IF_ERROR(CheckShape(*freqs, c.rope_dim / 2, 1));
    if (freqs->dtype != DType::kF32) return absl::InvalidArgumentError("rope_freqs.weight must be F32");
    c.rope_freq_factors.resize(c.rope_dim / 2);
    std::memcpy(c.rope_freq_factors.data(), freqs->data, c.rope_freq_factors.size() * 4);
  }

  // GGUF llama checkpoints have Q/K rows permuted for adjacent-pair rotation;
  // qwen2 and phi3 keep the Hugging Face (half-split) layout.
  c.rope_style = a == "llama" ? kernels::RopeStyle::kAdjacent : kernels::RopeStyle::kHalf;
  c.qkv_bias = a == "qwen2";

  ASSIGN_OR_RETURN(std::optional<std::span<const std::string_view>> tokens,
                   f.GetStringArray("tokenizer.ggml.tokens"));
  ASSIGN_OR_RETURN(c.vocab_size,
                   ArchInt(f, a, "vocab_size",
                           tokens ? std::optional<int64_t>(tokens->size()) : std::nullopt));
  c.tie_embeddings = f.FindTensor("output.weight") == nullptr;
  RETURN_IF_ERROR(c.Validate());
  return c;
}

absl::StatusOr<std::unique_ptr<Model>> LoadGgufModel(const std::string& path) {
  ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file_owner, GgufFile::Open(path));
  std::shared_ptr<const GgufFile> file(std::move(file_owner));
  const GgufFile& f = *file;
  auto model = std::make_unique<Model>();
  model->format = "gguf";
  model->path = path;
  model->keep_alive.push_back(file);

  auto with_path = [&](absl::Status s) {
    return absl::Status(s.code(), StrCat(path, ": ", s.message()));
  };
  absl::StatusOr<ModelConfig> config = ModelConfigFromGguf(f);
  if (!config.ok()) return with_path(config.status());
  model->config = *std::move(config);
  const ModelConfig& c = model->config;
  LlamaWeights& w = model->weights;

  absl::Status st = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(w.token_embedding,
                     LoadMatrix(f, "token_embd.weight", c.vocab_size, c.hidden_size));
    ASSIGN_OR_RETURN(w.output_norm, LoadVector(f, "output_norm.weight", c.hidden_size, w));
    if (c.tie_embeddings) {
      w.output = w.token_embedding;
    } else {
      ASSIGN_OR_RETURN(w.output, LoadMatrix(f, "output.weight", c.vocab_size, c.hidden_size));
    }
    w.layers.resize(c.num_layers);
    for (int64_t i = 0; i < c.num_layers; ++i) {
      LayerWeights& l = w.layers[i];
      const std::string p = StrCat("blk.", i, ".");
      ASSIGN_OR_RETURN(l.attn_norm, LoadVector(f, p + "attn_norm.weight", c.hidden_size, w));
      ASSIGN_OR_RETURN(l.ffn_norm, LoadVector(f, p + "ffn_norm.weight", c.hidden_size, w));
      if (f.FindTensor(p + "attn_qkv.weight") != nullptr) {
        ASSIGN_OR_RETURN(Matrix qkv, LoadMatrix(f, p + "attn_qkv.weight",
                                                c.q_dim() + 2 * c.kv_dim(), c.hidden_size));
        l.wq = qkv.RowSlice(0, c.q_dim());
        l.wk = qkv.RowSlice(c.q_dim(), c.kv_dim());
        l.wv = qkv.RowSlice(c.q_dim() + c.kv_dim(), c.kv_dim());
      } else {
        ASSIGN_OR_RETURN(l.wq, LoadMatrix(f, p + "attn_q.weight", c.q_dim(), c.hidden_size));
        ASSIGN_OR_RETURN(l.wk, LoadMatrix(f, p + "attn_k.weight", c.kv_dim(), c.hidden_size));
        ASSIGN_OR_RETURN(l.wv, LoadMatrix(f, p + "attn_v.weight", c.kv_dim(), c.hidden_size));
      }
      if (c.qkv_bias) {
        ASSIGN_OR_RETURN(l.bq, LoadVector(f, p + "attn_q.bias", c.q_dim(), w));
        ASSIGN_OR_RETURN(l.bk, LoadVector(f, p + "attn_k.bias", c.kv_dim(), w));
        ASSIGN_OR_RETURN(l.bv, LoadVector(f, p + "attn_v.bias", c.kv_dim(), w));
      }
      ASSIGN_OR_RETURN(l.wo, LoadMatrix(f, p + "attn_output.weight", c.hidden_size, c.q_dim()));
      if (f.FindTensor(p + "ffn_gate.weight") == nullptr) {
        // Fused gate_up (phi3): the gate is the first half of the rows.
        ASSIGN_OR_RETURN(Matrix gate_up, LoadMatrix(f, p + "ffn_up.weight",
                                                    2 * c.intermediate_size, c.hidden_size));
        l.w_gate = gate_up.RowSlice(0, c.intermediate_size);
        l.w_up = gate_up.RowSlice(c.intermediate_size, c.intermediate_size);
      } else {
        ASSIGN_OR_RETURN(l.w_gate, LoadMatrix(f, p + "ffn_gate.weight", c.intermediate_size,
                                              c.hidden_size));
        ASSIGN_OR_RETURN(l.w_up,
                         LoadMatrix(f, p + "ffn_up.weight", c.intermediate_size, c.hidden_size));
      }
      ASSIGN_OR_RETURN(l.w_down,
                       LoadMatrix(f, p + "ffn_down.weight", c.hidden_size, c.intermediate_size));
    }
    ASSIGN_OR_RETURN(model->tokenizer, Tokenizer::FromGguf(f));
    if (model->tokenizer->vocab_size() > c.vocab_size) {
      return absl::InvalidArgumentError(
          StrCat("tokenizer has ", model->tokenizer->vocab_size(),
                       " tokens but the model's vocabulary is ", c.vocab_size));
    }
    return absl::OkStatus();
  }();
  if (!st.ok()) return with_path(st);
  return model;
}

}  // namespace morphserve::engine
