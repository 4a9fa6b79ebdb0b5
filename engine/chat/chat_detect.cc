// Recognises a chat template's family and layout from tell-tale pieces of
// its Jinja text, and lifts the literals the native renderers need (default
// system prompt, knowledge-cutoff line, date).
#include <ctime>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "engine/chat/chat_format.h"

namespace morphserve::engine {
namespace {

bool Has(std::string_view text, std::string_view piece) {
  return text.find(piece) != std::string_view::npos;
}

// Decodes a fragment of a Jinja string literal. Fails (nullopt) on an
// unescaped quote or brace, i.e. when the fragment is not one literal.
std::optional<std::string> UnescapeLiteral(std::string_view text) {
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '\'' || c == '"' || c == '{' || c == '}') return std::nullopt;
    if (c != '\\') {
      out.push_back(c);
      continue;
    }
    if (++i == text.size()) return std::nullopt;
    switch (text[i]) {
      case 'n':
        out.push_back('\n');
        break;
      case 't':
        out.push_back('\t');
        break;
      default:
        out.push_back(text[i]);
        break;  // \\ \' \"
    }
  }
  return out;
}

// Length of a newline at `pos`, written either as a real newline or as the
// two-character escape "\n"; 0 if there is none.
size_t NewlineAt(std::string_view text, size_t pos) {
  if (text.substr(pos, 1) == "\n") return 1;
  if (text.substr(pos, 2) == "\\n") return 2;
  return 0;
}

// The text of a literal '<|im_start|>system\n...<|im_end|>' in the template:
// the prompt used when the conversation brings no system message.
std::string DefaultChatMlSystem(std::string_view tmpl) {
  constexpr std::string_view kOpen = "<|im_start|>system";
  constexpr std::string_view kClose = "<|im_end|>";
  for (size_t pos = tmpl.find(kOpen); pos != std::string_view::npos;
       pos = tmpl.find(kOpen, pos + 1)) {
    const size_t start = pos + kOpen.size() + NewlineAt(tmpl, pos + kOpen.size());
    const size_t end = tmpl.find(kClose, start);
    if (start == pos + kOpen.size() || end == std::string_view::npos || end == start) continue;
    if (std::optional<std::string> text = UnescapeLiteral(tmpl.substr(start, end - start))) {
      return *text;
    }
  }
  return "";
}

// "Cutting Knowledge Date: <month year>" up to the end of its line.
std::string KnowledgeCutoff(std::string_view tmpl) {
  const size_t start = tmpl.find("Cutting Knowledge Date:");
  size_t end = start;
  while (end < tmpl.size() && NewlineAt(tmpl, end) == 0 && tmpl[end] != '"' && tmpl[end] != '\'') {
    ++end;
  }
  return std::string(tmpl.substr(start, end - start));
}

std::string Today() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  const size_t n = std::strftime(buf, sizeof(buf), "%d %b %Y", &tm);
  return std::string(buf, n);
}

// Llama 3.1 fixes the date shown ("26 Jul 2024"); 3.2 and later ask for
// today's date through strftime_now when the renderer offers it.
std::string TemplateDate(std::string_view tmpl) {
  if (Has(tmpl, "strftime_now")) return Today();
  for (std::string_view quote : {"\"", "'"}) {
    const std::string key = std::string("set date_string = ") + std::string(quote);
    const size_t start = tmpl.find(key);
    if (start == std::string_view::npos) continue;
    const size_t begin = start + key.size();
    const size_t end = tmpl.find(quote, begin);
    if (end != std::string_view::npos) return std::string(tmpl.substr(begin, end - begin));
  }
  return "26 Jul 2024";
}

absl::StatusOr<ChatFormat> DetectMistral(std::string_view tmpl, ChatFormat format) {
  format.family = ChatFamily::kMistral;
  if (Has(tmpl, "' [INST] '") || Has(tmpl, "\" [INST] \"")) {
    format.variant = ChatVariant::kMistralV1System;
  } else if (Has(tmpl, "loop.last and system_message") &&
             (Has(tmpl, "\"[INST] \"") || Has(tmpl, "'[INST] '"))) {
    format.variant = ChatVariant::kMistralV3;
  } else if (Has(tmpl, "'[INST] ' + message['content'] + ' [/INST]'")) {
    format.variant = ChatVariant::kMistralV1;
  } else {
    return absl::FailedPreconditionError("unrecognised chat template ([INST] layout)");
  }
  return format;
}

}  // namespace

absl::StatusOr<ChatFormat> DetectChatFormat(std::string_view tmpl) {
  if (tmpl.empty()) return absl::FailedPreconditionError("model has no chat template");
  ChatFormat format;
  format.bos_in_text = Has(tmpl, "bos_token");
  if (Has(tmpl, "<|im_start|>")) {
    format.family = ChatFamily::kChatMl;
    format.bos_in_text = false;
    format.default_system = DefaultChatMlSystem(tmpl);
    return format;
  }
  if (Has(tmpl, "<|start_header_id|>")) {
    format.family = ChatFamily::kLlama3;
    if (Has(tmpl, "Cutting Knowledge Date:")) {
      format.variant = ChatVariant::kLlama3DatedSystem;
      format.knowledge_cutoff = KnowledgeCutoff(tmpl);
      format.date = TemplateDate(tmpl);
    }
    return format;
  }
  if (Has(tmpl, "[INST]")) {
    if (Has(tmpl, "<<SYS>>")) {
      format.family = ChatFamily::kLlama2;
      return format;
    }
    return DetectMistral(tmpl, std::move(format));
  }
  if (Has(tmpl, "<|end|>") &&
      (Has(tmpl, "<|user|>") || Has(tmpl, "'<|' + message['role'] + '|>'"))) {
    format.family = ChatFamily::kPhi3;
    const bool knows_roles = Has(tmpl, "<|system|>") || Has(tmpl, "'<|' + message['role'] + '|>'");
    if (!knows_roles) {
      format.variant = ChatVariant::kPhi3Classic;
      return format;
    }
    format.eos_without_generation_prompt = Has(tmpl, "eos_token");
    format.skip_empty_system = Has(tmpl, "message['role'] == 'system' and message['content']");
    return format;
  }
  return absl::FailedPreconditionError("unrecognised chat template");
}

}  // namespace morphserve::engine
