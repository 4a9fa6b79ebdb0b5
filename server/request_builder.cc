#include "server/request_builder.h"

#include <algorithm>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/str_replace.h"
#include "common/status.h"
#include "common/strings.h"
#include "engine/chat/chat_template.h"
#include "engine/generation/stop_checker.h"
#include "engine/tokenizer/unicode.h"

namespace morphserve::server {
namespace {

// Client request ids go into logs and responses as they are.
constexpr size_t kMaxRequestIdBytes = 256;

// The fields chat input is checked for whatever the model's template.
absl::Status CheckChatMessages(const v1::ChatInput& chat) {
  if (chat.messages().empty()) return absl::InvalidArgumentError("chat.messages: empty");
  for (int i = 0; i < chat.messages_size(); ++i) {
    const v1::ChatMessage& m = chat.messages(i);
    if (m.role() != "system" && m.role() != "user" && m.role() != "assistant") {
      // The role is not echoed: errors are logged.
      return absl::InvalidArgumentError(
          StrCat("chat.messages[", i, "].role: must be system, user or assistant"));
    }
    if (m.content().empty()) {
      return absl::InvalidArgumentError(StrCat("chat.messages[", i, "].content: empty"));
    }
    if (!IsValidUtf8(m.content())) {
      return absl::InvalidArgumentError(StrCat("chat.messages[", i, "].content: not valid UTF-8"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> RenderChat(const engine::Model& model,
                                                const v1::ChatInput& chat) {
  if (model.tokenizer == nullptr) {
    return absl::InvalidArgumentError("chat: the model has no tokenizer; send tokens");
  }
  RETURN_IF_ERROR(CheckChatMessages(chat));
  auto tmpl = engine::ChatTemplate::FromModel(*model.tokenizer);
  if (!tmpl.ok()) {
    return absl::InvalidArgumentError(
        StrCat("chat: the model has no chat template the server knows (",
               ToStd(tmpl.status().message()), "); send text or tokens"));
  }
  std::vector<engine::ChatMessage> messages;
  for (const v1::ChatMessage& m : chat.messages()) messages.push_back({m.role(), m.content()});
  // The template's own rules (e.g. alternating turns) are about the list.
  auto text = tmpl->Render(messages, /*add_generation_prompt=*/true);
  if (!text.ok()) {
    return absl::Status(text.status().code(),
                        StrCat("chat.messages: ", ToStd(text.status().message())));
  }
  return model.tokenizer->Encode(*text, /*add_special=*/!tmpl->adds_bos_in_text(),
                                 /*parse_special=*/true);
}

absl::StatusOr<std::vector<int32_t>> EncodeText(const engine::Model& model, const std::string& text,
                                                bool add_special) {
  if (model.tokenizer == nullptr) {
    return absl::InvalidArgumentError("text: the model has no tokenizer; send tokens");
  }
  if (!IsValidUtf8(text)) return absl::InvalidArgumentError("text: not valid UTF-8");
  return model.tokenizer->Encode(text, add_special, /*parse_special=*/false);
}

absl::Status CheckTokenIds(std::string_view field, const std::vector<int32_t>& ids,
                           int64_t vocab_size) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab_size) {
      return absl::InvalidArgumentError(StrCat(
          field, "[", i, "]: ", ids[i], " is not a token id (vocabulary [0, ", vocab_size, "))"));
    }
  }
  return absl::OkStatus();
}

// The engine's StopConditions checks again, but names no proto field.
absl::Status CheckStopping(const engine::StopConditions& stop, int64_t vocab_size) {
  if (stop.min_new_tokens > stop.max_new_tokens) {
    return absl::InvalidArgumentError(StrCat("stopping.min_new_tokens: ", stop.min_new_tokens,
                                             " is above max_new_tokens (", stop.max_new_tokens,
                                             ")"));
  }
  if (stop.stop_strings.size() > engine::kMaxStopStrings) {
    return absl::InvalidArgumentError(StrCat("stopping.stop: ", stop.stop_strings.size(),
                                             " strings; at most ", engine::kMaxStopStrings));
  }
  for (size_t i = 0; i < stop.stop_strings.size(); ++i) {
    const std::string& s = stop.stop_strings[i];
    if (s.empty()) return absl::InvalidArgumentError(StrCat("stopping.stop[", i, "]: empty"));
    if (s.size() > engine::kMaxStopStringBytes) {
      return absl::InvalidArgumentError(StrCat("stopping.stop[", i, "]: ", s.size(),
                                               " bytes; at most ", engine::kMaxStopStringBytes));
    }
    if (!IsValidUtf8(s)) {
      return absl::InvalidArgumentError(StrCat("stopping.stop[", i, "]: not valid UTF-8"));
    }
  }
  if (stop.stop_token_ids.size() > kMaxStopTokenIds) {
    return absl::InvalidArgumentError(
        StrCat("stopping.stop_token_ids: ", stop.stop_token_ids.size(), " ids; at most ",
               kMaxStopTokenIds));
  }
  return CheckTokenIds("stopping.stop_token_ids", stop.stop_token_ids, vocab_size);
}

// The field a KV parse error is about, in front of the parser's message.
absl::Status KvFieldError(std::string_view field, const absl::Status& status) {
  return absl::Status(status.code(), StrCat(field, ": ", ToStd(status.message())));
}

}  // namespace

bool IsValidUtf8(std::string_view text) { return engine::unicode::IsValidUtf8(text); }

absl::Status CheckRequestId(std::string_view id) {
  if (id.size() > kMaxRequestIdBytes) {
    return absl::InvalidArgumentError(
        StrCat("request_id: longer than ", kMaxRequestIdBytes, " bytes"));
  }
  for (const char c : id) {
    const auto b = static_cast<unsigned char>(c);
    if (b <= 0x20 || b >= 0x7f) {
      return absl::InvalidArgumentError("request_id: only printable ASCII, no spaces");
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<KvPolicyConfig> KvPolicyFromProto(const v1::KvParams& kv,
                                                 const KvPolicyConfig& defaults,
                                                 int64_t context_length) {
  KvPolicyConfig c = defaults;
  if (!kv.policy().empty()) {
    auto kind = ParseKvPolicyKind(kv.policy());
    if (!kind.ok()) return KvFieldError("kv.policy", kind.status());
    c.kind = *kind;
  }
  if (kv.has_window()) c.window = kv.window();
  if (kv.has_capacity()) c.capacity = kv.capacity();
  if (kv.has_sinks()) c.sinks = kv.sinks();
  if (!kv.fusion().empty()) {
    auto fusion = ParseKvFusion(kv.fusion());
    if (!fusion.ok()) return KvFieldError("kv.fusion", fusion.status());
    c.fusion = *fusion;
  }
  if (!kv.aggregation().empty()) {
    auto aggregation = ParseMorphKvAggregation(kv.aggregation());
    if (!aggregation.ok()) return KvFieldError("kv.aggregation", aggregation.status());
    c.aggregation = *aggregation;
  }
  // The checks name the parameters as the CLI's kv_* options; the API's
  // fields are kv.*.
  if (absl::Status st = c.Validate(context_length); !st.ok()) {
    return absl::Status(st.code(), absl::StrReplaceAll(st.message(), {{"kv_", "kv."}}));
  }
  return c;
}

absl::StatusOr<std::vector<int32_t>> TokenizeInput(const engine::Model& model,
                                                   const v1::TokenizeRequest& request) {
  switch (request.input_case()) {
    case v1::TokenizeRequest::kText:
      return EncodeText(model, request.text(), request.add_special_tokens());
    case v1::TokenizeRequest::kChat:
      return RenderChat(model, request.chat());
    default:
      return absl::InvalidArgumentError("input: empty; set text or chat");
  }
}

absl::StatusOr<GenerationRequest> BuildGenerationRequest(const v1::GenerateRequest& request,
                                                         const engine::Model& model,
                                                         const ServerDefaults& defaults) {
  const int64_t vocab_size = model.config.vocab_size;
  const int64_t context_length = model.config.context_length;
  RETURN_IF_ERROR(CheckRequestId(request.request_id()));
  GenerationRequest r;
  std::string_view input;  // the field the prompt came from
  switch (request.input_case()) {
    case v1::GenerateRequest::kText: {
      input = "text";
      if (request.text().empty()) return absl::InvalidArgumentError("text: empty");
      ASSIGN_OR_RETURN(r.prompt, EncodeText(model, request.text(), /*add_special=*/true));
      break;
    }
    case v1::GenerateRequest::kTokens:
      input = "tokens.ids";
      r.prompt.assign(request.tokens().ids().begin(), request.tokens().ids().end());
      if (r.prompt.empty()) return absl::InvalidArgumentError("tokens.ids: empty");
      RETURN_IF_ERROR(CheckTokenIds(input, r.prompt, vocab_size));
      break;
    case v1::GenerateRequest::kChat: {
      input = "chat.messages";
      ASSIGN_OR_RETURN(r.prompt, RenderChat(model, request.chat()));
      break;
    }
    default:
      return absl::InvalidArgumentError("input: empty; set text, tokens or chat");
  }
  const auto prompt = static_cast<int64_t>(r.prompt.size());
  if (prompt == 0) return absl::InvalidArgumentError(StrCat(input, ": encodes to no tokens"));
  if (prompt >= context_length) {
    return absl::OutOfRangeError(StrCat(input, ": the prompt is ", prompt,
                                        " tokens; the context length ", context_length,
                                        " leaves no room to generate"));
  }

  const v1::SamplingParams& s = request.sampling();
  if (s.has_temperature()) r.sampling.temperature = s.temperature();
  if (s.has_top_k()) r.sampling.top_k = s.top_k();
  if (s.has_top_p()) r.sampling.top_p = s.top_p();
  if (s.has_min_p()) r.sampling.min_p = s.min_p();
  if (s.has_repetition_penalty()) r.sampling.repetition_penalty = s.repetition_penalty();
  if (s.has_presence_penalty()) r.sampling.presence_penalty = s.presence_penalty();
  if (s.has_frequency_penalty()) r.sampling.frequency_penalty = s.frequency_penalty();
  if (s.has_seed()) r.sampling.seed = s.seed();
  if (absl::Status st = r.sampling.Validate(); !st.ok()) {
    return absl::InvalidArgumentError(StrCat("sampling.", ToStd(st.message())));
  }
  if (request.top_logprobs() > static_cast<uint32_t>(kMaxLogprobs)) {
    return absl::InvalidArgumentError(
        StrCat("top_logprobs: ", request.top_logprobs(), " is above ", kMaxLogprobs));
  }
  r.sampling.logprobs = static_cast<int32_t>(request.top_logprobs());

  const v1::StoppingCriteria& stop = request.stopping();
  if (stop.has_max_new_tokens()) {
    r.stop.max_new_tokens = stop.max_new_tokens();
    if (r.stop.max_new_tokens < 1 || r.stop.max_new_tokens > defaults.max_new_tokens_limit) {
      return absl::InvalidArgumentError(StrCat("stopping.max_new_tokens: ", r.stop.max_new_tokens,
                                               " is outside [1, ", defaults.max_new_tokens_limit,
                                               "]"));
    }
    if (prompt + r.stop.max_new_tokens > context_length) {
      return absl::OutOfRangeError(StrCat("stopping.max_new_tokens: ", r.stop.max_new_tokens,
                                          " after a prompt of ", prompt,
                                          " tokens exceeds the context length ", context_length));
    }
  } else {
    r.stop.max_new_tokens = std::min(defaults.max_new_tokens, context_length - prompt);
  }
  r.stop.min_new_tokens = stop.min_new_tokens();
  r.stop.ignore_eos = stop.ignore_eos();
  r.stop.stop_strings.assign(stop.stop().begin(), stop.stop().end());
  r.stop.stop_token_ids.assign(stop.stop_token_ids().begin(), stop.stop_token_ids().end());
  RETURN_IF_ERROR(CheckStopping(r.stop, vocab_size));

  ASSIGN_OR_RETURN(r.kv, KvPolicyFromProto(request.kv(), defaults.kv, context_length));
  r.priority = request.priority();
  return r;
}

}  // namespace morphserve::server
