// The sampling and stopping flags shared by the commands that generate
// (generate, batch, and later serve's defaults).
#ifndef MORPHSERVE_SERVER_CLI_GENERATION_OPTIONS_H_
#define MORPHSERVE_SERVER_CLI_GENERATION_OPTIONS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/sampling_params.h"
#include "engine/generation/stop_checker.h"
#include "engine/tokenizer/tokenizer.h"
#include "server/cli/arg_parser.h"

namespace morphserve::cli {

struct GenerationFlags {
  int64_t max_tokens = 256;
  int64_t min_tokens = 0;
  bool ignore_eos = false;
  std::vector<std::string> stop;
  float temperature = 0.0f;
  int64_t top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int64_t seed = -1;
  int64_t logprobs = 0;
};

void AddGenerationFlags(ArgParser& parser, GenerationFlags* flags);

// `text` as prompt tokens: raw (BOS added as the model asks), or as one user
// message (after `system`, when not empty) in the model's chat template.
absl::StatusOr<std::vector<int32_t>> EncodePrompt(const engine::Tokenizer& tokenizer,
                                                  const std::string& text, bool chat,
                                                  const std::string& system = "");

// Converts and validates; the message names the offending field.
absl::Status GenerationParams(const GenerationFlags& flags, SamplingParams* sampling,
                              engine::StopConditions* stop);

}  // namespace morphserve::cli

#endif  // MORPHSERVE_SERVER_CLI_GENERATION_OPTIONS_H_
