#include "server/cli/generation_options.h"

#include "common/status.h"
#include "engine/chat/chat_template.h"

namespace morphserve::cli {

void AddGenerationFlags(ArgParser& p, GenerationFlags* f) {
  p.AddInt("max-tokens", &f->max_tokens, "most tokens to generate");
  p.AddInt("min-tokens", &f->min_tokens, "tokens to generate before EOS or stops count");
  p.AddFlag("ignore-eos", &f->ignore_eos, "keep generating after end-of-sequence tokens");
  p.AddList("stop", &f->stop, "stop string (repeatable); not included in the output");
  p.AddFloat("temperature", &f->temperature, "sampling temperature; 0 is greedy");
  p.AddInt("top-k", &f->top_k, "keep the k most likely tokens; 0 is off");
  p.AddFloat("top-p", &f->top_p, "nucleus sampling mass in (0, 1]");
  p.AddFloat("min-p", &f->min_p, "drop tokens below min-p times the top probability");
  p.AddFloat("repetition-penalty", &f->repetition_penalty, "penalty for prompt and output tokens");
  p.AddFloat("presence-penalty", &f->presence_penalty, "subtracted once from seen output tokens");
  p.AddFloat("frequency-penalty", &f->frequency_penalty, "subtracted per occurrence in output");
  p.AddInt("seed", &f->seed, "random seed (-1: random); same seed, same output");
  p.AddInt("logprobs", &f->logprobs,
           "with --json: the top-N alternatives of each token (`logprobs`) and the chosen "
           "token's log-probability (`token_logprobs`)");
}

absl::StatusOr<std::vector<int32_t>> EncodePrompt(const engine::Tokenizer& tokenizer,
                                                  const std::string& text, bool chat,
                                                  const std::string& system) {
  if (!chat) return tokenizer.Encode(text, /*add_special=*/true, /*parse_special=*/false);
  ASSIGN_OR_RETURN(const engine::ChatTemplate tmpl, engine::ChatTemplate::FromModel(tokenizer));
  std::vector<engine::ChatMessage> messages;
  if (!system.empty()) messages.push_back({"system", system});
  messages.push_back({"user", text});
  ASSIGN_OR_RETURN(const std::string rendered,
                   tmpl.Render(messages, /*add_generation_prompt=*/true));
  return tokenizer.Encode(rendered, /*add_special=*/!tmpl.adds_bos_in_text(),
                          /*parse_special=*/true);
}

absl::Status GenerationParams(const GenerationFlags& f, SamplingParams* sampling,
                              engine::StopConditions* stop) {
  sampling->temperature = f.temperature;
  sampling->top_k = static_cast<int32_t>(f.top_k);
  sampling->top_p = f.top_p;
  sampling->min_p = f.min_p;
  sampling->repetition_penalty = f.repetition_penalty;
  sampling->presence_penalty = f.presence_penalty;
  sampling->frequency_penalty = f.frequency_penalty;
  if (f.seed >= 0) sampling->seed = static_cast<uint64_t>(f.seed);
  sampling->logprobs = static_cast<int32_t>(f.logprobs);
  RETURN_IF_ERROR(sampling->Validate());
  stop->max_new_tokens = f.max_tokens;
  stop->min_new_tokens = f.min_tokens;
  stop->ignore_eos = f.ignore_eos;
  stop->stop_strings = f.stop;
  return stop->Validate();
}

}  // namespace morphserve::cli
