// Recognises the normalizer / pre_tokenizer / post_processor configurations
// of the supported model families in tokenizer.json.
#include <string>
#include <vector>

#include "common/status.h"
#include "common/strings.h"
#include "engine/tokenizer/hf_json.h"

namespace morphserve::engine::hf_json {
namespace {

constexpr std::string_view kSpaceMarker = "\xE2\x96\x81";  // U+2581

// Split regexes of the supported byte-level families, as tokenizer.json
// spells them.
constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::string_view kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|)"
    R"( ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kQwen2Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|)"
    R"( ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// The steps of a component, flattening one level of "Sequence".
absl::StatusOr<std::vector<const Json*>> Steps(const Json& root, std::string_view component,
                                               std::string_view list_key) {
  std::vector<const Json*> steps;
  const Json* c = Member(root, component);
  if (c == nullptr) return steps;
  ASSIGN_OR_RETURN(std::string type, OptionalString(*c, "type", ""));
  if (type != "Sequence") {
    steps.push_back(c);
    return steps;
  }
  const Json* list = Member(*c, list_key);
  if (list == nullptr || !list->is_array()) {
    return absl::InvalidArgumentError(
        morphserve::StrCat(component, ": Sequence without ", list_key));
  }
  for (const Json& step : *list) steps.push_back(&step);
  return steps;
}

absl::StatusOr<std::string> TypeOf(const Json& step) { return OptionalString(step, "type", ""); }

// The regex of a Split step that isolates its matches.
absl::StatusOr<std::string> SplitRegex(const Json& step) {
  const Json* pattern = Member(step, "pattern");
  ASSIGN_OR_RETURN(std::string regex,
                   pattern != nullptr ? OptionalString(*pattern, "Regex", "") : std::string());
  ASSIGN_OR_RETURN(std::string behavior, OptionalString(step, "behavior", ""));
  ASSIGN_OR_RETURN(bool invert, OptionalBool(step, "invert", false));
  if (regex.empty() || behavior != "Isolated" || invert) {
    return absl::UnimplementedError(
        morphserve::StrCat("pre_tokenizer Split must isolate a regex: ", step.dump()));
  }
  return regex;
}

absl::Status ReadByteLevel(const std::vector<const Json*>& steps, TokenizerSpec* spec) {
  spec->model_name = "gpt2";
  const Json& byte_level = *steps.back();
  ASSIGN_OR_RETURN(std::string last_type, TypeOf(byte_level));
  ASSIGN_OR_RETURN(bool use_regex, OptionalBool(byte_level, "use_regex", true));
  ASSIGN_OR_RETURN(spec->byte_level_prefix_space,
                   OptionalBool(byte_level, "add_prefix_space", false));
  std::string first_type;
  if (steps.size() == 2) {
    ASSIGN_OR_RETURN(first_type, TypeOf(*steps[0]));
  }

  if (last_type == "ByteLevel" && steps.size() == 1 && use_regex) {
    spec->pre_tokenizer = PreTokenizerKind::kGpt2;
    spec->pre_tokenizer_name = "gpt-2";
    return absl::OkStatus();
  }
  if (last_type == "ByteLevel" && steps.size() == 2 && first_type == "Digits" && use_regex) {
    ASSIGN_OR_RETURN(bool individual, OptionalBool(*steps[0], "individual_digits", false));
    if (individual) {
      spec->pre_tokenizer = PreTokenizerKind::kDigitsThenGpt2;
      spec->pre_tokenizer_name = "smollm";
      return absl::OkStatus();
    }
  }
  if (last_type == "ByteLevel" && steps.size() == 2 && first_type == "Split" && !use_regex) {
    ASSIGN_OR_RETURN(std::string regex, SplitRegex(*steps[0]));
    if (regex == kLlama3Regex) {
      spec->pre_tokenizer = PreTokenizerKind::kLlama3;
      spec->pre_tokenizer_name = "llama-bpe";
      return absl::OkStatus();
    }
    if (regex == kQwen2Regex) {
      spec->pre_tokenizer = PreTokenizerKind::kQwen2;
      spec->pre_tokenizer_name = "qwen2";
      return absl::OkStatus();
    }
    if (regex == kGpt2Regex) {
      spec->pre_tokenizer = PreTokenizerKind::kGpt2;
      spec->pre_tokenizer_name = "gpt-2";
      return absl::OkStatus();
    }
    return absl::UnimplementedError(morphserve::StrCat("unsupported pre_tokenizer regex: ", regex));
  }
  return absl::UnimplementedError("unsupported byte-level pre_tokenizer configuration");
}

// SentencePiece-style: spaces become U+2581 through a Metaspace pre-tokenizer
// or a Replace normalizer, with an optional prefix.
absl::Status ReadMetaspace(const std::vector<const Json*>& normalizers,
                           const std::vector<const Json*>& pre_steps, TokenizerSpec* spec) {
  spec->model_name = "llama";
  spec->pre_tokenizer_name = "default";
  bool escapes_spaces = false;
  for (const Json* n : normalizers) {
    ASSIGN_OR_RETURN(std::string type, TypeOf(*n));
    if (type == "Prepend") {
      ASSIGN_OR_RETURN(std::string prepend, OptionalString(*n, "prepend", ""));
      if (prepend != kSpaceMarker) {
        return absl::UnimplementedError(
            morphserve::StrCat("unsupported Prepend normalizer: ", n->dump()));
      }
      spec->add_space_prefix = true;
    } else if (type == "Replace") {
      const Json* pattern = Member(*n, "pattern");
      ASSIGN_OR_RETURN(std::string from,
                       pattern != nullptr ? OptionalString(*pattern, "String", "") : std::string());
      ASSIGN_OR_RETURN(std::string to, OptionalString(*n, "content", ""));
      if (from != " " || to != kSpaceMarker) {
        return absl::UnimplementedError(
            morphserve::StrCat("unsupported Replace normalizer: ", n->dump()));
      }
      escapes_spaces = true;
    } else if (type != "NFC") {  // NFC is not applied, as in llama.cpp
      return absl::UnimplementedError(morphserve::StrCat("unsupported normalizer '", type, "'"));
    }
  }
  for (const Json* p : pre_steps) {
    ASSIGN_OR_RETURN(std::string type, TypeOf(*p));
    ASSIGN_OR_RETURN(std::string replacement, OptionalString(*p, "replacement", ""));
    ASSIGN_OR_RETURN(bool split, OptionalBool(*p, "split", false));
    if (type != "Metaspace" || replacement != kSpaceMarker || split) {
      return absl::UnimplementedError(morphserve::StrCat("unsupported pre_tokenizer: ", p->dump()));
    }
    escapes_spaces = true;
    ASSIGN_OR_RETURN(bool legacy_prefix, OptionalBool(*p, "add_prefix_space", true));
    ASSIGN_OR_RETURN(std::string scheme,
                     OptionalString(*p, "prepend_scheme", legacy_prefix ? "always" : "never"));
    if (scheme != "always" && scheme != "first" && scheme != "never") {
      return absl::UnimplementedError(
          morphserve::StrCat("unsupported prepend_scheme '", scheme, "'"));
    }
    spec->add_space_prefix = scheme != "never";
    spec->space_prefix_first_only = scheme == "first";
  }
  if (!escapes_spaces) {
    return absl::UnimplementedError(
        "tokenizer.json has neither a ByteLevel nor a Metaspace-style pre-tokenization");
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ReadPreTokenization(const Json& root, TokenizerSpec* spec) {
  ASSIGN_OR_RETURN(std::vector<const Json*> normalizers, Steps(root, "normalizer", "normalizers"));
  ASSIGN_OR_RETURN(std::vector<const Json*> pre_steps,
                   Steps(root, "pre_tokenizer", "pretokenizers"));
  bool byte_level = false;
  for (const Json* p : pre_steps) {
    ASSIGN_OR_RETURN(std::string type, TypeOf(*p));
    byte_level = byte_level || type == "ByteLevel";
  }
  if (!byte_level) return ReadMetaspace(normalizers, pre_steps, spec);
  for (const Json* n : normalizers) {
    ASSIGN_OR_RETURN(std::string type, TypeOf(*n));
    if (type != "NFC") {  // NFC is not applied, as in llama.cpp
      return absl::UnimplementedError(morphserve::StrCat("unsupported normalizer '", type, "'"));
    }
  }
  return ReadByteLevel(pre_steps, spec);
}

absl::StatusOr<PostProcessor> ReadPostProcessor(const Json& root) {
  PostProcessor result;
  ASSIGN_OR_RETURN(std::vector<const Json*> steps, Steps(root, "post_processor", "processors"));
  for (const Json* step : steps) {
    ASSIGN_OR_RETURN(std::string type, TypeOf(*step));
    const Json* single = Member(*step, "single");
    if (type != "TemplateProcessing" || single == nullptr || !single->is_array() ||
        single->empty()) {
      continue;
    }
    auto special_id = [](const Json& item) -> absl::StatusOr<std::string> {
      const Json* special = Member(item, "SpecialToken");
      return special != nullptr ? OptionalString(*special, "id", "") : std::string();
    };
    ASSIGN_OR_RETURN(result.bos, special_id(single->front()));
    if (single->size() > 1) {
      ASSIGN_OR_RETURN(result.eos, special_id(single->back()));
    }
  }
  return result;
}

}  // namespace morphserve::engine::hf_json
