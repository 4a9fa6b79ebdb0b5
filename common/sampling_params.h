// How the next token is chosen from the logits, per request.
#ifndef MORPHSERVE_COMMON_SAMPLING_PARAMS_H_
#define MORPHSERVE_COMMON_SAMPLING_PARAMS_H_

#include <cstdint>
#include <optional>

#include "absl/status/status.h"

namespace morphserve {

struct SamplingParams {
  float temperature = 1.0f;  // 0: greedy (argmax, ties to the lower id)
  int32_t top_k = 0;         // 0: off
  float top_p = 1.0f;        // (0, 1]; 1: off
  float min_p = 0.0f;        // [0, 1]; 0: off
  // Penalties as vLLM applies them: repetition over prompt and output
  // (divide positive logits, multiply negative ones); presence and frequency
  // over the output tokens (subtract).
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  std::optional<uint64_t> seed;  // same seed, same output
  int32_t logprobs = 0;          // top-N alternatives to report per token

  // Checks ranges; the message names the offending field.
  absl::Status Validate() const;
  bool greedy() const { return temperature == 0.0f; }
};

inline constexpr int32_t kMaxLogprobs = 20;

}  // namespace morphserve

#endif  // MORPHSERVE_COMMON_SAMPLING_PARAMS_H_
