#include "engine/tokenizer/hf_json.h"

#include "common/status.h"
#include "common/strings.h"

namespace morphserve::engine::hf_json {
namespace {

absl::Status TypeError(std::string_view key, std::string_view want) {
  return absl::InvalidArgumentError(morphserve::StrCat("'", key, "' must be ", want));
}

}  // namespace

const Json* Member(const Json& obj, std::string_view key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

absl::StatusOr<bool> OptionalBool(const Json& obj, std::string_view key, bool fallback) {
  const Json* v = Member(obj, key);
  if (v == nullptr) return fallback;
  if (!v->is_boolean()) return TypeError(key, "a boolean");
  return v->get<bool>();
}

absl::StatusOr<std::string> OptionalString(const Json& obj, std::string_view key,
                                           std::string fallback) {
  const Json* v = Member(obj, key);
  if (v == nullptr) return fallback;
  if (!v->is_string()) return TypeError(key, "a string");
  return v->get<std::string>();
}

absl::StatusOr<std::vector<AddedToken>> ReadAddedTokens(const Json& root) {
  std::vector<AddedToken> tokens;
  const Json* list = Member(root, "added_tokens");
  if (list == nullptr) return tokens;
  if (!list->is_array()) return TypeError("added_tokens", "an array");
  for (const Json& entry : *list) {
    const Json* id = Member(entry, "id");
    if (id == nullptr || !id->is_number_integer() || id->get<int64_t>() < 0 ||
        id->get<int64_t>() >= kMaxVocabSize) {
      return absl::InvalidArgumentError("added_tokens: an entry has no valid 'id'");
    }
    AddedToken t;
    t.id = static_cast<int32_t>(id->get<int64_t>());
    ASSIGN_OR_RETURN(t.content, OptionalString(entry, "content", ""));
    if (t.content.empty()) {
      return absl::InvalidArgumentError(
          morphserve::StrCat("added_tokens: id ", t.id, " has no content"));
    }
    ASSIGN_OR_RETURN(t.special, OptionalBool(entry, "special", false));
    ASSIGN_OR_RETURN(t.lstrip, OptionalBool(entry, "lstrip", false));
    ASSIGN_OR_RETURN(t.rstrip, OptionalBool(entry, "rstrip", false));
    tokens.push_back(std::move(t));
  }
  return tokens;
}

absl::StatusOr<std::vector<MergePair>> ReadMerges(const Json& model) {
  std::vector<MergePair> merges;
  const Json* list = Member(model, "merges");
  if (list == nullptr) return merges;
  if (!list->is_array()) return TypeError("model.merges", "an array");
  merges.reserve(list->size());
  for (size_t i = 0; i < list->size(); ++i) {
    const Json& m = (*list)[i];
    if (m.is_string()) {
      const std::string& line = m.get_ref<const std::string&>();
      const size_t space = line.size() > 1 ? line.find(' ', 1) : std::string::npos;
      if (space != std::string::npos) {
        merges.emplace_back(line.substr(0, space), line.substr(space + 1));
        continue;
      }
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
      continue;
    }
    return absl::InvalidArgumentError(morphserve::StrCat(
        "model.merges[", i, "] is neither \"a b\" nor [\"a\", \"b\"]: ", m.dump()));
  }
  return merges;
}

absl::StatusOr<std::string> TokenText(const Json& config, std::string_view key) {
  const Json* v = Member(config, key);
  if (v == nullptr) return std::string();
  if (v->is_string()) return v->get<std::string>();
  if (v->is_object()) return OptionalString(*v, "content", "");
  return TypeError(key, "a string or an object with 'content'");
}

absl::StatusOr<std::string> ChatTemplate(const Json& config) {
  const Json* v = Member(config, "chat_template");
  if (v == nullptr) return std::string();
  if (v->is_string()) return v->get<std::string>();
  if (!v->is_array()) return TypeError("chat_template", "a string or a list");
  std::string first;
  for (const Json& entry : *v) {
    ASSIGN_OR_RETURN(std::string name, OptionalString(entry, "name", ""));
    ASSIGN_OR_RETURN(std::string text, OptionalString(entry, "template", ""));
    if (name == "default") return text;
    if (first.empty()) first = std::move(text);
  }
  return first;
}

absl::StatusOr<std::vector<int32_t>> IdList(const Json& obj, std::string_view key) {
  std::vector<int32_t> ids;
  const Json* v = Member(obj, key);
  if (v == nullptr) return ids;
  const Json list = v->is_array() ? *v : Json::array({*v});
  for (const Json& id : list) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
      return TypeError(key, "a token id or a list of token ids");
    }
    ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
  }
  return ids;
}

}  // namespace morphserve::engine::hf_json
