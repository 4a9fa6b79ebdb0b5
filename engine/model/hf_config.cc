// config.json (transformers' PretrainedConfig) to ModelConfig.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>

#include "common/status.h"
#include "common/strings.h"
#include "engine/model/hf_internal.h"
#include "engine/model/hf_loader.h"
#include "nlohmann/json.hpp"

namespace morphserve::engine {
namespace {

using Json = nlohmann::json;

struct Architecture {
  std::string_view hf_name;     // config.json "architectures"
  std::string_view model_type;  // config.json "model_type", used when the former is absent
  std::string_view name;        // ModelConfig::architecture
  bool qkv_bias;
};

// Mistral is a Llama with a sliding window (handled below), as in llama.cpp.
constexpr Architecture kArchitectures[] = {
    {"LlamaForCausalLM", "llama", "llama", false},
    {"MistralForCausalLM", "mistral", "llama", false},
    {"Qwen2ForCausalLM", "qwen2", "qwen2", true},
    {"Phi3ForCausalLM", "phi3", "phi3", false},
};

// Typed access to optional keys: nullopt when absent or null, an error when
// present with the wrong type.
class Fields {
 public:
  explicit Fields(const Json& json) : json_(json) {}

  const Json* Get(std::string_view key) const {
    auto it = json_.find(key);
    return it == json_.end() || it->is_null() ? nullptr : &*it;
  }

  absl::StatusOr<std::optional<int64_t>> Int(std::string_view key) const {
    const Json* v = Get(key);
    if (v == nullptr) return std::nullopt;
    if (v->is_number_unsigned() && v->get<uint64_t>() > std::numeric_limits<int64_t>::max()) {
      return Error(key, "is too large");
    }
    if (v->is_number_integer()) return v->get<int64_t>();
    // Some writers store integers as floats (4096.0).
    if (v->is_number_float() && std::abs(v->get<double>()) < 1e15 &&
        std::floor(v->get<double>()) == v->get<double>()) {
      return static_cast<int64_t>(v->get<double>());
    }
    return Error(key, "must be an integer");
  }

  absl::StatusOr<int64_t> RequiredInt(std::string_view key) const {
    ASSIGN_OR_RETURN(std::optional<int64_t> v, Int(key));
    if (!v) return Error(key, "is missing");
    return *v;
  }

  absl::StatusOr<std::optional<double>> Real(std::string_view key) const {
    const Json* v = Get(key);
    if (v == nullptr) return std::nullopt;
    if (!v->is_number()) return Error(key, "must be a number");
    return v->get<double>();
  }

  absl::StatusOr<std::optional<bool>> Bool(std::string_view key) const {
    const Json* v = Get(key);
    if (v == nullptr) return std::nullopt;
    if (!v->is_boolean()) return Error(key, "must be true or false");
    return v->get<bool>();
  }

  absl::StatusOr<std::optional<std::string>> String(std::string_view key) const {
    const Json* v = Get(key);
    if (v == nullptr) return std::nullopt;
    if (!v->is_string()) return Error(key, "must be a string");
    return v->get<std::string>();
  }

 private:
  static absl::Status Error(std::string_view key, std::string_view problem) {
    return absl::InvalidArgumentError(StrCat("'", key, "' ", problem));
  }

  const Json& json_;
};

absl::StatusOr<const Architecture*> FindArchitecture(const Json& json) {
  std::string wanted;
  if (auto it = json.find("architectures");
      it != json.end() && it->is_array() && !it->empty() && (*it)[0].is_string()) {
    wanted = (*it)[0].get<std::string>();
    for (const Architecture& a : kArchitectures) {
      if (a.hf_name == wanted) return &a;
    }
  } else if (auto mt = json.find("model_type"); mt != json.end() && mt->is_string()) {
    wanted = mt->get<std::string>();
    for (const Architecture& a : kArchitectures) {
      if (a.model_type == wanted) return &a;
    }
  }
  std::string supported;
  for (const Architecture& a : kArchitectures) {
    StrAppend(&supported, supported.empty() ? "" : ", ", a.hf_name);
  }
  if (wanted.empty()) {
    return absl::InvalidArgumentError(
        StrCat("config has no 'architectures' or 'model_type' (supported: ", supported, ")"));
  }
  return absl::UnimplementedError(
      StrCat("architecture '", wanted, "' is not supported (supported: ", supported, ")"));
}

// `rope_scaling` (or transformers 5's `rope_parameters`) into `c`.
absl::Status ParseRopeScaling(const Json& json, ModelConfig& c) {
  const Fields f(json);
  ASSIGN_OR_RETURN(std::optional<std::string> type, f.String("rope_type"));
  if (!type) {
    ASSIGN_OR_RETURN(type, f.String("type"));
  }
  if (!type || *type == "default") return absl::OkStatus();
  RopeScaling& s = c.rope_scaling;
  if (*type != "linear" && *type != "llama3") {
    return absl::UnimplementedError(
        StrCat("rope scaling type '", *type, "' is not supported (linear, llama3)"));
  }
  s.type = *type == "linear" ? RopeScaling::Type::kLinear : RopeScaling::Type::kLlama3;
  ASSIGN_OR_RETURN(std::optional<double> factor, f.Real("factor"));
  if (!factor) {
    return absl::InvalidArgumentError(StrCat("rope scaling '", *type, "' needs 'factor'"));
  }
  s.factor = static_cast<float>(*factor);
  if (s.type == RopeScaling::Type::kLlama3) {
    ASSIGN_OR_RETURN(std::optional<double> low, f.Real("low_freq_factor"));
    ASSIGN_OR_RETURN(std::optional<double> high, f.Real("high_freq_factor"));
    ASSIGN_OR_RETURN(std::optional<int64_t> original, f.Int("original_max_position_embeddings"));
    if (!low || !high || !original) {
      return absl::InvalidArgumentError(
          "rope scaling 'llama3' needs low_freq_factor, high_freq_factor and "
          "original_max_position_embeddings");
    }
    if (!(*high > *low) || *original <= 0) {
      return absl::InvalidArgumentError(
          "rope scaling 'llama3' needs high_freq_factor > low_freq_factor and a positive "
          "original_max_position_embeddings");
    }
    s.low_freq_factor = static_cast<float>(*low);
    s.high_freq_factor = static_cast<float>(*high);
    s.original_max_position = *original;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ModelConfigFromHfJson(std::string_view json_text) {
  const Json json = Json::parse(json_text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded()) return absl::InvalidArgumentError("config is not valid JSON");
  if (!json.is_object()) return absl::InvalidArgumentError("config is not a JSON object");
  const Fields f(json);
  ModelConfig c;
  ASSIGN_OR_RETURN(const Architecture* arch, FindArchitecture(json));
  c.architecture = std::string(arch->name);
  c.qkv_bias = arch->qkv_bias;
  ASSIGN_OR_RETURN(std::optional<std::string> name, f.String("_name_or_path"));
  c.name = name.value_or("");

  ASSIGN_OR_RETURN(c.hidden_size, f.RequiredInt("hidden_size"));
  ASSIGN_OR_RETURN(c.num_layers, f.RequiredInt("num_hidden_layers"));
  ASSIGN_OR_RETURN(c.num_heads, f.RequiredInt("num_attention_heads"));
  if (c.num_heads <= 0) return absl::InvalidArgumentError("'num_attention_heads' must be positive");
  ASSIGN_OR_RETURN(std::optional<int64_t> kv_heads, f.Int("num_key_value_heads"));
  c.num_kv_heads = kv_heads.value_or(c.num_heads);
  ASSIGN_OR_RETURN(std::optional<int64_t> head_dim, f.Int("head_dim"));
  c.head_dim = head_dim.value_or(c.hidden_size / c.num_heads);
  ASSIGN_OR_RETURN(c.intermediate_size, f.RequiredInt("intermediate_size"));
  ASSIGN_OR_RETURN(c.context_length, f.RequiredInt("max_position_embeddings"));
  ASSIGN_OR_RETURN(c.vocab_size, f.RequiredInt("vocab_size"));
  ASSIGN_OR_RETURN(std::optional<double> eps, f.Real("rms_norm_eps"));
  c.rms_norm_eps = static_cast<float>(eps.value_or(1e-6));  // transformers' default
  ASSIGN_OR_RETURN(std::optional<bool> tie, f.Bool("tie_word_embeddings"));
  c.tie_embeddings = tie.value_or(false);

  ASSIGN_OR_RETURN(std::optional<std::string> act, f.String("hidden_act"));
  if (act && *act != "silu") {
    return absl::UnimplementedError(StrCat("hidden_act '", *act, "' is not supported (silu)"));
  }
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    ASSIGN_OR_RETURN(std::optional<bool> bias, f.Bool(key));
    // Qwen2's q/k/v biases are implied by the architecture; these flags add
    // biases (o_proj, MLP) the weights have no slot for.
    if (bias.value_or(false)) {
      return absl::UnimplementedError(StrCat("'", key, ": true' is not supported"));
    }
  }

  ASSIGN_OR_RETURN(std::optional<double> theta, f.Real("rope_theta"));
  if (const Json* scaling = f.Get("rope_scaling"); scaling != nullptr) {
    if (!scaling->is_object()) {
      return absl::InvalidArgumentError("'rope_scaling' must be an object");
    }
    RETURN_IF_ERROR(ParseRopeScaling(*scaling, c));
  } else if (const Json* params = f.Get("rope_parameters"); params != nullptr) {
    if (!params->is_object()) {
      return absl::InvalidArgumentError("'rope_parameters' must be an object");
    }
    RETURN_IF_ERROR(ParseRopeScaling(*params, c));
    if (!theta) {
      ASSIGN_OR_RETURN(theta, Fields(*params).Real("rope_theta"));
    }
  }
  c.rope_theta = static_cast<float>(theta.value_or(10000.0));
  ASSIGN_OR_RETURN(std::optional<double> partial, f.Real("partial_rotary_factor"));
  // As transformers does: int(head_dim * partial_rotary_factor).
  c.rope_dim = static_cast<int64_t>(static_cast<double>(c.head_dim) * partial.value_or(1.0));
  c.rope_style = kernels::RopeStyle::kHalf;

  // Attention over a sliding window equals full attention while the context
  // fits in the window; the engine has no windowed attention, so the context
  // is capped there instead of silently diverging beyond it.
  ASSIGN_OR_RETURN(std::optional<bool> use_window, f.Bool("use_sliding_window"));
  ASSIGN_OR_RETURN(std::optional<int64_t> window, f.Int("sliding_window"));
  if (use_window.value_or(true) && window && *window > 0 && *window < c.context_length) {
    c.context_length = *window;
  }
  RETURN_IF_ERROR(c.Validate());
  return c;
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    return absl::NotFoundError(StrCat(path, ": no such file"));
  }
  if (!std::filesystem::is_regular_file(path, ec)) {
    return absl::InvalidArgumentError(StrCat(path, ": not a regular file"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(StrCat(path, ": cannot open file"));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::DataLossError(StrCat(path, ": read error"));
  return text.str();
}

absl::StatusOr<ModelConfig> ModelConfigFromHfFile(const std::string& config_path) {
  ASSIGN_OR_RETURN(std::string text, ReadTextFile(config_path));
  absl::StatusOr<ModelConfig> config = ModelConfigFromHfJson(text);
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        StrCat(config_path, ": ", config.status().message()));
  }
  return config;
}

}  // namespace morphserve::engine
