// Native renderers, one per family, each producing exactly what the
// family's Jinja template produces for plain system/user/assistant turns.
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "common/strings.h"
#include "engine/chat/chat_format.h"

namespace morphserve::engine {
namespace {

using Messages = std::span<const ChatMessage>;

bool IsPythonSpace(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// Decodes the UTF-8 character starting at text[pos] and sets *len; a byte
// that does not start a well-formed character reads as U+FFFD, length 1.
uint32_t CodePointAt(std::string_view text, size_t pos, size_t* len) {
  constexpr uint32_t kInvalid = 0xFFFD;
  const auto b = [&](size_t i) { return static_cast<uint8_t>(text[i]); };
  const uint8_t lead = b(pos);
  *len = 1;
  if (lead < 0x80) return lead;
  if (lead < 0xC2 || lead > 0xF4) return kInvalid;
  const size_t n = lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
  if (pos + n > text.size()) return kInvalid;
  uint32_t cp = lead & (0x7F >> n);
  for (size_t i = 1; i < n; ++i) {
    if ((b(pos + i) & 0xC0) != 0x80) return kInvalid;
    cp = (cp << 6) | (b(pos + i) & 0x3F);
  }
  *len = n;
  return cp;
}

absl::Status CheckRoles(Messages messages) {
  if (messages.empty()) return absl::InvalidArgumentError("no messages to render");
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& role = messages[i].role;
    if (role != "system" && role != "user" && role != "assistant") {
      return absl::InvalidArgumentError(morphserve::StrCat(
          "message ", i, " has role '", role, "'; expected system, user or assistant"));
    }
  }
  return absl::OkStatus();
}

// Splits off a leading system message and checks that the rest alternates
// user/assistant starting with user, as the [INST] templates require.
absl::StatusOr<Messages> AlternatingTurns(Messages messages, const ChatMessage** system) {
  *system = nullptr;
  if (messages.front().role == "system") {
    *system = &messages.front();
    messages = messages.subspan(1);
  }
  for (size_t i = 0; i < messages.size(); ++i) {
    const char* expected = i % 2 == 0 ? "user" : "assistant";
    if (messages[i].role != expected) {
      return absl::InvalidArgumentError(morphserve::StrCat(
          "this chat template needs an optional leading system message and then alternating "
          "user/assistant messages starting with user; turn ",
          i, " is '", messages[i].role, "'"));
    }
  }
  return messages;
}

std::string RenderChatMl(const ChatFormat& f, Messages messages, bool add_generation_prompt) {
  std::string out;
  if (!f.default_system.empty() && messages.front().role != "system") {
    out += "<|im_start|>system\n" + f.default_system + "<|im_end|>\n";
  }
  for (const ChatMessage& m : messages) {
    out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
  }
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

std::string Llama3Turn(std::string_view role, std::string_view content) {
  return morphserve::StrCat("<|start_header_id|>", role, "<|end_header_id|>\n\n",
                            StripPython(content), "<|eot_id|>");
}

std::string RenderLlama3(const ChatFormat& f, Messages messages, bool add_generation_prompt) {
  std::string out = f.bos_in_text ? f.bos_text : "";
  if (f.variant == ChatVariant::kLlama3DatedSystem) {
    std::string_view system;
    if (messages.front().role == "system") {
      system = StripPython(messages.front().content);
      messages = messages.subspan(1);
    }
    out += morphserve::StrCat("<|start_header_id|>system<|end_header_id|>\n\n", f.knowledge_cutoff,
                              "\nToday Date: ", f.date, "\n\n", system, "<|eot_id|>");
  }
  for (const ChatMessage& m : messages) out += Llama3Turn(m.role, m.content);
  if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

absl::StatusOr<std::string> RenderLlama2(const ChatFormat& f, Messages messages) {
  const ChatMessage* system = nullptr;
  auto turns = AlternatingTurns(messages, &system);
  if (!turns.ok()) return turns.status();
  std::string out;
  for (size_t i = 0; i < turns->size(); ++i) {
    const ChatMessage& m = (*turns)[i];
    std::string content = m.content;
    if (i == 0 && system != nullptr) {
      content = "<<SYS>>\n" + system->content + "\n<</SYS>>\n\n" + content;
    }
    if (m.role == "user") {
      out += morphserve::StrCat(f.bos_in_text ? f.bos_text : "", "[INST] ", StripPython(content),
                                " [/INST]");
    } else {
      out += morphserve::StrCat(" ", StripPython(content), " ", f.eos_text);
    }
  }
  return out;
}

absl::StatusOr<std::string> RenderMistral(const ChatFormat& f, Messages messages) {
  const ChatMessage* system = nullptr;
  auto turns = AlternatingTurns(messages, &system);
  if (!turns.ok()) return turns.status();
  if (system != nullptr && f.variant == ChatVariant::kMistralV1) {
    return absl::InvalidArgumentError(
        "this model's chat template does not accept a system message");
  }
  std::string out = f.bos_in_text ? f.bos_text : "";
  for (size_t i = 0; i < turns->size(); ++i) {
    const ChatMessage& m = (*turns)[i];
    const bool assistant = m.role == "assistant";
    switch (f.variant) {
      case ChatVariant::kMistralV1System:
        if (assistant) {
          out += " " + m.content + f.eos_text;
        } else if (i == 0 && system != nullptr) {
          out += " [INST] " + system->content + "\n\n" + m.content + " [/INST]";
        } else {
          out += " [INST] " + m.content + " [/INST]";
        }
        break;
      case ChatVariant::kMistralV3:
        if (assistant) {
          out += morphserve::StrCat(" ", StripPython(m.content), f.eos_text);
        } else if (i + 1 == turns->size() && system != nullptr) {
          out += "[INST] " + system->content + "\n\n" + m.content + "[/INST]";
        } else {
          out += "[INST] " + m.content + "[/INST]";
        }
        break;
      default:  // kMistralV1
        out += assistant ? m.content + f.eos_text : "[INST] " + m.content + " [/INST]";
        break;
    }
  }
  return out;
}

std::string RenderPhi3(const ChatFormat& f, Messages messages, bool add_generation_prompt) {
  std::string out = f.bos_in_text ? f.bos_text : "";
  if (f.variant == ChatVariant::kPhi3Classic) {
    // The template has no system role; like llama.cpp, the system prompt is
    // put in front of the first user turn.
    std::string pending_system;
    for (const ChatMessage& m : messages) {
      if (m.role == "system") {
        pending_system = m.content;
      } else if (m.role == "user") {
        const std::string content =
            pending_system.empty() ? m.content : pending_system + "\n" + m.content;
        pending_system.clear();
        out += "<|user|>\n" + content + "<|end|>\n<|assistant|>\n";
      } else {
        out += m.content + "<|end|>\n";
      }
    }
    return out;
  }
  for (const ChatMessage& m : messages) {
    if (f.skip_empty_system && m.role == "system" && m.content.empty()) continue;
    out += "<|" + m.role + "|>\n" + m.content + "<|end|>\n";
  }
  if (add_generation_prompt) {
    out += "<|assistant|>\n";
  } else if (f.eos_without_generation_prompt) {
    out += f.eos_text;
  }
  return out;
}

}  // namespace

std::string_view StripPython(std::string_view text) {
  size_t len = 0;
  while (!text.empty() && IsPythonSpace(CodePointAt(text, 0, &len))) text.remove_prefix(len);
  while (!text.empty()) {
    size_t start = text.size() - 1;
    while (start > 0 && (static_cast<uint8_t>(text[start]) & 0xC0) == 0x80) --start;
    if (!IsPythonSpace(CodePointAt(text, start, &len)) || start + len != text.size()) break;
    text.remove_suffix(text.size() - start);
  }
  return text;
}

absl::StatusOr<std::string> RenderChat(const ChatFormat& format, Messages messages,
                                       bool add_generation_prompt) {
  if (absl::Status status = CheckRoles(messages); !status.ok()) return status;
  switch (format.family) {
    case ChatFamily::kChatMl:
      return RenderChatMl(format, messages, add_generation_prompt);
    case ChatFamily::kLlama3:
      return RenderLlama3(format, messages, add_generation_prompt);
    case ChatFamily::kLlama2:
      return RenderLlama2(format, messages);
    case ChatFamily::kMistral:
      return RenderMistral(format, messages);
    case ChatFamily::kPhi3:
      return RenderPhi3(format, messages, add_generation_prompt);
  }
  return absl::InternalError("unknown chat family");
}

}  // namespace morphserve::engine
