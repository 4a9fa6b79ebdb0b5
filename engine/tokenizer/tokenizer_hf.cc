// Tokenizer::FromHuggingFace: reads tokenizer.json (BPE models only) and the
// optional tokenizer_config.json, chat_template.jinja and
// generation_config.json. The pre-tokenizer and normalizer configurations
// of the supported model families are recognised and mapped onto the same
// machinery the GGUF vocabularies use; anything else is rejected.
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "common/status.h"
#include "common/strings.h"
#include "engine/tokenizer/hf_json.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/tokenizer_spec.h"

namespace morphserve::engine {
namespace {

using hf_json::Json;
using hf_json::kMaxVocabSize;

bool IsFile(const std::filesystem::path& path) {
  std::error_code error;  // the throwing overload would throw on I/O errors
  return std::filesystem::is_regular_file(path, error);
}

absl::StatusOr<std::string> ReadWholeFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(morphserve::StrCat(path.string(), ": cannot open"));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) return absl::DataLossError(morphserve::StrCat(path.string(), ": read error"));
  return buffer.str();
}

absl::StatusOr<Json> ReadJsonFile(const std::filesystem::path& path) {
  ASSIGN_OR_RETURN(std::string text, ReadWholeFile(path));
  Json json = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded() || !json.is_object()) {
    return absl::InvalidArgumentError(morphserve::StrCat(path.string(), ": not a JSON object"));
  }
  return json;
}

// Vocabulary, merges and added tokens from the "model" and "added_tokens"
// sections.
absl::Status ReadModel(const Json& root, const Json& model, bool byte_fallback, TokenizerSpec* spec,
                       absl::flat_hash_map<std::string, int32_t>* ids) {
  const Json* vocab = hf_json::Member(model, "vocab");
  if (vocab == nullptr || !vocab->is_object()) {
    return absl::InvalidArgumentError("model.vocab is missing or not an object");
  }
  int64_t size = 0;
  for (const auto& [text, id] : vocab->items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= kMaxVocabSize) {
      return absl::InvalidArgumentError(
          morphserve::StrCat("model.vocab['", text, "'] is not a valid id"));
    }
    size = std::max(size, id.get<int64_t>() + 1);
  }
  ASSIGN_OR_RETURN(std::vector<hf_json::AddedToken> added, hf_json::ReadAddedTokens(root));
  for (const hf_json::AddedToken& a : added) size = std::max(size, int64_t{a.id} + 1);

  spec->tokens.resize(size);
  std::vector<bool> filled(size, false);
  for (const auto& [text, id] : vocab->items()) {
    const int64_t i = id.get<int64_t>();
    if (filled[i]) {
      return absl::InvalidArgumentError(morphserve::StrCat("model.vocab reuses id ", i));
    }
    filled[i] = true;
    spec->tokens[i].text = text;
    const bool is_byte = text.size() == 6 && text.starts_with("<0x") && text.back() == '>';
    spec->tokens[i].type = byte_fallback && is_byte ? TokenType::kByte : TokenType::kNormal;
  }
  for (const hf_json::AddedToken& a : added) {
    TokenRecord& t = spec->tokens[a.id];
    t.text = a.content;
    t.type = a.special ? TokenType::kControl : TokenType::kUserDefined;
    t.lstrip = a.lstrip;
    t.rstrip = a.rstrip;
    filled[a.id] = true;
  }
  for (int64_t i = 0; i < size; ++i) {
    if (!filled[i]) {  // ids nothing names are padded, as the GGUF converter does
      spec->tokens[i].text = morphserve::StrCat("[PAD", i, "]");
      spec->tokens[i].type = TokenType::kUnused;
    }
    ids->emplace(spec->tokens[i].text, static_cast<int32_t>(i));
  }

  ASSIGN_OR_RETURN(spec->merges, hf_json::ReadMerges(model));
  spec->strict_merges = true;
  ASSIGN_OR_RETURN(spec->ignore_merges, hf_json::OptionalBool(model, "ignore_merges", false));
  return absl::OkStatus();
}

// Resolves a special token given by text; "" means none.
absl::StatusOr<int32_t> IdOf(const absl::flat_hash_map<std::string, int32_t>& ids,
                             const std::string& text, std::string_view what) {
  if (text.empty()) return kNoToken;
  auto it = ids.find(text);
  if (it == ids.end()) {
    return absl::InvalidArgumentError(
        morphserve::StrCat(what, " '", text, "' is not in the vocabulary"));
  }
  return it->second;
}

absl::Status ReadConfig(const std::filesystem::path& dir, const hf_json::PostProcessor& post,
                        const absl::flat_hash_map<std::string, int32_t>& ids, TokenizerSpec* spec) {
  Json config = Json::object();
  if (IsFile(dir / "tokenizer_config.json")) {
    ASSIGN_OR_RETURN(config, ReadJsonFile(dir / "tokenizer_config.json"));
  }
  ASSIGN_OR_RETURN(std::string bos, hf_json::TokenText(config, "bos_token"));
  ASSIGN_OR_RETURN(std::string eos, hf_json::TokenText(config, "eos_token"));
  ASSIGN_OR_RETURN(std::string pad, hf_json::TokenText(config, "pad_token"));
  if (bos.empty()) bos = post.bos;
  if (eos.empty()) eos = post.eos;
  ASSIGN_OR_RETURN(spec->bos_id, IdOf(ids, bos, "tokenizer_config.json bos_token"));
  ASSIGN_OR_RETURN(spec->eos_id, IdOf(ids, eos, "tokenizer_config.json eos_token"));
  ASSIGN_OR_RETURN(spec->pad_id, IdOf(ids, pad, "tokenizer_config.json pad_token"));
  ASSIGN_OR_RETURN(spec->add_bos,
                   hf_json::OptionalBool(config, "add_bos_token", !post.bos.empty()));
  ASSIGN_OR_RETURN(spec->add_eos,
                   hf_json::OptionalBool(config, "add_eos_token", !post.eos.empty()));
  if (spec->add_bos && spec->bos_id == kNoToken) {
    return absl::InvalidArgumentError("add_bos_token is true, but bos_token is not set");
  }
  if (spec->add_eos && spec->eos_id == kNoToken) {
    return absl::InvalidArgumentError("add_eos_token is true, but eos_token is not set");
  }

  ASSIGN_OR_RETURN(spec->chat_template, hf_json::ChatTemplate(config));
  if (spec->chat_template.empty() && IsFile(dir / "chat_template.jinja")) {
    ASSIGN_OR_RETURN(spec->chat_template, ReadWholeFile(dir / "chat_template.jinja"));
  }
  if (IsFile(dir / "generation_config.json")) {
    ASSIGN_OR_RETURN(Json generation, ReadJsonFile(dir / "generation_config.json"));
    ASSIGN_OR_RETURN(spec->extra_eog_ids, hf_json::IdList(generation, "eos_token_id"));
  }
  return absl::OkStatus();
}

absl::StatusOr<TokenizerSpec> LoadSpec(const std::filesystem::path& dir) {
  ASSIGN_OR_RETURN(Json root, ReadJsonFile(dir / "tokenizer.json"));
  const Json* model = hf_json::Member(root, "model");
  if (model == nullptr || !model->is_object()) {
    return absl::InvalidArgumentError("'model' is missing or not an object");
  }
  ASSIGN_OR_RETURN(std::string type, hf_json::OptionalString(*model, "type", "BPE"));
  if (type != "BPE") {
    return absl::UnimplementedError(
        morphserve::StrCat("model type '", type, "' is not supported (only BPE)"));
  }
  ASSIGN_OR_RETURN(bool byte_fallback, hf_json::OptionalBool(*model, "byte_fallback", false));

  TokenizerSpec spec;
  RETURN_IF_ERROR(hf_json::ReadPreTokenization(root, &spec));
  absl::flat_hash_map<std::string, int32_t> ids;
  RETURN_IF_ERROR(ReadModel(root, *model, byte_fallback, &spec, &ids));
  ASSIGN_OR_RETURN(std::string unk, hf_json::OptionalString(*model, "unk_token", ""));
  ASSIGN_OR_RETURN(spec.unk_id, IdOf(ids, unk, "model.unk_token"));
  if (spec.unk_id != kNoToken) spec.tokens[spec.unk_id].type = TokenType::kUnknown;
  ASSIGN_OR_RETURN(hf_json::PostProcessor post, hf_json::ReadPostProcessor(root));
  RETURN_IF_ERROR(ReadConfig(dir, post, ids, &spec));
  return spec;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromHuggingFace(const std::string& dir) {
  absl::StatusOr<TokenizerSpec> spec = LoadSpec(dir);
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
      spec.ok() ? Build(*std::move(spec)) : spec.status();
  if (!tokenizer.ok()) {
    return absl::Status(tokenizer.status().code(),
                        morphserve::StrCat(dir, ": ", tokenizer.status().message()));
  }
  return tokenizer;
}

}  // namespace morphserve::engine
