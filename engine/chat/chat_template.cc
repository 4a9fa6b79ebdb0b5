#include "engine/chat/chat_template.h"

#include <utility>

namespace morphserve::engine {

absl::StatusOr<ChatTemplate> ChatTemplate::FromModel(const Tokenizer& tokenizer) {
  return FromTemplate(tokenizer.chat_template(),
                      std::string(tokenizer.TokenText(tokenizer.bos_id())),
                      std::string(tokenizer.TokenText(tokenizer.eos_id())));
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromTemplate(std::string_view template_text,
                                                        std::string bos_text,
                                                        std::string eos_text) {
  absl::StatusOr<ChatFormat> format = DetectChatFormat(template_text);
  if (!format.ok()) return format.status();
  format->bos_text = std::move(bos_text);
  format->eos_text = std::move(eos_text);
  // Without a BOS token there is nothing to put in the text.
  if (format->bos_text.empty()) format->bos_in_text = false;
  return ChatTemplate(*std::move(format));
}

absl::StatusOr<std::string> ChatTemplate::Render(std::span<const ChatMessage> messages,
                                                 bool add_generation_prompt) const {
  return RenderChat(format_, messages, add_generation_prompt);
}

std::string_view ChatTemplate::family_name() const {
  switch (format_.family) {
    case ChatFamily::kChatMl:
      return "chatml";
    case ChatFamily::kLlama3:
      return "llama3";
    case ChatFamily::kLlama2:
      return "llama2";
    case ChatFamily::kMistral:
      return "mistral";
    case ChatFamily::kPhi3:
      return "phi3";
  }
  return "unknown";
}

}  // namespace morphserve::engine
