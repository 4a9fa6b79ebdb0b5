// Chat prompt formatting for the supported model families, recognised from
// the model's own Jinja chat template (Tokenizer::chat_template()) and
// rendered natively, byte for byte as the template would.
//
// Supported families: ChatML (SmolLM2, Qwen2/2.5, with the default system
// prompt the template carries), Llama 3 / 3.1+, Llama 2 ([INST] with
// <<SYS>>), Mistral ([INST], v1 and v3 layouts) and Phi-3.
//
// The rendered text contains the special tokens as text: encode it with
// Tokenizer::Encode(text, /*add_special=*/!adds_bos_in_text(),
// /*parse_special=*/true) so BOS is neither missing nor doubled.
#ifndef MORPHSERVE_ENGINE_CHAT_CHAT_TEMPLATE_H_
#define MORPHSERVE_ENGINE_CHAT_CHAT_TEMPLATE_H_

#include <span>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "engine/chat/chat_format.h"
#include "engine/tokenizer/tokenizer.h"

namespace morphserve::engine {

class ChatTemplate {
 public:
  // FailedPrecondition "model has no chat template" or "unrecognised chat
  // template" when no family matches.
  static absl::StatusOr<ChatTemplate> FromModel(const Tokenizer& tokenizer);
  // Same from a template string and the BOS/EOS token texts it refers to.
  static absl::StatusOr<ChatTemplate> FromTemplate(std::string_view template_text,
                                                   std::string bos_text, std::string eos_text);

  // The prompt for `messages` (roles "system", "user", "assistant"),
  // followed by the assistant header when `add_generation_prompt` and the
  // family has one. InvalidArgument for unknown roles, no messages, or an
  // order the family's template rejects (Llama 2 and Mistral: an optional
  // leading system message, then user/assistant alternating from user).
  absl::StatusOr<std::string> Render(std::span<const ChatMessage> messages,
                                     bool add_generation_prompt) const;

  // Whether the rendered text already starts with the BOS token's text.
  bool adds_bos_in_text() const { return format_.bos_in_text; }
  // "chatml", "llama3", "llama2", "mistral" or "phi3".
  std::string_view family_name() const;

 private:
  explicit ChatTemplate(ChatFormat format) : format_(std::move(format)) {}

  ChatFormat format_;
};

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_CHAT_CHAT_TEMPLATE_H_
