// Tokenizer::FromGguf: reads the `tokenizer.ggml.*` metadata with llama.cpp's
// defaults (llama-vocab.cpp, llama_vocab::impl::load).
#include <algorithm>
#include <cctype>
#include <utility>

#include "common/status.h"
#include "common/strings.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/tokenizer_spec.h"

namespace morphserve::engine {
namespace {

constexpr std::string_view kModelKey = "tokenizer.ggml.model";
constexpr std::string_view kPreKey = "tokenizer.ggml.pre";
constexpr std::string_view kTokensKey = "tokenizer.ggml.tokens";
constexpr std::string_view kScoresKey = "tokenizer.ggml.scores";
constexpr std::string_view kTypesKey = "tokenizer.ggml.token_type";
constexpr std::string_view kMergesKey = "tokenizer.ggml.merges";

// Pre-tokenizers for which llama.cpp sets ignore_merges and forces add_bos.
bool IsLlama3Family(std::string_view pre) {
  return pre == "llama3" || pre == "llama-v3" || pre == "llama-bpe" || pre == "falcon3" ||
         pre == "falcon-h1" || pre == "pixtral";
}

TokenType TypeFromGguf(int64_t value) {
  return value >= 0 && value <= 6 ? static_cast<TokenType>(value) : TokenType::kUndefined;
}

// A per-token array: empty when absent, an error when its length is wrong.
template <typename T>
absl::StatusOr<std::vector<T>> ReadPerToken(absl::StatusOr<std::optional<std::vector<T>>> array,
                                            std::string_view key, size_t n) {
  if (!array.ok()) return array.status();
  if (!array->has_value()) return std::vector<T>();
  std::vector<T> values = std::move(**array);
  if (values.size() != n) {
    return absl::InvalidArgumentError(morphserve::StrCat("metadata '", key, "' has ", values.size(),
                                                         " entries for ", n, " tokens"));
  }
  return values;
}

absl::Status ReadTokens(const GgufFile& file, TokenizerSpec* spec) {
  ASSIGN_OR_RETURN(auto texts, file.GetStringArray(kTokensKey));
  if (!texts || texts->empty()) {
    return absl::InvalidArgumentError(morphserve::StrCat("metadata '", kTokensKey, "' is missing"));
  }
  const size_t n = texts->size();
  ASSIGN_OR_RETURN(std::vector<float> scores,
                   ReadPerToken(file.GetRealArray(kScoresKey), kScoresKey, n));
  ASSIGN_OR_RETURN(std::vector<int64_t> types,
                   ReadPerToken(file.GetIntArray(kTypesKey), kTypesKey, n));
  spec->tokens.resize(n);
  for (size_t i = 0; i < n; ++i) {
    TokenRecord& t = spec->tokens[i];
    // llama.cpp renames empty entries so that every text stays unique.
    t.text = (*texts)[i].empty() ? morphserve::StrCat("[EMPTY_", i, "]") : std::string((*texts)[i]);
    if (!scores.empty()) t.score = scores[i];
    if (!types.empty()) t.type = TypeFromGguf(types[i]);
  }
  return absl::OkStatus();
}

absl::Status ReadMerges(const GgufFile& file, TokenizerSpec* spec) {
  ASSIGN_OR_RETURN(auto merges, file.GetStringArray(kMergesKey));
  if (!merges) {
    return absl::InvalidArgumentError(morphserve::StrCat(
        "metadata '", kMergesKey, "' is missing (required for BPE vocabularies)"));
  }
  spec->merges.reserve(merges->size());
  for (size_t i = 0; i < merges->size(); ++i) {
    const std::string_view line = (*merges)[i];
    const size_t space = line.size() > 1 ? line.find(' ', 1) : std::string_view::npos;
    if (space == std::string_view::npos) {
      return absl::InvalidArgumentError(morphserve::StrCat(
          "metadata '", kMergesKey, "'[", i, "] = '", line, "' is not a space-separated pair"));
    }
    spec->merges.emplace_back(std::string(line.substr(0, space)),
                              std::string(line.substr(space + 1)));
  }
  return absl::OkStatus();
}

// Reads an optional token id key into *id; out-of-range values are errors.
absl::Status ReadId(const GgufFile& file, std::string_view key, size_t n_tokens, int32_t* id) {
  ASSIGN_OR_RETURN(std::optional<int64_t> value, file.GetInt(key));
  if (!value) return absl::OkStatus();
  if (*value < 0 || static_cast<uint64_t>(*value) >= n_tokens) {
    return absl::InvalidArgumentError(morphserve::StrCat(
        "metadata '", key, "' = ", *value, " is outside the vocabulary of ", n_tokens, " tokens"));
  }
  *id = static_cast<int32_t>(*value);
  return absl::OkStatus();
}

absl::Status ReadBool(const GgufFile& file, std::string_view key, bool* out) {
  ASSIGN_OR_RETURN(std::optional<bool> value, file.GetBool(key));
  if (value) *out = *value;
  return absl::OkStatus();
}

// llama.cpp strips whitespace after Phi-3's special tokens, a property its
// GGUF files do not carry.
absl::Status ApplyModelQuirks(const GgufFile& file, TokenizerSpec* spec) {
  ASSIGN_OR_RETURN(std::optional<std::string_view> name, file.GetString("general.name"));
  if (!name) return absl::OkStatus();
  std::string lower(*name);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (lower.find("phi-3") == std::string::npos && lower.find("phi3") == std::string::npos) {
    return absl::OkStatus();
  }
  for (TokenRecord& t : spec->tokens) {
    const bool special = t.type == TokenType::kControl || t.type == TokenType::kUserDefined ||
                         t.type == TokenType::kUnknown;
    if (special || t.text == "</s>") t.rstrip = true;
    if (t.text == "<unk>" || t.text == "<s>" || t.text == "<|endoftext|>") t.rstrip = false;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const GgufFile& file) {
  TokenizerSpec spec;
  ASSIGN_OR_RETURN(std::optional<std::string_view> model, file.GetString(kModelKey));
  if (!model) {
    return absl::InvalidArgumentError(morphserve::StrCat("metadata '", kModelKey, "' is missing"));
  }
  ASSIGN_OR_RETURN(std::optional<std::string_view> pre, file.GetString(kPreKey));
  spec.model_name = std::string(*model);
  RETURN_IF_ERROR(ReadTokens(file, &spec));
  const size_t n = spec.tokens.size();
  auto default_id = [n](int32_t id) { return static_cast<size_t>(id) < n ? id : kNoToken; };

  if (*model == "llama") {
    spec.pre_tokenizer_name = "default";
    spec.use_scores = true;
    spec.add_space_prefix = true;
    spec.add_bos = true;
    spec.bos_id = default_id(1);
    spec.eos_id = default_id(2);
    spec.unk_id = default_id(0);
  } else if (*model == "gpt2") {
    spec.pre_tokenizer_name = pre && !pre->empty() ? std::string(*pre) : "default";
    const std::optional<PreTokenizerKind> kind = PreTokenizerFromGgufName(spec.pre_tokenizer_name);
    if (!kind) {
      return absl::InvalidArgumentError(morphserve::StrCat(
          "unknown pre-tokenizer type '", spec.pre_tokenizer_name, "' (metadata '", kPreKey, "')"));
    }
    spec.pre_tokenizer = *kind;
    if (IsLlama3Family(spec.pre_tokenizer_name)) {
      spec.ignore_merges = true;
      spec.add_bos = true;
    }
    RETURN_IF_ERROR(ReadMerges(file, &spec));
  } else {
    return absl::InvalidArgumentError(morphserve::StrCat("unsupported tokenizer model '", *model,
                                                         "' (metadata '", kModelKey,
                                                         "'); supported: llama, gpt2"));
  }

  RETURN_IF_ERROR(ReadId(file, "tokenizer.ggml.bos_token_id", n, &spec.bos_id));
  RETURN_IF_ERROR(ReadId(file, "tokenizer.ggml.eos_token_id", n, &spec.eos_id));
  RETURN_IF_ERROR(ReadId(file, "tokenizer.ggml.unknown_token_id", n, &spec.unk_id));
  RETURN_IF_ERROR(ReadId(file, "tokenizer.ggml.padding_token_id", n, &spec.pad_id));
  for (std::string_view key : {"tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"}) {
    int32_t id = kNoToken;
    RETURN_IF_ERROR(ReadId(file, key, n, &id));
    if (id != kNoToken) spec.extra_eog_ids.push_back(id);
  }
  RETURN_IF_ERROR(ReadBool(file, "tokenizer.ggml.add_bos_token", &spec.add_bos));
  RETURN_IF_ERROR(ReadBool(file, "tokenizer.ggml.add_eos_token", &spec.add_eos));
  RETURN_IF_ERROR(ReadBool(file, "tokenizer.ggml.add_space_prefix", &spec.add_space_prefix));
  if (spec.add_bos && spec.bos_id == kNoToken) {
    return absl::InvalidArgumentError(
        "tokenizer.ggml.add_bos_token is true, but tokenizer.ggml.bos_token_id is not set");
  }
  if (spec.add_eos && spec.eos_id == kNoToken) {
    return absl::InvalidArgumentError(
        "tokenizer.ggml.add_eos_token is true, but tokenizer.ggml.eos_token_id is not set");
  }
  ASSIGN_OR_RETURN(std::optional<std::string_view> chat_template,
                   file.GetString("tokenizer.chat_template"));
  if (chat_template) spec.chat_template = std::string(*chat_template);
  RETURN_IF_ERROR(ApplyModelQuirks(file, &spec));

  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = Build(std::move(spec));
  if (!tokenizer.ok()) {
    return absl::Status(tokenizer.status().code(),
                        morphserve::StrCat("GGUF vocabulary: ", tokenizer.status().message()));
  }
  return tokenizer;
}

}  // namespace morphserve::engine
