// What ChatTemplate learns from a Jinja chat template: the family, the
// layout variant and the literals it needs. Detection and rendering live in
// separate files; this header joins them.
#ifndef MORPHSERVE_ENGINE_CHAT_CHAT_FORMAT_H_
#define MORPHSERVE_ENGINE_CHAT_CHAT_FORMAT_H_

#include <span>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace morphserve::engine {

struct ChatMessage {
  std::string role;
  std::string content;
};

enum class ChatFamily { kChatMl, kLlama3, kLlama2, kMistral, kPhi3 };

enum class ChatVariant {
  kStandard,
  // Llama 3.1+: a system header with the knowledge cutoff and today's date
  // is always present.
  kLlama3DatedSystem,
  // Mistral v1 without system support: "[INST] u [/INST]a</s>".
  kMistralV1,
  // Mistral v1 with the system prompt in the first turn: " [INST] s\n\nu [/INST] a</s>".
  kMistralV1System,
  // Mistral v3: "[INST] u[/INST] a</s>", system prompt in the last turn.
  kMistralV3,
  // Phi-3 mini/medium: the template knows no system role (it is folded into
  // the first user turn) and writes the assistant header after every user turn.
  kPhi3Classic,
};

struct ChatFormat {
  ChatFamily family = ChatFamily::kChatMl;
  ChatVariant variant = ChatVariant::kStandard;
  std::string bos_text;
  std::string eos_text;
  bool bos_in_text = false;
  // ChatML: the system prompt used when the conversation has none.
  std::string default_system;
  // Llama 3.1+: "Cutting Knowledge Date: ..." line and the date shown.
  std::string knowledge_cutoff;
  std::string date;
  // Phi-3: EOS text after the last turn when no generation prompt is asked
  // for; system turns with empty content are left out.
  bool eos_without_generation_prompt = false;
  bool skip_empty_system = false;
};

// Recognises the family of `template_text`; FailedPrecondition when none.
absl::StatusOr<ChatFormat> DetectChatFormat(std::string_view template_text);

absl::StatusOr<std::string> RenderChat(const ChatFormat& format,
                                       std::span<const ChatMessage> messages,
                                       bool add_generation_prompt);

// Python's str.strip() (and Jinja's trim): removes leading and trailing
// Unicode whitespace.
std::string_view StripPython(std::string_view text);

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_CHAT_CHAT_FORMAT_H_
