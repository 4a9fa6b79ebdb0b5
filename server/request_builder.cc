#include "server/request_builder.h"

#include <string>
#include <vector>

#include "common/status.h"
#include "common/strings.h"
#include "engine/chat/chat_template.h"

namespace morphserve::server {
namespace {

absl::StatusOr<std::vector<int32_t>> RenderChat(const engine::Model& model,
                                                const v1::ChatInput& chat) {
  if (model.tokenizer == nullptr) {
    return absl::InvalidArgumentError("chat input needs a model with a tokenizer");
  }
  if (chat.messages().empty()) return absl::InvalidArgumentError("chat.messages is empty");
  auto tmpl = engine::ChatTemplate::FromModel(*model.tokenizer);
  if (!tmpl.ok()) {
    return absl::InvalidArgumentError(
        StrCat("chat input needs a chat template: ", ToStd(tmpl.status().message())));
  }
  std::vector<engine::ChatMessage> messages;
  for (int i = 0; i < chat.messages_size(); ++i) {
    const v1::ChatMessage& m = chat.messages(i);
    if (m.role() != "system" && m.role() != "user" && m.role() != "assistant") {
      return absl::InvalidArgumentError(StrCat("chat.messages[", i, "].role must be system, user "
                                               "or assistant"));
    }
    if (!IsValidUtf8(m.content())) {
      return absl::InvalidArgumentError(StrCat("chat.messages[", i, "].content is not UTF-8"));
    }
    messages.push_back({m.role(), m.content()});
  }
  ASSIGN_OR_RETURN(const std::string text, tmpl->Render(messages, /*add_generation_prompt=*/true));
  return model.tokenizer->Encode(text, /*add_special=*/!tmpl->adds_bos_in_text(),
                                 /*parse_special=*/true);
}

absl::StatusOr<std::vector<int32_t>> EncodeText(const engine::Model& model,
                                                const std::string& text, bool add_special) {
  if (model.tokenizer == nullptr) {
    return absl::InvalidArgumentError("text input needs a model with a tokenizer; send tokens");
  }
  if (!IsValidUtf8(text)) return absl::InvalidArgumentError("text is not valid UTF-8");
  return model.tokenizer->Encode(text, add_special, /*parse_special=*/false);
}

}  // namespace

bool IsValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t n = 0;  // continuation bytes
    uint32_t cp = 0;
    if ((c >> 5) == 0x6) {
      n = 1;
      cp = c & 0x1f;
    } else if ((c >> 4) == 0xe) {
      n = 2;
      cp = c & 0x0f;
    } else if ((c >> 3) == 0x1e) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + n >= s.size()) return false;
    for (size_t k = 1; k <= n; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc >> 6) != 0x2) return false;
      cp = (cp << 6) | (cc & 0x3f);
    }
    // Overlong forms, surrogates and values beyond Unicode.
    if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
        (cp >= 0xd800 && cp <= 0xdfff) || cp > 0x10ffff) {
      return false;
    }
    i += n + 1;
  }
  return true;
}

absl::StatusOr<KvPolicyConfig> KvPolicyFromProto(const v1::KvParams& kv,
                                                 const KvPolicyConfig& defaults) {
  KvPolicyConfig c = defaults;
  if (!kv.policy().empty()) {
    ASSIGN_OR_RETURN(c.kind, ParseKvPolicyKind(kv.policy()));
  }
  if (kv.has_window()) c.window = kv.window();
  if (kv.has_capacity()) c.capacity = kv.capacity();
  if (kv.has_sinks()) c.sinks = kv.sinks();
  if (!kv.fusion().empty()) {
    ASSIGN_OR_RETURN(c.fusion, ParseKvFusion(kv.fusion()));
  }
  if (!kv.aggregation().empty()) {
    ASSIGN_OR_RETURN(c.aggregation, ParseMorphKvAggregation(kv.aggregation()));
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
      return absl::InvalidArgumentError("input is empty: set text or chat");
  }
}

absl::StatusOr<GenerationRequest> BuildGenerationRequest(const v1::GenerateRequest& request,
                                                         const engine::Model& model,
                                                         const ServerDefaults& defaults) {
  GenerationRequest r;
  switch (request.input_case()) {
    case v1::GenerateRequest::kText: {
      if (request.text().empty()) return absl::InvalidArgumentError("text is empty");
      ASSIGN_OR_RETURN(r.prompt, EncodeText(model, request.text(), /*add_special=*/true));
      break;
    }
    case v1::GenerateRequest::kTokens:
      r.prompt.assign(request.tokens().ids().begin(), request.tokens().ids().end());
      if (r.prompt.empty()) return absl::InvalidArgumentError("tokens.ids is empty");
      for (int32_t id : r.prompt) {
        if (id < 0 || id >= model.config.vocab_size) {
          return absl::InvalidArgumentError(StrCat("tokens.ids: ", id, " is not a token id (vocab ",
                                                   model.config.vocab_size, ")"));
        }
      }
      break;
    case v1::GenerateRequest::kChat: {
      ASSIGN_OR_RETURN(r.prompt, RenderChat(model, request.chat()));
      break;
    }
    default:
      return absl::InvalidArgumentError("input is empty: set text, tokens or chat");
  }
  if (r.prompt.empty()) return absl::InvalidArgumentError("the input encodes to no tokens");

  const v1::SamplingParams& s = request.sampling();
  if (s.has_temperature()) r.sampling.temperature = s.temperature();
  if (s.has_top_k()) r.sampling.top_k = s.top_k();
  if (s.has_top_p()) r.sampling.top_p = s.top_p();
  if (s.has_min_p()) r.sampling.min_p = s.min_p();
  if (s.has_repetition_penalty()) r.sampling.repetition_penalty = s.repetition_penalty();
  if (s.has_presence_penalty()) r.sampling.presence_penalty = s.presence_penalty();
  if (s.has_frequency_penalty()) r.sampling.frequency_penalty = s.frequency_penalty();
  if (s.has_seed()) r.sampling.seed = s.seed();
  if (request.top_logprobs() > static_cast<uint32_t>(kMaxLogprobs)) {
    return absl::InvalidArgumentError(StrCat("top_logprobs must be at most ", kMaxLogprobs));
  }
  r.sampling.logprobs = static_cast<int32_t>(request.top_logprobs());
  if (absl::Status st = r.sampling.Validate(); !st.ok()) {
    return absl::InvalidArgumentError(StrCat("sampling.", ToStd(st.message())));
  }

  const v1::StoppingCriteria& stop = request.stopping();
  r.stop.max_new_tokens =
      stop.has_max_new_tokens() ? static_cast<int64_t>(stop.max_new_tokens()) : defaults.max_new_tokens;
  if (r.stop.max_new_tokens < 1 || r.stop.max_new_tokens > defaults.max_new_tokens_limit) {
    return absl::InvalidArgumentError(StrCat("stopping.max_new_tokens must be in [1, ",
                                             defaults.max_new_tokens_limit, "]"));
  }
  r.stop.min_new_tokens = stop.min_new_tokens();
  r.stop.ignore_eos = stop.ignore_eos();
  r.stop.stop_strings.assign(stop.stop().begin(), stop.stop().end());
  r.stop.stop_token_ids.assign(stop.stop_token_ids().begin(), stop.stop_token_ids().end());
  for (const std::string& text : r.stop.stop_strings) {
    if (!IsValidUtf8(text)) return absl::InvalidArgumentError("stopping.stop is not UTF-8");
  }
  if (absl::Status st = r.stop.Validate(); !st.ok()) {
    return absl::InvalidArgumentError(StrCat("stopping.", ToStd(st.message())));
  }
  ASSIGN_OR_RETURN(r.kv, KvPolicyFromProto(request.kv(), defaults.kv));
  r.priority = request.priority();
  return r;
}

}  // namespace morphserve::server
