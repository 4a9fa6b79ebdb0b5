// Readers for the parts of Hugging Face tokenizer files that the tokenizer
// uses. Every accessor checks JSON types and reports a status instead of
// throwing. Internal to engine/tokenizer.
#ifndef MORPHSERVE_ENGINE_TOKENIZER_HF_JSON_H_
#define MORPHSERVE_ENGINE_TOKENIZER_HF_JSON_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/tokenizer/bpe_model.h"
#include "engine/tokenizer/tokenizer_spec.h"
#include "nlohmann/json.hpp"

namespace morphserve::engine::hf_json {

using Json = nlohmann::json;

// Token ids at or past this are rejected, which bounds what a hostile file
// can make the loader allocate (real vocabularies stay below 300k).
inline constexpr int64_t kMaxVocabSize = int64_t{1} << 21;

// The member `key` of `obj`, or nullptr when `obj` is not an object or the
// member is absent or null.
const Json* Member(const Json& obj, std::string_view key);

absl::StatusOr<bool> OptionalBool(const Json& obj, std::string_view key, bool fallback);
absl::StatusOr<std::string> OptionalString(const Json& obj, std::string_view key,
                                           std::string fallback);

// tokenizer.json "added_tokens".
struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
};
absl::StatusOr<std::vector<AddedToken>> ReadAddedTokens(const Json& root);

// model.merges, as "a b" strings or ["a", "b"] pairs.
absl::StatusOr<std::vector<MergePair>> ReadMerges(const Json& model);

// A special token in tokenizer_config.json: a string or {"content": ...};
// "" when absent.
absl::StatusOr<std::string> TokenText(const Json& config, std::string_view key);
// "chat_template": a string, or a list of {name, template} (the "default"
// entry, else the first).
absl::StatusOr<std::string> ChatTemplate(const Json& config);
// An id or a list of ids (generation_config.json "eos_token_id").
absl::StatusOr<std::vector<int32_t>> IdList(const Json& obj, std::string_view key);

// Special tokens a TemplateProcessing post-processor puts around a single
// sequence ("" when none).
struct PostProcessor {
  std::string bos;
  std::string eos;
};
absl::StatusOr<PostProcessor> ReadPostProcessor(const Json& root);

// Maps "normalizer" and "pre_tokenizer" onto the spec's model_name,
// pre-tokenizer and space-prefix fields. Unknown configurations are errors.
absl::Status ReadPreTokenization(const Json& root, TokenizerSpec* spec);

}  // namespace morphserve::engine::hf_json

#endif  // MORPHSERVE_ENGINE_TOKENIZER_HF_JSON_H_
