#include "engine/model/hf_loader.h"

#include <cstring>
#include <filesystem>
#include <map>

#include "absl/strings/str_join.h"
#include "common/fp16.h"
#include "common/status.h"
#include "common/strings.h"
#include "engine/model/hf_internal.h"
#include "engine/model/safetensors_file.h"
#include "nlohmann/json.hpp"

namespace morphserve::engine {
namespace {

namespace fs = std::filesystem;

constexpr char kSingleFile[] = "model.safetensors";
constexpr char kIndexFile[] = "model.safetensors.index.json";

struct TensorRef {
  const SafetensorsTensor* tensor;
  const SafetensorsFile* file;
};

// Every tensor of the checkpoint by name, across its shard files.
class TensorIndex {
 public:
  // Opens model.safetensors, or the shards model.safetensors.index.json
  // lists; the mappings are appended to `keep_alive`.
  static absl::StatusOr<TensorIndex> Open(const fs::path& dir,
                                          std::vector<std::shared_ptr<const void>>& keep_alive);

  const TensorRef* Find(const std::string& name) const {
    auto it = tensors_.find(name);
    return it == tensors_.end() ? nullptr : &it->second;
  }

  absl::StatusOr<TensorRef> Require(const std::string& name) const {
    const TensorRef* ref = Find(name);
    if (ref == nullptr) {
      return absl::InvalidArgumentError(StrCat(dir_, ": missing tensor '", name, "'"));
    }
    return *ref;
  }

 private:
  std::string dir_;
  std::map<std::string, TensorRef, std::less<>> tensors_;
};

absl::StatusOr<std::shared_ptr<const SafetensorsFile>> OpenShard(
    const fs::path& path, std::vector<std::shared_ptr<const void>>& keep_alive) {
  ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> owner, SafetensorsFile::Open(path.string()));
  std::shared_ptr<const SafetensorsFile> file(std::move(owner));
  keep_alive.push_back(file);
  return file;
}

absl::StatusOr<TensorIndex> TensorIndex::Open(
    const fs::path& dir, std::vector<std::shared_ptr<const void>>& keep_alive) {
  TensorIndex index;
  index.dir_ = dir.string();
  std::error_code ec;
  const fs::path index_path = dir / kIndexFile;
  if (!fs::exists(index_path, ec)) {
    if (!fs::exists(dir / kSingleFile, ec)) {
      return absl::NotFoundError(
          StrCat(dir.string(), ": neither ", kSingleFile, " nor ", kIndexFile, " found"));
    }
    ASSIGN_OR_RETURN(std::shared_ptr<const SafetensorsFile> file,
                     OpenShard(dir / kSingleFile, keep_alive));
    for (const SafetensorsTensor& t : file->tensors()) {
      index.tensors_.emplace(t.name, TensorRef{&t, file.get()});
    }
    return index;
  }

  ASSIGN_OR_RETURN(std::string text, ReadTextFile(index_path.string()));
  const nlohmann::json json = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  auto bad_index = [&](std::string_view problem) {
    return absl::InvalidArgumentError(StrCat(index_path.string(), ": ", problem));
  };
  if (json.is_discarded()) return bad_index("not valid JSON");
  auto map_it = json.is_object() ? json.find("weight_map") : json.end();
  if (map_it == json.end() || !map_it->is_object()) return bad_index("no 'weight_map' object");
  std::map<std::string, std::shared_ptr<const SafetensorsFile>> shards;
  for (const auto& [name, shard] : map_it->items()) {
    if (!shard.is_string()) return bad_index(StrCat("'", name, "' maps to a non-string"));
    const std::string shard_name = shard.get<std::string>();
    // Shards live beside the index; anything else could read outside it.
    if (shard_name.empty() || shard_name.find('/') != std::string::npos || shard_name == "." ||
        shard_name == "..") {
      return bad_index(StrCat("'", name, "' maps to '", shard_name,
                              "', which is not a file name in the model directory"));
    }
    auto it = shards.find(shard_name);
    if (it == shards.end()) {
      ASSIGN_OR_RETURN(std::shared_ptr<const SafetensorsFile> file,
                       OpenShard(dir / shard_name, keep_alive));
      it = shards.emplace(shard_name, std::move(file)).first;
    }
    const SafetensorsTensor* t = it->second->Find(name);
    if (t == nullptr) {
      return bad_index(
          StrCat("tensor '", name, "' is mapped to ", shard_name, ", which does not hold it"));
    }
    index.tensors_.emplace(name, TensorRef{t, it->second.get()});
  }
  return index;
}

absl::Status TensorError(const TensorRef& ref, std::string_view problem) {
  return absl::InvalidArgumentError(
      StrCat(ref.file->name(), ": tensor '", ref.tensor->name, "' ", problem));
}

absl::StatusOr<TensorRef> RequireShaped(const TensorIndex& index, const std::string& name,
                                        const std::vector<int64_t>& shape) {
  ASSIGN_OR_RETURN(TensorRef ref, index.Require(name));
  if (ref.tensor->shape != shape) {
    return TensorError(ref, StrCat("has shape [", absl::StrJoin(ref.tensor->shape, ", "),
                                   "], expected [", absl::StrJoin(shape, ", "), "]"));
  }
  if (!ref.tensor->dtype) {
    return absl::UnimplementedError(StrCat(ref.file->name(), ": tensor '", name, "' has dtype ",
                                           ref.tensor->dtype_name,
                                           ", which is not supported (F32, F16, BF16)"));
  }
  return ref;
}

// Points into the mapping: HF stores [out_features, in_features] row-major,
// which is the engine's layout.
absl::StatusOr<Matrix> LoadMatrix(const TensorIndex& index, const std::string& name, int64_t rows,
                                  int64_t cols) {
  ASSIGN_OR_RETURN(TensorRef ref, RequireShaped(index, name, {rows, cols}));
  const DType dtype = *ref.tensor->dtype;
  return Matrix{dtype, ref.tensor->data, rows, cols, RowBytes(dtype, cols)};
}

// Norm weights and biases become f32. The data may be unaligned (the JSON
// header has any length), hence memcpy.
absl::StatusOr<const float*> LoadVector(const TensorIndex& index, const std::string& name,
                                        int64_t n, LlamaWeights& w) {
  ASSIGN_OR_RETURN(TensorRef ref, RequireShaped(index, name, {n}));
  std::vector<float> v(n);
  const uint8_t* src = ref.tensor->data;
  for (int64_t i = 0; i < n; ++i) {
    if (*ref.tensor->dtype == DType::kF32) {
      std::memcpy(&v[i], src + 4 * i, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      v[i] = *ref.tensor->dtype == DType::kF16 ? HalfToFloat(h) : BF16ToFloat(h);
    }
  }
  return w.Own(std::move(v));
}

absl::Status LoadLayer(const TensorIndex& index, const ModelConfig& c, int64_t i, LlamaWeights& w) {
  LayerWeights& l = w.layers[i];
  const std::string p = StrCat("model.layers.", i, ".");
  ASSIGN_OR_RETURN(l.attn_norm, LoadVector(index, p + "input_layernorm.weight", c.hidden_size, w));
  ASSIGN_OR_RETURN(l.ffn_norm,
                   LoadVector(index, p + "post_attention_layernorm.weight", c.hidden_size, w));
  if (index.Find(p + "self_attn.qkv_proj.weight") != nullptr) {
    // Phi3 fuses Q, K and V into one matrix, in that row order.
    ASSIGN_OR_RETURN(Matrix qkv, LoadMatrix(index, p + "self_attn.qkv_proj.weight",
                                            c.q_dim() + 2 * c.kv_dim(), c.hidden_size));
    l.wq = qkv.RowSlice(0, c.q_dim());
    l.wk = qkv.RowSlice(c.q_dim(), c.kv_dim());
    l.wv = qkv.RowSlice(c.q_dim() + c.kv_dim(), c.kv_dim());
  } else {
    ASSIGN_OR_RETURN(l.wq,
                     LoadMatrix(index, p + "self_attn.q_proj.weight", c.q_dim(), c.hidden_size));
    ASSIGN_OR_RETURN(l.wk,
                     LoadMatrix(index, p + "self_attn.k_proj.weight", c.kv_dim(), c.hidden_size));
    ASSIGN_OR_RETURN(l.wv,
                     LoadMatrix(index, p + "self_attn.v_proj.weight", c.kv_dim(), c.hidden_size));
  }
  if (c.qkv_bias) {
    ASSIGN_OR_RETURN(l.bq, LoadVector(index, p + "self_attn.q_proj.bias", c.q_dim(), w));
    ASSIGN_OR_RETURN(l.bk, LoadVector(index, p + "self_attn.k_proj.bias", c.kv_dim(), w));
    ASSIGN_OR_RETURN(l.bv, LoadVector(index, p + "self_attn.v_proj.bias", c.kv_dim(), w));
  }
  ASSIGN_OR_RETURN(l.wo,
                   LoadMatrix(index, p + "self_attn.o_proj.weight", c.hidden_size, c.q_dim()));
  if (index.Find(p + "mlp.gate_up_proj.weight") != nullptr) {
    // Phi3 fuses gate and up; the gate is the first half of the rows.
    ASSIGN_OR_RETURN(Matrix gate_up, LoadMatrix(index, p + "mlp.gate_up_proj.weight",
                                                2 * c.intermediate_size, c.hidden_size));
    l.w_gate = gate_up.RowSlice(0, c.intermediate_size);
    l.w_up = gate_up.RowSlice(c.intermediate_size, c.intermediate_size);
  } else {
    ASSIGN_OR_RETURN(l.w_gate, LoadMatrix(index, p + "mlp.gate_proj.weight", c.intermediate_size,
                                          c.hidden_size));
    ASSIGN_OR_RETURN(
        l.w_up, LoadMatrix(index, p + "mlp.up_proj.weight", c.intermediate_size, c.hidden_size));
  }
  ASSIGN_OR_RETURN(
      l.w_down, LoadMatrix(index, p + "mlp.down_proj.weight", c.hidden_size, c.intermediate_size));
  return absl::OkStatus();
}

}  // namespace

absl::Status AttachHfTokenizer(const std::string& dir, Model& model) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::FromHuggingFace(dir);
  if (!tokenizer.ok()) {
    // Some tokenizer errors name their file, others only the problem.
    const std::string_view message = ToStd(tokenizer.status().message());
    if (message.starts_with(dir)) return tokenizer.status();
    return absl::Status(tokenizer.status().code(), StrCat(dir, ": tokenizer: ", message));
  }
  model.tokenizer = *std::move(tokenizer);
  if (model.tokenizer->vocab_size() > model.config.vocab_size) {
    return absl::InvalidArgumentError(StrCat(dir, ": tokenizer has ", model.tokenizer->vocab_size(),
                                             " tokens but the model's vocabulary is ",
                                             model.config.vocab_size));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Model>> LoadHfModel(const std::string& path) {
  std::error_code ec;
  const fs::path dir(path);
  if (!fs::is_directory(dir, ec)) {
    return absl::InvalidArgumentError(StrCat(
        path, ": not a directory (expected a Hugging Face model directory with config.json)"));
  }
  auto model = std::make_unique<Model>();
  model->format = "safetensors";
  model->path = path;
  ASSIGN_OR_RETURN(model->config, ModelConfigFromHfFile((dir / "config.json").string()));
  ASSIGN_OR_RETURN(TensorIndex index, TensorIndex::Open(dir, model->keep_alive));
  ModelConfig& c = model->config;
  LlamaWeights& w = model->weights;

  ASSIGN_OR_RETURN(w.token_embedding,
                   LoadMatrix(index, "model.embed_tokens.weight", c.vocab_size, c.hidden_size));
  ASSIGN_OR_RETURN(w.output_norm, LoadVector(index, "model.norm.weight", c.hidden_size, w));
  // Checkpoints of tied models often omit lm_head; when both are present
  // the config decides, as transformers does.
  c.tie_embeddings = c.tie_embeddings || index.Find("lm_head.weight") == nullptr;
  if (c.tie_embeddings) {
    w.output = w.token_embedding;
  } else {
    ASSIGN_OR_RETURN(w.output, LoadMatrix(index, "lm_head.weight", c.vocab_size, c.hidden_size));
  }
  w.layers.resize(c.num_layers);
  for (int64_t i = 0; i < c.num_layers; ++i) RETURN_IF_ERROR(LoadLayer(index, c, i, w));

  RETURN_IF_ERROR(AttachHfTokenizer(path, *model));
  return model;
}

}  // namespace morphserve::engine
